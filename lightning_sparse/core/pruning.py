"""Magnitude pruning step shared by the pruning callbacks: rank by |w|, allocate, write exact masks."""

from __future__ import annotations

from collections.abc import Mapping

from lightning_sparse.core.allocation import zero_counts
from lightning_sparse.core.criteria import exact_mask, magnitude
from lightning_sparse.core.masks import MaskSet


def prune_by_magnitude(masks: MaskSet, sparsity: float | Mapping[str, float], distribution: str = "uniform") -> dict[str, int]:
    """Prune the smallest-magnitude weights so the masked parameters reach ``sparsity`` (or ``{name: sparsity}``).

    Already-pruned weights rank lowest, so raising the sparsity never revives a pruned weight (Zhu & Gupta).
    Returns the number of zeros written per parameter.
    """
    scores = {name: magnitude(masks.params[name], masks.mask(name)) for name in masks}
    counts = zero_counts(distribution, scores, sparsity)
    for name, score in scores.items():
        masks.set(name, exact_mask(score, counts[name]))
    return counts
