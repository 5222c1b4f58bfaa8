"""Weight quantizers as plain tensor math: uniform grids (per channel or per tensor) and k-means codebooks.

Every quantizer maps 0 to exactly 0 (the symmetric grid is centred on 0, the asymmetric one has an integer
zero point, k-means leaves zeros out of the codebook), so pruned weights stay pruned through quantization.
The same function gives the same bits on every call, which is what makes export and resume exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sparse.core.allocation import round_half_up
from lightning_sparse.core.criteria import exact_mask
from lightning_sparse.core.layouts import Layout
from lightning_sparse.core.masks import non_finite
from lightning_sparse.core.shards import full_tensor, is_sharded, local_part, local_tensor, sharded_like

SCALES = ("per_channel", "per_tensor")
METHODS = ("uniform", "kmeans")


def check_bits(name: str, value: object, low: int = 2) -> None:
    """``bits`` style arguments: an int in ``low``..8."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 8:
        raise ValueError(f"`{name}` must be an int in {low}..8, got {value!r}")


def uniform_quantize(weight: Tensor, bits: int, scale: str = "per_channel", symmetric: bool = True, axis: int = 0) -> Tensor:
    """Round ``weight`` onto a uniform grid through PyTorch's fused fake-quantize kernels.

    Symmetric: ``2**bits - 1`` levels centred on 0 with ``scale = max|w| / (2**(bits-1) - 1)``. Asymmetric: the
    range ``[min(w, 0), max(w, 0)]`` in ``2**bits`` levels with an integer zero point, so 0 is on the grid.
    Per channel means one scale per output channel (along ``axis``: 0, or 1 for GPT-2's ``Conv1D`` weight stored
    ``(in, out)`` and a ``ConvTranspose`` weight stored ``(in, out/groups, k…)``; a grouped ``ConvTranspose`` is
    quantized by :class:`FakeQuantizer` through its layout's rows, one per real channel); 0-d and 1-d tensors use one
    scale.
    """
    if axis and scale == "per_channel" and weight.dim() >= 2:
        moved = uniform_quantize(weight.detach().movedim(axis, 0).contiguous(), bits, scale, symmetric)
        return moved.movedim(0, axis).contiguous()
    w = weight.detach()
    x = w.float()
    per_channel = scale == "per_channel" and x.dim() >= 2
    dims = tuple(range(1, x.dim())) if per_channel else tuple(range(x.dim()))
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        high = x.abs().amax(dim=dims) if dims else x.abs()
        step = high / qmax
        zero_point = torch.zeros_like(step, dtype=torch.int32)
    else:
        qmin, qmax = 0, 2**bits - 1
        low, high = torch.aminmax(x.reshape(x.shape[0], -1), dim=1) if per_channel else torch.aminmax(x)
        low, high = low.clamp(max=0), high.clamp(min=0)
        step = (high - low) / qmax
        zero_point = torch.clamp(torch.round(-low / torch.where(step > 0, step, 1.0)), qmin, qmax).to(torch.int32)
    step = torch.where(step > 0, step, torch.ones_like(step))
    if per_channel:  # one grid step per output channel: broadcast along the other dimensions
        step = step.reshape(-1, *([1] * (x.dim() - 1)))
        zero_point = zero_point.reshape(step.shape)
    return fake_quantize(x, step, zero_point, qmin, qmax).to(w.dtype)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x · (1/scale)) + zero_point, qmin, qmax) - zero_point) · scale`` (``scale`` and ``zero_point``
    broadcast against ``x``; rounding half to even).

    The arithmetic of PyTorch's ``fake_quantize_per_{tensor,channel}_affine`` kernels, step for step (the reciprocal
    of the scale in fp32, ``nearbyint``), so the bits are theirs, written as plain tensor ops: on a CPU those kernels
    took 0.29 ms for a 512 × 128 weight against 0.02 ms here, which was 85% of QAT's cost per training step.
    """
    inverse = torch.reciprocal(scale)
    codes = torch.round(x * inverse).add_(zero_point).clamp_(qmin, qmax)
    return codes.sub_(zero_point).mul_(scale)


def zero_smallest(weight: Tensor, fraction: float) -> Tensor:
    """A copy of ``weight`` with its ``round(fraction · N)`` smallest magnitudes set to +0.0 (CLIP-Q's pruning,
    applied to the quantized copy only, so the full-precision weights keep every connection)."""
    keep = exact_mask(weight.detach().abs(), round_half_up(fraction * weight.numel()))
    return weight.detach().masked_fill(~keep, 0)


def interval_means_quantize(weight: Tensor, levels: int) -> Tensor:
    """CLIP-Q's quantizer (Tung & Mori 2018): the range ``[min, max]`` of the non-zero weights is split into
    ``levels`` equal intervals and each non-zero weight replaced by the mean of the non-zero weights in its
    interval; zeros stay +0.0. With ``levels = 2**bits - 1`` the layer holds at most ``2**bits`` values counting
    zero, and no surviving weight becomes zero (an interval mean of exactly 0, from a run balanced around 0, is
    replaced by the mean magnitude of that interval).
    """
    w = weight.detach()
    nonzero = w != 0
    values = w[nonzero].float()
    if values.numel() == 0:
        return w.clone()
    low, high = values.min(), values.max()
    width = (high - low) / levels
    index = ((values - low) / torch.where(width > 0, width, 1.0)).floor().clamp_(0, levels - 1).long()
    counts = torch.zeros(levels, device=w.device).index_add_(0, index, torch.ones_like(values)).clamp_(min=1)
    means = torch.zeros(levels, device=w.device).index_add_(0, index, values) / counts
    magnitudes = torch.zeros(levels, device=w.device).index_add_(0, index, values.abs()) / counts
    means = torch.where(means == 0, magnitudes, means)
    return torch.zeros_like(w).masked_scatter_(nonzero, means[index].to(w.dtype))


def nearest_codes(values: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook entry for every value (``codebook`` sorted ascending; ties go to the lower)."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(values, midpoints, right=False)


def _prefix_sums(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    zero = x.new_zeros(1)
    return (torch.cat([zero, torch.cumsum(w, 0)]), torch.cat([zero, torch.cumsum(w * x, 0)]),
            torch.cat([zero, torch.cumsum(w * x * x, 0)]))  # fmt: skip


def _optimal_bounds(x: Tensor, w: Tensor, k: int) -> Tensor:
    """Cluster boundaries ``b_0 = 0 < b_1 < ... < b_k = n`` minimising the weighted within-cluster sum of squares
    of the sorted distinct values ``x`` (weights ``w``), by dynamic programming (Wang & Song 2011, Ckmeans.1d.dp).

    ``D[m][i]`` (best cost of ``x[0..i]`` in ``m`` clusters) ``= min_j D[m-1][j-1] + cost(j, i)`` with the cost of a
    run from prefix sums. The best ``j`` is non-decreasing in ``i`` (and in ``m``), so each row ``m`` is solved by
    divide and conquer over ``i``, one vectorised pass per recursion level: O(k · n · log n) work, O(k · n) memory.
    """
    n, device = x.numel(), x.device
    W, S1, S2 = _prefix_sums(x, w)
    prev = (S2[1:] - S1[1:] ** 2 / W[1:]).clamp_(min=0)  # D[1]
    prev_opt = torch.zeros(n, dtype=torch.int64, device=device)
    opts = []
    for m in range(2, k + 1):
        first, last = m - 1, n - 1 - (k - m)  # rows that leave room for the other clusters
        shifted = torch.cat([x.new_full((1,), math.inf), prev]) - S2  # D[m-1][j-1] - S2[j]
        cur = torch.full((n,), math.inf, dtype=x.dtype, device=device)
        opt = torch.zeros(n, dtype=torch.int64, device=device)
        row_lo = torch.tensor([last if m == k else first], device=device)  # the last row only needs i = n - 1
        row_hi, col_lo, col_hi = (torch.tensor([v], device=device) for v in (last, first, last))
        while row_lo.numel():
            mid = (row_lo + row_hi) // 2
            lo = torch.maximum(col_lo, prev_opt[mid])
            lengths = torch.minimum(col_hi, mid) - lo + 1
            segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
            j = torch.arange(segment.numel(), device=device) + (lo - (torch.cumsum(lengths, 0) - lengths))[segment]
            s = S1[mid + 1][segment] - S1[j]
            value = shifted[j] - s * s / (W[mid + 1][segment] - W[j])
            best = torch.full((lengths.numel(),), math.inf, dtype=x.dtype, device=device)
            best.scatter_reduce_(0, segment, value, "amin")
            arg = torch.full((lengths.numel(),), n, dtype=torch.int64, device=device)
            arg.scatter_reduce_(0, segment, torch.where(value <= best[segment], j, n), "amin")  # leftmost best j
            cur[mid], opt[mid] = best + S2[mid + 1], arg
            left, right = row_lo < mid, mid < row_hi
            row_lo, row_hi, col_lo, col_hi = (
                torch.cat([row_lo[left], (mid + 1)[right]]), torch.cat([(mid - 1)[left], row_hi[right]]),
                torch.cat([col_lo[left], arg[right]]), torch.cat([arg[left], col_hi[right]]),
            )  # fmt: skip
        opts.append(opt.to(device='cpu', dtype=torch.int32))  # k · n int32 for the backtrack
        prev, prev_opt = cur, opt
    bounds, i = [n], n - 1
    for opt in reversed(opts):
        cut = int(opt[i])
        bounds.append(cut)
        i = cut - 1
    bounds.append(0)
    return torch.tensor(bounds[::-1], device=device)


def _centroids(x: Tensor, w: Tensor, bounds: Tensor) -> Tensor:
    W, S1, _ = _prefix_sums(x, w)
    return (S1[bounds[1:]] - S1[bounds[:-1]]) / (W[bounds[1:]] - W[bounds[:-1]])


def distortion(values: Tensor, codebook: Tensor) -> float:
    """Sum of squared distances of ``values`` to their nearest codebook entry (k-means' objective), in float64."""
    flat = values.detach().reshape(-1).double()
    book = codebook.detach().to(flat).sort().values
    return float(((flat - book[nearest_codes(flat, book)]) ** 2).sum())


def lloyd_1d(values: Tensor, init: Tensor, iterations: int = 30) -> Tensor:
    """Lloyd's iteration from ``init`` (sorted result): a local refinement only; empty clusters keep their centroid.

    This was :func:`kmeans_1d` before it became exact (from linear seeds over ``[min, max]`` it lands 1.75-10×
    above the optimum on weight distributions); it remains for comparisons (``benchmarks/kmeans.py``).
    """
    flat = values.detach().reshape(-1)
    centroids = init.to(device=flat.device, dtype=flat.dtype).sort().values
    k = centroids.numel()
    ones = torch.ones_like(flat)
    for _ in range(iterations):
        codes = nearest_codes(flat, centroids)
        sums = torch.zeros(k, dtype=flat.dtype, device=flat.device).index_add_(0, codes, flat)
        counts = torch.zeros(k, dtype=flat.dtype, device=flat.device).index_add_(0, codes, ones)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids).sort().values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids


