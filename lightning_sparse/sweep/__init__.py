"""Ax search over compression settings: ``run_sweep`` (``lightning-sparse sweep``), trial launchers, W&B export.

Imports are lazy: ``lightning-sparse fit`` loads :class:`SweepMetrics` without paying for Ax.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "run_sweep": "lightning_sparse.sweep.runner",
    "SweepResult": "lightning_sparse.sweep.runner",
    "SweepConfig": "lightning_sparse.sweep.config",
    "load_sweep": "lightning_sparse.sweep.config",
    "SweepMetrics": "lightning_sparse.sweep.metrics",
    "LocalLauncher": "lightning_sparse.sweep.launchers",
    "RayLauncher": "lightning_sparse.sweep.launchers",
    "export_wandb_sweep": "lightning_sparse.sweep.wandb_sweep",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_sparse.sweep' has no attribute {name!r}")
