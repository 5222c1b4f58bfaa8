"""lightning_sparse: sparsify and compress models inside an ordinary PyTorch Lightning ``Trainer.fit``."""

from lightning_sparse.callbacks import (
    SET,
    GradualMagnitudePruning,
    LearningCompression,
    QuantizationAwareTraining,
    RigL,
)

__version__ = "0.1.0.dev0"

__all__ = ["GradualMagnitudePruning", "LearningCompression", "QuantizationAwareTraining", "RigL", "SET", "__version__"]
