"""Pure-torch sparsity engine: target selection, masks, allocation, schedules and scores.

Nothing in this package imports Lightning, W&B or Ax, so it works from a plain PyTorch loop.
"""

from lightning_sparse.core.allocation import DISTRIBUTIONS, erk_sparsities, zero_counts
from lightning_sparse.core.criteria import magnitude, exact_mask
from lightning_sparse.core.masks import MaskSet
from lightning_sparse.core.pruning import prune_by_magnitude
from lightning_sparse.core.schedules import SCHEDULES, is_update_step, sparsity_at
from lightning_sparse.core.targets import DEFAULT_MODULES, prunable_names, select_targets

__all__ = [
    "DEFAULT_MODULES",
    "DISTRIBUTIONS",
    "MaskSet",
    "SCHEDULES",
    "erk_sparsities",
    "exact_mask",
    "is_update_step",
    "magnitude",
    "prunable_names",
    "prune_by_magnitude",
    "select_targets",
    "sparsity_at",
    "zero_counts",
]
