"""CharGPT: a nanoGPT-style character-level decoder as a LightningModule, and :func:`fused_adam`, which the
demo modules share."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lightning_sparse.models.vision import LR_SCHEDULES

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