def kmeans_1d(values: Tensor, k: int, init: Tensor | None = None) -> Tensor:
    """Optimal 1-D k-means codebook of ``values``: sorted, distinct, at most ``k`` entries, no empty cluster.

    The exact optimum by dynamic programming over the sorted distinct values weighted by their counts (Wang & Song
    2011, "Ckmeans.1d.dp"; see :func:`_optimal_bounds`). With fewer than ``k`` distinct values the codebook is those
    values (shorter than ``k``, zero distortion). Cost: O(k · n · log n) for n distinct values, about 2 s for
    266k values at k = 16 and 25 s at k = 256 on one CPU core (``benchmarks/kmeans.py``); QAT re-fits every
    ``frequency`` steps, L-C once per C step.

    Warm start: an exact method needs none, so ``init`` (the previous codebook) only decides ties: when it is no
    worse than the new codebook (same distortion within rounding, e.g. the weights did not change), ``init`` is
    returned as it is, so codes do not flip between equally good codebooks from one re-fit to the next.
    Raises ``ValueError`` on NaN or infinite values (there is no meaningful codebook for them).
    """
    flat = values.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(1, dtype=values.dtype, device=values.device)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"k-means got {int((~torch.isfinite(flat)).sum())} NaN/infinite values of {flat.numel()}")
    distinct, counts = torch.unique(flat.double(), return_counts=True)
    if distinct.numel() <= k:
        return distinct.to(values.dtype)
    weights = counts.double()
    offset = distinct.mean()  # centred prefix sums lose less to cancellation
    x = distinct - offset
    threads = torch.get_num_threads()
    if x.device.type == "cpu":
        torch.set_num_threads(1)  # thousands of small ops: with intra-op threads on a busy CPU they run 10-20x slower
    try:
        codebook = _centroids(x, weights, _optimal_bounds(x, weights, k)) + offset
    finally:
        torch.set_num_threads(threads)
    codebook = torch.unique(codebook.to(values.dtype))  # float64 centroids that round to one value merge
    if init is not None and init.numel():
        previous = torch.unique(init.detach().to(device=flat.device, dtype=values.dtype))
        if previous.numel() <= k and distortion(flat, previous) <= distortion(flat, codebook) * (1 + 1e-9):
            return previous
    return codebook


