"""Reference image classifiers: LeNet-300-100, LeNet-5, a small CNN and ResNet-8 under one classifier
LightningModule."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


def _flat_features(features: nn.Module, input_shape: Sequence[int]) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, *input_shape)).numel()


def lenet_300_100(input_shape: Sequence[int], num_classes: int) -> nn.Sequential:
    """LeCun et al. 1998's MLP: in → 300 → 100 → classes (266k weights on MNIST)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def lenet5(input_shape: Sequence[int], num_classes: int) -> nn.Sequential:
    """The Caffe LeNet-5 used by Han et al. 2015 (conv20-conv50-fc500), with same-padded 5×5 convs."""
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 20, 5, padding=2), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5, padding=2), nn.MaxPool2d(2), nn.Flatten()
    )
    return nn.Sequential(
        features, nn.Linear(_flat_features(features, input_shape), 500), nn.ReLU(), nn.Linear(500, num_classes)
    )


def small_cnn(input_shape: Sequence[int], num_classes: int) -> nn.Sequential:
    """Three 3×3 conv layers (32-64-64) with two max-pools, then a 128-unit hidden layer."""
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )  # fmt: skip
    return nn.Sequential(
        features, nn.Linear(_flat_features(features, input_shape), 128), nn.ReLU(), nn.Linear(128, num_classes)
    )


class BasicBlock(nn.Module):
    """He et al. 2016's basic residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, the shortcut a
    1×1 conv + BatchNorm where the block changes the width or the resolution (option B), the identity otherwise."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet (He et al. 2016, arXiv 1512.03385, section 4.2): a 3×3 stem, three stages of basic blocks
    at ``widths`` (the 2nd and 3rd halve the resolution, with 1×1 conv + BN shortcuts), global average pooling and a
    Linear head. Every layer writing into a stage's residual stream shares its channel index."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64), blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, previous = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks):
                layers.append(BasicBlock(previous, width, stride=2 if stage > 0 and index == 0 else 1))
                previous = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


def resnet8(input_shape: Sequence[int], num_classes: int) -> ResNet:
    """ResNet-8: stem, one basic block per stage at widths 16-32-64, head (8 weight layers; 78k weights)."""
    return ResNet(input_shape[0], num_classes, (16, 32, 64), blocks=1)


def resnet8x2(input_shape: Sequence[int], num_classes: int) -> ResNet:
    """ResNet-8 at twice the width, 32-64-128 (Zagoruyko & Komodakis' widening factor k = 2; 308k parameters): wide
    enough that channel-pruned widths stay multiples of 16, the block oneDNN's AVX-512 convolutions work in."""
    return ResNet(input_shape[0], num_classes, (32, 64, 128), blocks=1)


ARCHITECTURES: dict[str, Callable[[Sequence[int], int], nn.Module]] = {
    "lenet300": lenet_300_100,
    "lenet5": lenet5,
    "cnn": small_cnn,
    "resnet8": resnet8,
    "resnet8x2": resnet8x2,
}
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")


class Classifier(pl.LightningModule):
    """Image classifier: cross-entropy, torchmetrics accuracy, SGD/Adam with an optional cosine schedule.

    Logs ``train_loss``, ``val_loss``/``val_acc`` and ``test_loss``/``test_acc``.

    Args:
        arch: ``lenet300``, ``lenet5``, ``cnn``, ``resnet8`` (residual, with BatchNorm: :func:`resnet8`) or
            ``resnet8x2`` (the same at twice the width: :func:`resnet8x2`).
        input_shape: (channels, height, width) of one image: (1, 8, 8) for digits, (1, 28, 28) for MNIST.
        num_classes: output classes.
        optimizer: ``sgd`` (with momentum), ``adam`` or ``adamw``.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        lr_schedule: ``constant`` or ``cosine`` (annealed to 0 over all optimizer steps).
        lr_schedule_steps: with ``cosine``, anneal to 0 over this many optimizer steps instead and stay there, e.g.
            a reference phase that ends where ``LearningCompression(l_step_lr=...)`` takes over the learning rate.
    """

    def __init__(
        self,
        arch: str = "lenet300",
        input_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        lr_schedule_steps: int | None = None,
    ) -> None:
        super().__init__()
        for name, value, choices in (
            ("arch", arch, tuple(ARCHITECTURES)),
            ("optimizer", optimizer, OPTIMIZERS),
            ("lr_schedule", lr_schedule, LR_SCHEDULES),
        ):
            if value not in choices:
                raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
        if lr_schedule_steps is not None and (isinstance(lr_schedule_steps, bool) or not isinstance(lr_schedule_steps, int) or lr_schedule_steps < 1):
            raise ValueError(f"`lr_schedule_steps` must be an int >= 1 (optimizer steps) or None, got {lr_schedule_steps!r}")
        self.save_hyperparameters()
        self.net = ARCHITECTURES[arch](tuple(input_shape), num_classes)
        # two zero images: Lightning's model summary counts FLOPs and shows layer sizes with it (else "Total Flops: 0")
        self.example_input_array = torch.zeros(2, *input_shape)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        self.log(f"{stage}_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}_acc", accuracy, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self):  # noqa: ANN201 - Lightning accepts several return types
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            cls = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
            optimizer = cls(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return optimizer
        steps = hp.get("lr_schedule_steps")
        if steps is None:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(self.trainer.estimated_stepping_batches), 1))
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step / steps, 1.0))))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
