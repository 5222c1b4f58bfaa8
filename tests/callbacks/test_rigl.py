"""RigL and SET inside real Trainer.fit runs on sklearn's digits."""

import csv
import inspect
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from support import StopAfterEpoch, digits_model, make_trainer
from lightning_sparse import SET, RigL
from lightning_sparse.core.allocation import erk_sparsities, round_half_up
from lightning_sparse.core.masks import unpack
from lightning_sparse.data import DigitsDataModule


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"`sparsity` must be a number in \[0, 1\), got 1.0"),
        ({"sparsity": -0.2}, r"`sparsity` must be a number in \[0, 1\)"),
        ({"alpha": 0.0}, r"`alpha` must be a number in \(0, 1\], got 0.0"),
        ({"alpha": 1.5}, r"`alpha` must be a number in \(0, 1\]"),
        ({"frequency": 0}, r"`frequency` must be an int >= 1"),
        ({"end": 50, "frequency": 100}, r"`end` \(step 50\) must come after the first connection update at step 100"),
        ({"end": 1.2}, r"`end` as a fraction of training must be in \[0, 1\]"),
        ({"grow": "momentum"}, r"`grow` must be one of \('gradient', 'random'\)"),
        ({"distribution": "global"}, r"`distribution` must be one of \('erk', 'uniform', 'er'\)"),
        ({"decay": "step"}, r"`decay` must be one of \('cosine', 'constant', 'linear'\)"),
        ({"erk_power_scale": 1.5}, r"`erk_power_scale` must be a number in \[0, 1\], got 1.5"),
        ({"dense_first_layer": 1}, r"`dense_first_layer` must be a bool"),
        ({"seed": "abc"}, r"`seed` must be an int, got 'abc'"),
        ({"seed": 1.5}, r"`seed` must be an int, got 1.5"),
        ({"grow_init": "random"}, r"`grow_init` must be one of \('zeros', 'gradient'\), got 'random'"),
        ({"grow_scale": 0}, r"`grow_scale` must be a finite number > 0, got 0"),
        ({"grow_scale": float("inf")}, r"`grow_scale` must be a finite number > 0, got inf"),
    ],
)
def test_bad_arguments_name_the_argument_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RigL(**kwargs)


def test_end_before_first_update_in_fractions_is_caught_at_fit(digits_model, make_trainer, tmp_path, digits):
    callback = RigL(end=0.1, frequency=10)  # 10% of 80 steps = step 8, first update at step 10
    with pytest.raises(ValueError, match=r"`end` \(step 8\) must come after the first connection update at step 10"):
        make_trainer(tmp_path, [callback]).fit(digits_model(), digits)


@pytest.mark.parametrize("sparsity", [0.0, 1e-6])
def test_erk_that_would_leave_every_layer_dense_is_refused(digits_model, make_trainer, tmp_path, digits, sparsity):
    callback = RigL(sparsity=sparsity, frequency=10)
    message = rf"`sparsity`={sparsity} with distribution 'erk' leaves every layer dense \(\['net.1.weight'"
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, [callback]).fit(digits_model(), digits)


