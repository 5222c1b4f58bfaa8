"""A model and a datamodule written against the unified `lightning` package (`lightning.pytorch`), as a user of
`import lightning as L` writes them (used by test_lightning_package.py, in-process and through the CLI)."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import nn

from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import lenet_300_100


class UnifiedClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = lenet_300_100((1, 8, 8), 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class UnifiedDigits(L.LightningDataModule):
    """sklearn's real digits (lightning_sparse.data.DigitsDataModule's splits) as a lightning.pytorch datamodule."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.digits = DigitsDataModule(batch_size=batch_size)

    def setup(self, stage: str) -> None:
        self.digits.setup(stage)

    def train_dataloader(self):  # noqa: ANN201
        return self.digits.train_dataloader()

    def val_dataloader(self):  # noqa: ANN201
        return self.digits.val_dataloader()

    def test_dataloader(self):  # noqa: ANN201
        return self.digits.test_dataloader()
