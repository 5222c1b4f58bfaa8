"""Hook plumbing shared by the sparsity callbacks: masks installed in ``setup``, kept in force around every
optimizer step, synchronised across ranks, checkpointed in ``state_dict`` and logged to every logger."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from torch.optim import Optimizer

from lightning_sparse import report
from lightning_sparse.core.masks import MaskSet, non_finite
from lightning_sparse.core.targets import each_setting, per_layer, select_targets


#: Optimizers whose whole per-weight state is tensors shaped like the weight, fresh at zero: zeroing them is a reset,
#: and a weight with zero gradient and zero state stays exactly where it is (0 for a pruned weight).
RESETTABLE_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
)


def check_fraction_or_step(name: str, value: Any) -> None:
    """``start``/``end`` style arguments: a float in [0, 1] (fraction of training) or an int >= 0 (a step)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a float in [0, 1] (fraction of training) or an int >= 0 (step), got {value!r}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` as a fraction of training must be in [0, 1], got {value}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"`{name}` as an optimizer step must be >= 0, got {value}")


def check_sparsity(name: str, value: Any) -> None:
    """A sparsity in [0, 1), or for ``sparsity`` a ``{glob: sparsity}`` mapping of them."""
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"`{name}` as a per-layer mapping must name at least one layer glob")
        for label, each in each_setting(name, value):
            check_sparsity(label, each)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}")


def as_sparsity(value: float | Mapping[str, float]) -> float | dict[str, float]:
    return {k: float(v) for k, v in value.items()} if isinstance(value, Mapping) else float(value)


def check_steps(name: str, value: Any, unit: str = "optimizer steps") -> None:
    """A count such as the optimizer steps between updates: an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1 ({unit}), got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")


def resolve_step(name: str, value: int | float, total_steps: float) -> int:
    """Turn a fraction of training into an optimizer step (the last step at most); ints pass through."""
    if isinstance(value, int):
        return value
    if total_steps == float("inf"):
        raise ValueError(
            f"`{name}`={value} is a fraction of training, but the Trainer has no max_steps/max_epochs; "
            f"give `{name}` as an int optimizer step instead"
        )
    return min(int(round(value * total_steps)), max(int(total_steps) - 1, 0))


def check_finite(callback: Callback, trainer: pl.Trainer, params: Mapping[str, torch.Tensor], step: int) -> bool:
    """Raise ``FloatingPointError`` naming the layers and the step when a compressed weight or its gradient holds a
    NaN or an infinity, instead of pruning, growing or quantizing by it (one sum per tensor, one sync per step).
    Gradients are not checked under a gradient scaler (fp16 AMP): it skips such steps itself. Returns whether the
    gradients were checked (and so are finite)."""
    tensors: dict[str, torch.Tensor | None] = {f"{name} (weight)": p for name, p in params.items()}
    scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
    if not scaled:
        tensors.update({f"{name} (gradient)": p.grad for name, p in params.items()})
    bad = non_finite(tensors)
    if bad:
        raise FloatingPointError(
            f"{type(callback).__name__}: NaN or infinite values in {', '.join(bad)} at optimizer step {step}; the "
            f"compressed layers cannot be pruned or quantized by them (lower the learning rate, clip gradients with "
            f"`gradient_clip_val`, or find the first one with `Trainer(detect_anomaly=True)`)"
        )
    return not scaled


def refuse_several_manual_optimizers(callback: Callback, trainer: pl.Trainer, pl_module: pl.LightningModule, why: str) -> None:
    """Manual optimization with several optimizers (GANs) is refused: ``trainer.global_step`` then advances once per
    optimizer step, not once per batch, so a schedule in steps is off, and ``why`` (the callback's own reason)."""
    if not pl_module.automatic_optimization and len(trainer.optimizers) > 1:
        raise ValueError(
            f"{type(callback).__name__} does not support manual optimization with {len(trainer.optimizers)} optimizers "
            f"(e.g. a GAN): `trainer.global_step` advances once per optimizer step, so its schedule would end early, "
            f"and {why}. Use one optimizer (one `configure_optimizers` entry over all parameters) or automatic "
            f"optimization"
        )


def warn_if_run_length_changed(callback: Callback, trainer: pl.Trainer, planned: int | None, schedule: str) -> None:
    """A resumed run keeps the schedule its fractions were resolved to; say so when this run's length differs
    (a larger ``max_epochs``, or resuming a ``max_steps``-truncated run without it)."""
    total = trainer.estimated_stepping_batches
    if planned is not None and math.isfinite(total) and int(total) != planned:
        rank_zero_warn(
            f"{type(callback).__name__}: resumed with the schedule planned for {planned} optimizer steps ({schedule}); "
            f"this run has {int(total)}. The schedule is kept as it was; to plan it for the new length, give "
            f"`start`/`end` as int optimizer steps"
        )


def warn_if_no_steps(callback: Callback, trainer: pl.Trainer) -> None:
    """Say so when the run has no optimizer step (an empty train dataloader, ``limit_train_batches=0``)."""
    if trainer.estimated_stepping_batches <= 0:  # -1 with limit_train_batches=0
        rank_zero_warn(
            f"{type(callback).__name__}: this run has 0 optimizer steps (empty train dataloader, or "
            f"`limit_train_batches`/`max_steps` of 0), so it compresses nothing"
        )


class SparsityCallback(Callback):
    """Base class: owns a :class:`~lightning_sparse.core.masks.MaskSet` over the selected parameters.

    Subclasses implement :meth:`_update_masks` (what happens at an optimizer step) and may extend
    :meth:`_extra_state` / :meth:`_load_extra_state`. The base keeps pruned weights and their gradients at
    exactly zero, makes every rank hold rank 0's masks, and logs ``sparsity/global`` and ``sparsity/<name>``.
    """

    def __init__(self, include: list[str] | None = None, exclude: list[str] | None = None, verbose: bool = True) -> None:
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self.verbose = verbose
        self.masks: MaskSet | None = None
        self.layer_sparsity: dict[str, float] | None = None  # per-layer targets, when `sparsity` is a mapping
        self._decided_step = -1  # last optimizer step whose masks were decided
        self._masked_step = -1  # last optimizer step after which weights were re-masked
        self._reapply = True  # re-mask weights after each optimizer step (unless the optimizer keeps zeros zero)

    # ----------------------------------------------------------------- hooks: when
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.masks = MaskSet(self._targets(pl_module))
            self._decided_step = self._masked_step = -1

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        if self.masks is None:
            return
        step = trainer.global_step
        finite = False  # gradients checked just now may be masked by a (faster) product
        if step != self._decided_step:  # once per step, even with several optimizers
            self._decided_step = step
            finite = check_finite(self, trainer, self.masks.params, step)
            if self._update_masks(trainer, pl_module, step):
                self._sync_masks(trainer)
                for each in trainer.optimizers:  # stale momentum must not push pruned weights
                    self.masks.mask_state_(each.state)
                self._log_sparsity(trainer)
        self.masks.mask_grads_(finite=finite)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # With zero gradients and zero state (both kept so at pruned positions), these optimizers leave a pruned
        # weight at exactly 0, so re-masking the weights after every step would be a wasted pass over them.
        self._reapply = not all(type(optimizer) in RESETTABLE_OPTIMIZERS for optimizer in trainer.optimizers)
        self._refuse_overlaps(trainer)
        refuse_several_manual_optimizers(
            self, trainer, pl_module, "masks decided at one optimizer's step would use another network's stale gradients"
        )
        warn_if_no_steps(self, trainer)

    def _refuse_overlaps(self, trainer: pl.Trainer) -> None:
        """Two pruning callbacks on one layer would each overwrite the other's zeros (and report its own sparsity)."""
        for other in trainer.callbacks:
            if other is self or not isinstance(other, SparsityCallback) or other.masks is None or self.masks is None:
                continue
            both = [name for name in self.masks.params if name in other.masks.params]
            if both:
                raise ValueError(
                    f"{type(self).__name__} and {type(other).__name__} both prune {both}: give them disjoint layers "
                    f"(`include`/`exclude`); each would overwrite the other's masks"
                )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.masks is not None and self._reapply and trainer.global_step != self._masked_step:
            self._masked_step = trainer.global_step  # an optimizer step ran: it may have moved pruned weights
            self.masks.apply_()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is not None and self.verbose:
            self._print_table()

    # ----------------------------------------------------------------- what
    def _targets(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Parameters to sparsify: ``include``/``exclude`` applied, then the layers a per-layer mapping names."""
        targets = select_targets(pl_module, self.include, self.exclude)
        if getattr(self, "dense_first_layer", False) and len(targets) > 1:
            targets.pop(next(iter(targets)))  # the first selected parameter, in model order
        sparsity = getattr(self, "sparsity", None)
        self.layer_sparsity = per_layer("sparsity", sparsity, list(targets)) if isinstance(sparsity, Mapping) else None
        return {name: targets[name] for name in self.layer_sparsity} if self.layer_sparsity else targets

    def _target(self) -> float | dict[str, float]:
        """The final sparsity: one number, or ``{parameter name: sparsity}`` from a per-layer mapping."""
        return self.layer_sparsity if self.layer_sparsity else self.sparsity

    def _update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> bool:
        """Change the masks for optimizer ``step`` if it is an update step; return whether they changed."""
        raise NotImplementedError

    def _sync_masks(self, trainer: pl.Trainer) -> None:
        """Make every rank hold rank 0's masks (they agree already; this guards against nondeterministic kernels)."""
        if trainer.world_size > 1:
            self.masks.load_state_dict(trainer.strategy.broadcast(self.masks.state_dict(), src=0))

    def _update_metrics(self) -> dict[str, float]:
        """Metrics logged beside ``sparsity/*`` at each mask update (subclasses add their own)."""
        return {}

    def _log_sparsity(self, trainer: pl.Trainer) -> None:
        metrics = {"sparsity/global": self.masks.sparsity()}
        metrics.update({f"sparsity/{name}": self.masks.sparsity(name) for name in self.masks})
        metrics.update(self._update_metrics())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    @rank_zero_only
    def _print_table(self) -> None:
        report.print_table(report.sparsity_table(report.stats_from_masks(self.masks), title=f"{type(self).__name__}: sparsity per layer"))

    # ----------------------------------------------------------------- checkpoint state
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        if self.masks is None:
            return {}
        return {"masks": self.masks.state_dict(), **self._extra_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "masks" not in state_dict:
            return
        if self.masks is None:
            rank_zero_warn(f"{type(self).__name__}: checkpoint masks were given before `setup`; they are ignored")
            return
        self.masks.load_state_dict(state_dict["masks"])  # validates every mask before loading any
        self._load_extra_state(state_dict)
