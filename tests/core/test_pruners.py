"""The pruner protocol in core/ (issue 33): one step-schedule object, one schedule family, one pruner object per method,
driven from a plain loop without Lightning (the same objects the callbacks are hooks over)."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_sparse.core import schedules
from lightning_sparse.core.pruners import MagnitudePruner, MovementPruner, OneShotPruner, Pruner, RigLPruner
from lightning_sparse.core.schedules import StepSchedule, polynomial, sparsity_at

PROTOCOL = ("select", "start", "observe", "decides", "update", "metrics", "rebind", "state_dict", "load_state_dict", "step")


def test_cubic_is_the_polynomial_family_at_its_power():
    assert not hasattr(schedules, "cubic")  # one implementation: `cubic` is polynomial(power)
    for step in (10, 13, 25, 40, 49):
        progress = (step - 10) / 40
        for power in (1.0, 2.0, 3.0, 5.0):
            expected = 0.1 + (0.9 - 0.1) * polynomial(progress, power)
            assert sparsity_at(step, 10, 50, 0.1, 0.9, "cubic", power) == expected
    assert sparsity_at(30, 10, 50, 0.0, 0.8, "cubic") == 0.8 * (1 - 0.5**3)  # Zhu & Gupta's default exponent


def test_step_schedule_resolves_fractions_against_the_planned_steps():
    schedule = StepSchedule(0.1, 0.5, 10)
    with pytest.raises(RuntimeError, match="resolve"):
        schedule.is_update(10)
    assert schedule.resolve(100) and (schedule.start_step, schedule.end_step, schedule.planned_steps) == (10, 50, 100)
    assert [t for t in range(100) if schedule.is_update(t)] == [10, 20, 30, 40, 50]
    assert not schedule.resolve(400)  # planned once: a second resolve keeps the steps
    assert schedule.end_step == 50
    moves = StepSchedule(0, 45, 10, updates="moves")
    moves.resolve(float("inf"))  # int steps need no run length
    assert [t for t in range(100) if moves.is_update(t)] == [10, 20, 30, 40] and moves.planned_steps is None
    with pytest.raises(ValueError, match=r"`end`=0.5 is a fraction of training, but the Trainer has no max_steps"):
        StepSchedule(0, 0.5).resolve(float("inf"))
    with pytest.raises(ValueError, match=r"`updates` must be one of \('ramp', 'moves'\), got 'often'"):
        StepSchedule(updates="often")


def test_step_schedule_target_per_layer_and_state_round_trip():
    schedule = StepSchedule(0.1, 0.5, 10, final={"a": 0.5, "b": 0.9}, initial=0.1, power=2.0)
    schedule.resolve(100)
    assert schedule.target(30) == {name: sparsity_at(30, 10, 50, 0.1, s, "cubic", 2.0) for name, s in (("a", 0.5), ("b", 0.9))}
    assert schedule.target(5, final=0.7) == 0.0 and schedule.target(50, final=0.7) == 0.7
    restored = StepSchedule(0.1, 0.5, 10)
    restored.load_state_dict(schedule.state_dict())
    assert not restored.resolve(999) and restored.state_dict() == {"start_step": 10, "end_step": 50, "planned_steps": 100}


def test_every_pruner_is_the_protocol():
    for cls in (MagnitudePruner, MovementPruner, RigLPruner, OneShotPruner):
        assert issubclass(cls, Pruner)
        assert all(callable(getattr(cls, name)) for name in PROTOCOL)
    with pytest.raises(TypeError, match="abstract"):
        Pruner(nn.Linear(2, 2), 0.5, None)  # type: ignore[abstract]


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:512] / 16.0, dtype=torch.float32), torch.tensor(y[:512])


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


PRUNERS = {
    "magnitude": lambda net: MagnitudePruner(net, 0.8, StepSchedule(0.1, 0.6, 4)),
    "movement": lambda net: MovementPruner(net, 0.8, StepSchedule(0.1, 0.6, 1)),
    "rigl": lambda net: RigLPruner(net, 0.8, StepSchedule(0, 0.8, 5, updates="moves"), seed=3),
    "set": lambda net: RigLPruner(net, 0.8, StepSchedule(0, 0.8, 5, updates="moves"), grow="random", seed=3),
}


def _train(net: nn.Module, pruner: Pruner, optimizer: torch.optim.Optimizer, steps: range) -> None:
    x, y = _digits()
    for step in steps:
        batch = slice((step % 16) * 32, (step % 16 + 1) * 32)
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
        pruner.step(step, [optimizer.state])
        optimizer.step()
        pruner.after_optimizer_step()


@pytest.mark.parametrize("method", list(PRUNERS))
def test_a_plain_loop_resumes_a_pruner_exactly_from_its_state_dict(method):
    """A pruner stopped half way and rebuilt from ``state_dict`` (with the model and optimizer) ends bit for bit where
    the uninterrupted one does: the schedule, masks and method state (scores, churn reference) all travel."""
    total = 40
    net = _net()
    pruner, optimizer = PRUNERS[method](net), torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    pruner.start(total)
    _train(net, pruner, optimizer, range(total))

    first = _net()
    half, half_opt = PRUNERS[method](first), torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
    half.start(total)
    _train(first, half, half_opt, range(total // 2))
    saved = {"pruner": half.state_dict(), "model": first.state_dict(), "optimizer": half_opt.state_dict()}

    second = _net()
    resumed, resumed_opt = PRUNERS[method](second), torch.optim.SGD(second.parameters(), lr=0.1, momentum=0.9)
    second.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["pruner"])
    assert not resumed.start(total * 2)  # the restored schedule is kept, whatever the new run length
    _train(second, resumed, resumed_opt, range(total // 2, total))

    for name in pruner.masks:
        assert torch.equal(resumed.masks.mask(name), pruner.masks.mask(name)), name
    for (name, a), b in zip(net.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.metrics() == pruner.metrics()
    assert pruner.masks.sparsity() == pytest.approx(0.8, abs=0.01)


def test_a_rigl_schedule_must_move_connections_between_start_and_end():
    with pytest.raises(ValueError, match=r"RigLPruner moves connections strictly between `start` and `end`: its schedule needs updates='moves'"):
        RigLPruner(_net(), 0.8, StepSchedule(0, 30, 5))
    pruner = RigLPruner(_net(), 0.8, StepSchedule(0, 8, 10, updates="moves"))
    with pytest.raises(ValueError, match=r"`end` \(step 8\) must come after the first connection update at step 10"):
        pruner.start(100)


def test_warnings_go_through_the_pruners_warn():
    said: list[str] = []
    pruner = MagnitudePruner(_net(), 0.5, StepSchedule(0, 50, 5), name="GMP", warn=said.append)
    pruner.start(20)
    assert said == ["GMP: `end` is step 50 but training has only 20 optimizer steps; sparsity 0.5 will not be reached"]
