"""The paper's own movement pruning, ported for comparison (not part of the library): Sanh, Wolf & Rush 2020.

Source: Hugging Face ``transformers``, ``examples/research_projects/movement-pruning`` (Apache-2.0):
``emmental/modules/binarizer.py`` (``TopKBinarizer``), ``emmental/modules/masked_nn.py`` (``MaskedLinear`` with
``pruning_method="topK"``) and ``masked_run_glue.py`` (``schedule_threshold`` and the optimizer groups). What it does,
written again here for our ``TextClassifier``:

- every pruned ``nn.Linear`` keeps its dense weight ``W`` and gets ``mask_scores`` (``S``, an ``nn.Parameter`` shaped
  like ``W``, initialised to 0: ``mask_init="constant"``, ``mask_scale=0``); its forward is
  ``F.linear(x, TopK(S, keep) * W, b)``, the top-k recomputed at every forward, with a straight-through gradient to
  ``S`` (``∂L/∂S = ∂L/∂(M⊙W) ⊙ W``); ``W``'s gradient is ``∂L/∂(M⊙W) ⊙ M``, so pruned entries of ``W`` get no gradient
  but still move under AdamW's momentum and decoupled weight decay;
- the scores are trained by AdamW in their own group, learning rate ``mask_scores_learning_rate`` (1e-2), no weight
  decay, under the same linear warm-up/decay schedule as the weights;
- the kept fraction follows ``schedule_threshold``: 1 up to ``initial_warmup × warmup_steps``, the final fraction for
  the last ``final_warmup × warmup_steps``, cubic in between; here given as ``start``/``end`` steps (the paper's
  ``initial_warmup=1, final_warmup=2`` with ``warmup_steps`` 10% of training is ``start=0.1, end=0.8``).

Checked against the paper's code itself (``huggingface/transformers`` at commit 00e12e7c for ``masked_run_glue.py``,
0140b285 for ``emmental/modeling_bert_masked.py``, 66979d22 for ``emmental/modules/masked_nn.py``, 76aa58e0 for
``emmental/modules/binarizer.py``; read again for issue 31). The method is ported as it is there: scores initialised to
0 (``MaskedLinear.init_mask``, ``mask_init="constant"``, ``mask_scale=0.0``); ``TopKBinarizer.forward`` keeps the
``int(threshold × numel)`` highest scores, gradient straight through; ``schedule_threshold`` as above, evaluated at
``global_step`` before each batch; scores in their own AdamW group at ``mask_scores_learning_rate`` with no weight
decay (the group sets none and ``transformers.AdamW`` defaults to 0), under ``get_linear_schedule_with_warmup``; no
regularisation (``--regularization`` defaults to None for ``topK``); ``global_topk`` off (its default), so top-k per
matrix, as our ``distribution="uniform"``; the masked layers are the encoder's query/key/value, attention output and
both FFN matrices (``BertSelfAttention``, ``BertSelfOutput``, ``BertIntermediate``, ``BertOutput``), while the pooler
and the classifier stay plain ``nn.Linear`` (``BertPooler``; our ``TextClassifier`` has no pooler and a dense head);
no teacher unless ``--teacher_type`` is given. Three differences are in the training *recipe*, not the method, and
``benchmarks/finetune.py --recipe paper`` applies them to every row: the embeddings are frozen
(``MaskedBertModel.__init__``: ``self.embeddings.requires_grad_(requires_grad=False)``), the gradient norm of all
parameters, scores included, is clipped at ``--max_grad_norm`` 1.0 (``train()``:
``nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)``), and ``--weight_decay`` defaults to 0.0 (ours:
embeddings trained, no clipping, 0.01). Left as they are: the model (mean pooling and a dense head on our MiniLM
against BERT's CLS pooler), the learning-rate warm-up's first step (``get_linear_schedule_with_warmup`` starts at 0,
``TextClassifier`` at ``1 / warmup``), and the paper's ``--learning_rate`` 3e-5 for BERT-base (ours 1e-4).

Switches move it one difference at a time towards the library's ``MovementPruning`` of before issue 31 (the ablation of
``benchmarks/finetune.py --ablation``): ``freeze`` (masks and scores frozen after ``end``), ``held_pruned`` (pruned
weights held at their value while pruned, their AdamW state kept), ``reset_pruned`` (the AdamW state of pruned entries
zeroed at every step while pruned, so a revived entry restarts its moments at zero; values move as in the reference);
both together are the library's zeroed weight with a frozen latent copy,
``score_rule="sum"`` (``S ← S − w⊙g``, no optimizer, instead of AdamW on ``S``) and ``frequency`` (masks recomputed every
``frequency`` steps instead of every forward).
"""

from __future__ import annotations

import types
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_sparse.models import NO_DECAY, TextClassifier, fused_adam


class TopKBinarizer(torch.autograd.Function):
    """``M = 1`` on the ``int(keep × numel)`` highest scores, 0 elsewhere; straight-through gradient (emmental's)."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, keep: float) -> Tensor:
        mask = torch.zeros_like(scores)
        j = int(keep * scores.numel())
        if j:
            mask.view(-1)[torch.topk(scores.flatten(), j, sorted=False).indices] = 1
        return mask

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def schedule_keep(step: int, start: int, end: int, final_keep: float) -> float:
    """``masked_run_glue.schedule_threshold`` with ``initial_threshold=1``: kept fraction at optimizer ``step``."""
    if step <= start:
        return 1.0
    if step > end:
        return final_keep
    progress = 1 - (step - start) / (end - start)
    return final_keep + (1.0 - final_keep) * progress**3


def _masked_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """``MaskedLinear.forward`` for ``pruning_method="topK"`` (with an optional cached mask for ``frequency > 1``)."""
    if self.cached_mask is not None:
        mask = self.cached_mask + self.mask_scores - self.mask_scores.detach()  # same value, straight-through to S
    else:
        mask = TopKBinarizer.apply(self.mask_scores, self.keep)
    self.last_mask = mask.detach()
    return F.linear(x, mask * self.weight, self.bias)


def install(model: nn.Module) -> dict[str, nn.Linear]:
    """Turn every ``nn.Linear`` of ``model`` into a masked one (scores at 0, everything kept); ``{name: module}``."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for module in layers.values():
        module.mask_scores = nn.Parameter(torch.zeros_like(module.weight))
        module.keep, module.cached_mask, module.last_mask = 1.0, None, None
        module.forward = types.MethodType(_masked_forward, module)
    return layers


