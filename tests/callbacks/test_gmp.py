"""GradualMagnitudePruning inside real Trainer.fit runs on sklearn's digits."""

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from support import StopAfterEpoch, digits_model, make_trainer
from wandb_records import wandb_history
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.core.allocation import round_half_up
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import Classifier

STEPS_PER_EPOCH = 20  # 1,257 training digits in batches of 64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"`sparsity` must be a number in \[0, 1\), got 1.0"),
        ({"sparsity": -0.1}, r"`sparsity` must be a number in \[0, 1\)"),
        ({"start": 0.5, "end": 0.2}, r"`end` must not come before `start`"),
        ({"start": 30, "end": 10}, r"`end` must not come before `start`"),
        ({"end": 1.5}, r"`end` as a fraction of training must be in \[0, 1\]"),
        ({"start": -3}, r"`start` as an optimizer step must be >= 0"),
        ({"frequency": 0}, r"`frequency` must be an int >= 1"),
        ({"schedule": "exp"}, r"`schedule` must be one of \('cubic', 'linear', 'constant'\)"),
        ({"distribution": "layerwise"}, r"`distribution` must be one of \('uniform', 'global', 'erk'\)"),
        ({"sparsity": 0.5, "initial_sparsity": 0.6}, r"`initial_sparsity` must be in \[0, sparsity=0.5\]"),
        ({"power": 0.5}, r"`power` must be a finite number >= 1, got 0.5"),
        ({"power": 2.0, "schedule": "linear"}, r"`power` is the exponent of schedule='cubic'"),
        ({"dense_first_layer": "yes"}, r"`dense_first_layer` must be a bool"),
    ],
)
def test_bad_arguments_name_the_argument_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradualMagnitudePruning(**kwargs)


def test_end_before_start_in_mixed_units_is_caught_at_fit(digits_model, make_trainer, tmp_path, digits):
    callback = GradualMagnitudePruning(start=50, end=0.1)  # step 50 vs 10% of 80 steps = step 8
    with pytest.raises(ValueError, match=r"`end` \(step 8\) must not come before `start` \(step 50\)"):
        make_trainer(tmp_path, [callback]).fit(digits_model(), digits)


def test_include_matching_nothing_fails_before_training(digits_model, make_trainer, tmp_path, digits):
    callback = GradualMagnitudePruning(include=["encoder.*"])
    with pytest.raises(ValueError, match=r"matches no parameter. Prunable by default: \['net.1.weight'"):
        make_trainer(tmp_path, [callback]).fit(digits_model(), digits)


def _read_sparsity_log(log_dir: Path) -> list[dict[str, float]]:
    with open(log_dir / "metrics.csv") as f:
        return [
            {k: float(v) for k, v in row.items() if v != ""}
            for row in csv.DictReader(f)
            if row.get("sparsity/global")
        ]


@pytest.mark.parametrize("distribution", ["uniform", "global", "erk"])
def test_target_reached_exactly_at_end_and_held(digits_model, make_trainer, tmp_path, digits, distribution):
    callback = GradualMagnitudePruning(sparsity=0.9, start=0.1, end=0.5, frequency=7, distribution=distribution)
    logger = CSVLogger(tmp_path)
    model = digits_model()
    make_trainer(tmp_path, [callback], logger=logger).fit(model, digits)
    rows = _read_sparsity_log(Path(logger.log_dir))
    steps = [int(row["step"]) for row in rows]
    assert steps == [8, 15, 22, 29, 36, 40]  # every 7 steps from 10% of 80, and at 50% of 80
    assert all(a < b for a, b in zip([r["sparsity/global"] for r in rows], [r["sparsity/global"] for r in rows][1:]))
    weights = {n: p for n, p in model.named_parameters() if n in callback.masks}
    zeros = {n: int((w == 0).sum()) for n, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    if distribution == "uniform":
        assert zeros == {n: round_half_up(0.9 * w.numel()) for n, w in weights.items()}
    elif distribution == "global":
        assert sum(zeros.values()) == round_half_up(0.9 * total)
    else:
        assert sum(zeros.values()) == pytest.approx(0.9 * total, abs=len(zeros))
    assert rows[-1]["sparsity/global"] == pytest.approx(sum(zeros.values()) / total)
    for name in weights:
        assert rows[-1][f"sparsity/{name}"] == pytest.approx(zeros[name] / weights[name].numel())


def test_steps_are_optimizer_steps_under_gradient_accumulation(digits_model, make_trainer, tmp_path, digits):
    callback = GradualMagnitudePruning(sparsity=0.8, start=0, end=0.5, frequency=5)
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, [callback], logger=logger, accumulate_grad_batches=4)
    trainer.fit(digits_model(), digits)
    assert trainer.global_step == 4 * STEPS_PER_EPOCH // 4
    assert [int(r["step"]) for r in _read_sparsity_log(Path(logger.log_dir))] == [0, 5, 10]  # end = 50% of 20


