"""One-shot pruning criteria from calibration inputs: Wanda, SparseGPT and OWL's per-block sparsities.

Data in, data out: a layer's weight as ``(outputs, inputs)`` and statistics of its inputs go in, a mask (``True``
keeps a weight) and, for SparseGPT, the updated weight come out. How the statistics are gathered (hooks, blocks
pruned in sequence) is :mod:`lightning_sparse.core.calibration`.

- **Wanda** (Sun et al. 2023, arXiv 2306.11695; ``locuslab/wanda`` ``lib/prune.py``): score
  ``S_ij = |W_ij| · ‖X_j‖₂`` with ``‖X_j‖₂²`` summed over the calibration tokens; the lowest scores of each output row
  are pruned (or, for N:M, the ``M - N`` lowest of each group of M inputs). No weight is changed.
- **SparseGPT** (Frantar & Alistarh 2023, arXiv 2301.00774; ``IST-DASLab/sparsegpt`` ``sparsegpt.py``
  ``fasterprune``): ``H = 2XᵀX/n``; dead inputs (``H_jj = 0``) get ``H_jj = 1`` and ``W_:j = 0``; damping
  ``δ · mean(diag H)``; ``U`` = upper Cholesky factor of ``H⁻¹``; columns in blocks of ``block_size``: the mask of a
  block ranks ``w² / U_jj²`` and each pruned column's error ``(w - q) / U_jj`` is pushed onto the block's later
  columns (``W_:,j: -= err · U_j,j:``) and then onto the remaining columns, so the kept weights compensate.
- **OWL** (Yin et al. 2024, arXiv 2310.05175, ``luuyin/OWL`` ``prune_wanda_outlier``): per block the outlier ratio
  ``D_l`` = share of its Wanda scores above ``M ×`` their mean; densities ``(D_l - min D) / (max D - min D) · 2λ``
  shifted to average ``1 - s``; the sparsities ``1 - density`` span ``2λ`` and average ``s``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sparse.core.allocation import round_half_up
from lightning_sparse.core.masks import MaskSet
from lightning_sparse.core.structured import Granularity


def _check_nm(name: str, columns: int, m: int) -> None:
    if columns % m:
        raise ValueError(
            f"N:M pruning of {name!r} needs M={m} to divide its {columns} inputs; use another M or prune this layer "
            f"'unstructured' (a per-layer `granularity` mapping) or leave it out (`exclude`)"
        )


def wanda_scores(weight: Tensor, squared_norms: Tensor) -> Tensor:
    """``|W_ij| · ‖X_j‖₂``: ``weight`` is ``(outputs, inputs)``, ``squared_norms`` the ``(inputs,)`` sums (or means)
    of each input's squares over the calibration tokens (a constant factor does not change any ranking)."""
    return weight.detach().float().abs() * squared_norms.float().sqrt().reshape(1, -1)


