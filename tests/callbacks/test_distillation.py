"""Distillation in real Trainer.fit runs on digits: the loss it trains on, exactness at alpha=0, logging, checkpoints,
composition with pruning callbacks, and refusals."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from support import digits_model, make_trainer
from lightning_sparse import Distillation, GradualMagnitudePruning, OneShotPruning
from lightning_sparse.core.distill import as_logits, kd_loss, recovery_loss, squarehead_loss
from lightning_sparse.data import DigitsDataModule

LAYERS = ("net.1.weight", "net.3.weight", "net.5.weight")


def test_kd_loss_is_the_kl_of_the_tempered_softmaxes():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 7, generator=gen)
    p_t, p_s = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t, 2.0), expected, atol=1e-6)
    assert kd_loss(t, t, 2.0).abs() < 1e-6
    loss = torch.tensor(1.5)
    assert recovery_loss(loss, expected, 2.0, 0.0) is loss
    assert torch.allclose(recovery_loss(loss, expected, 2.0, 0.25), 0.75 * loss + 0.25 * 4 * expected)


def test_squarehead_normalises_each_layers_mse_by_the_teachers_variance():
    t = [torch.randn(4, 8) * 10, torch.randn(4, 8)]
    s = [x + 0.1 * torch.randn_like(x) for x in t]
    expected = sum(nn.functional.mse_loss(a, b) / b.var() for a, b in zip(s, t)) / 2
    assert torch.allclose(squarehead_loss(s, t), expected, atol=1e-6)


def fit(tmp_path, callbacks, model=None, **kwargs):
    torch.manual_seed(0)
    model = model or digits_model()
    kwargs.setdefault("max_epochs", 2)
    make_trainer(tmp_path, callbacks, **kwargs).fit(model, DigitsDataModule())
    return model


def test_alpha_zero_trains_exactly_as_without_it(tmp_path):
    plain = fit(tmp_path / "a", [])
    distilled = fit(tmp_path / "b", [Distillation(alpha=0.0)])
    for key, value in plain.state_dict().items():
        assert torch.equal(value, distilled.state_dict()[key]), key


def test_distillation_changes_training_and_logs_the_kl(tmp_path):
    plain = fit(tmp_path / "a", [])
    distilled = fit(tmp_path / "b", [Distillation(alpha=0.9, temperature=2.0)], logger=CSVLogger(tmp_path, name="log"),
                    log_every_n_steps=5)  # fmt: skip
    assert not torch.equal(plain.net[1].weight, distilled.net[1].weight)
    header, *rows = (tmp_path / "log" / "version_0" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("distill/kl")
    kls = [float(row.split(",")[column]) for row in rows if row.split(",")[column]]
    assert kls and all(k >= 0 for k in kls) and max(kls) > 0


def test_the_teacher_is_the_dense_model_at_fit_start_and_stays_out_of_checkpoints(tmp_path):
    distill = Distillation(alpha=0.5)
    oneshot = OneShotPruning(0.5, "sparsegpt", calibration_batches=2, verbose=False)
    torch.manual_seed(0)
    model = digits_model()
    dense = copy.deepcopy(model)
    trainer = make_trainer(tmp_path, [oneshot, distill], max_epochs=1, enable_checkpointing=True)
    trainer.fit(model, DigitsDataModule())
    for name in LAYERS:
        assert torch.equal(distill.teacher.get_parameter(name), dense.get_parameter(name))  # dense, frozen
        assert float((model.get_parameter(name) == 0).float().mean()) == 0.5  # masks held under distillation
    assert not any(p.requires_grad for p in distill.teacher.parameters())
    (path,) = tmp_path.glob("**/*.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    assert set(checkpoint["state_dict"]) == set(model.state_dict())
    assert checkpoint["callbacks"].get(distill.state_key, {}) == {}
    assert "training_step" not in vars(model)  # the wrapper is gone after fit


def test_save_teacher_keeps_it_in_the_checkpoint(tmp_path):
    distill = Distillation(save_teacher=True)
    trainer = make_trainer(tmp_path, [distill], max_steps=2, enable_checkpointing=True)
    torch.manual_seed(0)
    trainer.fit(digits_model(), DigitsDataModule())
    (path,) = tmp_path.glob("**/*.ckpt")
    saved = torch.load(path, weights_only=False)["callbacks"][distill.state_key]["teacher"]
    assert torch.equal(saved["net.1.weight"], distill.teacher.net[1].weight)


@pytest.mark.parametrize("save_teacher", [True, False])
def test_resumed_run_distils_from_the_saved_teacher_or_says_it_copies_the_resumed_model(tmp_path, save_teacher):
    torch.manual_seed(0)
    first, model = Distillation(save_teacher=save_teacher), digits_model()
    dense = copy.deepcopy(model)
    make_trainer(tmp_path / "a", [first], max_steps=3, enable_checkpointing=True).fit(model, DigitsDataModule())
    (path,) = (tmp_path / "a").glob("**/*.ckpt")
    resumed_model = digits_model()  # other weights: the checkpoint's are loaded into it
    second = Distillation(save_teacher=save_teacher)
    trainer = make_trainer(tmp_path / "b", [second], max_steps=4)
    if save_teacher:
        trainer.fit(resumed_model, DigitsDataModule(), ckpt_path=path)
        expected = dense  # the model the first run started from
    else:
        with pytest.warns(UserWarning, match="resumed without the teacher's weights"):
            trainer.fit(resumed_model, DigitsDataModule(), ckpt_path=path)
        expected = model  # the model as the checkpoint holds it (after 3 steps)
    assert not torch.equal(dense.net[1].weight, model.net[1].weight)
    for name, param in expected.named_parameters():
        assert torch.equal(second.teacher.get_parameter(name), param), name


def test_composes_with_gmp(tmp_path):
    gmp = GradualMagnitudePruning(0.8, start=0, end=20, frequency=5, verbose=False)
    model = fit(tmp_path, [gmp, Distillation(alpha=0.5, hidden_weight=0.0)])
    assert gmp.masks.sparsity() == pytest.approx(0.8, abs=1e-3)
    for name in LAYERS:
        assert torch.equal(model.get_parameter(name) == 0, ~gmp.masks.mask(name))


class Decoder(pl.LightningModule):
    """A user's small sequence model with repeated layers in a ModuleList (for SquareHead's hidden states)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(2))
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h = self.inp(x.flatten(1))
        for layer in self.layers:
            h = h + layer(h)
        return self.out(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": nn.functional.cross_entropy(self(x), y)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_hidden_state_loss_on_the_repeated_layers_is_logged(tmp_path):
    gmp = GradualMagnitudePruning(0.5, start=0, end=5, frequency=1, verbose=False)
    fit(tmp_path, [gmp, Distillation(alpha=0.5, hidden_weight=1.0)], model=Decoder(), max_steps=8,
        logger=CSVLogger(tmp_path, name="log"), log_every_n_steps=1)  # fmt: skip
    header = (tmp_path / "log" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "distill/hidden" in header and "distill/kl" in header


# ----------------------------------------------------------------------------- refusals
class ReturnsLoss(Decoder):
    def forward(self, x, y):
        return nn.functional.cross_entropy(super().forward(x), y)

    def training_step(self, batch, batch_idx):
        return self(*batch)


def test_outputs_that_are_not_logits_are_refused_saying_how_to_give_them(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(\), not logits.*`logits=lambda output"):
        fit(tmp_path, [Distillation()], model=ReturnsLoss(), max_steps=1)
    with pytest.raises(ValueError, match="a tuple, not logits"):
        as_logits((torch.zeros(2, 3), torch.zeros(())))


def test_a_teacher_with_other_output_shapes_is_refused(tmp_path):
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    with pytest.raises(ValueError, match=r"teacher's logits have shape \(\d+, 7\) but the student's \(\d+, 10\)"):
        fit(tmp_path, [Distillation(teacher=teacher)], max_steps=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 1.5}, r"`alpha` must be a number in \[0, 1\]"),
    ({"temperature": 0}, "`temperature` must be a number > 0"),
    ({"hidden_weight": -1}, "`hidden_weight` must be a number >= 0"),
    ({"teacher": "gpt2"}, "`teacher` must be a torch.nn.Module"),
])  # fmt: skip
def test_bad_arguments_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Distillation(**kwargs)


def test_oneshot_and_distillation_in_the_unified_lightning_trainer(tmp_path):
    import lightning

    from unified_modules import UnifiedClassifier, UnifiedDigits

    torch.manual_seed(0)
    model = UnifiedClassifier()
    oneshot = OneShotPruning(0.5, "wanda", calibration_batches=2, verbose=False)
    distill = Distillation(alpha=0.5)
    trainer = lightning.Trainer(max_epochs=1, callbacks=[oneshot, distill], logger=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", devices=1)  # fmt: skip
    trainer.fit(model, UnifiedDigits())
    assert oneshot.masks.sparsity() == 0.5
    assert float((distill.teacher.net[1].weight == 0).float().mean()) == 0.0  # the teacher stayed dense
    (path,) = tmp_path.glob("**/checkpoints/*.ckpt")
    assert torch.load(path, weights_only=True)["state_dict"].keys() == model.state_dict().keys()