class UpdateRecorder(pl.Callback):
    """Listed after RigL: at each step, compares masks, weights, dense gradients and optimizer state around updates."""

    def __init__(self, rigl: RigL) -> None:
        self.rigl = rigl
        self.updates: list[dict] = []
        self.nonzeros: list[dict[str, int]] = []
        self._before: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        masks = self.rigl.masks
        self._before = {name: masks.mask(name) for name in masks}

    def on_after_backward(self, trainer, pl_module) -> None:  # dense gradients, before RigL masks them
        self._grads = {name: masks_param.grad.detach().clone() for name, masks_param in self.rigl.masks.params.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        masks = self.rigl.masks
        after = {name: masks.mask(name) for name in masks}
        self.nonzeros.append({name: int(mask.sum()) for name, mask in after.items()})
        if all(torch.equal(after[n], self._before[n]) for n in after):
            return
        row = {"step": trainer.global_step, "grown": {}, "grad_ok": True, "zero_start": True, "state_reset": True}
        for name, new in after.items():
            param, old = masks.params[name], self._before[name]
            grown, kept_after_drop = new & ~old, old & new
            candidates_left = ~new
            row["grown"][name] = int(grown.sum())
            grad = self._grads[name].abs()
            if grown.any() and candidates_left.any():
                row["grad_ok"] &= bool(grad[grown].min() >= grad[candidates_left & ~kept_after_drop].max())
            row["zero_start"] &= bool(torch.all(param[grown] == 0))
            row.setdefault("grown_values", {})[name] = (param[grown].detach().clone(), self._grads[name][grown])
            for value in optimizer.state.get(param, {}).values():
                if value.shape == param.shape:
                    row["state_reset"] &= bool(torch.all(value[grown] == 0))
        self.updates.append(row)


def _rigl_log(log_dir: Path) -> list[dict[str, float]]:
    with open(log_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f) if row.get("rigl/churn/global")]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_rigl_moves_connections_at_constant_exact_sparsity(digits_model, make_trainer, tmp_path, digits, optimizer):
    rigl = RigL(sparsity=0.9, frequency=10, alpha=0.3, end=0.75)
    recorder = UpdateRecorder(rigl)
    logger = CSVLogger(tmp_path)
    model = digits_model(optimizer=optimizer)
    make_trainer(tmp_path, [rigl, recorder], logger=logger).fit(model, digits)

    # exact ERK counts at every step, never changed by an update
    shapes = {name: tuple(p.shape) for name, p in rigl.masks.params.items()}
    target = erk_sparsities(shapes, 0.9)
    expected = {name: p.numel() - round_half_up(target[name] * p.numel()) for name, p in rigl.masks.params.items()}
    assert len(recorder.nonzeros) == 80 and all(counts == expected for counts in recorder.nonzeros)
    weights = dict(model.named_parameters())
    assert {name: int((weights[name] != 0).sum()) for name in expected} == expected

    # updates at steps 10..50 (end = 60), each moving connections grown by dense |gradient|, at zero, with fresh state
    assert [u["step"] for u in recorder.updates] == [10, 20, 30, 40, 50]
    assert all(u["grad_ok"] and u["zero_start"] and u["state_reset"] for u in recorder.updates)
    moved = [sum(u["grown"].values()) for u in recorder.updates]
    assert moved[0] > moved[-1] > 0  # cosine decay of the update fraction

    rows = _rigl_log(Path(logger.log_dir))
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40, 50]
    for row, update in zip(rows, recorder.updates):
        assert row["rigl/moved/global"] == sum(update["grown"].values())
        for name, count in update["grown"].items():
            assert row[f"rigl/moved/{name}"] == count
        assert row["sparsity/global"] == pytest.approx(0.9, abs=1e-3)
    churn = [r["rigl/churn/global"] for r in rows]
    assert churn[0] == pytest.approx(moved[0] / sum(expected.values()))  # first update: churn = moved / active
    assert all(0 < c < 1 for c in churn)


def test_set_grows_at_random_and_is_reproducible(digits_model, make_trainer, tmp_path, digits):
    def run(seed):
        pl.seed_everything(0)
        callback = SET(sparsity=0.9, frequency=10, seed=seed)
        recorder = UpdateRecorder(callback)
        make_trainer(tmp_path, [callback, recorder], max_epochs=2).fit(digits_model(), digits)
        return callback, recorder

    first, first_rec = run(seed=1)
    again, _ = run(seed=1)
    other, _ = run(seed=2)
    assert first.grow == "random" and first.masks.checksum() == again.masks.checksum() != other.masks.checksum()
    assert [u["step"] for u in first_rec.updates] == [10, 20]
    assert not all(u["grad_ok"] for u in first_rec.updates)  # random growth ignores the gradient
    assert all(u["zero_start"] and u["state_reset"] for u in first_rec.updates)


def test_sparse_from_a_later_step_keeps_the_largest_weights_there(digits_model, make_trainer, tmp_path, digits):
    rigl = RigL(sparsity=0.8, distribution="uniform", start=20, frequency=10, end=0.75)
    recorder = UpdateRecorder(rigl)
    make_trainer(tmp_path, [rigl, recorder]).fit(digits_model(), digits)
    dense_steps = [i for i, counts in enumerate(recorder.nonzeros) if counts == {n: p.numel() for n, p in rigl.masks.params.items()}]
    assert dense_steps == list(range(20))
    assert [u["step"] for u in recorder.updates] == [20, 30, 40, 50]  # magnitude start, then moves
    assert rigl.masks.sparsity() == pytest.approx(0.8, abs=1e-4)


