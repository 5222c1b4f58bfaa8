"""Scores that rank weights for pruning, and the exact mask that keeps the highest-scoring ones."""

from __future__ import annotations

import torch
from torch import Tensor


def magnitude(weight: Tensor, mask: Tensor | None = None) -> Tensor:
    """``|w|``; entries already pruned by ``mask`` score -1 so they are the first to stay pruned, and so do NaN or
    infinite weights (a non-finite score never wins a place)."""
    scores = torch.nan_to_num(weight.detach().abs(), nan=-1.0, posinf=-1.0)
    if mask is not None:
        scores.masked_fill_(~mask, -1.0)
    return scores


def exact_mask(scores: Tensor, n_zeros: int) -> Tensor:
    """Boolean mask pruning exactly ``n_zeros`` lowest-scoring entries.

    Ties are broken deterministically by flat index (the lower index is pruned first), via a stable sort.
    """
    if not 0 <= n_zeros <= scores.numel():
        raise ValueError(f"`n_zeros` must be in [0, {scores.numel()}], got {n_zeros}")
    flat = scores.reshape(-1)
    mask = torch.ones(flat.shape, dtype=torch.bool, device=flat.device)
    if n_zeros:
        mask[torch.sort(flat, stable=True).indices[:n_zeros]] = False
    return mask.view(scores.shape)


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask keeping exactly the ``k`` highest-scoring entries; ties go to the lower flat index."""
    if not 0 <= k <= scores.numel():
        raise ValueError(f"`k` must be in [0, {scores.numel()}], got {k}")
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if k:
        mask[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return mask.view(scores.shape)
