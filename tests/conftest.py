"""Shared fixtures: W&B offline, quiet trainers on sklearn's real digits."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import pytorch_lightning as pl  # noqa: E402

from lightning_sparse.data import DigitsDataModule  # noqa: E402
from lightning_sparse.models import Classifier  # noqa: E402


def digits_model(arch: str = "lenet300", **kwargs) -> Classifier:
    kwargs.setdefault("lr", 0.05)
    return Classifier(arch=arch, input_shape=(1, 8, 8), **kwargs)


def make_trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


@pytest.fixture
def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64)


class StopAfterEpoch(pl.Callback):
    """Interrupt training: save a checkpoint at the end of ``epoch`` and stop (to test exact resume)."""

    def __init__(self, epoch: int, path) -> None:
        self.epoch, self.path = epoch, path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True
