"""OneShotPruning in real Trainer.fit runs: digits (LeNet-300-100), a tiny Hugging Face Llama built from a config on
Shakespeare; masks held through recovery, exact resume without pruning again, a model's own zeros as masks, bad input."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from support import StopAfterEpoch, digits_model, make_trainer
from lightning_sparse import GradualMagnitudePruning, OneShotPruning
from lightning_sparse.core import MaskSet, select_targets
from lightning_sparse.core.calibration import evaluation_mode
from lightning_sparse.core.oneshot import prune_one_shot
from lightning_sparse.core.structured import nm_counts
from lightning_sparse.data import DigitsDataModule

LAYERS = ("net.1.weight", "net.3.weight", "net.5.weight")  # LeNet-300-100's Linear weights


def zeros(model, name):
    return model.get_parameter(name) == 0


class FirstBatch(pl.Callback):
    """The weights as the first training batch starts (after OneShotPruning's own hook, placed before it)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "weights"):
            self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_sparsegpt_prunes_at_fit_start_and_recovery_holds_the_masks(tmp_path):
    torch.manual_seed(0)
    model = digits_model()
    dense = copy.deepcopy(model)
    first = FirstBatch()
    callback = OneShotPruning(sparsity=0.5, method="sparsegpt", calibration_batches=4, verbose=False)
    trainer = make_trainer(tmp_path, [callback, first], max_epochs=2, logger=CSVLogger(tmp_path, name="log"))
    trainer.fit(model, DigitsDataModule())
    for name in LAYERS:
        pruned = first.weights[name] == 0
        assert int(pruned.sum()) == round(0.5 * pruned.numel())  # exactly 50% at the first step
        assert torch.equal(zeros(model, name), pruned)  # and the same zeros after two epochs of recovery
        # SparseGPT updated the kept weights (not dense weights under a mask)
        kept = ~pruned
        assert not torch.allclose(first.weights[name][kept], dense.get_parameter(name).detach()[kept])
    assert callback.pruner.pruned_step == 0
    metrics = (tmp_path / "log" / "version_0" / "metrics.csv").read_text()
    assert "sparsity/global" in metrics and "oneshot/target_sparsity" in metrics and "oneshot/seconds" in metrics


def test_in_fit_pruning_equals_core_pruning_on_the_same_batches(tmp_path):
    torch.manual_seed(0)
    model = digits_model()
    reference = copy.deepcopy(model)
    data = DigitsDataModule()
    data.setup()
    batches = [b for _, b in zip(range(3), data.train_dataloader())]
    masks = MaskSet(select_targets(reference))
    with evaluation_mode(reference):
        prune_one_shot(reference, masks, batches, lambda b: reference(b[0]), "wanda", 0.6)
    first = FirstBatch()
    trainer = make_trainer(tmp_path, [OneShotPruning(0.6, "wanda", calibration_batches=3, verbose=False), first], max_steps=1)
    trainer.fit(model, data)
    for name in LAYERS:
        assert torch.equal(first.weights[name], reference.get_parameter(name).detach())


def test_pruning_at_a_later_step_waits_for_it(tmp_path):
    torch.manual_seed(0)
    callback = OneShotPruning(0.5, "wanda", calibration_batches=2, step=5, verbose=False)
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append((trainer.global_step, float((pl_module.net[1].weight == 0).float().mean())))

    make_trainer(tmp_path, [callback, Watch()], max_steps=8).fit(digits_model(), DigitsDataModule())
    assert [s for step, s in seen if step <= 5] == [0.0] * 5
    assert all(s == 0.5 for step, s in seen if step > 5)
    assert callback.pruner.pruned_step == 5


def test_resume_holds_the_masks_and_does_not_prune_again(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "stop.ckpt"
    make_trainer(tmp_path, [OneShotPruning(0.5, "sparsegpt", calibration_batches=2, verbose=False), StopAfterEpoch(0, ckpt)],
                 max_epochs=3).fit(digits_model(), DigitsDataModule())  # fmt: skip
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    first = FirstBatch()
    callback = OneShotPruning(0.5, "sparsegpt", calibration_batches=2, verbose=False)
    model = digits_model()
    make_trainer(tmp_path, [callback, first], max_epochs=2).fit(model, DigitsDataModule(), ckpt_path=ckpt)
    assert callback.pruner.pruned_step == 0  # restored, not a new pruning
    for name in LAYERS:
        assert torch.equal(first.weights[name], saved[name])  # pruning again would have moved the kept weights
        assert torch.equal(zeros(model, name), saved[name] == 0)


def test_method_zeros_holds_the_zeros_a_model_already_has(tmp_path):
    torch.manual_seed(0)
    model = digits_model()
    with torch.no_grad():  # pruned elsewhere: every third weight, and half of net.3's rows
        for name in LAYERS:
            model.get_parameter(name)[:, ::3] = 0
        model.net[3].weight[::2] = 0
    before = {name: zeros(model, name).clone() for name in LAYERS}
    callback = OneShotPruning(method="zeros", verbose=False)
    make_trainer(tmp_path, [callback], max_epochs=2).fit(model, DigitsDataModule())
    for name in LAYERS:
        assert torch.equal(zeros(model, name), before[name])
        assert callback.masks.sparsity(name) == pytest.approx(float(before[name].float().mean()))


def test_wanda_2_4_with_owl_refused_and_2_4_groups_held(tmp_path):
    with pytest.raises(ValueError, match="`distribution`='owl' needs unstructured"):
        OneShotPruning(method="wanda", granularity="2:4", distribution="owl")
    torch.manual_seed(0)
    model = digits_model()
    make_trainer(tmp_path, [OneShotPruning(method="wanda", granularity="2:4", calibration_batches=2, verbose=False)],
                 max_epochs=1).fit(model, DigitsDataModule())  # fmt: skip
    for name in LAYERS:
        assert (nm_counts(model.get_parameter(name), 4) <= 2).all()
        assert float(zeros(model, name).float().mean()) == 0.5


def test_owl_gives_layers_different_sparsities_averaging_the_target(tmp_path):
    torch.manual_seed(0)
    callback = OneShotPruning(0.6, "wanda", distribution="owl", calibration_batches=2, owl_spread=0.1, verbose=False)
    model = digits_model()
    make_trainer(tmp_path, [callback], max_steps=2).fit(model, DigitsDataModule())
    given = callback.pruner.given
    assert len(set(given.values())) == 3 and max(given.values()) - min(given.values()) == pytest.approx(0.2)
    for name in LAYERS:
        inputs = model.get_parameter(name).shape[1]  # Wanda prunes a whole number per row
        assert callback.masks.sparsity(name) == pytest.approx(given[name], abs=0.5 / inputs)
    sizes = {name: model.get_parameter(name).numel() for name in LAYERS}
    assert sum(given[n] * sizes[n] for n in LAYERS) / sum(sizes.values()) == pytest.approx(0.6)


def test_composes_with_gmp_on_other_layers(tmp_path):
    torch.manual_seed(0)
    model = digits_model()
    oneshot = OneShotPruning(0.5, "sparsegpt", calibration_batches=2, include=["net.1.weight"], verbose=False)
    gmp = GradualMagnitudePruning(0.8, start=0, end=10, frequency=2, exclude=["net.1.weight"], verbose=False)
    make_trainer(tmp_path, [oneshot, gmp], max_epochs=1).fit(model, DigitsDataModule())
    assert float(zeros(model, "net.1.weight").float().mean()) == 0.5
    assert float(zeros(model, "net.3.weight").float().mean()) == pytest.approx(0.8, abs=1e-3)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    ({"calibration_batches": 0}, "`calibration_batches` must be an int >= 1"),
    ({"method": "obs"}, r"`method` must be one of \('sparsegpt', 'wanda', 'magnitude', 'zeros'\)"),
    ({"distribution": "erk"}, r"`distribution` must be one of \('uniform', 'owl'\)"),
    ({"granularity": "channel"}, "`granularity` of OneShotPruning must be 'unstructured' or an 'N:M'"),
    ({"sparsity": 1.0}, r"`sparsity` must be a number in \[0, 1\)"),
    ({"step": -1}, "`step` must be an int >= 0"),
    ({"dampening": -0.1}, "`dampening` must be a number >= 0"),
])  # fmt: skip
def test_bad_arguments_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OneShotPruning(**kwargs)


