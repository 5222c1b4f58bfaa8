"""The pruner protocol: one object per method that owns its masks, its step schedule and its state.

A pruner is built over a model (:meth:`Pruner.select` picks the parameters and a :class:`MaskSet` is made over them),
planned against the run's optimizer steps (:meth:`Pruner.start`), and then, at every optimizer step with the dense
gradients in ``.grad``, observes them (:meth:`Pruner.observe`), says whether the step may change the masks
(:meth:`Pruner.decides`) and updates them (:meth:`Pruner.update`). :meth:`Pruner.metrics` are the numbers to log after
an update and :meth:`Pruner.state_dict` / :meth:`Pruner.load_state_dict` carry everything an exact resume needs.

The Lightning callbacks (:mod:`lightning_sparse.callbacks`) are hooks over these objects; a plain PyTorch or Fabric
loop drives the same object with :meth:`Pruner.step`::

    pruner = MagnitudePruner(net, sparsity=0.9, schedule=StepSchedule(start=8, end=40, frequency=8))
    pruner.start(total_steps)
    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        loss(net(x), y).backward()
        pruner.step(step, [optimizer.state])   # observe, update on the schedule, mask gradients and stale state
        optimizer.step()
        pruner.after_optimizer_step()          # pruned weights back to exactly zero

Implementations: :class:`MagnitudePruner` (gradual magnitude pruning, Zhu & Gupta 2017, with channel/head/neuron/N:M
granularities), :class:`MovementPruner` (Sanh et al. 2020), :class:`RigLPruner` (Evci et al. 2020; SET with
``grow="random"``) and :class:`OneShotPruner` (SparseGPT, Wanda, magnitude, a model's zeros, at one step).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_sparse.core.allocation import zero_counts
from lightning_sparse.core.dynamic import DECAYS, GROW_INITS, move_connections, random_masks, update_fraction
from lightning_sparse.core.groups import GroupedChannels, find_groups
from lightning_sparse.core.heads import GroupSet, check_group_sparsity, extend_targets, prune_groups_by_magnitude, prune_groups_by_scores, select_groups
from lightning_sparse.core.masks import MaskSet, pack, unpack
from lightning_sparse.core.movement import MovementScores, prune_by_movement, signal_warning
from lightning_sparse.core.oneshot import prune_one_shot
from lightning_sparse.core.pruning import prune_by_magnitude
from lightning_sparse.core.schedules import StepSchedule
from lightning_sparse.core.structured import Granularity, channels_to_prune, check_shape, expand_granularity
from lightning_sparse.core.targets import Targets, per_layer, select_targets

if TYPE_CHECKING:
    from lightning_sparse.structure.plan import StructurePlan

Sparsity = float | dict[str, float]
OptimizerStates = Sequence[Mapping[Tensor, Mapping[str, Any]]]


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def lr_factor(optimizer: torch.optim.Optimizer) -> float:
    """Where the weights' learning-rate schedule stands: the first group's learning rate over its initial one (1
    without a scheduler). Movement scores follow the weights' warm-up and decay, as in Sanh et al.'s code."""
    group = optimizer.param_groups[0]
    initial = group.get("initial_lr")
    return float(group["lr"]) / float(initial) if initial else 1.0


class Pruner(ABC):
    """The protocol every pruning method implements; the callbacks and plain loops call only these members.

    Attributes:
        masks: the :class:`MaskSet` over the selected parameters (the one place masks live).
        targets: the selected parameters, with the aliases of tied tensors.
        schedule: when the masks change and the sparsity aimed at (``None`` for a pruner without one).
        sparsity: the final sparsity as given: a number or ``{glob: sparsity}``.
        layer_sparsity: ``{parameter: sparsity}`` when ``sparsity`` is a mapping, else ``None``.
        name: how messages name the pruner (a callback passes its own class name).
        warn: how warnings are emitted (``warnings.warn``; a callback passes rank-zero warnings).
        metric_prefix: prefix of :meth:`metrics` beside ``sparsity/*``.
        reset_pruned_state: zero the optimizer state (momentum, Adam moments) of pruned weights when masks change.
        grows: the pruner revives weights and zeroes their optimizer state (so an optimizer whose state it cannot
            reset deserves a warning).
        masks_grads_before_update: gradients are masked with the masks of the forward that took them, before an
            update changes the masks (the paper's ``W ⊙ M`` for movement pruning); else with the updated masks.

    ``__init__`` selects the parameters (:meth:`select`) and builds :attr:`masks`, so a subclass sets the attributes
    its ``select`` reads before calling it. ``update`` is the one abstract member.
    """

    metric_prefix = ""
    reset_pruned_state = True
    grows = False
    masks_grads_before_update = False

    def __init__(
        self,
        model: nn.Module,
        sparsity: Sparsity,
        schedule: StepSchedule | None,
        *,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        dense_first_layer: bool = False,
        name: str | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name or type(self).__name__
        self.warn = warn or _warn
        self.sparsity: Sparsity = {k: float(v) for k, v in sparsity.items()} if isinstance(sparsity, Mapping) else float(sparsity)
        self.schedule = schedule
        self.include, self.exclude, self.dense_first_layer = include, exclude, dense_first_layer
        self.layer_sparsity: dict[str, float] | None = None
        self.targets: Targets = self.select(model)
        self.masks = MaskSet(self.targets)

    # ----------------------------------------------------------------- the protocol
    def select(self, model: nn.Module) -> Targets:
        """The parameters to prune: ``include``/``exclude`` (default every weight doing a matrix product), the first
        one left dense with ``dense_first_layer``, then the layers a per-layer ``sparsity`` mapping names."""
        targets = select_targets(model, self.include, self.exclude)
        if self.dense_first_layer and len(targets) > 1:
            targets = targets.subset(list(targets)[1:])  # the first selected parameter, in model order, stays dense
        self.layer_sparsity = per_layer("sparsity", self.sparsity, targets) if isinstance(self.sparsity, Mapping) else None
        return targets.subset(self.layer_sparsity) if self.layer_sparsity else targets

    def final_sparsity(self) -> Sparsity:
        """The final sparsity: one number, or ``{parameter name: sparsity}`` from a per-layer mapping."""
        return self.layer_sparsity if self.layer_sparsity else self.sparsity

    def start(self, total_steps: float) -> bool:
        """Plan the schedule for a run of ``total_steps`` optimizer steps (``inf``: unknown). Returns whether it was
        planned now (False: it was restored from a checkpoint and is kept)."""
        return self.schedule.resolve(total_steps) if self.schedule is not None else False

    def observe(self, step: int, lr_factor: float = 1.0) -> None:  # noqa: B027 - a hook most pruners leave empty
        """See the dense gradients of ``step`` (once per optimizer step, before any masking); a no-op by default."""

    def before_optimizer_step(self, step: int) -> bool:
        """Just before the optimizer steps (gradients masked): change the weights it steps, if the method needs to.
        Returns whether it did; then :meth:`after_optimizer_step` must follow the step. A no-op by default."""
        return False

    def after_optimizer_step(self) -> None:
        """Right after the optimizer step: pruned weights back to exactly zero (the step may have moved them)."""
        self.masks.apply_()

    def decides(self, step: int) -> bool:
        """Whether optimizer ``step`` may change the masks (weights and gradients are checked before it does)."""
        return self.schedule is not None and self.schedule.is_update(step)

    @abstractmethod
    def update(self, step: int, optimizer_states: OptimizerStates = ()) -> bool:
        """Change the masks for optimizer ``step`` if it is an update step; return whether they changed."""

    def metrics(self) -> dict[str, float]:
        """Numbers to log beside ``sparsity/*`` after an update (``<metric_prefix>/...``)."""
        return {}

    def rebind(self, params: Mapping[str, nn.Parameter]) -> None:
        """Follow new tensors for the same parameters (FSDP2's ``fully_shard`` replaces them after setup)."""
        self.masks.rebind(params)
        self.targets = self.targets.rebound(params)

    def state_dict(self) -> dict[str, Any]:
        """The masks (packed bits), the resolved schedule and the method's own state."""
        schedule = self.schedule.state_dict() if self.schedule is not None else {}
        return {"masks": self.masks.state_dict(), **schedule}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.masks.load_state_dict(state["masks"])  # validates every mask before loading any
        if self.schedule is not None:
            self.schedule.load_state_dict(state)

    # ----------------------------------------------------------------- for plain loops
    def step(self, step: int, optimizer_states: OptimizerStates = (), lr_factor: float = 1.0) -> bool:
        """One optimizer step of a plain loop, after ``backward`` and before ``optimizer.step()``: observe the dense
        gradients, update the masks if ``step`` is an update step (zeroing the optimizer state of pruned weights),
        then mask the gradients (with the masks of this step's forward where ``masks_grads_before_update``).
        Returns whether the masks changed. After ``optimizer.step()`` call :meth:`after_optimizer_step`."""
        self.observe(step, lr_factor)
        if self.masks_grads_before_update:
            self.masks.mask_grads_()
        changed = self.decides(step) and self.update(step, optimizer_states)
        if changed and self.reset_pruned_state:
            for state in optimizer_states:
                self.masks.mask_state_(state)
        if not self.masks_grads_before_update:
            self.masks.mask_grads_()
        self.before_optimizer_step(step)
        return changed


class MagnitudePruner(Pruner):
    """Gradual magnitude pruning (Zhu & Gupta 2017, arXiv 1710.01878): at every update step of ``schedule`` the
    smallest-magnitude weights go until the schedule's sparsity ``s_t = s_f + (s_i - s_f)(1 - (t - start) /
    (end - start))^power`` is reached (``cubic``: power 3), then it is held.

    ``granularity`` (one value or ``{glob: value}``): ``unstructured``, ``channel`` (coupled channel groups found from one
    real forward on ``example_inputs``, a tensor tuple or a function returning one, called only when a layer
    asks for channels), ``head``/``neuron`` (:mod:`lightning_sparse.core.heads`) or ``"N:M"``. ``channel_norm`` ranks
    channels, heads and neurons; ``channel_multiple`` rounds the channels kept. ``distribution`` allocates one
    ``sparsity`` over layers (``uniform``, ``global``, ``erk``).
    """

    metric_prefix = "gmp"
    schedule: StepSchedule

    def __init__(
        self,
        model: nn.Module,
        sparsity: Sparsity = 0.9,
        schedule: StepSchedule | None = None,
        *,
        distribution: str = "uniform",
        granularity: str | Mapping[str, str] = "unstructured",
        channel_norm: str = "l1",
        channel_multiple: int = 1,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        dense_first_layer: bool = False,
        example_inputs: tuple[Tensor, ...] | Callable[[], tuple[Tensor, ...] | None] | None = None,
        name: str | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.distribution, self.channel_norm, self.channel_multiple = distribution, channel_norm, channel_multiple
        self.granularity = dict(granularity) if isinstance(granularity, Mapping) else granularity
        self.heads = GroupSet()  # heads / neurons pruned whole (core/heads.py), found in select
        self.groups: GroupedChannels | None = None  # coupled channel groups, found below
        self.scheduled: Sparsity | None = None  # the schedule's target at the last mask update
        super().__init__(model, sparsity, schedule or StepSchedule(), include=include, exclude=exclude,
                         dense_first_layer=dense_first_layer, name=name, warn=warn)  # fmt: skip
        self.layer_granularity: dict[str, Granularity] = expand_granularity(self.granularity, self.targets)
        for layer in self.heads.layers:  # every member of a head/neuron group (biases too) follows its group
            self.layer_granularity.update({name: Granularity(layer.kind) for name in layer.params})
        recurrent = any(layer.pattern == "recurrent:rnn" for layer in self.heads.layers)
        channel = [name for name, g in self.layer_granularity.items() if g.kind == "channel"]
        inputs = self._example_inputs(example_inputs) if recurrent or channel else None  # read once, only if needed
        if recurrent:
            self._check_recurrent_readers(model, inputs)
        if channel:
            self.groups = self._channel_groups(model, channel, inputs)
        self.check_layers()
        self.schedule.final = self.final_sparsity()

    def select(self, model: nn.Module) -> Targets:
        """The base's targets, plus every member of the heads/neurons ``granularity`` asks for (biases, output
        projections), each given its group layer's sparsity."""
        targets = super().select(model)
        self.heads = select_groups(model, targets, expand_granularity(self.granularity, targets))
        if not self.heads:
            return targets
        if self.layer_sparsity:
            check_group_sparsity(self.heads, self.layer_sparsity)
            for layer in self.heads.layers:
                value = next(self.layer_sparsity[p] for p in layer.params if p in self.layer_sparsity)
                self.layer_sparsity.update({p: value for p in layer.params})
        return extend_targets(model, targets, self.heads)

    def _example_inputs(self, example_inputs: Any) -> tuple[Tensor, ...] | None:
        """``example_inputs`` (called if it is a function) on the device of the pruned parameters."""
        inputs = example_inputs() if callable(example_inputs) else example_inputs
        device = next(iter(self.masks.params.values())).device
        return tuple(x.to(device) for x in inputs) if inputs else None

    def _check_recurrent_readers(self, model: nn.Module, inputs: tuple[Tensor, ...] | None) -> None:
        """Refuse recurrent hidden units whose reader (found by module order) does not read the recurrent output as it
        is, checked on the example input (:func:`lightning_sparse.structure.recurrent.check_readers`)."""
        from lightning_sparse.structure.recurrent import check_readers  # the structure package imports core

        check_readers(model, self.heads.layers, inputs)

    def _channel_groups(self, model: nn.Module, channel: list[str], inputs: tuple[Tensor, ...] | None) -> GroupedChannels:
        """The coupled groups of the ``channel`` targets; their companions (biases, BatchNorm affine entries) join
        :attr:`masks`, so they are masked, checkpointed and restored like the weights."""
        from fnmatch import fnmatchcase

        plan = find_groups(model, inputs)
        params = dict(model.named_parameters())
        patterns = [self.exclude] if isinstance(self.exclude, str) else list(self.exclude or [])
        excluded = [name for name in params if any(fnmatchcase(name, p) for p in patterns)]
        grouped = GroupedChannels(plan, self.targets, channel, params, excluded)
        if grouped.companions:
            self.masks = MaskSet({**self.masks.params, **grouped.companions})
        return grouped

    def final_sparsity(self) -> Sparsity:
        """The target of every layer at ``end``, with N:M layers at ``1 - N/M``."""
        final = super().final_sparsity()
        fixed = {name: float(g.final_sparsity or 0.0) for name, g in self.layer_granularity.items() if g.kind == "nm"}
        if not fixed:
            return final
        return {name: fixed.get(name, final[name] if isinstance(final, dict) else final) for name in self.layer_granularity}

    def check_layers(self) -> None:
        """Refuse, before training, a granularity a layer's shape cannot hold or a channel target removing every channel."""
        final = self.final_sparsity()
        initial = self.schedule.initial
        for name, granularity in self.layer_granularity.items():
            shape = self.masks.params[name].shape
            check_shape(name, shape, granularity)
            layer_final = final[name] if isinstance(final, dict) else final
            if granularity.kind == "channel":
                channels_to_prune(name, layer_final, shape[granularity.axis or 0], self.channel_multiple)
            if name in self.heads.params:
                continue  # a head/neuron member: checked with its group below
            if initial > layer_final:
                raise ValueError(
                    f"`initial_sparsity`={initial} is above the final sparsity {layer_final:.4g} of {name!r} ({granularity})"
                )
        if self.groups is not None:
            self.groups.check(final, self.channel_multiple)
        check_group_sparsity(self.heads, final)

    def start(self, total_steps: float) -> bool:
        """Plan the schedule; refuse ``end`` before ``start`` and warn when ``end`` is past the run's last step."""
        if not super().start(total_steps):
            return False
        start, end = self.schedule.steps()
        if end < start:
            raise ValueError(f"`end` (step {end}) must not come before `start` (step {start})")
        if 0 < total_steps <= end:  # a run with no steps at all is said once, by the callback
            self.warn(
                f"{self.name}: `end` is step {end} but training has only {total_steps} optimizer steps; sparsity "
                f"{self.sparsity} will not be reached"
            )
        return True

    def update(self, step: int, optimizer_states: OptimizerStates = ()) -> bool:
        if not self.decides(step):
            return False
        target = self.schedule.target(step)
        self.prune(target, step)
        self.scheduled = target
        return True

    def prune(self, target: Sparsity, step: int | None = None) -> None:
        """Write the masks for ``target`` (one sparsity, or one per parameter): the smallest magnitudes go."""
        skip = self.groups.names if self.groups is not None else ()
        prune_by_magnitude(self.masks, target, self.distribution, self.layer_granularity, self.channel_norm, skip=skip,
                           channel_multiple=self.channel_multiple)  # fmt: skip
        if self.groups is not None:
            self.groups.prune(self.masks, target, self.channel_norm, self.channel_multiple)
        if self.heads:
            prune_groups_by_magnitude(self.masks, self.heads, target, self.channel_norm)

    @property
    def structure_plan(self) -> StructurePlan | None:
        """The heads/neurons found at set-up and which the masks keep (``None`` without such units), for
        ``deploy(model, x, plan=...)``; also in :meth:`state_dict` as ``"structure_plan"`` (plain data)."""
        from lightning_sparse.structure.plan import StructurePlan  # the structure package imports core

        return StructurePlan.from_masks(self.heads, self.masks) if self.heads else None

    def state_dict(self) -> dict[str, Any]:
        plan = self.structure_plan
        return {**super().state_dict(), **({"structure_plan": plan.state_dict()} if plan is not None else {})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuse a checkpoint whose structure plan describes other units than this model's (a changed head count with
        the same weight shapes would otherwise load masks that cut heads in the wrong places), then load."""
        if state.get("structure_plan") is not None:
            self.check_plan(state["structure_plan"])
        super().load_state_dict(state)

    def check_plan(self, stored: Mapping[str, Any]) -> None:
        """A ``ValueError`` naming the first unit layer that differs between ``stored`` (a checkpoint's
        ``"structure_plan"``) and the units found in this model at set-up."""
        from lightning_sparse.structure.plan import StructurePlan  # the structure package imports core

        found = {(layer.module, layer.kind): layer for layer in self.heads.layers}
        advice = "the model's layout or `granularity` changed since the checkpoint was written; resume with the same ones"
        for saved in StructurePlan.from_state(stored).layers:
            mine = found.pop((saved.module, saved.kind), None)
            if mine is None:
                raise ValueError(f"{self.name}: the checkpoint prunes the {saved.kind}s of {saved.module!r} "
                                 f"({saved.describe()}), which are not units of this model: {advice}")  # fmt: skip
            if mine != saved:
                field = next(f for f in ("count", "width", "query_heads", "kv_heads", "members", "pattern", "shared",
                                         "module_type") if getattr(mine, f) != getattr(saved, f))  # fmt: skip
                raise ValueError(f"{self.name}: the checkpoint's units of {saved.module!r} differ from this model's "
                                 f"({field}: {getattr(saved, field)!r} in the checkpoint, {getattr(mine, field)!r} here; "
                                 f"checkpoint: {saved.describe()}; here: {mine.describe()}): {advice}")  # fmt: skip
        if found:
            module, kind = next(iter(found))
            raise ValueError(f"{self.name}: this model's {kind}s of {module!r} are units the checkpoint does not prune: {advice}")

    def metrics(self) -> dict[str, float]:
        """``<prefix>/target_sparsity``: the schedule's target at this update (per layer too when they differ)."""
        if self.scheduled is None:
            return {}
        prefix = self.metric_prefix
        if not isinstance(self.scheduled, dict):
            return {f"{prefix}/target_sparsity": float(self.scheduled)}
        sizes = {name: self.masks.numel(name) for name in self.scheduled}
        mean = sum(self.scheduled[n] * sizes[n] for n in sizes) / (sum(sizes.values()) or 1)
        return {f"{prefix}/target_sparsity": mean, **{f"{prefix}/target_sparsity/{n}": float(s) for n, s in self.scheduled.items()}}


class MovementPruner(MagnitudePruner):
    """Hard movement pruning (Sanh, Wolf & Rush 2020, arXiv 2005.07683) on the magnitude pruner's schedule: masks are
    the top ``1 - s_t`` of the movement scores ``S`` (:class:`~lightning_sparse.core.movement.MovementScores`,
    trained from ``w ⊙ ∂L/∂w`` by :meth:`observe` at every step until ``end``), recomputed from ``S`` alone so a pruned
    weight whose score rose comes back with its latent value. Until ``end`` pruned weights move as the paper's dense
    ``W`` does (Hugging Face ``examples/research_projects/movement-pruning``, ``emmental.MaskedLinear``: the forward
    uses ``W ⊙ M``, the optimizer steps all of ``W``): they keep their optimizer state, gradients are masked with the
    masks of the forward that took them, and each optimizer step also steps their values (momentum, Adam moments,
    decoupled weight decay), which :meth:`before_optimizer_step` lends to the model for the step alone and
    :meth:`after_optimizer_step` takes back into the latent copy, leaving exact zeros in the model.

    ``check_signal``: at the first mask update that prunes, warn once (through ``warn``) when the scores are still
    minibatch noise (:func:`~lightning_sparse.core.movement.signal_warning`); costs two more weight-sized fp32 tensors
    until that update."""

    metric_prefix = "movement"
    reset_pruned_state = False
    masks_grads_before_update = True

    def __init__(
        self, model: nn.Module, sparsity: Sparsity = 0.9, schedule: StepSchedule | None = None, *, score_rule: str = "adam",
        score_lr: float = 1e-2, check_signal: bool = True, **options: Any,
    ) -> None:  # fmt: skip
        super().__init__(model, sparsity, schedule, **options)
        self.score_rule = score_rule
        self.scores = MovementScores(self.masks.params, rule=score_rule, lr=score_lr, track_signal=check_signal)
        self.lent = False  # the model holds the pruned weights' values for an optimizer step

    def observe(self, step: int, lr_factor: float = 1.0) -> None:
        """One step of the scores on the dense gradients, until the last mask update (``end``; after it they would
        be computed for nothing)."""
        if self.lent:
            raise RuntimeError(
                f"{self.name}: the pruned weights lent to the model for the last optimizer step were not taken back: "
                f"call `pruner.after_optimizer_step()` after every `optimizer.step()` (the Lightning callback does)"
            )
        end = self.schedule.end_step
        if end is None or step <= end:
            self.scores.accumulate_(lr_factor)

    def update(self, step: int, optimizer_states: OptimizerStates = ()) -> bool:
        """At an update step, the top ``1 - s`` of the scores at the schedule's sparsity of ``step + 1``: these masks
        are the next forward's, and the paper's code sets the kept fraction of a step (``schedule_threshold``) before
        that step's forward. Measured: with the sparsity of ``step`` instead, the masks ran one step behind those of
        the paper's code ported (``benchmarks/movement_reference.py``; the weights of the two runs are bit-identical
        until pruning begins), and Adam-stepped scores amplified that into a different model (4 MiniLM layers, seed 3:
        a constant predictor where the port keeps 99.17%)."""
        if not self.decides(step):
            return False
        target = self.schedule.target(step + 1)
        self.prune(target, step)
        self.scheduled = target
        return True

    def before_optimizer_step(self, step: int) -> bool:
        """Lend the pruned weights' values to the model so the optimizer steps them too (as the paper's dense ``W``),
        while a later mask update may still bring them back (before ``end``)."""
        end = self.schedule.end_step
        self.lent = bool(self.scores.latent) and (end is None or step < end)
        if self.lent:
            self.scores.lend_()
        return self.lent

    def after_optimizer_step(self) -> None:
        """Take the lent values back (stepped by the optimizer) into the latent copy; pruned weights exactly zero."""
        if self.lent:
            self.scores.take_back_(self.masks)
            self.lent = False
        else:
            self.masks.apply_()

    def prune(self, target: Sparsity, step: int | None = None) -> None:
        missing = self.scores.missing()
        if missing:
            raise ValueError(
                f"{self.name}: no gradient has reached parameter {missing[0]!r} by optimizer step {step}, so its "
                f"movement scores (S = -sum of w * dL/dw over the steps) were never accumulated and cannot rank its "
                f"weights (frozen or unused in forward?). Leave it out with `exclude`, or begin later with `start`. "
                f"Without scores: {missing}"
            )
        if self.scores.signal_sums and max(target.values() if isinstance(target, dict) else [target]) > 0:
            message = signal_warning(self.scores.signal(), max(self.scores.steps.values()), step, self.score_rule)
            self.scores.release_signal()  # once: the first mask update that prunes
            if message:
                self.warn(message)
        grouped = set(self.heads.params)
        prune_by_movement(self.masks, self.scores, target, self.distribution, [n for n in self.masks if n not in grouped])
        if self.heads:  # whole heads / neurons by their summed scores; a pruned one may come back, as a weight may
            masks, _ = prune_groups_by_scores(self.heads, self.scores.scores, target, self.masks.params)
            for name, mask in masks.items():
                self.scores.set_mask(self.masks, name, mask)

    def rebind(self, params: Mapping[str, nn.Parameter]) -> None:
        super().rebind(params)
        self.scores.rebind(self.masks.params)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "movement": self.scores.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "movement" in state:
            self.scores.load_state_dict(state["movement"])


class RigLPruner(Pruner):
    """Dynamic sparse training at constant sparsity (RigL, Evci et al. 2020, Alg. 1; SET, Mocanu et al. 2018, with
    ``grow="random"``). Sparse from ``start`` (a random mask with each layer's exact zeros when ``start`` is 0, the
    largest magnitudes otherwise); at each update step of ``schedule`` (``updates="moves"``) every layer drops the
    ``f(t) · n_active`` smallest active weights and grows as many inactive ones by dense-gradient magnitude (or at
    random), ``f(t) = alpha/2 · (1 + cos(π (t - start) / (end - start)))`` (``decay``); grown weights start at
    ``grow_init`` with their optimizer state reset (:func:`~lightning_sparse.core.dynamic.move_connections`).
    """

    reset_pruned_state = True
    grows = True
    schedule: StepSchedule

    def __init__(
        self,
        model: nn.Module,
        sparsity: Sparsity = 0.9,
        schedule: StepSchedule | None = None,
        *,
        distribution: str = "erk",
        alpha: float = 0.3,
        grow: str = "gradient",
        seed: int = 0,
        decay: str = "cosine",
        erk_power_scale: float = 1.0,
        grow_init: str = "zeros",
        grow_scale: float = 1.0,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        dense_first_layer: bool = False,
        name: str | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if decay not in DECAYS:
            raise ValueError(f"`decay` must be one of {DECAYS}, got {decay!r}")
        if grow_init not in GROW_INITS:
            raise ValueError(f"`grow_init` must be one of {GROW_INITS}, got {grow_init!r}")
        schedule = schedule or StepSchedule(0, 0.75, 100, updates="moves")
        if schedule.updates != "moves":
            raise ValueError(
                f"{name or type(self).__name__} moves connections strictly between `start` and `end`: its schedule "
                f"needs updates='moves', got {schedule.updates!r}"
            )
        self.distribution, self.alpha, self.grow, self.seed, self.decay = distribution, float(alpha), grow, seed, decay
        self.erk_power_scale, self.grow_init, self.grow_scale = float(erk_power_scale), grow_init, float(grow_scale)
        self.initial: dict[str, Tensor] = {}  # packed masks at the sparse start, for the churn metric
        self.moved: dict[str, int] = {}
        self._warned_no_grad = False
        super().__init__(model, sparsity, schedule, include=include, exclude=exclude, dense_first_layer=dense_first_layer,
                         name=name, warn=warn)  # fmt: skip
        schedule.final = self.final_sparsity()
        frozen = [name for name, param in self.masks.params.items() if not param.requires_grad]
        if frozen:
            raise ValueError(
                f"{self.name} cannot train the connections it grows in frozen parameters {frozen} "
                f"(requires_grad=False): leave them out with `exclude`, or prune them with GradualMagnitudePruning"
            )
        counts = zero_counts(self.distribution, self.masks.params, self.final_sparsity(), power_scale=self.erk_power_scale)
        if not any(counts.values()):
            raise ValueError(
                f"`sparsity`={self.sparsity} with distribution {self.distribution!r} leaves every layer dense "
                f"({list(counts)}): there is nothing for {self.name} to move; raise `sparsity`"
            )
        if schedule.start == 0:  # sparse from the first forward pass; a checkpoint being resumed replaces these masks
            random_masks(self.masks, self.final_sparsity(), self.distribution, self.seed, self.erk_power_scale)
            self._record_initial()

    @property
    def metric_prefix(self) -> str:  # type: ignore[override]
        """``rigl`` for gradient growth, ``set`` for random growth (SET)."""
        return "rigl" if self.grow == "gradient" else "set"

    def start(self, total_steps: float) -> bool:
        """Plan the schedule; refuse an ``end`` that leaves no update after ``start``."""
        if not super().start(total_steps):
            return False
        check_first_update(*self.schedule.steps(), self.schedule.frequency)
        return True

    def decides(self, step: int) -> bool:
        if self.masks.is_empty:  # dense until `start`, then keep the largest magnitudes
            return step >= self.schedule.steps()[0]
        return self.schedule.is_update(step)

    def update(self, step: int, optimizer_states: OptimizerStates = ()) -> bool:
        if not self.decides(step):
            return False
        if self.masks.is_empty:
            prune_by_magnitude(self.masks, self.final_sparsity(), self.distribution, power_scale=self.erk_power_scale)
            self._record_initial()
            return True
        if self.grow == "gradient":
            missing = [name for name, param in self.masks.params.items() if param.grad is None]
            if missing and not self._warned_no_grad:
                self._warned_no_grad = True
                self.warn(
                    f"{self.name}: {missing} have no gradient at step {step} (frozen, or unused in the forward pass); "
                    f"their connections do not move while that lasts"
                )
        fraction = update_fraction(step, *self.schedule.steps(), self.alpha, self.decay)
        self.moved = move_connections(
            self.masks, fraction, self.grow, list(optimizer_states), self.seed, step, self.grow_init, self.grow_scale
        )
        return True

    def _record_initial(self) -> None:
        self.initial = {name: pack(self.masks.mask(name)) for name in self.masks}

    def metrics(self) -> dict[str, float]:
        """``<prefix>/churn/*`` (share of active weights not active at the sparse start) and ``<prefix>/moved/*``."""
        prefix, metrics = self.metric_prefix, {}
        new_total = active_total = 0
        for name in self.masks:
            mask = self.masks.mask(name)
            new = int((mask & ~unpack(self.initial[name], mask.shape)).sum())
            active = int(mask.sum())
            metrics[f"{prefix}/churn/{name}"] = new / active if active else 0.0
            new_total, active_total = new_total + new, active_total + active
        metrics[f"{prefix}/churn/global"] = new_total / active_total if active_total else 0.0
        if self.moved:
            metrics.update({f"{prefix}/moved/{name}": float(count) for name, count in self.moved.items()})
            metrics[f"{prefix}/moved/global"] = float(sum(self.moved.values()))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": {name: packed.cpu().clone() for name, packed in self.initial.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.initial = {name: packed.to(self.masks.params[name].device) for name, packed in state.get("initial", {}).items()}


def check_first_update(start: int, end: int, frequency: int) -> None:
    """RigL/SET: ``end`` must leave at least one connection update after ``start``."""
    first = start + frequency
    if end <= first:
        raise ValueError(
            f"`end` (step {end}) must come after the first connection update at step {first} "
            f"(`start` {start} + `frequency` {frequency}); allowed: end > {first}"
        )


class OneShotPruner(Pruner):
    """One-shot pruning at one optimizer step (:func:`~lightning_sparse.core.oneshot.prune_one_shot`: SparseGPT,
    Wanda, magnitude, a model's own zeros), then the masks held. :meth:`prune` runs it on calibration batches;
    :meth:`update` never changes the masks."""

    metric_prefix = "oneshot"

    def __init__(
        self,
        model: nn.Module,
        sparsity: Sparsity = 0.5,
        *,
        method: str = "sparsegpt",
        granularity: str | Mapping[str, str] = "unstructured",
        distribution: str = "uniform",
        step: int = 0,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        options: Mapping[str, Any] | None = None,
        name: str | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.method, self.distribution, self.at_step = method, distribution, step
        self.granularity = dict(granularity) if isinstance(granularity, Mapping) else granularity
        self.options = dict(options or {})  # blocks, block_size, dampening, owl_threshold, owl_spread
        self.pruned_step: int | None = None  # the optimizer step pruning happened at (checkpointed)
        self.given: dict[str, float] = {}  # what each layer was given (OWL, N:M, a mapping)
        self.seconds: float | None = None
        super().__init__(model, sparsity, None, include=include, exclude=exclude, name=name, warn=warn)
        self.layer_granularity = expand_granularity(self.granularity, self.targets)
        for each, kind in self.layer_granularity.items():
            check_shape(each, self.masks.params[each].shape, kind)  # N:M: M must divide the inputs

    def start(self, total_steps: float) -> bool:
        if self.pruned_step is None and self.at_step >= total_steps:
            self.warn(f"{self.name}: `step`={self.at_step} but training has only {int(total_steps)} optimizer steps; nothing will be pruned")
        return False

    def due(self, step: int) -> bool:
        """Whether to prune before the forward pass of ``step`` (once)."""
        return self.pruned_step is None and step >= self.at_step

    def decides(self, step: int) -> bool:
        return False  # masks change only in :meth:`prune`, before the step's forward

    def update(self, step: int, optimizer_states: OptimizerStates = ()) -> bool:
        return False

    def prune(self, model: nn.Module, batches: Sequence[Any], run: Callable[[Any], Any], step: int,
              reduce: Callable[[Tensor], Tensor] | None = None) -> None:  # fmt: skip
        """Prune now, calibrating on ``batches`` (``run(batch)`` runs the model on one); ``reduce`` sums the
        statistics over ranks."""
        self.given = prune_one_shot(
            model, self.masks, batches, run, self.method, self.final_sparsity(), self.layer_granularity, self.distribution,
            aliases=self.targets.aliases, reduce=reduce, **self.options,
        )  # fmt: skip
        self.pruned_step = step

    def metrics(self) -> dict[str, float]:
        if not self.given:
            return {}
        sizes = {name: self.masks.numel(name) for name in self.given}
        mean = sum(self.given[n] * sizes[n] for n in sizes) / (sum(sizes.values()) or 1)
        metrics = {"oneshot/target_sparsity": mean}
        if len(set(self.given.values())) > 1:
            metrics.update({f"oneshot/target_sparsity/{n}": float(s) for n, s in self.given.items()})
        if self.seconds is not None:
            metrics["oneshot/seconds"] = self.seconds
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pruned_step": self.pruned_step, "layer_sparsity": dict(self.given)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.pruned_step = state.get("pruned_step")
        self.given = dict(state.get("layer_sparsity") or {})


__all__ = ["MagnitudePruner", "MovementPruner", "OneShotPruner", "Pruner", "RigLPruner", "lr_factor"]
