"""Learning-Compression (Carreira-Perpiñán 2017, arXiv 1707.01209): C steps, the penalty gradient, multipliers, μ.

The L-C algorithm alternates an L step, ``min_w loss(w) + μ/2 ||w - Δ(Θ) - λ/μ||²`` (ordinary training with an
extra gradient ``μ(w - Δ(Θ)) - λ``), and a C step, ``Θ = Π(w - λ/μ)``: the best compressed weights for the
current ones, in closed form here. Then ``λ ← λ - μ(w - Δ(Θ))`` and μ grows geometrically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_sparse.core.allocation import zero_counts
from lightning_sparse.core.criteria import exact_mask
from lightning_sparse.core.quantize import kmeans_1d, nearest_codes

COMPRESSIONS = ("prune", "quantize", "prune+quantize")
CODEBOOKS = ("kmeans", "binary", "ternary")


def mu_at(k: int, mu_init: float, multiplier: float, mu_max: float) -> float:
    """μ_k = μ_0 · a^k, capped at ``mu_max``."""
    return min(mu_init * multiplier**k, mu_max)


L_STEP_SCHEDULES = ("cosine", "constant")


def l_step_lr(
    step: int, first: int, every: int, lc_steps: int, total: int, base: float, decay: float, schedule: str = "cosine"
) -> float | None:
    """Learning rate at optimizer ``step`` when every L step runs like a fresh optimizer.

    L step k (after C step k at ``first + k·every``) starts at ``base · decay^k``. ``schedule="constant"`` holds
    that rate for the whole L step, as the published L-C code does (a new SGD per L step at ``lr · 0.98^k``);
    ``"cosine"`` anneals it to 0 by a half cosine over the L step's ``every`` steps. The steps after the last C step
    (where only parameters L-C does not compress still move) form one more such stretch up to ``total``. ``None``
    before C step 0: the user's own schedule applies.
    """
    if schedule not in L_STEP_SCHEDULES:
        raise ValueError(f"`l_step_schedule` must be one of {L_STEP_SCHEDULES}, got {schedule!r}")
    if step < first:
        return None
    k = min((step - first) // every, lc_steps - 1)
    if schedule == "constant":
        return base * decay**k
    start = first + k * every
    length = every if k < lc_steps - 1 else max(total - start, 1)
    progress = min((step - start) / length, 1.0)
    return base * decay**k * 0.5 * (1.0 + math.cos(math.pi * progress))


def prune_c_step(targets: Mapping[str, Tensor], sparsity: float | Mapping[str, float], distribution: str) -> dict[str, Tensor]:
    """Closed-form pruning C step: keep the top-κ magnitudes of ``targets`` (``global``: one κ over all layers)."""
    scores = {name: t.detach().abs() for name, t in targets.items()}
    counts = zero_counts(distribution, scores, sparsity)
    return {name: t.detach().masked_fill(~exact_mask(scores[name], counts[name]), 0) for name, t in targets.items()}


def binary_c_step(target: Tensor) -> tuple[Tensor, Tensor]:
    """Best ``{-a, +a}`` approximation: ``a = mean |w|``. Returns (Δ, codebook)."""
    a = target.detach().abs().mean()
    codebook = torch.stack([-a, a])
    return torch.where(target >= 0, a, -a), codebook


def ternary_c_step(target: Tensor) -> tuple[Tensor, Tensor]:
    """Best ``{-a, 0, +a}`` approximation: keep the j largest |w| with ``j = argmax (Σ_top-j |w|)² / j``, ``a`` their mean."""
    flat = target.detach().abs().reshape(-1)
    ordered = torch.sort(flat, descending=True, stable=True)
    sums = torch.cumsum(ordered.values, 0)
    counts = torch.arange(1, flat.numel() + 1, dtype=sums.dtype, device=sums.device)
    j = int(torch.argmax(sums * sums / counts)) + 1
    a = sums[j - 1] / j
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[ordered.indices[:j]] = True
    delta = torch.where(keep.view(target.shape), torch.sign(target.detach()) * a, torch.zeros_like(target))
    return delta, torch.stack([-a, torch.zeros_like(a), a])


def kmeans_c_step(target: Tensor, k: int, init: Tensor | None = None, skip_zeros: bool = False) -> tuple[Tensor, Tensor]:
    """k-means C step: a codebook of ``k`` values (warm-started from ``init``) and every weight at its nearest entry.

    With ``skip_zeros`` (prune+quantize), exact zeros stay zero and only the others are clustered.
    """
    w = target.detach()
    values = w[w != 0] if skip_zeros else w.reshape(-1)
    codebook = kmeans_1d(values, k, init)
    delta = codebook[nearest_codes(w, codebook)]
    if skip_zeros:
        delta = delta.masked_fill(w == 0, 0)
    return delta, codebook


def project(
    targets: Mapping[str, Tensor],
    compression: str,
    sparsity: float | Mapping[str, float] = 0.0,
    distribution: str = "global",
    codebook_sizes: Mapping[str, int] | None = None,
    codebook: str = "kmeans",
    codebooks: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Π, the closed-form C step: prune (top-κ), quantize (``codebook`` per layer), or prune then quantize the kept
    weights. ``codebooks`` warm-starts k-means and receives every layer's new codebook."""
    codebooks = {} if codebooks is None else codebooks
    delta = dict(targets)
    if "prune" in compression:
        delta = prune_c_step(delta, sparsity, distribution)
    if "quantize" in compression:
        for name, target in delta.items():
            if codebook == "binary":
                delta[name], codebooks[name] = binary_c_step(target)
            elif codebook == "ternary":
                delta[name], codebooks[name] = ternary_c_step(target)
            else:
                delta[name], codebooks[name] = kmeans_c_step(
                    target, codebook_sizes[name], codebooks.get(name), skip_zeros=compression == "prune+quantize"
                )
    return {name: t.clone() for name, t in delta.items()}


def penalty_gradient(weight: Tensor, delta: Tensor, lam: Tensor, mu: float) -> Tensor:
    """Gradient of ``μ/2 ||w - Δ - λ/μ||²`` with respect to w: ``μ(w - Δ) - λ``."""
    return mu * (weight.detach() - delta) - lam


def update_multiplier(lam: Tensor, weight: Tensor, delta: Tensor, mu: float) -> None:
    """λ ← λ - μ(w - Δ(Θ)), in place."""
    lam.sub_(mu * (weight.detach() - delta))
