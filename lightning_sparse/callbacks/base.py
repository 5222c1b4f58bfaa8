"""Hook plumbing shared by the sparsity callbacks: masks installed in ``setup``, kept in force around every
optimizer step, synchronised across ranks, checkpointed in ``state_dict`` and logged to every logger."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_sparse import report
from lightning_sparse.compat import logged_step
from lightning_sparse.core.masks import MaskSet, non_finite
from lightning_sparse.core.pruners import Pruner, lr_factor
from lightning_sparse.core.shards import full_tensor
from lightning_sparse.core.targets import (
    Targets,
    as_patterns,
    describe_targets,
    each_setting,
    format_targets,
    model_sparsity,
    select_targets,
    weight_matrices,
)


try:  # the unified `lightning` package: its Trainer's isinstance(callback, Callback) checks must pass too
    from lightning.pytorch import Callback as _UnifiedCallback

    CALLBACK_BASES: tuple[type, ...] = (Callback, _UnifiedCallback)
except ImportError:  # only pytorch_lightning is installed
    CALLBACK_BASES = (Callback,)

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


def check_bool(name: str, value: Any) -> None:
    """A flag: ``True`` or ``False`` only (not ``"abc"``, ``[1]``, 1 or NaN, which Python would take as true)."""
    if type(value) is not bool:
        raise ValueError(f"`{name}` must be a bool (true or false), got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")


def grads_are_scaled(trainer: pl.Trainer) -> bool:
    """True under a gradient scaler (fp16 AMP): its gradients may be infinite, and it skips those steps itself."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def check_finite(callback: Callback, trainer: pl.Trainer, params: Mapping[str, torch.Tensor], step: int) -> bool:
    """Raise ``FloatingPointError`` naming the layers and the step when a compressed weight or its gradient holds a
    NaN or an infinity, instead of pruning, growing or quantizing by it (one sum per tensor, one sync per step).
    Gradients are not checked under a gradient scaler (fp16 AMP): it skips such steps itself. Returns whether the
    gradients were checked (and so are finite)."""
    tensors: dict[str, torch.Tensor | None] = {f"{name} (weight)": p for name, p in params.items()}
    scaled = grads_are_scaled(trainer)
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


def warn_if_optimizer_state_not_reset(callback: Callback, trainer: pl.Trainer) -> None:
    """A pruner that grows weights zeroes their optimizer state: say so for an optimizer whose state it cannot
    fully reset."""
    for optimizer in trainer.optimizers:
        if type(optimizer) not in RESETTABLE_OPTIMIZERS:
            rank_zero_warn(
                f"{type(callback).__name__}: cannot reset the state of optimizer {type(optimizer).__name__} for grown "
                f"weights: only its tensors shaped like a weight are zeroed at grown positions; any other state "
                f"it keeps is not reset. Fully reset: {[cls.__name__ for cls in RESETTABLE_OPTIMIZERS]}"
            )


def hint_fused_adam(callback: Callback, trainer: pl.Trainer, params: Mapping[str, torch.Tensor]) -> None:
    """Say once when pruned CPU weights are stepped by a for-each Adam/AdamW: every pruned weight has a zero second
    moment, torch's CPU ``sqrt`` takes about 9x as long on a zero as on other values, and so the optimizer step of a
    90%-sparse model takes about twice the dense one's; ``fused=True`` has no such cost."""
    on_cpu = any(param.device.type == "cpu" for param in params.values())
    slow = [type(o).__name__ for o in trainer.optimizers if type(o) in (torch.optim.Adam, torch.optim.AdamW) and not o.defaults.get("fused")]
    if on_cpu and slow:
        rank_zero_info(
            f"{type(callback).__name__}: {slow[0]} steps the pruned weights on the CPU without `fused=True`; their zero "
            f"second moments make its step about twice as slow at 90% sparsity (torch's CPU sqrt is slow on zeros). "
            f"`{slow[0]}(..., fused=True)` avoids it"
        )