def test_more_calibration_batches_than_the_loader_holds_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, [OneShotPruning(calibration_batches=500, verbose=False)], max_steps=2)
    with pytest.raises(ValueError, match=r"`calibration_batches`=500 is more than the \d+ batches"):
        trainer.fit(digits_model(), DigitsDataModule())


def test_nm_that_does_not_divide_a_layer_is_refused_at_setup_naming_it(tmp_path):
    trainer = make_trainer(tmp_path, [OneShotPruning(granularity={"net.5.weight": "3:8"}, verbose=False)], max_steps=2)
    with pytest.raises(ValueError, match=r"net\.5\.weight"):
        trainer.fit(digits_model(), DigitsDataModule())


class WithUnusedLayer(pl.LightningModule):
    """A user's module with a layer its forward never calls."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.spare = nn.Linear(32, 32)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.body(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_layer_never_called_in_forward_is_named(tmp_path):
    trainer = make_trainer(tmp_path, [OneShotPruning(method="wanda", calibration_batches=2, verbose=False)], max_steps=2)
    with pytest.raises(ValueError, match=r"never calls.*'spare\.weight'.*exclude"):
        trainer.fit(WithUnusedLayer(), DigitsDataModule())
    trainer = make_trainer(tmp_path, [OneShotPruning(method="wanda", calibration_batches=2, exclude="spare.weight", verbose=False)], max_steps=2)
    trainer.fit(model := WithUnusedLayer(), DigitsDataModule())
    assert float((model.body[1].weight == 0).float().mean()) == 0.5


def test_a_per_layer_mapping_prunes_the_layers_it_names_and_leaves_the_rest_dense(tmp_path):
    torch.manual_seed(0)
    model = digits_model()
    callback = OneShotPruning({"net.1.*": 0.75, "net.3.*": 0.5}, "sparsegpt", calibration_batches=2, verbose=False)
    make_trainer(tmp_path, [callback], max_steps=2).fit(model, DigitsDataModule())
    assert float(zeros(model, "net.1.weight").float().mean()) == 0.75
    assert float(zeros(model, "net.3.weight").float().mean()) == 0.5
    assert "net.5.weight" not in callback.masks and int(zeros(model, "net.5.weight").sum()) == 0


class Manual(WithUnusedLayer):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        del self.spare

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self.body(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


def test_manual_optimization_needs_a_calibrate_function(tmp_path):
    with pytest.raises(ValueError, match="manual optimization.*`calibrate=lambda module, batch"):
        make_trainer(tmp_path, [OneShotPruning(calibration_batches=2, verbose=False)], max_steps=2).fit(Manual(), DigitsDataModule())
    model = Manual()
    callback = OneShotPruning(calibration_batches=2, calibrate=lambda module, batch: module.body(batch[0]), verbose=False)
    make_trainer(tmp_path, [callback], max_steps=2).fit(model, DigitsDataModule())
    assert float((model.body[1].weight == 0).float().mean()) == 0.5
