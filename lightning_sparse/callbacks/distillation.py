"""Distillation from a frozen teacher during ``fit`` (recovery after pruning), without touching ``training_step``: the
Lightning adapter over :mod:`lightning_sparse.core.distill`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_sparse.callbacks.base import CALLBACK_BASES
from lightning_sparse.core.distill import as_logits, first_tensor, kd_loss, recovery_loss, repeated_blocks, squarehead_loss
from lightning_sparse.core.shards import full_tensor, sharded_like, unsharded_copy
from lightning_sparse.core.targets import as_patterns


class Distillation(*CALLBACK_BASES):
    """Train on ``(1 - alpha) · L + alpha · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + hidden_weight · L_hidden``, where
    ``L`` is what the user's ``training_step`` returns, ``z_s`` the logits of the model's forward in that step and
    ``z_t`` a frozen teacher's on the same inputs (Hinton et al. 2015); ``L_hidden`` is SquareHead's per-layer
    ``MSE(h_s, h_t) / Var(h_t)`` (Kurtić et al. 2023), optional. ``alpha=0`` (and ``hidden_weight=0``) leaves training
    exactly as without the callback; ``alpha=1`` is pure distillation.

    How: at ``fit`` start the LightningModule's ``training_step`` is wrapped (restored at the end): the calls of the
    student's forward during the step are recorded with hooks (their inputs and outputs), the teacher runs on the same
    inputs under ``no_grad`` in ``eval`` mode, and the returned loss is replaced by the recovery loss (a dict's
    ``"loss"`` too). Logs ``distill/kl`` (the KL at temperature ``T``, before ``T²``) and ``distill/hidden``.

    The teacher is a frozen copy of the student taken at ``fit`` start (by default: the dense model, before
    :class:`OneShotPruning` prunes at its first batch), or the module given; it moves to the student's device and runs
    beside it on every rank under DDP. Under FSDP2 (``fully_shard``, whose modules refuse ``copy.deepcopy``) the copy is
    the whole model, unsharded, on every rank (:func:`~lightning_sparse.core.shards.unsharded_copy`: the shards
    all-gathered once at fit start); it runs without communication, so training equals DDP's bit for bit, at the cost
    of one whole model's memory per rank (for a model too large for that, give a ``teacher=`` ``fully_shard``-ed like
    the model: it runs with all-gathers on every rank). It is not saved in checkpoints unless ``save_teacher=True``
    (then as whole tensors, in a sharded checkpoint too, cut again into a sharded teacher's shards on resume): a
    resumed run without it copies the resumed (pruned) model, and says so.

    Composes with every compression callback (GMP, one-shot, structured, QAT): it changes only the loss.

    Args:
        teacher: the teacher module (its forward takes the student's inputs); default: a copy of the student.
        alpha: weight of the distillation term, in [0, 1].
        temperature: softmax temperature ``T`` > 0.
        hidden_weight: weight ``β >= 0`` of SquareHead's hidden-state loss (0: off).
        module: name of the submodule whose forward returns the logits (default: the LightningModule's own forward,
            ``self(...)``); the teacher copy is of this submodule.
        hidden_modules: glob(s) of the submodules whose outputs are compared with ``hidden_weight`` (default: the
            entries of the largest ``nn.ModuleList``, a transformer's layers).
        logits: ``fn(output) -> logits`` for a forward whose output is not the logits, a ``.logits`` or ``["logits"]``
            (Python API only).
        save_teacher: keep the teacher's weights in the checkpoint (exact resume of a copied teacher).
    """

    def __init__(
        self,
        teacher: nn.Module | None = None,
        alpha: float = 0.5,
        temperature: float = 2.0,
        hidden_weight: float = 0.0,
        module: str | None = None,
        hidden_modules: str | list[str] | None = None,
        logits: Callable[[Any], Tensor] | None = None,
        save_teacher: bool = False,
    ) -> None:
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise ValueError(f"`teacher` must be a torch.nn.Module or None (a copy of the model), got {type(teacher).__name__}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}")
        if isinstance(hidden_weight, bool) or not isinstance(hidden_weight, (int, float)) or not hidden_weight >= 0:
            raise ValueError(f"`hidden_weight` must be a number >= 0, got {hidden_weight!r}")
        if module is not None and not isinstance(module, str):
            raise ValueError(f"`module` must be a submodule name (e.g. 'model') or None, got {module!r}")
        if logits is not None and not callable(logits):
            raise ValueError(f"`logits` must be a function output -> logits, got {logits!r}")
        if not isinstance(save_teacher, bool):
            raise ValueError(f"`save_teacher` must be a bool, got {save_teacher!r}")
        self.given_teacher = teacher
        self.alpha, self.temperature, self.hidden_weight = float(alpha), float(temperature), float(hidden_weight)
        self.module, self.logits, self.save_teacher = module, logits, save_teacher
        self.hidden_modules = as_patterns("hidden_modules", hidden_modules)
        self.teacher: nn.Module | None = None
        self._teacher_loaded = False
        self._saved_teacher: dict[str, Tensor] | None = None
        self._hooks: list[Any] = []
        self._recording = False
        self._calls: list[list[Any]] = []  # [args, kwargs, output] of each student forward in the step
        self._student_hidden: list[Tensor] = []
        self._teacher_hidden: list[Tensor] = []
        self._wrapped: pl.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, temperature=self.temperature, module=self.module)

    # ----------------------------------------------------------------- hooks: when
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        student = self._student(pl_module)
        self._teacher_loaded = False
        self.teacher = self._make_teacher(trainer, pl_module, student)
        self._install(pl_module, student)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On a resumed run everything has been restored by now: a strategy that restores the checkpoint only after
        ``on_fit_start`` (``ModelParallelStrategy``, FSDP2) has loaded the saved teacher through
        :meth:`load_state_dict`; without one, the copied teacher takes the resumed model's weights (as under DDP,
        where the model is restored before ``on_fit_start``)."""
        if trainer.ckpt_path is None or self._teacher_loaded or self.given_teacher is not None:
            return
        rank_zero_warn(
            "Distillation: resumed without the teacher's weights (`save_teacher=False`), so the teacher is a copy "
            "of the model as resumed, not the model the run started from; give `teacher=` or `save_teacher=True`"
        )
        own = self.teacher.state_dict()  # (the same keys on every rank: full_tensor is a collective)
        whole = {k: full_tensor(v.detach()) for k, v in self._student(pl_module).state_dict().items() if k in own}
        self.teacher.load_state_dict(whole, strict=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove()

    def state_dict(self) -> dict[str, Any]:
        if self.save_teacher and self.teacher is not None:
            # whole tensors (a sharded teacher's shards gathered: every rank saves the same state)
            return {"teacher": {k: full_tensor(v.detach()).cpu() for k, v in self.teacher.state_dict().items()}}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_teacher = state_dict.get("teacher")
        if self.teacher is not None and self._saved_teacher is not None:  # restored after on_fit_start (FSDP2)
            self._load_teacher(self.teacher)

    # ----------------------------------------------------------------- what
    def _student(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            names = [name for name, _ in pl_module.named_children()]
            raise ValueError(f"`module`={self.module!r} is not a submodule of {type(pl_module).__name__}; its children: {names}") from None

    def _make_teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule, student: nn.Module) -> nn.Module:
        if self.given_teacher is not None:
            teacher = self.given_teacher
        else:
            teacher = _frozen_copy(student)
        if self._saved_teacher is not None:
            self._load_teacher(teacher)
        teacher.to(next(student.parameters()).device)
        teacher.eval()
        teacher.requires_grad_(False)
        return teacher

    def _load_teacher(self, teacher: nn.Module) -> None:
        """Load the saved (whole) teacher weights; a sharded teacher takes each cut into its own shards."""
        own = teacher.state_dict()
        teacher.load_state_dict({k: sharded_like(v, own[k]) if k in own else v for k, v in self._saved_teacher.items()})
        self._saved_teacher, self._teacher_loaded = None, True

    def _install(self, pl_module: pl.LightningModule, student: nn.Module) -> None:
        def before(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._recording:
                self._calls.append([args, kwargs, None])

        def after(_module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> None:
            if self._recording and self._calls and self._calls[-1][2] is None:
                self._calls[-1][2] = output

        self._hooks = [student.register_forward_pre_hook(before, with_kwargs=True),
                       student.register_forward_hook(after, with_kwargs=True)]  # fmt: skip
        if self.hidden_weight:
            names = self._hidden_names(student)
            for name in names:
                self._hooks.append(student.get_submodule(name).register_forward_hook(self._record(self._student_hidden, True)))
                self._hooks.append(self.teacher.get_submodule(name).register_forward_hook(self._record(self._teacher_hidden, False)))
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._calls.clear()
            self._student_hidden.clear()
            self._recording = True
            try:
                output = original(*args, **kwargs)
            finally:
                self._recording = False
            return self._distill(pl_module, output)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = pl_module

    def _record(self, into: list[Tensor], student: bool) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if not student or self._recording:
                into.append(first_tensor(output))
        return hook

    def _hidden_names(self, student: nn.Module) -> list[str]:
        if self.hidden_modules is None:
            names = repeated_blocks(student)
            if not names:
                raise ValueError("Distillation: `hidden_weight` > 0 but the model has no nn.ModuleList of layers; name the layers with `hidden_modules`")
            return names
        names = [name for name, _ in student.named_modules() if name and any(fnmatchcase(name, p) for p in self.hidden_modules)]
        if not names:
            raise ValueError(f"`hidden_modules` {self.hidden_modules} match no submodule of {type(student).__name__}")
        return names

    def _remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._wrapped is not None and "training_step" in vars(self._wrapped):
            del self._wrapped.training_step
        self._wrapped = None

    def _distill(self, pl_module: pl.LightningModule, output: Any) -> Any:
        loss = output["loss"] if isinstance(output, Mapping) else output
        if loss is None:  # the user skipped this batch
            return output
        calls = [call for call in self._calls if call[2] is not None]
        if not calls:
            where = f"`{self.module}`" if self.module else f"{type(pl_module).__name__}'s forward (`self(...)`)"
            raise ValueError(
                f"Distillation: `training_step` did not call {where}, so there are no student logits to distil into; "
                f"give `module=` naming the submodule it calls (e.g. 'model')"
            )
        kls = []
        self._teacher_hidden.clear()
        for args, kwargs, out in calls:
            student = as_logits(out, self.logits, "the student")
            with torch.no_grad():
                teacher = as_logits(self.teacher(*args, **kwargs), self.logits, "the teacher")
            if teacher.shape != student.shape:
                raise ValueError(
                    f"Distillation: the teacher's logits have shape {tuple(teacher.shape)} but the student's "
                    f"{tuple(student.shape)}; the teacher must map the same inputs to the same classes"
                )
            kls.append(kd_loss(student, teacher, self.temperature))
        kl = torch.stack(kls).mean()
        hidden = None
        if self.hidden_weight:
            hidden = squarehead_loss(self._student_hidden, self._teacher_hidden)
            pl_module.log("distill/hidden", hidden.detach())
        pl_module.log("distill/kl", kl.detach())
        total = recovery_loss(loss, kl, self.temperature, self.alpha, hidden, self.hidden_weight)
        if isinstance(output, Mapping):
            return {**output, "loss": total}
        return total


def _frozen_copy(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` that does not drag its Trainer along (a LightningModule holds one); of an FSDP2-sharded
    student, a whole (unsharded) copy (:func:`~lightning_sparse.core.shards.unsharded_copy`)."""
    held = "_trainer" in vars(student)  # either Lightning package's module
    trainer = vars(student).get("_trainer")
    if held:
        student._trainer = None
    try:
        return unsharded_copy(student)
    finally:
        if held:
            student._trainer = trainer