def refuse_fsdp1(callback: Callback, trainer: pl.Trainer) -> None:
    """FSDP1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``) keeps each rank's part of a layer as a flat
    1-D view that does not have the layer's shape, so no mask, grid or projection can be applied to it: refused,
    naming the way that works (FSDP2). Lightning's ``FSDPStrategy`` wraps the LightningModule from outside, so the
    strategy's model is searched too."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return
    strategy = trainer.strategy
    models = [m for m in (getattr(strategy, "model", None), trainer.lightning_module) if isinstance(m, torch.nn.Module)]
    wrapped = [name or "<root>" for model in models for name, module in model.named_modules() if isinstance(module, FullyShardedDataParallel)]
    if any(cls.__name__ == "FSDPStrategy" for cls in type(strategy).__mro__):
        wrapped = wrapped or [type(strategy).__name__]
    if wrapped:
        raise ValueError(
            f"{type(callback).__name__} does not support FSDP1 (`FullyShardedDataParallel`, Lightning's `FSDPStrategy`; "
            f"wrapped here: {wrapped[:3]}): its flat parameter shards do not keep the layers' shapes. Use FSDP2: "
            f"`ModelParallelStrategy` with `torch.distributed.fsdp.fully_shard` applied in `configure_model`, or DDP"
        )


def current_parameters(
    callback: Callback, trainer: pl.Trainer, pl_module: torch.nn.Module, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The module's parameters ``names`` as they are now: a sharding strategy replaces them after ``setup`` (FSDP2's
    ``fully_shard`` in ``configure_model`` turns each into a ``DTensor``), so callbacks look them up again by name at
    ``fit`` start (parameter names do not change under ``fully_shard``)."""
    refuse_fsdp1(callback, trainer)
    found = dict(pl_module.named_parameters(remove_duplicate=False))
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(
            f"{type(callback).__name__}: the parameters {missing} chosen at `setup` are gone from the model at `fit` "
            f"start (a strategy renamed or replaced them); parameters now: {list(found)[:10]}"
        )
    return {name: found[name] for name in names}


@rank_zero_only
def print_rank_zero(table: Any) -> None:
    """Print a rich table once (tables are computed on every rank: under FSDP2 their counts need every shard)."""
    report.print_table(table)


def whole_tensors(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: whole detached tensor}`` (gathered when sharded, so call on every rank)."""
    return {name: full_tensor(param.detach()) for name, param in params.items()}


@rank_zero_only
def print_targets(title: str, model: torch.nn.Module, targets: Targets) -> None:
    """Say once, at ``setup``, what a callback compresses and what it leaves dense (by kind, counts, share)."""
    print(format_targets(describe_targets(model, targets), title))


class CompressionCallback(*CALLBACK_BASES):
    """One base for every callback that compresses parameters: which ones (``include``/``exclude``), the refusal of
    another callback that would fight over them, one logging helper and the setup summary.

    A subclass says what it compresses by filling :attr:`compressed` in ``setup``: ``{parameter name: what it
    writes}``, where ``"zeros"`` means it decides which weights are zero (masks) and ``"values"`` that it rewrites
    the weights' values (quantization, a projection). Two callbacks that write the same thing into one parameter
    would overwrite each other's work, so the later one refuses the pair at ``setup``, before any training.
    """

    #: prefix of the metrics this callback logs beside ``sparsity/*`` (``gmp``, ``rigl``, ``set``, ``qat``, ``lc``, ``movement``)
    metric_prefix = ""

    def __init__(self, include: list[str] | None = None, exclude: list[str] | None = None, verbose: bool = True) -> None:
        self.include = as_patterns("include", include)
        self.exclude = as_patterns("exclude", exclude)
        check_bool("verbose", verbose)
        self.verbose = verbose
        self.compressed: dict[str, frozenset[str]] = {}

    def _select(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The parameters ``include``/``exclude`` select (default: every weight that does a matrix product)."""
        return select_targets(pl_module, self.include, self.exclude)

    def _refuse_overlaps(self, trainer: pl.Trainer) -> None:
        """Refuse an earlier callback of this Trainer that writes the same thing into one of this one's parameters."""
        for other in trainer.callbacks:
            if other is self:
                return
            if not isinstance(other, CompressionCallback):
                continue
            clash = {name: what & other.compressed[name] for name, what in self.compressed.items() if name in other.compressed}
            both = sorted(name for name, what in clash.items() if what)
            if both:
                written = sorted(set().union(*(clash[name] for name in both)))
                raise ValueError(
                    f"{type(other).__name__} and {type(self).__name__} both compress {both}: both write their "
                    f"{' and '.join(written)}, so each would overwrite the other's. Give them disjoint layers "
                    f"(`include`/`exclude`, or a per-layer {{glob: value}} mapping){self._overlap_hint}"
                )

    #: appended to the overlap refusal: how to get what the user wanted with one callback
    _overlap_hint = ""

    def _log(self, trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
        """Send ``metrics`` to every logger of the Trainer, at the step of the last optimizer step."""
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=logged_step(trainer))


