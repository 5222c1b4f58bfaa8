"""Sparsity schedules as pure functions of the optimizer step."""

from __future__ import annotations

from collections.abc import Callable


def cubic(progress: float) -> float:
    """Zhu & Gupta 2017 (arXiv 1710.01878, Eq. 1): ``1 - (1 - p)^3``, fast pruning early, slow near the end."""
    return 1.0 - (1.0 - progress) ** 3


def linear(progress: float) -> float:
    """Equal sparsity increments per update."""
    return progress


def constant(progress: float) -> float:
    """The final sparsity from the first update on (one-shot pruning, then held)."""
    return 1.0


SCHEDULES: dict[str, Callable[[float], float]] = {"cubic": cubic, "linear": linear, "constant": constant}


def polynomial(progress: float, power: float = 3.0) -> float:
    """``1 - (1 - p)^power``: Zhu & Gupta's schedule with another exponent (``power=3`` is :func:`cubic`)."""
    return 1.0 - (1.0 - progress) ** power


def sparsity_at(
    step: int, start: int, end: int, initial: float, final: float, schedule: str = "cubic", power: float = 3.0
) -> float:
    """Target sparsity at optimizer ``step``: 0 before ``start``, ``final`` from ``end`` on.

    In between: ``initial + (final - initial) * f((step - start) / (end - start))`` with ``f`` the schedule;
    ``schedule="polynomial"`` is ``1 - (1 - p)^power`` (``power`` is used by it alone).
    """
    if schedule not in SCHEDULES and schedule != "polynomial":
        raise ValueError(f"`schedule` must be one of {tuple(SCHEDULES)}, got {schedule!r}")
    if step < start:
        return 0.0
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    shape = polynomial(progress, power) if schedule == "polynomial" else SCHEDULES[schedule](progress)
    return initial + (final - initial) * shape


def is_update_step(step: int, start: int, end: int, frequency: int) -> bool:
    """Masks are recomputed at ``start, start + frequency, ...`` up to ``end``, and always at ``end`` itself."""
    return start <= step <= end and ((step - start) % frequency == 0 or step == end)
