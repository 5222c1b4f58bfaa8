"""Weight quantizers as plain tensor math: uniform grids (per channel or per tensor) and k-means codebooks.

Every quantizer maps 0 to exactly 0 (the symmetric grid is centred on 0, the asymmetric one has an integer
zero point, k-means leaves zeros out of the codebook), so pruned weights stay pruned through quantization.
The same function gives the same bits on every call, which is what makes export and resume exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sparse.core.allocation import round_half_up
from lightning_sparse.core.criteria import exact_mask

SCALES = ("per_channel", "per_tensor")
GRANULARITIES = SCALES  # the old name of SCALES
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
    ``(in, out)``); 0-d and 1-d tensors use one scale.
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

    Args:
        params: ``{name: parameter}`` to quantize.
        bits: bits per parameter (2..8).
        method: ``uniform`` or ``kmeans``.
        scale: ``per_channel`` or ``per_tensor`` (uniform only).
        symmetric: symmetric grid centred on 0, or asymmetric with a zero point.
        sparsity: CLIP-Q's fraction of zeros per parameter (missing names: none).
        frequency: optimizer steps between k-means re-fits.
        axes: the output-channel axis of each parameter for per-channel scales (default 0; 1 for GPT-2's ``Conv1D``).
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
    ) -> None:
        self.params = dict(params)
        self.axes = {name: axis for name, axis in (axes or {}).items() if axis}
        self.bits = {name: bits[name] for name in self.params}
        self.method, self.scale, self.symmetric = method, scale, symmetric
        self.sparsity = dict(sparsity or {})
        self.frequency = frequency
        self.codebooks: dict[str, Tensor] = {}
        self.latent: dict[str, Tensor] = {}
        self.quantized = False
        self.codebook_step = -1

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
            param.copy_(self.quantize_layer(name, latent, refit))
        if refit:
            self.codebook_step = step
        self.quantized = True

    @torch.no_grad()
    def restore(self) -> None:
        """Write the latent weights back into the parameters (the optimizer then steps w, not q(w))."""
        if self.quantized:
            for name, param in self.params.items():
                param.copy_(self.latent[name])
            self.quantized = False

    def quantize_layer(self, name: str, latent: Tensor, refit: bool = False) -> Tensor:
        """q(w) of one layer: CLIP-Q pruning (if any), then the uniform grid or the layer's codebook."""
        fraction = self.sparsity.get(name, 0.0)
        weight = zero_smallest(latent, fraction) if fraction else latent
        bits = self.bits[name]
        if self.method == "uniform":
            return uniform_quantize(weight, bits, self.scale, self.symmetric, self.axes.get(name, 0))
        if refit or name not in self.codebooks:
            self.codebooks[name] = fit_codebook(weight, bits, self.codebooks.get(name))
        return codebook_quantize(weight, self.codebooks[name])

    def errors(self) -> dict[str, float]:
        """Relative quantization error ``||q(w) - w|| / ||w||`` per layer (while the parameters hold q(w))."""
        result = {}
        for name, param in self.params.items():
            latent = self.latent[name]
            norm = float(latent.norm())
            result[name] = float((param.detach() - latent).norm()) / norm if norm else 0.0
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
        """Codebooks, the last re-fit step and, while the parameters hold q(w), the latent weights (on CPU)."""
        state: dict[str, Any] = {"codebook_step": self.codebook_step}
        state["codebooks"] = {name: codebook.cpu().clone() for name, codebook in self.codebooks.items()}
        if self.quantized:  # the parameters (and so a checkpoint's state dict) hold q(w); resuming needs w
            state["latent"] = {name: latent.cpu().clone() for name, latent in self.latent.items()}
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
        self.latent = {n: t.to(device=self.params[n].device, dtype=self.params[n].dtype) for n, t in latent.items()}
        self.quantized = bool(latent)