def test_unknown_optimizer_state_is_warned_about(digits_model, make_trainer, tmp_path, digits):
    class AdagradClassifier(type(digits_model())):
        def configure_optimizers(self):
            return torch.optim.Adagrad(self.parameters(), lr=0.05, initial_accumulator_value=0.1)

    model = AdagradClassifier(arch="lenet300", input_shape=(1, 8, 8))
    with pytest.warns(UserWarning, match=r"RigL: cannot reset the state of optimizer Adagrad"):
        make_trainer(tmp_path, [RigL(frequency=10)], max_epochs=1).fit(model, digits)


def _run(tmp_path: Path, cls, stop_epoch=None, ckpt=None):
    pl.seed_everything(11)
    model = digits_model(optimizer="adam", lr=1e-3)
    callback = cls(sparsity=0.85, frequency=6, end=0.8)
    callbacks = [callback] + ([StopAfterEpoch(stop_epoch, tmp_path / "cut.ckpt")] if stop_epoch is not None else [])
    trainer = make_trainer(tmp_path, callbacks)
    trainer.fit(model, DigitsDataModule(batch_size=64), ckpt_path=ckpt)
    return model, callback, trainer


@pytest.mark.parametrize("cls", [RigL, SET])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, cls):
    full_model, full_cb, _ = _run(tmp_path / "full", cls)
    _, cut_cb, cut_trainer = _run(tmp_path / "cut", cls, stop_epoch=1)
    assert cut_trainer.global_step == 40  # updates every 6 steps up to step 64
    resumed_model, resumed_cb, trainer = _run(tmp_path / "resumed", cls, ckpt=tmp_path / "cut" / "cut.ckpt")
    assert trainer.global_step == 80
    assert resumed_cb.masks.checksum() == full_cb.masks.checksum() != cut_cb.masks.checksum()
    for (name, full), (_, resumed) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(full, resumed), name
    churn = f"{'set' if cls is SET else 'rigl'}/churn/global"  # SET logs under set/
    assert resumed_cb.pruner.metrics()[churn] == full_cb.pruner.metrics()[churn]


def test_checkpoint_keys_stay_dense(digits_model, make_trainer, tmp_path, digits):
    model = digits_model()
    keys = list(model.state_dict())
    trainer = make_trainer(tmp_path, [RigL(frequency=10)], max_epochs=1)
    trainer.fit(model, digits)
    trainer.save_checkpoint(tmp_path / "rigl.ckpt")
    assert list(torch.load(tmp_path / "rigl.ckpt", weights_only=False)["state_dict"]) == keys


def test_per_layer_sparsity_mapping(digits_model, make_trainer, tmp_path, digits):
    rigl = RigL(sparsity={"net.1.weight": 0.95, "net.3.weight": 0.8}, frequency=10)
    recorder = UpdateRecorder(rigl)
    model = digits_model()
    make_trainer(tmp_path, [rigl, recorder], max_epochs=2).fit(model, digits)
    expected = {"net.1.weight": 19200 - round_half_up(0.95 * 19200), "net.3.weight": 30000 - round_half_up(0.8 * 30000)}
    assert all(counts == expected for counts in recorder.nonzeros)
    assert [u["step"] for u in recorder.updates] == [10, 20]
    assert int((model.net[5].weight == 0).sum()) == 0  # matched no glob: dense


def test_a_nan_gradient_is_an_error_naming_the_layer_and_the_step(digits_model, make_trainer, tmp_path, digits):
    # RigL used to grow the NaN-gradient positions first, and NaN · 0 left NaN at pruned positions
    class PoisonGradient(pl.Callback):
        def on_after_backward(self, trainer, pl_module) -> None:
            if trainer.global_step == 4:
                pl_module.get_parameter("net.1.weight").grad[0, :] = float("nan")

    callback = RigL(sparsity=0.8, frequency=4, end=0.5)
    with pytest.raises(FloatingPointError, match=r"RigL: NaN or infinite values in net.1.weight \(gradient\) at optimizer step 4"):
        make_trainer(tmp_path, [callback, PoisonGradient()], max_epochs=1).fit(digits_model(), digits)


def test_frozen_layers_are_refused_naming_them(digits_model, make_trainer, tmp_path, digits):
    # RigL used to grow frozen layers by index, leaving 570 of 2,091 active weights as untrainable zeros
    model = digits_model()
    model.net[3].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"RigL cannot train the connections it grows in frozen parameters \['net.3.weight'\]"):
        make_trainer(tmp_path, [RigL(sparsity=0.8, frequency=4, end=0.5)], max_epochs=1).fit(model, digits)


