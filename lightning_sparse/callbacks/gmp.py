"""Gradual magnitude pruning (Zhu & Gupta 2017) as a Lightning callback."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl

from lightning_sparse.callbacks.base import (
    SparsityCallback,
    as_sparsity,
    check_choice,
    check_sparsity,
    check_steps,
)
from lightning_sparse.callbacks.grouping import example_input, report_channel_groups
from lightning_sparse.core.allocation import DISTRIBUTIONS
from lightning_sparse.core.pruners import MagnitudePruner
from lightning_sparse.core.schedules import SCHEDULES, StepSchedule, check_fraction_or_step
from lightning_sparse.core.structured import NORMS, parse_granularity
from lightning_sparse.core.targets import each_setting
from lightning_sparse.structure.plan import StructurePlan


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
            (:mod:`lightning_sparse.core.groups`, found at setup from one real forward on
            ``example_input_array`` or the first training batch, no ``torch.fx`` trace): every layer writing into one residual stream, with
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
        check_choice("schedule", schedule, SCHEDULES)
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

    @property
    def state_key(self) -> str:
        extra = {} if self.granularity == "unstructured" else {"granularity": self.granularity}  # old keys unchanged
        return self._generate_state_key(sparsity=self.sparsity, include=self.include, exclude=self.exclude, **extra)

    def step_schedule(self) -> StepSchedule:
        """The :class:`StepSchedule` that ``start``, ``end``, ``frequency``, ``schedule``, ``power`` and
        ``initial_sparsity`` describe (resolved against the run's steps at fit start)."""
        return StepSchedule(self.start, self.end, self.frequency, initial=self.initial_sparsity, schedule=self.schedule,
                            power=self.power)  # fmt: skip

    def make_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> MagnitudePruner:
        pruner = MagnitudePruner(
            pl_module, self.sparsity, self.step_schedule(), distribution=self.distribution, granularity=self.granularity,
            channel_norm=self.channel_norm, channel_multiple=self.channel_multiple, include=self.include,
            exclude=self.exclude, dense_first_layer=self.dense_first_layer,
            example_inputs=lambda: example_input(trainer, pl_module), name=type(self).__name__,
        )  # fmt: skip
        report_channel_groups(self, pruner.groups)
        return pruner

    @property
    def structure_plan(self) -> StructurePlan | None:
        """The heads/neurons ``granularity`` prunes, found once at set-up, and which the masks keep (``None`` before
        set-up or without such units): ``lightning_sparse.deploy(model, x, plan=callback.structure_plan)`` removes them
        without finding them again. Also in the checkpoint state as ``"structure_plan"`` (plain data)."""
        return self.pruner.structure_plan if isinstance(self.pruner, MagnitudePruner) else None


def _check_granularity(granularity: Any, distribution: str, sparsity: Any) -> None:
    """Validate ``granularity`` (one value or ``{glob: value}``); structured layers need a per-layer allocation."""
    if isinstance(granularity, Mapping) and not granularity:
        raise ValueError("`granularity` as a per-layer mapping must name at least one layer glob")
    parsed = [parse_granularity(label, value) for label, value in each_setting("granularity", granularity)]
    structured = [str(g) for g in parsed if g.kind != "unstructured"]
    if structured and distribution != "uniform" and not isinstance(sparsity, Mapping):
        raise ValueError(
            f"`distribution`={distribution!r} ranks single weights across layers, which `granularity`={structured[0]!r} "
            f"does not prune (and layers keeping different numbers of heads/neurons could not be saved with a standard "
            f"config for `save_pretrained`); use distribution='uniform' or a per-layer `sparsity` mapping"
        )