def test_no_weight_orig_no_hooks_and_masks_within_memory_budget(digits_model, make_trainer, tmp_path, digits):
    model = digits_model("cnn")
    dense_keys = list(model.state_dict())
    callback = GradualMagnitudePruning(sparsity=0.9, start=0, end=0.5, frequency=10)
    make_trainer(tmp_path, [callback], max_epochs=1).fit(model, digits)
    assert list(model.state_dict()) == dense_keys
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert not any("orig" in name or "mask" in name for name, _ in model.named_buffers())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert callback.masks.packed_bytes() <= 0.05 * param_bytes


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_state_of_pruned_weights_is_cleared(digits_model, make_trainer, tmp_path, digits, optimizer):
    model = digits_model(optimizer=optimizer)
    callback = GradualMagnitudePruning(sparsity=0.8, start=0.25, end=0.5, frequency=5)
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(model, digits)
    state = trainer.optimizers[0].state
    for name, param in model.named_parameters():
        if name in callback.masks:
            pruned = ~callback.masks.mask(name)
            tensors = [v for v in state[param].values() if v.shape == param.shape]
            assert tensors and all(torch.all(v[pruned] == 0) for v in tensors), name


def test_checkpoint_has_dense_keys_and_loads_into_plain_model(digits_model, make_trainer, tmp_path, digits):
    callback = GradualMagnitudePruning(sparsity=0.75, start=0, end=0.5, frequency=10)
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(digits_model(), digits)
    path = tmp_path / "sparse.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    plain = Classifier(arch="lenet300", input_shape=(1, 8, 8))
    assert set(checkpoint["state_dict"]) == set(plain.state_dict())
    plain.load_state_dict(checkpoint["state_dict"])  # strict
    assert (plain.net[1].weight == 0).float().mean().item() == pytest.approx(0.75, abs=1e-4)
    assert callback.state_key in checkpoint["callbacks"]


def _gmp_run(tmp_path: Path, stop_epoch: int | None = None, ckpt: Path | None = None, **trainer_kwargs):
    pl.seed_everything(7)
    model = digits_model(optimizer="adam", lr=1e-3)
    callback = GradualMagnitudePruning(sparsity=0.85, start=0.1, end=0.7, frequency=6)
    callbacks = [callback] + ([StopAfterEpoch(stop_epoch, tmp_path / "interrupted.ckpt")] if stop_epoch is not None else [])
    trainer = make_trainer(tmp_path, callbacks, **trainer_kwargs)
    trainer.fit(model, DigitsDataModule(batch_size=64), ckpt_path=ckpt)
    return model, callback, trainer


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    full_model, full_cb, _ = _gmp_run(tmp_path / "full")
    _, cut_cb, cut_trainer = _gmp_run(tmp_path / "cut", stop_epoch=1)
    assert cut_trainer.global_step == 40  # mid-ramp: updates run from step 8 to step 56
    assert 0 < cut_cb.masks.sparsity() < 0.85
    resumed_model, resumed_cb, resumed_trainer = _gmp_run(tmp_path / "resumed", ckpt=tmp_path / "cut" / "interrupted.ckpt")
    assert resumed_trainer.global_step == 80
    for (name, full), (_, resumed) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(full, resumed), name
    assert resumed_cb.masks.checksum() == full_cb.masks.checksum()


def test_resume_restores_masks_and_schedule_position(digits_model, make_trainer, tmp_path):
    _, cut_cb, _ = _gmp_run(tmp_path / "cut", stop_epoch=0)
    saved = torch.load(tmp_path / "cut" / "interrupted.ckpt", weights_only=False)["callbacks"][cut_cb.state_key]
    resumed_cb = GradualMagnitudePruning(sparsity=0.85, start=0.1, end=0.7, frequency=6)
    model = digits_model(optimizer="adam", lr=1e-3)
    # max_epochs differs from the original run: the restored schedule (steps 8..56) must still win.
    trainer = make_trainer(tmp_path / "resumed", [resumed_cb], max_epochs=1)
    trainer.fit(model, DigitsDataModule(), ckpt_path=tmp_path / "cut" / "interrupted.ckpt")
    assert (resumed_cb.pruner.schedule.start_step, resumed_cb.pruner.schedule.end_step) == (saved["start_step"], saved["end_step"]) == (8, 56)
    assert resumed_cb.masks.checksum() == cut_cb.masks.checksum()