def test_a_layer_frozen_during_training_keeps_its_mask_with_a_warning(digits_model, make_trainer, tmp_path, digits):
    class FreezeAfterSetup(pl.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            pl_module.net[3].weight.requires_grad_(False)

    callback = RigL(sparsity=0.8, frequency=4, end=0.5)
    with pytest.warns(UserWarning, match=r"RigL: \['net.3.weight'\] have no gradient at step 4"):
        make_trainer(tmp_path, [callback, FreezeAfterSetup()], max_epochs=1).fit(digits_model(), digits)
    assert callback.pruner.moved["net.3.weight"] == 0 and callback.pruner.moved["net.1.weight"] > 0
    assert torch.equal(callback.masks.mask("net.3.weight"), unpack(callback.pruner.initial["net.3.weight"], (100, 300)))


def test_resume_into_a_longer_run_keeps_the_schedule_and_says_so(digits_model, make_trainer, tmp_path, digits):
    callback = RigL(sparsity=0.8, frequency=4, end=0.5)
    trainer = make_trainer(tmp_path / "first", [callback], max_epochs=1)
    trainer.fit(digits_model(), digits)
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    resumed = RigL(sparsity=0.8, frequency=4, end=0.5)
    with pytest.warns(UserWarning, match=r"RigL: resumed with the schedule planned for 20 optimizer steps \(start step 0, end step 10\); this run has 40"):
        make_trainer(tmp_path / "second", [resumed], max_epochs=2).fit(digits_model(), digits, ckpt_path=tmp_path / "first.ckpt")
    assert resumed.pruner.schedule.end_step == 10


def test_er_power_scale_linear_decay_and_dense_first_layer(digits_model, make_trainer, tmp_path, digits):
    callback = RigL(sparsity=0.8, distribution="er", erk_power_scale=0.5, decay="constant", frequency=4, end=0.5,
                    dense_first_layer=True)  # fmt: skip
    model = digits_model()
    make_trainer(tmp_path, [callback], max_epochs=1).fit(model, digits)
    assert list(callback.masks.params) == ["net.3.weight", "net.5.weight"] and (model.net[1].weight == 0).sum() == 0
    shapes = {n: tuple(p.shape) for n, p in callback.masks.params.items()}
    expected = erk_sparsities(shapes, 0.8, kernel=False, power_scale=0.5)
    for name, param in callback.masks.params.items():
        assert int((param == 0).sum()) == round_half_up(expected[name] * param.numel())
    active = int(callback.masks.mask("net.3.weight").sum())
    # constant decay moves alpha = 30% at the last update too (step 8; regrown drops are not counted), where the
    # cosine would move 0.15 · (1 + cos(0.8π)) = 2.9%
    assert 0.15 * active < callback.pruner.moved["net.3.weight"] <= 0.3 * active


def test_set_takes_every_rigl_argument_but_grow():
    rigl = inspect.signature(RigL.__init__).parameters
    set_ = inspect.signature(SET.__init__).parameters
    assert list(set_) == [name for name in rigl if name != "grow"]
    assert all(set_[name].default == rigl[name].default and set_[name].annotation == rigl[name].annotation for name in set_)
    callback = SET(sparsity={"net.1.weight": 0.8}, decay="linear", erk_power_scale=0.5, dense_first_layer=True)
    assert (callback.grow, callback.decay, callback.erk_power_scale, callback.dense_first_layer) == ("random", "linear", 0.5, True)
    with pytest.raises(TypeError, match="update_frequency"):
        RigL(update_frequency=7)


def test_grown_weights_can_start_at_a_scaled_descent_step(digits_model, make_trainer, tmp_path, digits):
    pl.seed_everything(0)
    rigl = RigL(sparsity=0.9, frequency=10, grow_init="gradient", grow_scale=0.5)
    recorder = UpdateRecorder(rigl)
    make_trainer(tmp_path, [rigl, recorder], max_epochs=2).fit(digits_model(), digits)
    assert [u["step"] for u in recorder.updates] == [10, 20]
    for update in recorder.updates:
        assert not update["zero_start"] and update["state_reset"]  # weights start off zero, momentum still reset
        for values, grads in update["grown_values"].values():
            assert torch.equal(values, grads * -0.5)  # w = -grow_scale · dense gradient, before the optimizer step
    assert rigl.masks.sparsity() == pytest.approx(0.9, abs=1e-4)
