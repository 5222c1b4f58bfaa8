"""Every bad argument refused with its name (issue 30): exclude typos, booleans, arguments of the other mode."""

from __future__ import annotations

import math

import pytest
from torch import nn

from support import digits_model, make_trainer
from lightning_sparse import (
    GradualMagnitudePruning,
    LearningCompression,
    MovementPruning,
    QuantizationAwareTraining,
    RigL,
)
from lightning_sparse.core.targets import select_targets
from lightning_sparse.data import DigitsDataModule


def test_an_exclude_glob_that_matches_nothing_is_refused_before_training(tmp_path):
    # main: the typo `net.O.weight` (letter O) was ignored and the layer meant to stay dense ended 89.8% pruned
    model = digits_model()
    callback = GradualMagnitudePruning(sparsity=0.9, exclude=["net.O.weight"], verbose=False)
    with pytest.raises(ValueError, match=r"`exclude` pattern 'net.O.weight' matches no parameter\. Prunable by default"):
        make_trainer(tmp_path, [callback], max_epochs=1).fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert all(bool((p != 0).all()) for n, p in model.named_parameters() if n.endswith("weight"))  # nothing pruned


def test_an_exclude_glob_naming_a_buffer_says_so_and_a_parameter_that_is_not_a_target_is_fine():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"`exclude` pattern '1.running_\*' matches only buffers"):
        select_targets(model, exclude=["1.running_*"])
    assert list(select_targets(model, exclude=["*.bias", "2.weight"])) == ["0.weight"]  # biases exist: no typo


CALLBACKS = [GradualMagnitudePruning, RigL, LearningCompression, QuantizationAwareTraining, MovementPruning]


@pytest.mark.parametrize("value", ["abc", [1], math.nan, 1, None, "false"])
@pytest.mark.parametrize("callback", CALLBACKS, ids=lambda c: c.__name__)
def test_verbose_must_be_a_bool(callback, value):
    with pytest.raises(ValueError, match=r"`verbose` must be a bool \(true or false\), got"):
        callback(verbose=value)


@pytest.mark.parametrize("value", ["abc", [1], math.nan, 0])
def test_reset_momentum_must_be_a_bool(value):
    with pytest.raises(ValueError, match=r"`reset_momentum` must be a bool \(true or false\)"):
        LearningCompression(reset_momentum=value)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"compression": "prune", "bits": 4}, "`bits`"),
        ({"compression": "prune", "codebook_size": 16}, "`codebook_size`"),
        ({"compression": "prune", "codebook": "binary"}, "`codebook`"),
        ({"compression": "prune", "bits": 4, "codebook_size": 16}, "`bits`, `codebook_size`"),
        ({"compression": "quantize", "sparsity": 0.5}, "`sparsity`"),
        ({"compression": "quantize", "distribution": "uniform"}, "`distribution`"),
    ],
)
def test_learning_compression_refuses_arguments_its_mode_does_not_use(arguments, named):
    # main: `bits` and `codebook_size` were ignored with compression="prune"
    with pytest.raises(ValueError, match=f"{named} do\\(es\\) nothing with compression='{arguments['compression']}'"):
        LearningCompression(**arguments)


def test_learning_compression_defaults_and_both_modes_still_take_everything():
    both = LearningCompression(compression="prune+quantize", sparsity=0.8, distribution="uniform", bits=3, codebook="kmeans")
    assert (both.sparsity, both.distribution, both.bits, both.codebook) == (0.8, "uniform", 3, "kmeans")
    prune, quantize = LearningCompression(), LearningCompression(compression="quantize", bits=1)
    assert (prune.sparsity, prune.distribution, quantize.bits, quantize.codebook) == (0.9, "global", 1, "kmeans")


@pytest.mark.parametrize("value", [1e18, 11.0])
def test_mu_multiplier_must_be_a_sane_factor(value):
    # main: 1e18 accepted
    with pytest.raises(ValueError, match=r"`mu_multiplier` must be at most 10 \(μ's factor per C step"):
        LearningCompression(mu_multiplier=value)
    assert LearningCompression(mu_multiplier=1.2174).mu_multiplier == 1.2174


def test_movement_pruning_takes_gmps_arguments_so_they_cannot_drift():
    """MovementPruning's signature is GMP's less the channel arguments it has no use for (named in NOT_FROM_GMP), with
    GMP's types and defaults (except OWN_DEFAULTS), then its own: an argument added to GMP fails here until movement
    takes it or names why not."""
    import inspect

    from lightning_sparse.callbacks.movement import NOT_FROM_GMP, OWN_DEFAULTS

    gmp = inspect.signature(GradualMagnitudePruning.__init__).parameters
    movement = inspect.signature(MovementPruning.__init__).parameters
    shared = [name for name in gmp if name not in NOT_FROM_GMP]
    assert list(movement)[: len(shared)] == shared
    assert list(movement)[len(shared) :] == ["score_rule", "score_lr", "check_signal"]
    for name in shared:
        assert movement[name].annotation == gmp[name].annotation, name
        assert movement[name].default == OWN_DEFAULTS.get(name, gmp[name].default), name
    callback = MovementPruning(sparsity=0.5, power=2.0, dense_first_layer=True)
    assert (callback.power, callback.dense_first_layer) == (2.0, True)


def test_a_new_pruning_method_is_one_make_pruner(tmp_path):
    """The documented override point (docs/contributing.md, "Adding a method"): a callback that only validates its
    arguments and builds a core pruner trains, logs and checkpoints through the base's hooks alone."""
    from lightning_sparse.callbacks.base import SparsityCallback
    from lightning_sparse.core.pruners import MagnitudePruner
    from lightning_sparse.core.schedules import StepSchedule

    class OneShotMagnitude(SparsityCallback):
        def __init__(self, sparsity: float = 0.5, at: int = 3) -> None:
            super().__init__(verbose=False)
            self.sparsity, self.at = sparsity, at

        def make_pruner(self, trainer, pl_module):
            return MagnitudePruner(pl_module, self.sparsity, StepSchedule(self.at, self.at, 1, schedule="constant"),
                                   name=type(self).__name__)  # fmt: skip

    assert set(SparsityCallback.__annotations__) >= {"pruner", "_matrices", "_decided_step", "_masked_step", "_reapply"}
    callback = OneShotMagnitude(sparsity=0.7)
    model = digits_model()
    make_trainer(tmp_path, [callback], max_epochs=1).fit(model, datamodule=DigitsDataModule(batch_size=64))
    assert callback.masks.sparsity() == pytest.approx(0.7, abs=1e-3)
    assert all(float((p == 0).float().mean()) == pytest.approx(0.7, abs=1e-2) for p in callback.masks.params.values())
    state = callback.state_dict()
    assert set(state) == {"masks", "start_step", "end_step", "planned_steps"} and state["start_step"] == 3
