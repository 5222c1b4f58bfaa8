"""Thin Lightning adapters over :mod:`lightning_sparse.core`, one file per method."""

from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.callbacks.gmp import GradualMagnitudePruning
from lightning_sparse.callbacks.lc import LearningCompression
from lightning_sparse.callbacks.movement import MovementPruning
from lightning_sparse.callbacks.qat import QuantizationAwareTraining
from lightning_sparse.callbacks.rigl import SET, RigL

__all__ = ["GradualMagnitudePruning", "LearningCompression", "MovementPruning", "QuantizationAwareTraining", "RigL", "SET", "SparsityCallback"]
