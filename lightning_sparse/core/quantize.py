"""Weight quantizers as plain tensor math: uniform grids (per channel or per tensor) and k-means codebooks.

Every quantizer maps 0 to exactly 0 (the symmetric grid is centred on 0, the asymmetric one has an integer
zero point, k-means leaves zeros out of the codebook), so pruned weights stay pruned through quantization.
The same function gives the same bits on every call, which is what makes export and resume exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

GRANULARITIES = ("per_channel", "per_tensor")
METHODS = ("uniform", "kmeans")


def check_bits(name: str, value: object) -> None:
    """``bits`` style arguments: an int in 2..8."""
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise ValueError(f"`{name}` must be an int in 2..8, got {value!r}")


def _reduce_dims(weight: Tensor, granularity: str) -> tuple[int, ...]:
    if granularity == "per_tensor" or weight.dim() < 2:
        return tuple(range(weight.dim()))
    return tuple(range(1, weight.dim()))  # one scale per output channel (dim 0)


def _amin_amax(weight: Tensor, granularity: str) -> tuple[Tensor, Tensor]:
    dims = _reduce_dims(weight, granularity)
    if not dims:  # 0-d tensor
        return weight, weight
    return weight.amin(dim=dims, keepdim=True), weight.amax(dim=dims, keepdim=True)


def uniform_quantize(weight: Tensor, bits: int, granularity: str = "per_channel", symmetric: bool = True) -> Tensor:
    """Round ``weight`` onto a uniform grid of ``2**bits`` levels (symmetric: ``2**bits - 1``, centred on 0).

    Symmetric: ``scale = max|w| / (2**(bits-1) - 1)``, ``q = clamp(round(w / scale)) * scale``. Asymmetric: the
    range ``[min(w, 0), max(w, 0)]`` in ``2**bits - 1`` steps with an integer zero point, so 0 is on the grid.
    """
    w = weight.detach()
    low, high = _amin_amax(w, granularity)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.maximum(low.abs(), high.abs()) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
    levels = 2**bits - 1
    low, high = torch.clamp(low, max=0), torch.clamp(high, min=0)
    scale = (high - low) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-low / scale), 0, levels)
    return (torch.clamp(torch.round(w / scale) + zero_point, 0, levels) - zero_point) * scale


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