def wanda_mask(weight: Tensor, squared_norms: Tensor, sparsity: float, n: int = 0, m: int = 0, name: str = "layer") -> Tensor:
    """Wanda's mask (``True`` keeps): per output row the ``round(sparsity · inputs)`` lowest scores are pruned (ties:
    lower input index first, as the reference's stable sort); with ``n, m`` (N:M, N kept of every M inputs) the
    ``M - N`` lowest of each group."""
    scores = wanda_scores(weight, squared_norms)
    rows, columns = scores.shape
    mask = torch.ones_like(scores, dtype=torch.bool)
    if m:
        _check_nm(name, columns, m)
        groups = scores.reshape(rows, columns // m, m)
        lowest = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]
        return mask.reshape(rows, columns // m, m).scatter_(-1, lowest, False).reshape(rows, columns)
    count = round_half_up(sparsity * columns)
    if count:
        mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :count], False)
    return mask


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    dampening: float = 0.01,
    name: str = "layer",
) -> tuple[Tensor, Tensor]:
    """SparseGPT's ``fasterprune`` on ``weight`` ``(outputs, inputs)`` with ``hessian`` = ``2XᵀX/n`` ``(inputs,
    inputs)``: returns ``(updated weight, mask)``, the weight in ``weight``'s dtype with pruned entries exactly 0.

    Unstructured: each block of ``block_size`` columns prunes exactly ``round(sparsity · outputs · block columns)``
    weights, the lowest ``w² / U_jj²`` of the block (the reference takes every entry ``<=`` the value at that index,
    one more). N:M (``n`` kept of every ``m`` inputs, ``m`` dividing ``block_size`` and the inputs): the ``m - n``
    lowest of each group, chosen when the sweep reaches the group, from the already updated weights.
    Raises ``ValueError`` naming ``name`` when ``H`` is not positive definite after damping.
    """
    columns = weight.shape[1]
    if m:
        _check_nm(name, columns, m)
        if block_size % m:
            raise ValueError(f"`block_size`={block_size} must be a multiple of M={m} for N:M pruning")
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = dampening * torch.mean(torch.diag(H))
    diagonal = torch.arange(columns, device=W.device)
    H[diagonal, diagonal] += damp
    L, info = torch.linalg.cholesky_ex(H)
    # a pivot at rounding level is a singular H that fp32 happened to factor: its inverse would be noise
    tiny = torch.finfo(torch.float32).eps * columns * torch.diag(H).abs().max()
    if int(info) != 0 or not torch.isfinite(L).all() or bool((torch.diag(L) ** 2 <= tiny).any()):
        raise ValueError(
            f"SparseGPT cannot prune {name!r}: the Hessian of its calibration inputs (2XᵀX/n) is not positive definite "
            f"after damping {dampening} × its mean diagonal (linearly dependent or non-finite inputs). Raise "
            f"`dampening`, give more `calibration_batches`, or prune it with method='wanda'"
        )
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    if not torch.isfinite(Hinv).all():
        raise ValueError(
            f"SparseGPT cannot prune {name!r}: the inverse of the Hessian of its calibration inputs is not finite (the "
            f"Hessian is not positive definite after damping {dampening} × its mean diagonal, or the inputs hold NaN "
            f"or infinite values); raise `dampening` or check the calibration data"
        )
    mask = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if not m:
            scores = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            count = round_half_up(sparsity * scores.numel())
            if count:
                keep1.view(-1)[torch.sort(scores.reshape(-1), stable=True).indices[:count]] = False
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if m and i % m == 0:
                group = W1[:, i : i + m] ** 2 / torch.diag(Hinv1)[i : i + m].reshape(1, -1) ** 2
                keep1[:, i : i + m].scatter_(1, torch.sort(group, dim=1, stable=True).indices[:, : m - n], False)
            q = w.clone()
            q[~keep1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = keep1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    W.masked_fill_(~mask, 0)  # +0.0 where pruned (Q holds q = 0 there already; this clears -0.0)
    return W.to(weight.dtype), mask


def outlier_ratio(scores: Sequence[Tensor], threshold: float = 5.0) -> float:
    """OWL's ``D``: the share of the scores (one block's Wanda scores, all its layers together) above ``threshold ×``
    their mean (the reference's ``check_outlier_mean``, as a fraction instead of a percentage)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return int((flat > flat.mean() * threshold).sum()) / flat.numel()


def owl_sparsities(
    ratios: Sequence[float], sparsity: float, spread: float = 0.08, sizes: Sequence[int] | None = None
) -> list[float]:
    """OWL's per-block sparsities from the outlier ratios ``D_l`` (Yin et al. 2024, the reference's
    ``prune_wanda_outlier``): ``r_l = (D_l - min D) / (max D - min D) · 2λ``, densities ``r_l - mean(r) + (1 - s)``,
    sparsity ``1 - density``: blocks with more outliers are pruned less; the sparsities span ``2λ`` and average ``s``.

    ``sizes`` (weights per block) weight the mean, so that blocks of different sizes still total sparsity ``s``
    (equal sizes, as a transformer's decoder layers: the paper's plain mean). All ratios equal: uniform ``s``.
    """
    D = torch.tensor(list(ratios), dtype=torch.float64)
    weights = torch.tensor(list(sizes) if sizes is not None else [1] * len(D), dtype=torch.float64)
    spread_of_d = D.max() - D.min()
    if len(D) < 2 or spread_of_d == 0:
        return [float(sparsity)] * len(D)
    r = (D - D.min()) / spread_of_d * (2 * spread)
    density = r - (r * weights).sum() / weights.sum() + (1 - sparsity)
    return [float(1 - d) for d in density]


def layer_sparsities(blocks: Mapping[str, Sequence[str]], block_sparsity: Mapping[str, float]) -> dict[str, float]:
    """``{layer: sparsity}`` from one sparsity per block (every layer of a block takes its block's)."""
    return {layer: block_sparsity[block] for block, layers in blocks.items() for layer in layers}


# ----------------------------------------------------------------------------- the whole model, block after block
METHODS = ("sparsegpt", "wanda", "magnitude", "zeros")
ONE_SHOT_DISTRIBUTIONS = ("uniform", "owl")


def owl_layer_sparsities(
    weights: Callable[[str], Tensor],
    layers: Mapping[str, Any],
    order: Any,
    batches: Sequence[Any],
    run: Callable[[Any], Any],
    sparsity: float,
    threshold: float = 5.0,
    spread: float = 0.08,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """OWL's sparsity for every layer: Wanda scores of the *dense* model (one forward per batch, every layer hooked,
    as the reference's first pass), one outlier ratio per block, :func:`owl_sparsities` over the blocks.
    ``weights(name)`` gives a layer's whole weight."""
    from lightning_sparse.core.calibration import collect

    stats = collect(layers, "norms", batches, run, None, reduce)
    ratios, sizes = [], []
    for names in order.blocks.values():
        scores = [wanda_scores(layers[n].as_rows(weights(n)), stats[n].squared_norms) for n in names]
        ratios.append(outlier_ratio(scores, threshold))
        sizes.append(sum(s.numel() for s in scores))
    per_block = owl_sparsities(ratios, sparsity, spread, sizes)
    return layer_sparsities(order.blocks, dict(zip(order.blocks, per_block)))


@torch.no_grad()
def prune_one_shot(
    model: torch.nn.Module,
    masks: MaskSet,
    batches: Sequence[Any],
    run: Callable[[Any], Any],
    method: str = "sparsegpt",
    sparsity: float | Mapping[str, float] = 0.5,
    granularity: Mapping[str, Granularity] | None = None,
    distribution: str = "uniform",
    aliases: Mapping[str, Sequence[str]] | None = None,
    blocks: str | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    owl_threshold: float = 5.0,
    owl_spread: float = 0.08,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Prune every parameter of ``masks`` in one shot from the calibration ``batches`` (``run(batch)`` runs the
    model's forward on one) and return the sparsity each layer was given.

    ``method``: ``sparsegpt`` (masks and weight updates), ``wanda`` or ``magnitude`` (masks only); ``zeros`` keeps the
    zeros the weights hold. ``sparsity``: one value, or ``{parameter: sparsity}``. ``granularity``: per parameter,
    ``unstructured`` or N:M (N:M fixes its layers' sparsity at ``1 - N/M``). ``distribution="owl"`` replaces one
    ``sparsity`` by OWL's per-block values. ``blocks``: a glob of the module names that are the model's repeated
    blocks (default: found, :func:`~lightning_sparse.core.calibration.find_blocks`). ``reduce`` sums a statistic
    over processes (DDP), so that every process reaches the same masks. Call in ``eval`` mode for a model with dropout
    (:func:`~lightning_sparse.core.calibration.evaluation_mode`).
    """
    from lightning_sparse.core.calibration import calibrate_sequentially, find_layers, ordered_blocks
    from lightning_sparse.core.pruning import prune_by_magnitude
    from lightning_sparse.core.shards import local_part, local_tensor

    granularity = dict(granularity or {})
    names = list(masks)
    if method == "zeros":
        for name in names:
            masks.set(name, masks.weight(name) != 0)
        return {name: masks.sparsity(name) for name in names}
    nm = {name: (g.n, g.m) for name, g in granularity.items() if g.kind == "nm"}

    def target(name: str) -> float:
        if name in nm:
            return 1.0 - nm[name][0] / nm[name][1]
        return float(sparsity[name] if isinstance(sparsity, Mapping) else sparsity)

    per_layer = {name: target(name) for name in names}
    if method == "magnitude" and distribution == "uniform":
        prune_by_magnitude(masks, per_layer, "uniform", granularity)
        return per_layer
    if not batches:
        raise ValueError("one-shot pruning by calibration needs at least one calibration batch")
    layers = find_layers(model, names, aliases)
    order = ordered_blocks(model, layers, run, batches[0], blocks)
    if distribution == "owl":
        if isinstance(sparsity, Mapping):
            raise ValueError("`distribution`='owl' chooses the per-layer sparsities itself; give one `sparsity`, not a mapping")
        owl = owl_layer_sparsities(masks.weight, layers, order, batches, run, sparsity, owl_threshold, owl_spread, reduce)
        per_layer = {name: (target(name) if name in nm else owl[name]) for name in names}
    if method == "magnitude":
        prune_by_magnitude(masks, per_layer, "uniform", granularity)
        return per_layer

    def prune_block(block: str, stats: Mapping[str, Any]) -> None:
        for name in order.blocks[block]:
            layer = layers[name]
            weight = layer.as_rows(masks.weight(name))
            n, m = nm.get(name, (0, 0))
            if method == "wanda":
                mask = wanda_mask(weight, stats[name].squared_norms, per_layer[name], n, m, name)
            else:
                updated, mask = sparsegpt_prune(weight, stats[name].hessian, per_layer[name], n, m, block_size, dampening, name)
                param = masks.params[name]
                local_tensor(param).copy_(local_part(layer.as_rows(updated).to(param.device), param))
            masks.set(name, layer.as_rows(mask).contiguous())

    kind = "norms" if method == "wanda" else "hessian"
    calibrate_sequentially(order, layers, kind, batches, run, prune_block, reduce)
    return per_layer
