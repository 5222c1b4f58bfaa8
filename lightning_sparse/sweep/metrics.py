"""The trial side of a sweep: what a finished ``fit`` reports (sparsity, compressed size and its logged metrics)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_sparse import export, files
from lightning_sparse.core.counting import global_sparsity
from lightning_sparse.core.targets import prunable_names

#: Metrics every trial reports, whatever its model logs.
MEASURED = ("sparsity", "compressed_bytes", "compression_ratio")


def measure(module: torch.nn.Module) -> dict[str, float]:
    """Global sparsity of the Linear/Conv weights and the size of the model's compressed export."""
    params = dict(module.named_parameters())
    with tempfile.TemporaryDirectory() as folder:
        written = export.save_compressed(module, Path(folder) / "model.lsz", verbose=False)
    return {
        "sparsity": global_sparsity(params[name] for name in prunable_names(module)),
        "compressed_bytes": float(written.file_bytes),
        "compression_ratio": written.fp32_bytes / written.file_bytes,
    }


def logged_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The scalar metrics the run logged last (``val_acc``, ``val_loss``, ...), as floats."""
    values = {}
    for name, value in trainer.callback_metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            values[name] = float(value)
    return values


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically: a reader never sees half a file."""
    files.write_json(path, payload)


class SweepMetrics(Callback):
    """When ``fit`` ends, measure sparsity and compressed size, log them (W&B sees them) and write every metric to
    ``path`` as JSON: the trial's report to the sweeper, which reads nothing else from the run.

    The logged metrics are those of the last validation (``val_acc`` ...); the measured ones describe the final
    weights. Without ``path`` it only logs, which is what a W&B sweep agent's run needs.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        measured = measure(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(measured, step=trainer.global_step)
        if self.path and trainer.is_global_zero:
            write_json(self.path, {**logged_metrics(trainer), **measured, "step": trainer.global_step})