class ReferenceClassifier(TextClassifier):
    """``TextClassifier`` whose encoder Linear layers are emmental ``MaskedLinear``s; AdamW groups as
    ``masked_run_glue.py``: scores at ``score_lr`` without decay, weights with, biases and norms without."""

    def __init__(self, *args: Any, score_lr: float = 1e-2, fused: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.score_lr, self.fused = score_lr, fused  # fused: None = as TextClassifier (fused_adam), False = torch's default (unfused)
        self.masked = install(self.backbone)

    def configure_optimizers(self):  # noqa: ANN201
        hp = self.hparams
        groups: dict[str, list[nn.Parameter]] = {"scores": [], "decay": [], "no_decay": []}
        for name, param in self.named_parameters():
            if param.requires_grad:
                kind = "scores" if name.endswith("mask_scores") else "no_decay" if name.endswith(NO_DECAY) else "decay"
                groups[kind].append(param)
        optimizer = torch.optim.AdamW(
            [{"params": groups["scores"], "lr": self.score_lr, "weight_decay": 0.0},
             {"params": groups["decay"], "weight_decay": hp.weight_decay},
             {"params": groups["no_decay"], "weight_decay": 0.0}],
            lr=hp.lr, fused=fused_adam(self) if self.fused is None else self.fused,
        )  # fmt: skip
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(hp.warmup * total)

        def factor(step: int) -> float:  # get_linear_schedule_with_warmup, as TextClassifier's
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ReferenceSchedule(pl.Callback):
    """Sets every masked layer's kept fraction at each step (``schedule_threshold``), and the ablation switches."""

    def __init__(self, sparsity: float, start: float, end: float, freeze: bool = False, held_pruned: bool = False,
                 reset_pruned: bool = False, score_rule: str = "adam", frequency: int = 1) -> None:  # fmt: skip
        if score_rule not in ("adam", "sum"):
            raise ValueError(f"`score_rule` must be one of ('adam', 'sum'), got {score_rule!r}")
        self.sparsity, self.start, self.end = sparsity, start, end
        self.freeze, self.score_rule, self.frequency = freeze, score_rule, frequency
        self.held_pruned, self.reset_pruned = held_pruned, reset_pruned
        self._before: dict[str, Tensor] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: ReferenceClassifier) -> None:
        total = int(trainer.estimated_stepping_batches)
        self._start, self._end = int(round(self.start * total)), int(round(self.end * total))

    def _masks_fixed(self, step: int) -> bool:
        return self.freeze and step > self._end

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: ReferenceClassifier, *args: Any) -> None:
        step = trainer.global_step
        keep = schedule_keep(step, self._start, self._end, 1.0 - self.sparsity)
        recompute = self.frequency == 1 or step <= self._start or (step - self._start) % self.frequency == 0
        for module in pl_module.masked.values():
            module.keep = keep
            if self._masks_fixed(step):
                if module.cached_mask is None:
                    module.cached_mask = TopKBinarizer.apply(module.mask_scores.detach(), keep)
            elif self.frequency > 1:
                if recompute or module.cached_mask is None:
                    module.cached_mask = TopKBinarizer.apply(module.mask_scores.detach(), keep)
            else:
                module.cached_mask = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: ReferenceClassifier, optimizer: Any) -> None:
        step = trainer.global_step
        for name, module in pl_module.masked.items():
            scores = module.mask_scores
            if self._masks_fixed(step):
                scores.grad = None  # frozen: AdamW skips a parameter without a gradient
            elif self.score_rule == "sum" and scores.grad is not None:
                with torch.no_grad():
                    scores.sub_(scores.grad)  # S ← S − ∂L/∂S = S − w⊙g (w the dense weight, g the masked one's)
                scores.grad = None
            if self.held_pruned:
                self._before[name] = module.weight.detach().clone()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: ReferenceClassifier, *args: Any) -> None:
        if not (self.held_pruned or self.reset_pruned):
            return
        optimizer = trainer.optimizers[0]
        for name, module in pl_module.masked.items():
            pruned = module.last_mask == 0  # the mask this step's forward used
            with torch.no_grad():
                if self.held_pruned:
                    module.weight[pruned] = self._before[name][pruned]  # held where it was
                if not self.reset_pruned:
                    continue
                for value in optimizer.state.get(module.weight, {}).values():
                    if torch.is_tensor(value) and value.shape == module.weight.shape:
                        value.masked_fill_(pruned, 0)


@torch.no_grad()
def bake(model: ReferenceClassifier) -> None:
    """Write ``M ⊙ W`` into the weights at the final kept fraction (so the model's zeros can be counted)."""
    for module in model.masked.values():
        mask = module.cached_mask if module.cached_mask is not None else TopKBinarizer.apply(module.mask_scores, module.keep)
        module.weight.mul_(mask)

