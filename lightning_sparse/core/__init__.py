"""Pure-torch compression engine: target selection, masks, allocation, schedules, scores, quantizers, codec.

Nothing in this package imports Lightning, W&B or Ax, so it works from a plain PyTorch loop.
"""

from lightning_sparse.core.allocation import DISTRIBUTIONS, erk_sparsities, zero_counts
from lightning_sparse.core.counting import count_zeros, global_sparsity, zero_fraction
from lightning_sparse.core.criteria import exact_mask, magnitude, top_k_mask
from lightning_sparse.core.dynamic import cosine_fraction, drop_and_grow, is_dynamic_update_step, move_connections, random_masks
from lightning_sparse.core.lc import LearningCompressor
from lightning_sparse.core.masks import MaskSet
from lightning_sparse.core.pruning import prune_by_magnitude
from lightning_sparse.core.quantize import FakeQuantizer, codebook_quantize, fit_codebook, kmeans_1d, uniform_quantize, zero_smallest
from lightning_sparse.core.pruners import MagnitudePruner, MovementPruner, OneShotPruner, Pruner, RigLPruner
from lightning_sparse.core.schedules import SCHEDULES, StepSchedule, is_update_step, sparsity_at
from lightning_sparse.core.structured import Granularity, channel_mask, nm_mask, parse_granularity
from lightning_sparse.core.targets import DEFAULT_MODULES, prunable_names, select_targets

__all__ = [
    "DEFAULT_MODULES",
    "DISTRIBUTIONS",
    "FakeQuantizer",
    "Granularity",
    "LearningCompressor",
    "MagnitudePruner",
    "MaskSet",
    "MovementPruner",
    "OneShotPruner",
    "Pruner",
    "RigLPruner",
    "SCHEDULES",
    "StepSchedule",
    "codebook_quantize",
    "count_zeros",
    "channel_mask",
    "cosine_fraction",
    "drop_and_grow",
    "erk_sparsities",
    "global_sparsity",
    "exact_mask",
    "fit_codebook",
    "is_dynamic_update_step",
    "is_update_step",
    "kmeans_1d",
    "magnitude",
    "move_connections",
    "nm_mask",
    "parse_granularity",
    "prunable_names",
    "prune_by_magnitude",
    "random_masks",
    "select_targets",
    "sparsity_at",
    "top_k_mask",
    "uniform_quantize",
    "zero_counts",
    "zero_fraction",
    "zero_smallest",
]
