"""Gradual magnitude pruning (Zhu & Gupta 2017) as a Lightning callback."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn

from lightning_sparse.callbacks.base import (
    SparsityCallback,
    as_sparsity,
    check_choice,
    check_fraction_or_step,
    check_sparsity,
    check_steps,
)
from lightning_sparse.callbacks.grouping import check_readers, setup_channel_groups
from lightning_sparse.core.allocation import DISTRIBUTIONS
from lightning_sparse.core.heads import GroupSet, check_group_sparsity, extend_targets, prune_groups_by_magnitude, select_groups
from lightning_sparse.core.pruning import prune_by_magnitude
from lightning_sparse.core.schedules import SCHEDULES, is_update_step, sparsity_at
from lightning_sparse.core.structured import NORMS, Granularity, channels_to_prune, check_shape, expand_granularity, parse_granularity
from lightning_sparse.core.targets import each_setting


class GradualMagnitudePruning(SparsityCallback):
    """Prune the smallest-magnitude weights on a schedule until ``sparsity`` is reached at ``end``, then hold.

    Sparsity at optimizer step t (Zhu & Gupta 2017, arXiv 1710.01878, Eq. 1, for ``schedule="cubic"``):
    ``s_t = s_f + (s_i - s_f) (1 - (t - start) / (end - start))^3``, masks recomputed every ``frequency``
    steps from ``start`` and at ``end``. Pruned weights and their gradients stay exactly zero.

    Logs at each mask update, to every logger: ``sparsity/global``, ``sparsity/model``, ``sparsity/<parameter>``
    and ``gmp/target_sparsity`` (the schedule's ``s_t`` at that step; with a per-layer ``sparsity``, the mean of the
    layers' targets weighted by their sizes, and ``gmp/target_sparsity/<parameter>`` for each).

    Args:
        sparsity: final fraction of zeros in the selected weights, in [0, 1); or ``{glob: sparsity}`` per layer
            (each matched layer pruned to its own target, ``distribution`` unused; unmatched layers stay dense).
        start: when the ramp begins: fraction of the total optimizer steps (float in [0, 1]) or a step (int).
        end: when the final sparsity is reached, same convention; must not come before ``start``.
        frequency: optimizer steps between mask updates (>= 1).
        schedule: ``cubic`` (Zhu & Gupta), ``linear`` or ``constant`` (one-shot at ``start``).
        power: the exponent of the ``cubic`` schedule, ``s_t = s_f + (s_i - s_f)(1 - progress)^power`` (3 is Zhu &
            Gupta's cubic; 1 is linear; larger prunes faster early), a number >= 1.
        dense_first_layer: leave the first selected parameter dense (the first layer holds few weights and is
            the most sensitive to pruning).
        distribution: ``uniform`` (same sparsity per layer), ``global`` (one threshold) or ``erk``; structured
            granularities need ``uniform`` or a per-layer ``sparsity`` mapping.
        granularity: ``unstructured`` (default), ``channel``, ``head`` (whole attention heads: q/k/v rows and the
            output projection's columns), ``neuron`` (whole MLP hidden units: up-projection row and bias, down-projection
            column) or an ``"N:M"`` string such as ``"2:4"`` (1 <= N < M, M dividing the layer's input dimension); or
            ``{glob: granularity}`` per layer (unmatched layers: ``unstructured``), so a sweep can set it layer by
            layer, e.g. ``{"*.attn.*": "head", "*.mlp.*": "neuron"}``. ``channel`` prunes coupled channel groups
            (:mod:`lightning_sparse.core.groups`, found at setup from a ``torch.fx`` trace on
            ``example_input_array`` or the first training batch): every layer writing into one residual stream, with
            its biases and BatchNorm affine entries, loses the same channels, so ``deploy`` can remove them; a layer
            whose coupling is not proved stays dense, with the reason printed. The hidden units of an
            ``nn.LSTM``/``GRU``/``RNN`` (rows in every gate, ``weight_hh`` column, the reader's columns) and the
            channels of an ``nn.ConvTranspose*d`` in an ``nn.Sequential`` are ``channel`` units too, found from the
            module structure (:mod:`lightning_sparse.structure.recurrent`). For heads and neurons the sparsity is
            the fraction of heads (neurons) of each module removed, and every member of a group (biases too) is
            masked; see :mod:`lightning_sparse.core.heads`.
        channel_norm: ``l1`` or ``l2``: the norm that ranks output channels for ``channel`` granularity, and heads
            and neurons (the sum of their members' norms).
        channel_multiple: with ``channel`` granularity, every layer (or coupled group) keeps a multiple of this many
            channels (the kept count rounded to the nearest multiple, at least one multiple), so the deployed widths
            suit the kernels: 16 for oneDNN on AVX-512 CPUs, 8 for GPU tensor cores. ``1`` (default): exactly
            ``round(s × channels)`` are pruned.
        include: glob patterns of parameter names to prune (default: every weight that does a matrix product).
        exclude: glob patterns of parameter names to leave dense.
        initial_sparsity: sparsity at ``start``, in [0, ``sparsity``].
        verbose: print the per-layer table when fitting ends.
    """

    def __init__(
        self,
        sparsity: float | dict[str, float] = 0.9,
        start: int | float = 0.0,
        end: int | float = 0.75,
        frequency: int = 100,
        schedule: str = "cubic",
        distribution: str = "uniform",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        initial_sparsity: float = 0.0,
        verbose: bool = True,
        granularity: str | dict[str, str] = "unstructured",
        channel_norm: str = "l1",
        channel_multiple: int = 1,
        power: float = 3.0,
        dense_first_layer: bool = False,
    ) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose)
        check_sparsity("sparsity", sparsity)
        check_sparsity("initial_sparsity", initial_sparsity)
        lowest = min(sparsity.values()) if isinstance(sparsity, Mapping) else sparsity
        if initial_sparsity > lowest:
            raise ValueError(f"`initial_sparsity` must be in [0, sparsity={lowest}], got {initial_sparsity}")
        check_fraction_or_step("start", start)
        check_fraction_or_step("end", end)
        if type(start) is type(end) and end < start:
            raise ValueError(f"`end` must not come before `start`: allowed range is [{start}, ...], got end={end}")
        check_steps("frequency", frequency)
        check_choice("schedule", schedule, tuple(SCHEDULES))
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not 1 <= power < math.inf:
            raise ValueError(f"`power` must be a finite number >= 1, got {power!r}")
        if power != 3 and schedule != "cubic":
            raise ValueError(f"`power` is the exponent of schedule='cubic'; it does not apply to schedule={schedule!r}")
        if not isinstance(dense_first_layer, bool):
            raise ValueError(f"`dense_first_layer` must be a bool (true or false), got {dense_first_layer!r}")
        check_choice("distribution", distribution, DISTRIBUTIONS)
        _check_granularity(granularity, distribution, sparsity)
        check_choice("channel_norm", channel_norm, NORMS)
        check_steps("channel_multiple", channel_multiple, unit="1: no rounding")
        self.sparsity = as_sparsity(sparsity)
        self.start, self.end = start, end
        self.frequency = frequency
        self.schedule = schedule
        self.power = float(power)
        self.dense_first_layer = dense_first_layer
        self.distribution = distribution
        self.initial_sparsity = float(initial_sparsity)
        self.granularity = dict(granularity) if isinstance(granularity, Mapping) else granularity
        self.channel_norm = channel_norm
        self.channel_multiple = channel_multiple
        self._granularity: dict[str, Granularity] = {}  # per parameter, resolved in setup
        self._groups = None  # coupled channel groups (core.groups.GroupedChannels), found in setup
        self._heads = GroupSet()  # heads / neurons pruned whole (core/heads.py), found in setup
        self._start_step: int | None = None
        self._end_step: int | None = None
        self._planned_steps: int | None = None  # run length the fractional start/end were resolved for
        self._scheduled: float | dict[str, float] | None = None  # the schedule's target at the last mask update

    metric_prefix = "gmp"

    @property
    def state_key(self) -> str:
        extra = {} if self.granularity == "unstructured" else {"granularity": self.granularity}  # old keys unchanged
        return self._generate_state_key(sparsity=self.sparsity, include=self.include, exclude=self.exclude, **extra)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._start_step = self._end_step = None  # resolved in on_fit_start, or restored from a checkpoint
            self._planned_steps = None
            self._granularity = expand_granularity(self.granularity, self.targets)
            for layer in self._heads.layers:  # every member of a head/neuron group (biases too) follows its group
                self._granularity.update({name: Granularity(layer.kind) for name in layer.params})
            check_readers(trainer, pl_module, self._heads)
            self._groups = setup_channel_groups(self, trainer, pl_module)
            self._check_layers()

    def _targets(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The base's targets, plus every member of the heads/neurons ``granularity`` asks for (biases, output
        projections), each given its group layer's sparsity."""
        targets = super()._targets(pl_module)
        self._heads = select_groups(pl_module, targets, expand_granularity(self.granularity, targets))
        if not self._heads:
            return targets
        if self.layer_sparsity:
            check_group_sparsity(self._heads, self.layer_sparsity)
            for layer in self._heads.layers:
                value = next(self.layer_sparsity[p] for p in layer.params if p in self.layer_sparsity)
                self.layer_sparsity.update({p: value for p in layer.params})
        return extend_targets(pl_module, targets, self._heads)

    def _check_layers(self) -> None:
        """Refuse, before training, a granularity a layer's shape cannot hold or a channel target removing every channel."""
        final = self._final_sparsity()
        for name, granularity in self._granularity.items():
            shape = self.masks.params[name].shape
            check_shape(name, shape, granularity)
            layer_final = final[name] if isinstance(final, dict) else final
            if granularity.kind == "channel":
                channels_to_prune(name, layer_final, shape[granularity.axis or 0], self.channel_multiple)
            if name in self._heads.params:
                continue  # a head/neuron member: checked with its group below
            if self.initial_sparsity > layer_final:
                raise ValueError(
                    f"`initial_sparsity`={self.initial_sparsity} is above the final sparsity {layer_final:.4g} of {name!r} "
                    f"({granularity})"
                )
        if self._groups is not None:
            self._groups.check(final, self.channel_multiple)
        check_group_sparsity(self._heads, final)

    def _final_sparsity(self) -> float | dict[str, float]:
        """The target of every layer: :meth:`_target`, with N:M layers at 1 - N/M."""
        final = self._target()
        fixed = {name: g.final_sparsity for name, g in self._granularity.items() if g.kind == "nm"}
        if not fixed:
            return final
        return {name: fixed.get(name, final[name] if isinstance(final, dict) else final) for name in self._granularity}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        total = self._resolve_schedule(trainer)
        if total is not None:
            if self._end_step < self._start_step:
                raise ValueError(
                    f"`end` (step {self._end_step}) must not come before `start` (step {self._start_step})"
                )
            if self._end_step >= total:
                rank_zero_warn(
                    f"{type(self).__name__}: `end` is step {self._end_step} but training has only {total} "
                    f"optimizer steps; sparsity {self.sparsity} will not be reached"
                )

    def _decides(self, step: int) -> bool:
        return is_update_step(step, self._start_step, self._end_step, self.frequency)

    def _update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> bool:
        if not self._decides(step):
            return False
        def at(final: float) -> float:
            schedule = "polynomial" if self.schedule == "cubic" else self.schedule
            return sparsity_at(step, self._start_step, self._end_step, self.initial_sparsity, final, schedule, self.power)

        final = self._final_sparsity()
        target = {name: at(s) for name, s in final.items()} if isinstance(final, dict) else at(final)
        self._prune(target)
        self._scheduled = target
        return True

    def _update_metrics(self) -> dict[str, float]:
        """``<prefix>/target_sparsity``: the schedule's target at this update (per layer too when they differ)."""
        if self._scheduled is None:
            return {}
        prefix = self.metric_prefix
        if not isinstance(self._scheduled, dict):
            return {f"{prefix}/target_sparsity": float(self._scheduled)}
        sizes = {name: self.masks.numel(name) for name in self._scheduled}
        mean = sum(self._scheduled[n] * sizes[n] for n in sizes) / (sum(sizes.values()) or 1)
        return {f"{prefix}/target_sparsity": mean, **{f"{prefix}/target_sparsity/{n}": float(s) for n, s in self._scheduled.items()}}

    def _prune(self, target: float | dict[str, float]) -> None:
        """Write the masks for ``target`` (one sparsity, or one per parameter): the smallest magnitudes go."""
        skip = self._groups.names if self._groups is not None else ()
        prune_by_magnitude(self.masks, target, self.distribution, self._granularity, self.channel_norm, skip=skip,
                           channel_multiple=self.channel_multiple)  # fmt: skip
        if self._groups is not None:
            self._groups.prune(self.masks, target, self.channel_norm, self.channel_multiple)
        if self._heads:
            prune_groups_by_magnitude(self.masks, self._heads, target, self.channel_norm)

    def _extra_state(self) -> dict[str, Any]:
        return {"start_step": self._start_step, "end_step": self._end_step, "planned_steps": self._planned_steps}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._start_step, self._end_step = state.get("start_step"), state.get("end_step")
        self._planned_steps = state.get("planned_steps")


def _check_granularity(granularity: Any, distribution: str, sparsity: Any) -> None:
    """Validate ``granularity`` (one value or ``{glob: value}``); structured layers need a per-layer allocation."""
    if isinstance(granularity, Mapping) and not granularity:
        raise ValueError("`granularity` as a per-layer mapping must name at least one layer glob")
    parsed = [parse_granularity(label, value) for label, value in each_setting("granularity", granularity)]
    structured = [str(g) for g in parsed if g.kind != "unstructured"]
    if structured and distribution != "uniform" and not isinstance(sparsity, Mapping):
        raise ValueError(
            f"`distribution`={distribution!r} ranks single weights across layers, which `granularity`={structured[0]!r} "
            f"does not prune; use distribution='uniform' or a per-layer `sparsity` mapping"
        )
