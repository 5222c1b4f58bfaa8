"""lightning_sparse: sparsify and compress models inside an ordinary PyTorch Lightning ``Trainer.fit``.

The public names are imported on first use, so that loading a deployed model (which needs only
``lightning_sparse.deployment``) does not import Lightning.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "Distillation": "lightning_sparse.callbacks",
    "GradualMagnitudePruning": "lightning_sparse.callbacks",
    "LearningCompression": "lightning_sparse.callbacks",
    "MovementPruning": "lightning_sparse.callbacks",
    "OneShotPruning": "lightning_sparse.callbacks",
    "QuantizationAwareTraining": "lightning_sparse.callbacks",
    "RigL": "lightning_sparse.callbacks",
    "SET": "lightning_sparse.callbacks",
    "deploy": "lightning_sparse.deployment",
}

__all__ = ["Distillation", "GradualMagnitudePruning", "LearningCompression", "MovementPruning", "OneShotPruning", "QuantizationAwareTraining", "RigL", "SET", "__version__", "deploy"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'lightning_sparse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
