"""Thin Lightning adapters over :mod:`lightning_sparse.core`, one file per method."""

from typing import Any

from lightning_sparse.callbacks.base import CompressionCallback, SparsityCallback
from lightning_sparse.callbacks.distillation import Distillation
from lightning_sparse.callbacks.gmp import GradualMagnitudePruning
from lightning_sparse.callbacks.lc import LearningCompression
from lightning_sparse.callbacks.movement import MovementPruning
from lightning_sparse.callbacks.oneshot import OneShotPruning
from lightning_sparse.callbacks.qat import QuantizationAwareTraining
from lightning_sparse.callbacks.rigl import SET, RigL
from lightning_sparse.imports import import_object



#: Callbacks that compress the model: the dense baseline of ``--compare_dense`` (and of a sweep) runs without them.
COMPRESSION_CALLBACKS = (CompressionCallback,)


def dropped_for_dense_baseline(callback_config: Any) -> bool:
    """True for a ``{class_path: ...}`` callback config that a dense baseline run leaves out: compression callbacks
    and checkpointing."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    class_path = callback_config.get("class_path") if hasattr(callback_config, "get") else None
    if not class_path:
        return False
    try:
        cls = import_object(class_path)
    except ImportError:
        return False
    return isinstance(cls, type) and issubclass(cls, (*COMPRESSION_CALLBACKS, ModelCheckpoint))


__all__ = ["Distillation", "GradualMagnitudePruning", "LearningCompression", "MovementPruning", "OneShotPruning", "QuantizationAwareTraining", "RigL", "SET", "SparsityCallback", "CompressionCallback", "dropped_for_dense_baseline"]
