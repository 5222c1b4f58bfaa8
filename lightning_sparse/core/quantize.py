"""Weight quantizers as plain tensor math: uniform grids (per channel or per tensor) and k-means codebooks.

Every quantizer maps 0 to exactly 0 (the symmetric grid is centred on 0, the asymmetric one has an integer
zero point, k-means leaves zeros out of the codebook), so pruned weights stay pruned through quantization.
The same function gives the same bits on every call, which is what makes export and resume exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sparse.core.allocation import round_half_up
from lightning_sparse.core.criteria import exact_mask

GRANULARITIES = ("per_channel", "per_tensor")
METHODS = ("uniform", "kmeans")


def check_bits(name: str, value: object, low: int = 2) -> None:
    """``bits`` style arguments: an int in ``low``..8."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 8:
        raise ValueError(f"`{name}` must be an int in {low}..8, got {value!r}")


def uniform_quantize(weight: Tensor, bits: int, granularity: str = "per_channel", symmetric: bool = True, axis: int = 0) -> Tensor:
    """Round ``weight`` onto a uniform grid through PyTorch's fused fake-quantize kernels.

    Symmetric: ``2**bits - 1`` levels centred on 0 with ``scale = max|w| / (2**(bits-1) - 1)``. Asymmetric: the
    range ``[min(w, 0), max(w, 0)]`` in ``2**bits`` levels with an integer zero point, so 0 is on the grid.
    Per channel means one scale per output channel (along ``axis``: 0, or 1 for GPT-2's ``Conv1D`` weight stored
    ``(in, out)``); 0-d and 1-d tensors use one scale.
    """
    if axis and granularity == "per_channel" and weight.dim() >= 2:
        moved = uniform_quantize(weight.detach().movedim(axis, 0).contiguous(), bits, granularity, symmetric)
        return moved.movedim(0, axis).contiguous()
    w = weight.detach()
    x = w.float()
    per_channel = granularity == "per_channel" and x.dim() >= 2
    dims = tuple(range(1, x.dim())) if per_channel else tuple(range(x.dim()))
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        high = x.abs().amax(dim=dims) if dims else x.abs()
        scale = high / qmax
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        qmin, qmax = 0, 2**bits - 1
        low, high = torch.aminmax(x.reshape(x.shape[0], -1), dim=1) if per_channel else torch.aminmax(x)
        low, high = low.clamp(max=0), high.clamp(min=0)
        scale = (high - low) / qmax
        zero_point = torch.clamp(torch.round(-low / torch.where(scale > 0, scale, 1.0)), qmin, qmax).to(torch.int32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if per_channel:
        q = torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, qmin, qmax)
    else:
        q = torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()), qmin, qmax)
    return q.to(w.dtype)


def zero_smallest(weight: Tensor, fraction: float) -> Tensor:
    """A copy of ``weight`` with its ``round(fraction · N)`` smallest magnitudes set to +0.0 (CLIP-Q's pruning,
    applied to the quantized copy only, so the full-precision weights keep every connection)."""
    keep = exact_mask(weight.detach().abs(), round_half_up(fraction * weight.numel()))
    return weight.detach().masked_fill(~keep, 0)


def nearest_codes(values: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook entry for every value (``codebook`` sorted ascending; ties go to the lower)."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(values, midpoints, right=False)


def kmeans_1d(values: Tensor, k: int, init: Tensor | None = None, iterations: int = 30) -> Tensor:
    """Sorted 1-D k-means centroids of ``values`` (Lloyd's algorithm), from ``init`` or linearly spaced.

    Linear initialisation over ``[min, max]`` is what Deep Compression (Han et al. 2016) found best; a warm start
    from the previous codebook makes re-fitting during training cost a few iterations. Empty clusters keep
    their centroid. Stops early when no centroid moves.
    """
    flat = values.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(k, dtype=values.dtype, device=values.device)
    if init is None:
        centroids = torch.linspace(0, 1, k, dtype=flat.dtype, device=flat.device) * (flat.max() - flat.min()) + flat.min()
    else:
        centroids = init.to(device=flat.device, dtype=flat.dtype).sort().values
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


def codebook_quantize(weight: Tensor, codebook: Tensor) -> Tensor:
    """Replace every non-zero weight by its nearest codebook entry; zeros stay exactly zero."""
    w = weight.detach()
    snapped = codebook[nearest_codes(w, codebook)]
    return torch.where(w == 0, torch.zeros_like(w), snapped)


def fit_codebook(weight: Tensor, bits: int, init: Tensor | None = None, iterations: int = 30) -> Tensor:
    """k-means codebook of ``2**bits`` values for the non-zero weights of one layer."""
    w = weight.detach().reshape(-1)
    return kmeans_1d(w[w != 0], 2**bits, init, iterations)
