"""Sparsity schedules in optimizer steps: one schedule family and the :class:`StepSchedule` object a pruner holds.

``cubic`` is Zhu & Gupta's polynomial ramp ``1 - (1 - p)^power`` (arXiv 1710.01878, Eq. 1, with ``power=3``):
:func:`polynomial` is the one implementation, ``power`` its exponent. ``linear`` is ``p``, ``constant`` is the final
sparsity from ``start`` on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning_sparse.core.dynamic import is_dynamic_update_step

#: the schedule shapes: ``cubic`` is :func:`polynomial` (its ``power``, 3 by default), ``linear``, ``constant``
SCHEDULES = ("cubic", "linear", "constant")

#: when a :class:`StepSchedule` updates: ``ramp`` at ``start, start + frequency, ...`` and at ``end`` (GMP, movement);
#: ``moves`` at ``start + frequency, ...`` strictly before ``end`` (RigL/SET)
UPDATES = ("ramp", "moves")


def polynomial(progress: float, power: float = 3.0) -> float:
    """``1 - (1 - p)^power``: Zhu & Gupta's schedule (``power=3``, the ``cubic`` schedule); larger prunes faster early."""
    return 1.0 - (1.0 - progress) ** power


def shape(schedule: str, progress: float, power: float = 3.0) -> float:
    """The fraction of the ramp done at ``progress`` in [0, 1]: ``cubic`` (:func:`polynomial` at ``power``),
    ``linear`` (``p``) or ``constant`` (1)."""
    if schedule == "cubic":
        return polynomial(progress, power)
    if schedule == "linear":
        return progress
    if schedule == "constant":
        return 1.0
    raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}")


def sparsity_at(
    step: int, start: int, end: int, initial: float, final: float, schedule: str = "cubic", power: float = 3.0
) -> float:
    """Target sparsity at optimizer ``step``: 0 before ``start``, ``final`` from ``end`` on.

    In between: ``initial + (final - initial) * f((step - start) / (end - start))`` with ``f`` the schedule's
    :func:`shape` (``cubic``: ``1 - (1 - p)^power``).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}")
    if step < start:
        return 0.0
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return initial + (final - initial) * shape(schedule, progress, power)


def is_update_step(step: int, start: int, end: int, frequency: int) -> bool:
    """Masks are recomputed at ``start, start + frequency, ...`` up to ``end``, and always at ``end`` itself."""
    return start <= step <= end and ((step - start) % frequency == 0 or step == end)


def check_fraction_or_step(name: str, value: Any) -> None:
    """``start``/``end`` style arguments: a float in [0, 1] (fraction of training) or an int >= 0 (a step)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a float in [0, 1] (fraction of training) or an int >= 0 (step), got {value!r}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` as a fraction of training must be in [0, 1], got {value}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"`{name}` as an optimizer step must be >= 0, got {value}")


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


Sparsity = float | dict[str, float]


class StepSchedule:
    """When a pruner updates its masks and the sparsity it aims at, in optimizer steps.

    ``start``/``end`` are fractions of the run (float in [0, 1]) or optimizer steps (int); :meth:`resolve` turns them
    into steps once, against the run's planned number of optimizer steps, and :meth:`state_dict` carries the resolved
    steps so a resumed run keeps the schedule it was planned with. :meth:`is_update` says whether a step updates
    (``updates="ramp"``: ``start, start + frequency, ...`` and ``end``; ``"moves"``: ``start + frequency, ...``
    strictly before ``end``); :meth:`target` is the sparsity at a step,
    ``s_t = s_i + (s_f - s_i) · f((t - start) / (end - start))`` (0 before ``start``, ``s_f`` from ``end`` on) with
    ``f`` the schedule's shape (``cubic``: ``1 - (1 - p)^power``, Zhu & Gupta 2017, Eq. 1), for one final sparsity
    or a ``{parameter: sparsity}`` mapping.
    """

    def __init__(
        self,
        start: int | float = 0.0,
        end: int | float = 0.75,
        frequency: int = 100,
        *,
        final: Sparsity = 0.0,
        initial: float = 0.0,
        schedule: str = "cubic",
        power: float = 3.0,
        updates: str = "ramp",
    ) -> None:
        check_fraction_or_step("start", start)
        check_fraction_or_step("end", end)
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"`frequency` must be an int >= 1 (optimizer steps), got {frequency!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}")
        if updates not in UPDATES:
            raise ValueError(f"`updates` must be one of {UPDATES}, got {updates!r}")
        self.start, self.end, self.frequency = start, end, frequency
        self.final: Sparsity = dict(final) if isinstance(final, Mapping) else final
        self.initial, self.schedule, self.power, self.updates = float(initial), schedule, float(power), updates
        self.start_step: int | None = None
        self.end_step: int | None = None
        self.planned_steps: int | None = None  # the run length fractional start/end were resolved for

    @property
    def resolved(self) -> bool:
        return self.start_step is not None

    @property
    def fractional(self) -> bool:
        """Whether ``start`` or ``end`` is a fraction of the run (so the run's length decides the steps)."""
        return isinstance(self.start, float) or isinstance(self.end, float)

    def resolve(self, total_steps: float) -> bool:
        """Turn ``start``/``end`` into optimizer steps for a run of ``total_steps`` (``inf``: unknown, then only
        int steps work). Returns False and keeps the steps when they were resolved already (restored from a
        checkpoint)."""
        if self.resolved:
            return False
        self.planned_steps = int(total_steps) if math.isfinite(total_steps) else None
        self.start_step = resolve_step("start", self.start, total_steps)
        self.end_step = resolve_step("end", self.end, total_steps)
        return True

    def reset(self) -> None:
        """Forget the resolved steps (a new ``fit``)."""
        self.start_step = self.end_step = self.planned_steps = None

    def steps(self) -> tuple[int, int]:
        """The resolved ``(start, end)`` optimizer steps (an error before :meth:`resolve`)."""
        if self.start_step is None or self.end_step is None:
            raise RuntimeError("StepSchedule: call `resolve(total_steps)` before asking about a step")
        return self.start_step, self.end_step

    def is_update(self, step: int) -> bool:
        """Whether the masks are updated at optimizer ``step``."""
        start, end = self.steps()
        if self.updates == "ramp":
            return is_update_step(step, start, end, self.frequency)
        return is_dynamic_update_step(step, start, end, self.frequency)

    def target(self, step: int, final: Sparsity | None = None) -> Sparsity:
        """The sparsity at ``step`` (per parameter when ``final``, default :attr:`final`, is a mapping)."""
        start, end = self.steps()
        final = self.final if final is None else final

        def at(value: float) -> float:
            return sparsity_at(step, start, end, self.initial, value, self.schedule, self.power)

        return {name: at(value) for name, value in final.items()} if isinstance(final, Mapping) else at(final)

    def state_dict(self) -> dict[str, int | None]:
        return {"start_step": self.start_step, "end_step": self.end_step, "planned_steps": self.planned_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.start_step, self.end_step = state.get("start_step"), state.get("end_step")
        self.planned_steps = state.get("planned_steps")
