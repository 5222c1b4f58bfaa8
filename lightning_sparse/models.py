"""Reference models: LeNet-300-100, LeNet-5, a small CNN and ResNet-8 under a classifier LightningModule, and CharGPT, a
nanoGPT-style character-level transformer."""

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


# ----------------------------------------------------------------------------- CharGPT (nanoGPT-style decoder)
def fused_adam(module: pl.LightningModule) -> bool:
    """Whether ``module``'s Adam/AdamW should run torch's fused kernel (``fused=True``: CPU and CUDA in torch >= 2.4).

    Fused is about 3× faster on a CPU and avoids a cost that only sparse training pays with the default (for-each)
    Adam: torch's CPU ``sqrt`` takes about 9× as long on a zero as on any other value, and every pruned weight has a
    zero second moment, so the for-each step over a 90%-sparse CharGPT took 4.4 ms against 2.0 ms dense (one thread).
    Not fused when the Trainer clips gradients under mixed precision: Lightning refuses clipping with an optimizer that
    unscales gradients itself, as the fused ones do.
    """
    trainer = module._trainer
    if trainer is None:
        return True
    return not (bool(trainer.gradient_clip_val) and str(trainer.precision).endswith("-mixed"))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection (``c_attn``) and an output projection."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.dropout = n_head, dropout

    def forward(self, x: Tensor) -> Tensor:
        batch, time, channels = x.shape
        q, k, v = self.c_attn(x).split(channels, dim=2)
        q, k, v = (t.view(batch, time, self.n_head, channels // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(batch, time, channels)))


class MLP(nn.Module):
    """The transformer's feed-forward block: ``n_embd → 4·n_embd → GELU → n_embd``."""

    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's decoder (Karpathy, github.com/karpathy/nanoGPT ``model.py``): token + position embeddings, ``n_layer``
    pre-norm blocks, a final LayerNorm and a head whose weight *is* the token embedding (weight tying, Press & Wolf
    2017), initialised N(0, 0.02) with the residual projections scaled by 1/sqrt(2·n_layer) (GPT-2)."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab_size, n_embd),
                "wpe": nn.Embedding(block_size, n_embd),
                "drop": nn.Dropout(dropout),
                "h": nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer)),
                "ln_f": nn.LayerNorm(n_embd, bias=bias),
            }
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # one tensor, two names
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(batch, time, vocab)`` for token ids ``(batch, time)``, ``time <= block_size``."""
        time = idx.shape[1]
        if time > self.block_size:
            raise ValueError(f"a sequence of {time} tokens is longer than `block_size`={self.block_size}")
        positions = torch.arange(time, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


class CharGPT(pl.LightningModule):
    """A character-level GPT (nanoGPT's decoder) trained with AdamW on next-character cross-entropy.

    The token embedding and the head are one tied tensor (``model.transformer.wte.weight`` =
    ``model.lm_head.weight``): an embedding, so the sparsity callbacks leave it dense unless it is included. AdamW's
    weight decay applies to the Linear weights only, not to norms, biases or embeddings (minGPT's groups; nanoGPT
    also decays its embeddings).
    The learning rate warms up linearly for ``warmup_steps`` and then follows a cosine to ``min_lr`` at the end of
    training (``lr_schedule="cosine"``, nanoGPT's), or stays constant. Logs ``train_loss`` and ``val_loss`` (nats
    per character).

    nanoGPT's CPU "baby GPT" for Shakespeare is ``n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0``,
    batch 12, ``lr=1e-3``, 2000 iterations (val loss ≈ 1.88 on tinyshakespeare).

    Args:
        vocab_size: characters in the vocabulary; 84 is the default Shakespeare text's
            (``ShakespeareDataModule.vocab_size``); training refuses a datamodule with more.
        block_size: longest context (characters).
        n_layer: transformer blocks.
        n_head: attention heads (must divide ``n_embd``).
        n_embd: model width.
        dropout: dropout probability (0 for the baby GPT).
        bias: biases in the Linear and LayerNorm layers (GPT-2 has them; nanoGPT's baby GPT does not).
        lr: peak AdamW learning rate.
        min_lr: learning rate at the end of the cosine.
        weight_decay: AdamW weight decay of the Linear weights.
        betas: AdamW betas (nanoGPT's Shakespeare config uses 0.99 for beta2: few tokens per step).
        warmup_steps: optimizer steps of linear warm-up.
        lr_schedule: ``cosine`` or ``constant``.
    """

    def __init__(
        self,
        vocab_size: int = 84,
        block_size: int = 64,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
        lr: float = 1e-3,
        min_lr: float = 1e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 100,
        lr_schedule: str = "cosine",
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        if n_embd % n_head:
            raise ValueError(f"`n_head`={n_head} must divide `n_embd`={n_embd}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"`lr_schedule` must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an int >= 0, got {warmup_steps!r}")
        self.save_hyperparameters()
        self.model = GPT(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias)

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def setup(self, stage: str) -> None:
        vocab = getattr(self.trainer.datamodule, "vocab_size", None) if self._trainer is not None else None
        if isinstance(vocab, int) and vocab > self.hparams.vocab_size:
            raise ValueError(
                f"The text has {vocab} distinct characters but `vocab_size`={self.hparams.vocab_size}: set "
                f"`model.vocab_size` to {vocab} (the datamodule's `vocab_size`)"
            )

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = self(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch), sync_dist=True)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Sample ``max_new_tokens`` characters after the ids ``idx`` (batch, time), each from the softmax at
        ``temperature`` over the last ``block_size`` characters."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.hparams.block_size :])[:, -1, :].float() / temperature
            idx = torch.cat([idx, torch.multinomial(logits.softmax(-1), 1, generator=generator)], dim=1)
        return idx

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: weight decay for the weights of Linear layers, none for norms, biases and embeddings."""
        from lightning_sparse.core.targets import parameter_roles

        roles = parameter_roles(self)
        decay = [param for param, _, role in roles.values() if role.default]
        rest = [param for param, _, role in roles.values() if not role.default]
        return [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": rest, "weight_decay": 0.0}]

    def configure_optimizers(self):  # noqa: ANN201 - Lightning accepts several return types
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=hp.lr, betas=tuple(hp.betas), fused=fused_adam(self))
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        warmup, floor = hp.warmup_steps, hp.min_lr / hp.lr

        def factor(step: int) -> float:  # nanoGPT's get_lr, as a multiple of lr
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if hp.lr_schedule == "constant":
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
