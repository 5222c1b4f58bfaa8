"""Per-layer sparsity allocation: ``uniform``, ``global`` (one magnitude threshold) and ``erk``.

Data in, data out: shapes or scores go in, the number of zeros per layer comes out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

DISTRIBUTIONS = ("uniform", "global", "erk")


def round_half_up(value: float) -> int:
    """``round(value)`` with halves rounded up, so the count does not depend on banker's rounding."""
    return int(math.floor(value + 0.5 + 1e-9))


def erk_sparsities(
    shapes: Mapping[str, Sequence[int]], sparsity: float, kernel: bool = True, power_scale: float = 1.0
) -> dict[str, float]:
    """Erdős–Rényi-Kernel sparsity per layer (Evci et al. 2020, after google-research/rigl ``sparse_utils``).

    Layer density is ``eps * (sum(shape) / prod(shape)) ** power_scale`` (for Linear ``(n_in + n_out) / (n_in *
    n_out)``), with ``eps`` solved so the total number of non-zeros is ``(1 - sparsity) * N``. Layers whose density
    would exceed 1 are made dense and ``eps`` is solved again over the rest. ``kernel=False`` is plain Erdős–Rényi
    (ER, Mocanu et al. 2018): only the output and input dimensions count, ``(n_out + n_in) / (n_out * n_in)``.
    ``power_scale`` is the reference's ``erk_power_scale`` (1: ERK; 0: uniform; in between: milder).
    """
    if sparsity == 0.0:
        return {name: 0.0 for name in shapes}
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    dims = {name: tuple(shape) if kernel or len(shape) < 2 else tuple(shape[:2]) for name, shape in shapes.items()}
    raw = {name: (sum(d) / math.prod(d)) ** power_scale for name, d in dims.items()}
    total = sum(sizes.values())
    dense: set[str] = set()
    while True:
        sparse = [name for name in shapes if name not in dense]
        if not sparse:
            raise ValueError(
                f"ERK cannot reach `sparsity`={sparsity}: every layer would have to be dense ({list(shapes)})"
            )
        budget = (1.0 - sparsity) * total - sum(sizes[name] for name in dense)
        eps = budget / sum(raw[name] * sizes[name] for name in sparse)
        too_dense = {name for name in sparse if eps * raw[name] > 1.0 + 1e-12}
        if not too_dense:
            break
        dense |= too_dense
    return {name: 0.0 if name in dense else 1.0 - eps * raw[name] for name in shapes}


def global_zero_counts(scores: Mapping[str, Tensor], sparsity: float, keep: int = 1) -> dict[str, int]:
    """Zeros per layer under one threshold across all layers: the ``round(sparsity * N)`` lowest scores.

    Ties are broken by layer order, then by index within the layer (stable sort), so the result is exact. The
    ``keep`` highest scores of every layer are never pruned (as tfmot keeps one weight per layer), so no layer is
    zeroed whole; the total stays ``round(sparsity * N)`` (taken from other layers), at most ``N - keep · layers``.
    """
    names = list(scores)
    flats = []
    for name in names:
        flat = scores[name].reshape(-1).float().clone()
        if keep:
            flat[torch.topk(flat, min(keep, flat.numel())).indices] = math.inf
        flats.append(flat)
    flat = torch.cat(flats)
    layer_of = torch.cat(
        [torch.full((scores[name].numel(),), i, dtype=torch.int32, device=flat.device) for i, name in enumerate(names)]
    )
    protected = sum(min(keep, scores[name].numel()) for name in names)
    n_zeros = min(round_half_up(sparsity * flat.numel()), flat.numel() - protected)
    pruned = layer_of[torch.sort(flat, stable=True).indices[:n_zeros]]
    counts = torch.bincount(pruned.long(), minlength=len(names)).tolist()
    return dict(zip(names, counts))


def zero_counts(
    distribution: str,
    scores: Mapping[str, Tensor],
    sparsity: float | Mapping[str, float],
    keep: int = 1,
    power_scale: float = 1.0,
) -> dict[str, int]:
    """Number of weights to prune in each layer so that the model is at ``sparsity`` under ``distribution``.

    ``distribution`` may also be ``er`` (Erdős–Rényi without kernel dimensions); ``power_scale`` is ERK's/ER's
    exponent (see :func:`erk_sparsities`). A mapping ``{name: sparsity}`` sets every layer's own target and
    ``distribution`` is not used. Every layer keeps
    at least ``keep`` weights (default 1, as tfmot): ``round(0.96 · 10)`` would zero a 2×5 layer whole, which silently
    cuts the network; ``keep=0`` allows it.
    """
    def capped(name: str, count: int) -> int:
        return max(min(count, scores[name].numel() - keep), 0)

    if isinstance(sparsity, Mapping):
        return {name: capped(name, round_half_up(sparsity[name] * scores[name].numel())) for name in scores}
    if distribution == "global":
        return global_zero_counts(scores, sparsity, keep)
    if distribution == "uniform":
        per_layer = {name: sparsity for name in scores}
    elif distribution in ("erk", "er"):
        shapes = {name: tuple(s.shape) for name, s in scores.items()}
        per_layer = erk_sparsities(shapes, sparsity, kernel=distribution == "erk", power_scale=power_scale)
    else:
        raise ValueError(f"`distribution` must be one of {DISTRIBUTIONS} (or 'er'), got {distribution!r}")
    return {name: capped(name, round_half_up(per_layer[name] * scores[name].numel())) for name in scores}