def test_resuming_masks_that_do_not_fit_the_model_fails_and_loads_nothing(digits_model, make_trainer, tmp_path):
    _gmp_run(tmp_path / "cut", stop_epoch=0)
    path = tmp_path / "cut" / "interrupted.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("GradualMagnitudePruning")]
    masks = checkpoint["callbacks"][key]["masks"]
    masks["shapes"]["net.3.weight"] = [100, 301]
    masks["packed"]["net.3.weight"] = torch.zeros((100 * 301 + 7) // 8, dtype=torch.uint8)
    torch.save(checkpoint, path)
    callback = GradualMagnitudePruning(sparsity=0.85, start=0.1, end=0.7, frequency=6)
    trainer = make_trainer(tmp_path, [callback])
    with pytest.raises(ValueError, match=r"mask for 'net.3.weight' has shape \[100, 301\] but the parameter has shape \[100, 300\]"):
        trainer.fit(digits_model(optimizer="adam", lr=1e-3), DigitsDataModule(), ckpt_path=path)
    assert not any(callback.masks.is_masked(name) for name in callback.masks.params)  # nothing half-loaded
    assert callback.pruner.schedule.start_step is None


def test_sparsity_reaches_wandb_offline_run(digits_model, make_trainer, tmp_path, digits, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="lightning-sparse-tests", save_dir=str(tmp_path))
    callback = GradualMagnitudePruning(sparsity=0.9, start=0, end=0.5, frequency=10)
    make_trainer(tmp_path, [callback], logger=logger, max_epochs=2).fit(digits_model(), digits)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    rows = [row for row in wandb_history(run_dir) if "sparsity/global" in row]
    assert [row["trainer/global_step"] for row in rows] == [0, 10, 20]  # end = 50% of 40 steps
    assert rows[-1]["sparsity/global"] == pytest.approx(callback.masks.sparsity())
    assert rows[-1]["sparsity/net.1.weight"] == pytest.approx(0.9, abs=1e-4)


def test_sparse_model_still_classifies_digits(digits_model, make_trainer, tmp_path, digits):
    pl.seed_everything(0)
    model = digits_model("cnn")
    callback = GradualMagnitudePruning(sparsity=0.9, start=0.1, end=0.6, frequency=10)
    trainer = make_trainer(tmp_path, [callback], max_epochs=12)
    trainer.fit(model, digits)
    assert callback.masks.sparsity() == pytest.approx(0.9, abs=1e-3)
    assert trainer.test(model, digits, verbose=False)[0]["test_acc"] > 0.93


def test_per_layer_sparsity_mapping(digits_model, make_trainer, tmp_path, digits):
    callback = GradualMagnitudePruning(sparsity={"net.1.*": 0.95, "net.3.weight": 0.5}, start=0, end=0.5, frequency=10)
    model = digits_model()
    make_trainer(tmp_path, [callback], max_epochs=2).fit(model, digits)
    assert list(callback.masks) == ["net.1.weight", "net.3.weight"]  # net.5 matched no glob: left dense
    assert int((model.net[1].weight == 0).sum()) == round_half_up(0.95 * 300 * 64)
    assert int((model.net[3].weight == 0).sum()) == round_half_up(0.5 * 100 * 300)
    assert int((model.net[5].weight == 0).sum()) == 0


def test_per_layer_sparsity_mapping_is_validated(digits_model, make_trainer, tmp_path, digits):
    with pytest.raises(ValueError, match=r"`sparsity\['net.1.\*'\]` must be a number in \[0, 1\), got 1.2"):
        GradualMagnitudePruning(sparsity={"net.1.*": 1.2})
    with pytest.raises(ValueError, match=r"`initial_sparsity` must be in \[0, sparsity=0.3\]"):
        GradualMagnitudePruning(sparsity={"net.1.*": 0.9, "net.3.*": 0.3}, initial_sparsity=0.5)
    callback = GradualMagnitudePruning(sparsity={"decoder.*": 0.5})
    with pytest.raises(ValueError, match=r"`sparsity` pattern 'decoder.\*' matches no selected parameter"):
        make_trainer(tmp_path, [callback]).fit(digits_model(), digits)


class _PrunedStayZero(pl.Callback):
    """After every optimizer step, counts pruned weights that are not exactly +0.0."""

    def __init__(self, pruner) -> None:
        self.pruner, self.violations, self.checked = pruner, 0, 0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        masks = self.pruner.masks
        for name in masks:
            if masks.is_masked(name):
                pruned = masks.params[name].detach()[~masks.mask(name)]
                self.violations += int(((pruned != 0) | torch.signbit(pruned)).sum())
                self.checked += pruned.numel()


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_pruned_weights_stay_positive_zero_through_every_optimizer_step(digits_model, make_trainer, tmp_path, digits, optimizer):
    # SGD with momentum and weight decay, Adam, AdamW: the weights are not re-masked after each step for these
    # optimizers (zero gradient and zero state keep them at 0), so this checks that invariant at every step.
    pruner = GradualMagnitudePruning(sparsity=0.8, start=0.1, end=0.5, frequency=5)
    watcher = _PrunedStayZero(pruner)
    model = digits_model(optimizer=optimizer, weight_decay=0.01)
    make_trainer(tmp_path, [pruner, watcher], max_epochs=2).fit(model, digits)
    assert pruner._reapply is False
    assert watcher.checked > 0 and watcher.violations == 0


class PoisonWeight(pl.Callback):
    """Write a NaN into one weight at the start of optimizer step ``step`` (what a diverging run does)."""

    def __init__(self, step: int, name: str = "net.3.weight") -> None:
        self.step, self.name = step, name

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.get_parameter(self.name)[0, 0] = float("nan")


def test_a_nan_weight_is_an_error_naming_the_layer_and_the_step(digits_model, make_trainer, tmp_path, digits):
    # GMP used to keep a NaN weight as the "largest" one and train on silently
    callback = GradualMagnitudePruning(sparsity=0.5, start=0, end=15, frequency=5)
    with pytest.raises(FloatingPointError, match=r"GradualMagnitudePruning: NaN or infinite values in .*net.3.weight \(weight\).* at optimizer step 7"):
        make_trainer(tmp_path, [callback, PoisonWeight(7)], max_epochs=1).fit(digits_model(), digits)


def test_a_nan_gradient_between_mask_updates_is_an_error_naming_the_layer_and_the_step(digits_model, make_trainer, tmp_path, digits):
    # between updates the gradients are checked in the masking pass: a NaN must still stop training at its own step
    class PoisonGradient(pl.Callback):
        def on_after_backward(self, trainer, pl_module) -> None:
            if trainer.global_step == 7:
                pl_module.get_parameter("net.1.weight").grad[0, :] = float("nan")

    callback = GradualMagnitudePruning(sparsity=0.5, start=0, end=15, frequency=5)
    with pytest.raises(FloatingPointError, match=r"GradualMagnitudePruning: NaN or infinite values in net.1.weight \(gradient\) at optimizer step 7"):
        make_trainer(tmp_path, [callback, PoisonGradient()], max_epochs=1).fit(digits_model(), digits)


@pytest.mark.parametrize("other", ["gmp", "rigl"])
def test_two_pruning_callbacks_on_the_same_layers_are_refused(digits_model, make_trainer, tmp_path, digits, other):
    # GMP reported 0.5 while 0.891 of the weights were zero
    from lightning_sparse import RigL

    second = GradualMagnitudePruning(sparsity=0.8, include=["net.3.weight"]) if other == "gmp" else RigL(sparsity=0.8, exclude=["net.1.weight"])
    name = "GradualMagnitudePruning" if other == "gmp" else "RigL"
    with pytest.raises(ValueError, match=rf"GradualMagnitudePruning and {name} both compress \['net.3.weight'"):
        make_trainer(tmp_path, [GradualMagnitudePruning(sparsity=0.5), second], max_epochs=1).fit(digits_model(), digits)


def test_disjoint_pruning_callbacks_compose(digits_model, make_trainer, tmp_path, digits):
    first, second = GradualMagnitudePruning(sparsity=0.5, include=["net.1.weight"]), GradualMagnitudePruning(sparsity=0.8, exclude=["net.1.weight"])
    model = digits_model()
    make_trainer(tmp_path, [first, second], max_epochs=1).fit(model, digits)
    assert first.masks.sparsity() == pytest.approx(0.5, abs=1e-3) and second.masks.sparsity() == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("empty", ["dataloader", "limit_train_batches"])
def test_an_empty_train_dataloader_is_reported(digits_model, make_trainer, tmp_path, digits, empty):
    # it used to run 0 steps without a word
    digits.setup("fit")
    if empty == "dataloader":
        loaders, options = torch.utils.data.DataLoader(torch.utils.data.Subset(digits.splits["train"], [])), {}
    else:
        loaders, options = digits.train_dataloader(), {"limit_train_batches": 0}
    with pytest.warns(UserWarning, match=r"GradualMagnitudePruning: this run has 0 optimizer steps"):
        make_trainer(tmp_path, [GradualMagnitudePruning(sparsity=0.5, end=5)], max_epochs=1, **options).fit(digits_model(), loaders)


@pytest.mark.parametrize("direction", ["longer max_epochs", "after max_steps"])
def test_resume_into_a_longer_run_keeps_the_schedule_and_says_so(digits_model, make_trainer, tmp_path, digits, direction):
    # fractional start/end used to be kept silently when the resumed run was longer
    first = {"max_epochs": 2} if direction == "longer max_epochs" else {"max_epochs": 4, "max_steps": 30}
    callback = GradualMagnitudePruning(sparsity=0.8, start=0.1, end=0.5, frequency=5)
    trainer = make_trainer(tmp_path / "first", [callback], **first)
    trainer.fit(digits_model(), digits)
    planned = (callback.pruner.schedule.start_step, callback.pruner.schedule.end_step)
    assert planned == ((4, 20) if direction == "longer max_epochs" else (3, 15))
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    resumed = GradualMagnitudePruning(sparsity=0.8, start=0.1, end=0.5, frequency=5)
    total = 40 if direction == "longer max_epochs" else 30
    with pytest.warns(UserWarning, match=rf"GradualMagnitudePruning: resumed with the schedule planned for {total} optimizer steps \(start step {planned[0]}, end step {planned[1]}\); this run has 80. The schedule is kept"):
        make_trainer(tmp_path / "second", [resumed], max_epochs=4).fit(digits_model(), digits, ckpt_path=tmp_path / "first.ckpt")
    assert (resumed.pruner.schedule.start_step, resumed.pruner.schedule.end_step) == planned


def test_resume_with_int_steps_does_not_warn(digits_model, make_trainer, tmp_path, digits, recwarn):
    callback = GradualMagnitudePruning(sparsity=0.8, start=2, end=10, frequency=5)
    trainer = make_trainer(tmp_path / "first", [callback], max_epochs=1)
    trainer.fit(digits_model(), digits)
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    make_trainer(tmp_path / "second", [GradualMagnitudePruning(sparsity=0.8, start=2, end=10, frequency=5)], max_epochs=2).fit(
        digits_model(), digits, ckpt_path=tmp_path / "first.ckpt"
    )
    assert not [w for w in recwarn if "resumed with the schedule" in str(w.message)]


def test_power_and_dense_first_layer(digits_model, make_trainer, tmp_path, digits):
    callback = GradualMagnitudePruning(sparsity=0.8, start=0, end=40, frequency=10, power=1.0, dense_first_layer=True)
    logger = CSVLogger(tmp_path)
    model = digits_model()
    make_trainer(tmp_path, [callback], logger=logger, max_epochs=3).fit(model, digits)
    assert "net.1.weight" not in callback.masks.params and (model.net[1].weight == 0).sum() == 0  # the first layer stays dense
    rows = _read_sparsity_log(Path(logger.log_dir))
    by_step = {int(r["step"]): r["sparsity/global"] for r in rows}
    assert by_step[20] == pytest.approx(0.4, abs=2e-3)  # power 1: linear, half way at half the ramp (cubic: 0.7)


@pytest.mark.parametrize(("optimizer", "hinted"), [("adam", True), ("adam-fused", False), ("sgd", False)])
def test_a_for_each_adam_on_the_cpu_gets_a_hint_to_fuse_it(digits_model, make_trainer, tmp_path, digits, caplog, optimizer, hinted):
    # for-each Adam takes sqrt of every pruned weight's zero second moment the slow way: twice the dense step time
    model = digits_model(optimizer="adam", lr=1e-3) if optimizer.startswith("adam") else digits_model()
    if optimizer == "adam-fused":
        model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, [GradualMagnitudePruning(sparsity=0.5, verbose=False)], max_steps=2).fit(model, digits)
    assert ("Adam steps the pruned weights on the CPU without `fused=True`" in caplog.text) is hinted