def codebook_quantize(weight: Tensor, codebook: Tensor) -> Tensor:
    """Replace every non-zero weight by its nearest codebook entry; zeros stay exactly zero."""
    w = weight.detach()
    snapped = codebook[nearest_codes(w, codebook)]
    return torch.where(w == 0, torch.zeros_like(w), snapped)


def fit_codebook(weight: Tensor, bits: int, init: Tensor | None = None, reserve_zero: bool = False) -> Tensor:
    """Optimal k-means codebook for the non-zero weights of one layer: at most ``2**bits`` values, or ``2**bits - 1``
    with ``reserve_zero`` (a pruned layer, whose zeros take the last of the ``2**bits`` codes)."""
    w = weight.detach().reshape(-1)
    return kmeans_1d(w[w != 0], 2**bits - (1 if reserve_zero else 0), init)


class FakeQuantizer:
    """Quantization-aware training's state for a set of parameters: the latent weights, codebooks and timing.

    The straight-through estimator without hooks or parametrizations: while :attr:`quantized`, the parameters hold
    q(w) and the full-precision latent weights w live here, so forward, backward, validation and checkpoints all
    see what will be deployed. Verbs, in the order a training step calls them:

    - :meth:`quantize` (before forward, and again after the optimizer step): keep w (with the pruning ``masks``
      applied to it, so q(0) = 0 keeps pruned weights pruned) and write q(w) into the parameters; k-means
      codebooks are re-fitted when ``frequency`` steps have passed since the last fit.
    - :meth:`restore` (after backward, before the optimizer step): write w back, so the gradient taken at q(w)
      updates w (the STE, Bengio et al. 2013).

    q(w) of one layer is CLIP-Q's pruning of its ``sparsity[name]`` smallest latent weights (Tung & Mori 2018;
    in q(w) only, so they can come back), then the uniform grid or the layer's codebook.

    Sharded parameters (FSDP2 ``DTensor``): the latent weights are sharded like their parameter; q(w) is computed on
    the whole latent tensor (gathered: the per-tensor scale, codebook and CLIP-Q count are the unsharded ones) and
    each rank writes its shard, except per-channel uniform grids over whole rows (``Shard(0)``), which each rank
    computes on its own rows without a gather.

    Args:
        params: ``{name: parameter}`` to quantize.
        bits: bits per parameter (2..8).
        method: ``uniform`` or ``kmeans``.
        scale: ``per_channel`` or ``per_tensor`` (uniform only).
        symmetric: symmetric grid centred on 0, or asymmetric with a zero point.
        sparsity: CLIP-Q's fraction of zeros per parameter (missing names: none).
        frequency: optimizer steps between k-means re-fits.
        axes: the output-channel axis of each parameter for per-channel scales (default 0; 1 for GPT-2's ``Conv1D``
            and a ``ConvTranspose``: :class:`~lightning_sparse.core.targets.Targets` ``output_axis``).
        layouts: each parameter's :class:`~lightning_sparse.core.layouts.Layout` (``Targets.layouts``); where one
            slice of the output axis holds several output units (a grouped ``ConvTranspose``, a MoE experts weight:
            one row per expert), per-channel scales are taken over its real units.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        bits: Mapping[str, int],
        method: str = "uniform",
        scale: str = "per_channel",
        symmetric: bool = True,
        sparsity: Mapping[str, float] | None = None,
        frequency: int = 100,
        axes: Mapping[str, int | None] | None = None,
        layouts: Mapping[str, Layout | None] | None = None,
    ) -> None:
        self.params = dict(params)
        self.axes = {name: axis for name, axis in (axes or {}).items() if axis}
        self.blocked = {
            name: layout for name, layout in (layouts or {}).items()
            if layout is not None and (layout.blocks > 1 or layout.experts is not None)
        }  # fmt: skip
        self.bits = {name: bits[name] for name in self.params}
        self.method, self.scale, self.symmetric = method, scale, symmetric
        self.sparsity = dict(sparsity or {})
        self.frequency = frequency
        self.codebooks: dict[str, Tensor] = {}
        self.latent: dict[str, Tensor] = {}
        self.quantized = False
        self.codebook_step = -1
        self._pruned: set[str] = set()  # parameters another callback's masks prune (their zeros take a code)

    @torch.no_grad()
    def quantize(self, step: int, masks: Sequence[Any] = ()) -> None:
        """Keep the latent weights (zeroed where any of ``masks`` prunes them) and put q(w) in the parameters."""
        refit = self.method == "kmeans" and (not self.codebooks or step - self.codebook_step >= self.frequency)
        for name, param in self.params.items():
            latent = self.latent.get(name)
            if latent is None:
                latent = self.latent[name] = torch.empty_like(param)
            latent.copy_(param)
            for mask_set in masks:
                mask_set.mask_tensor_(name, latent)
        bad = non_finite(self.latent)  # one fused check: a NaN weight must not become a code (it was -7.0)
        if bad:
            raise FloatingPointError(
                f"QuantizationAwareTraining: NaN or infinite latent weights in {bad} at optimizer step {step}; they "
                f"cannot be quantized (lower the learning rate, clip gradients with `gradient_clip_val`, or find the "
                f"first one with `Trainer(detect_anomaly=True)`)"
            )
        self._pruned = {name for mask_set in masks for name in self.params if name in mask_set.params}
        for name, param in self.params.items():
            if self._rows_are_local(name):  # per-row grids of whole rows: each shard quantized as unsharded, no gather
                local_tensor(param).copy_(self.quantize_layer(name, local_tensor(self.latent[name]), refit))
            else:  # a sharded layer is quantized whole (its scale, codebook or CLIP-Q count), then cut to the shard
                local_tensor(param).copy_(local_part(self.quantize_layer(name, full_tensor(self.latent[name]), refit), param))
        if refit:
            self.codebook_step = step
        self.quantized = True

    def _rows_are_local(self, name: str) -> bool:
        """True when ``name`` is sharded by whole rows (FSDP2's ``Shard(0)``) and q(w) is a per-row uniform grid
        (per channel along axis 0, no CLIP-Q), so each rank's rows quantize on their own to the same bits."""
        param: Any = self.params[name]  # a DTensor when sharded
        return (
            is_sharded(param) and all(p.is_shard(0) for p in param.placements) and param.dim() >= 2
            and local_tensor(param).numel() > 0 and self.method == "uniform" and self.scale == "per_channel"
            and not self.sparsity.get(name, 0.0) and not self.axes.get(name, 0)
        )  # fmt: skip

    def rebind(self, params: Mapping[str, Tensor]) -> None:
        """Point the quantizer at new tensors for the same parameters (``fully_shard`` replaces every parameter by a
        ``DTensor``); latent weights kept while quantized are moved to the new sharding."""
        self.latent = {name: sharded_like(full_tensor(t), params[name]) for name, t in self.latent.items()}
        self.params = {name: params[name] for name in self.params}

    @torch.no_grad()
    def restore(self) -> None:
        """Write the latent weights back into the parameters (the optimizer then steps w, not q(w))."""
        if self.quantized:
            for name, param in self.params.items():
                param.copy_(self.latent[name])
            self.quantized = False

    def quantize_layer(self, name: str, latent: Tensor, refit: bool = False) -> Tensor:
        """q(w) of one layer: CLIP-Q pruning (if any), then the uniform grid or the layer's codebook.

        With CLIP-Q pruning the layer has exactly ``round(sparsity · N)`` zeros and at most ``2**bits`` values: the
        survivors go to ``2**bits - 1`` non-zero levels, interval means (``uniform``, per layer as in Tung & Mori)
        or k-means codes (``kmeans``). A k-means layer that holds zeros (pruned by CLIP-Q or another callback) gets
        ``2**bits - 1`` codes plus the zero.
        """
        fraction = self.sparsity.get(name, 0.0)
        weight = zero_smallest(latent, fraction) if fraction else latent
        bits = self.bits[name]
        if self.method == "uniform":
            if fraction:
                return interval_means_quantize(weight, 2**bits - 1)
            layout = self.blocked.get(name)
            if layout is not None and self.scale == "per_channel":  # one scale per real output unit
                return layout.from_units(uniform_quantize(layout.units(weight), bits, self.scale, self.symmetric), weight.shape)
            return uniform_quantize(weight, bits, self.scale, self.symmetric, self.axes.get(name, 0))
        if refit or name not in self.codebooks:
            pruned = bool(fraction) or name in self._pruned or bool((weight == 0).any())
            self.codebooks[name] = fit_codebook(weight, bits, self.codebooks.get(name), reserve_zero=pruned)
        return codebook_quantize(weight, self.codebooks[name])

    def errors(self) -> dict[str, float]:
        """Relative quantization error ``||q(w) - w|| / ||w||`` per layer (while the parameters hold q(w))."""
        result = {}
        for name, param in self.params.items():
            latent = full_tensor(self.latent[name])  # whole tensors: the same numbers sharded or not (a gather)
            norm = float(latent.norm())
            result[name] = float((full_tensor(param.detach()) - latent).norm()) / norm if norm else 0.0
        return result

    def metrics(self, prefix: str = "qat") -> dict[str, float]:
        """``{prefix}/bits/<name>``, ``{prefix}/error/<name>`` and the size-weighted ``{prefix}/error/global``."""
        errors = self.errors()
        metrics = {f"{prefix}/bits/{name}": float(bits) for name, bits in self.bits.items()}
        metrics.update({f"{prefix}/error/{name}": error for name, error in errors.items()})
        sizes = {name: self.params[name].numel() for name in errors}
        metrics[f"{prefix}/error/global"] = sum(errors[n] * sizes[n] for n in errors) / max(sum(sizes.values()), 1)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Codebooks, the last re-fit step and, while the parameters hold q(w), the whole latent weights (on CPU,
        gathered if sharded)."""
        state: dict[str, Any] = {"codebook_step": self.codebook_step}
        state["codebooks"] = {name: codebook.cpu().clone() for name, codebook in self.codebooks.items()}
        if self.quantized:  # the parameters (and so a checkpoint's state dict) hold q(w); resuming needs w
            state["latent"] = {name: full_tensor(latent).cpu().clone() for name, latent in self.latent.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; every latent tensor is checked against its parameter before any is loaded."""
        latent = state.get("latent", {})
        for name, tensor in latent.items():
            if name not in self.params or tuple(tensor.shape) != tuple(self.params[name].shape):
                expected = tuple(self.params[name].shape) if name in self.params else "not quantized here"
                raise ValueError(
                    f"Checkpoint latent weights for {name!r} have shape {tuple(tensor.shape)} but the model's "
                    f"parameter is {expected} (quantized here: {list(self.params)})"
                )
        self.codebook_step = state.get("codebook_step", -1)
        self.codebooks = {n: c.to(self.params[n].device) for n, c in state.get("codebooks", {}).items()}
        self.latent = {
            n: sharded_like(t.to(device=self.params[n].device, dtype=self.params[n].dtype), self.params[n])
            for n, t in latent.items()
        }  # whole in the checkpoint, sharded like the parameter here
        self.quantized = bool(latent)