class SparsityCallback(CompressionCallback):
    """Base class of the pruning callbacks: Lightning hooks over a :class:`~lightning_sparse.core.pruners.Pruner`.

    **The one override point** is :meth:`make_pruner`: a subclass validates its arguments in ``__init__`` and returns,
    from ``make_pruner(trainer, pl_module)`` at ``setup``, the core pruner that does the method (which parameters, its
    schedule, how masks change at a step, its metrics and checkpoint state). Everything else is here and is the same
    for every method: the overlap check, the finiteness check before each decision, masks synchronised across ranks,
    the optimizer state of pruned weights zeroed (``pruner.reset_pruned_state``), pruned weights and their gradients
    held at exactly zero, ``sparsity/*`` and ``pruner.metrics()`` logged to every logger, and ``state_dict`` being the
    pruner's. The base reads only the attributes declared below.
    """

    #: the core object doing the method; built by :meth:`make_pruner` at ``setup`` (``None`` before)
    pruner: Pruner | None
    #: every weight matrix of the model, for ``sparsity/model``
    _matrices: dict[str, Any]
    #: the last optimizer step whose masks were decided, and the last one after which weights were re-masked
    _decided_step: int
    _masked_step: int
    #: re-mask weights after each optimizer step (unless the optimizer keeps zeros zero)
    _reapply: bool
    #: the optimizer's one-shot step hook calling :meth:`Pruner.after_optimizer_step` (``None`` when not armed)
    _after_step_hook: RemovableHandle | None

    def __init__(self, include: list[str] | None = None, exclude: list[str] | None = None, verbose: bool = True) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose)
        self.pruner = None
        self._matrices = {}
        self._decided_step = self._masked_step = -1
        self._reapply = True
        self._after_step_hook = None

    def make_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Pruner:
        """Build this method's pruner over ``pl_module`` (called once per ``fit``, in ``setup``): the one method a
        pruning callback implements. Pass ``name=type(self).__name__`` so the pruner's messages name the callback."""
        raise NotImplementedError(f"{type(self).__name__} must implement `make_pruner(trainer, pl_module)`")

    @property
    def masks(self) -> MaskSet | None:
        """The pruner's masks (``None`` before ``setup``)."""
        return self.pruner.masks if self.pruner is not None else None

    @property
    def targets(self) -> Targets | None:
        """The pruned parameters, with the aliases of tied tensors (``None`` before ``setup``)."""
        return self.pruner.targets if self.pruner is not None else None

    # ----------------------------------------------------------------- hooks: when
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.pruner = self.make_pruner(trainer, pl_module)
            self.pruner.warn = rank_zero_warn
            self.compressed = {name: frozenset({"zeros"}) for name in self.pruner.masks}
            self._refuse_overlaps(trainer)
            self._matrices = weight_matrices(pl_module)
            self._decided_step = self._masked_step = -1
            if self.verbose:
                print_targets(type(self).__name__, pl_module, self.pruner.targets)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        if self.pruner is None:
            return
        masks, step = self.pruner.masks, trainer.global_step
        if step == self._decided_step:  # a second optimizer step within one step: its gradients only need masking
            masks.mask_grads_()
        else:
            self._decided_step = step
            self.pruner.observe(step, lr_factor(optimizer))  # dense gradients: masked below, after deciding
            if self.pruner.decides(step) or grads_are_scaled(trainer):
                self._decide(trainer, step)
            elif not masks.mask_grads_and_check_():  # the steps between decisions: one pass masks and checks
                check_finite(self, trainer, masks.params, step)  # names the tensors (or clears an overflowing sum)
        if self.pruner.before_optimizer_step(step):  # undone right after this optimizer's step
            self._after_step_hook = getattr(optimizer, "optimizer", optimizer).register_step_post_hook(self._after_step)

    def _after_step(self, *_: Any) -> None:
        """Right after the optimizer step that :meth:`Pruner.before_optimizer_step` prepared (or at the end of the
        batch if the step was skipped, as a gradient scaler does on overflow): let the pruner undo what it did."""
        if self._after_step_hook is not None:
            self._after_step_hook.remove()
            self._after_step_hook = None
            self.pruner.after_optimizer_step()

    def _decide(self, trainer: pl.Trainer, step: int) -> None:
        """Check weights and gradients, let the pruner update the masks, then mask the gradients (or first, with
        the masks the forward used, where the pruner asks for that)."""
        pruner = self.pruner
        finite = check_finite(self, trainer, pruner.masks.params, step)
        if pruner.masks_grads_before_update:
            pruner.masks.mask_grads_(finite=finite)
        if pruner.update(step, [optimizer.state for optimizer in trainer.optimizers]):
            self._masks_changed(trainer)
        if not pruner.masks_grads_before_update:
            pruner.masks.mask_grads_(finite=finite)  # checked just now: the faster product is safe

    def _masks_changed(self, trainer: pl.Trainer) -> None:
        """After the pruner changed the masks: the same masks on every rank, no stale optimizer state, a log line."""
        self._sync_masks(trainer)
        for each in trainer.optimizers if self.pruner.reset_pruned_state else ():  # stale momentum must not push pruned weights
            self.pruner.masks.mask_state_(each.state)
        self._log_sparsity(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is not None:
            self._follow_parameters(trainer, pl_module)
            self._plan(trainer)
        # With zero gradients and zero state (both kept so at pruned positions), these optimizers leave a pruned
        # weight at exactly 0, so re-masking the weights after every step would be a wasted pass over them.
        resets = self.pruner is None or self.pruner.reset_pruned_state
        self._reapply = not resets or not all(type(optimizer) in RESETTABLE_OPTIMIZERS for optimizer in trainer.optimizers)
        refuse_several_manual_optimizers(
            self, trainer, pl_module, "masks decided at one optimizer's step would use another network's stale gradients"
        )
        warn_if_no_steps(self, trainer)
        if self.pruner is not None:
            hint_fused_adam(self, trainer, self.pruner.masks.params)
            if self.pruner.grows:
                warn_if_optimizer_state_not_reset(self, trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._after_step()  # if the optimizer step was skipped
        if self.pruner is not None and self._reapply and trainer.global_step != self._masked_step:
            self._masked_step = trainer.global_step  # an optimizer step ran: it may have moved pruned weights
            self.pruner.masks.apply_()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is not None and self.verbose:
            self._print_table()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._after_step()  # a crash between preparing an optimizer step and taking it leaves the model as pruned

    def _plan(self, trainer: pl.Trainer) -> None:
        """Plan the pruner's schedule for this run's length once; a resumed run keeps its checkpoint's steps, with a
        warning when the run length changed since they were planned."""
        schedule = self.pruner.schedule
        if schedule is not None and schedule.resolved:
            if schedule.fractional:
                where = f"start step {schedule.start_step}, end step {schedule.end_step}"
                warn_if_run_length_changed(self, trainer, schedule.planned_steps, where)
            return
        self.pruner.start(trainer.estimated_stepping_batches)

    # ----------------------------------------------------------------- what
    def _follow_parameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Point the pruner at the model's parameters as they are at ``fit`` start (FSDP2 replaced them by sharded
        ``DTensor`` ones after ``setup``); masks set before (a sparse start) are cut to each rank's shard."""
        masks = self.pruner.masks
        current = current_parameters(self, trainer, pl_module, list(masks.params))
        if all(current[name] is param for name, param in masks.params.items()):
            return
        self.pruner.rebind(current)
        self._matrices = weight_matrices(pl_module)

    def _sync_masks(self, trainer: pl.Trainer) -> None:
        """Make every rank hold rank 0's masks (they agree already; this guards against nondeterministic kernels)."""
        if trainer.world_size > 1:
            masks = self.pruner.masks
            masks.load_state_dict(trainer.strategy.broadcast(masks.state_dict(), src=0))

    def _log_sparsity(self, trainer: pl.Trainer) -> None:
        masks = self.pruner.masks
        metrics = {"sparsity/global": masks.sparsity(), "sparsity/model": model_sparsity(self._matrices)}
        metrics.update({f"sparsity/{name}": masks.sparsity(name) for name in masks})
        metrics.update(self.pruner.metrics())
        self._log(trainer, metrics)

    def _print_table(self) -> None:
        pruner = self.pruner
        stats = report.stats_from_masks(pruner.masks, pruner.targets.label)
        print_rank_zero(report.sparsity_table(stats, title=f"{type(self).__name__}: sparsity per layer"))

    # ----------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The pruner's state: masks (packed bits), the resolved schedule and the method's own state."""
        return self.pruner.state_dict() if self.pruner is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "masks" not in state_dict:
            return
        if self.pruner is None:
            rank_zero_warn(f"{type(self).__name__}: checkpoint masks were given before `setup`; they are ignored")
            return
        self.pruner.load_state_dict(state_dict)  # the masks are validated before any is loaded
