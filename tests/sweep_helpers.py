"""Scaffolding for the sweep tests: a callback that makes one chosen trial crash or hang (the sweeper is under test)."""

from __future__ import annotations

import os
import time

import pytorch_lightning as pl


class FailInTrial(pl.Callback):
    """In the trial labelled ``crash`` raise at setup; in the one labelled ``hang`` sleep far past any timeout."""

    def __init__(self, crash: str = "", hang: str = "") -> None:
        self.crash, self.hang = crash, hang

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        label = os.environ.get("LIGHTNING_SPARSE_TRIAL", "")
        if label == self.crash:
            raise RuntimeError(f"{label} crashes on purpose")
        if label == self.hang:
            time.sleep(3600)
