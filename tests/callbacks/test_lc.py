"""Learning-Compression: closed-form C steps, the penalty gradient, and the callback inside real Trainer.fit runs."""

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from support import StopAfterEpoch
from lightning_sparse import GradualMagnitudePruning, LearningCompression, QuantizationAwareTraining
from lightning_sparse.core import lc
from lightning_sparse.core.allocation import round_half_up
from lightning_sparse.data import DigitsDataModule

LAYERS = ("net.1.weight", "net.3.weight", "net.5.weight")


# ----------------------------------------------------------------------------- closed forms
def test_prune_c_step_keeps_exactly_the_top_kappa():
    w = {"a": torch.tensor([0.5, -3.0, 0.1, 2.0]), "b": torch.tensor([[-0.2, 4.0], [1.0, 0.05]])}
    glob = lc.prune_c_step(w, 0.5, "global")  # 8 weights, keep the 4 largest |w|: -3, 2, 4, 1
    assert glob["a"].tolist() == [0.0, -3.0, 0.0, 2.0] and glob["b"].tolist() == [[0.0, 4.0], [1.0, 0.0]]
    uniform = lc.prune_c_step(w, 0.75, "uniform")  # one survivor per layer
    assert uniform["a"].tolist() == [0.0, -3.0, 0.0, 0.0] and uniform["b"].tolist() == [[0.0, 4.0], [0.0, 0.0]]


def test_kmeans_c_step_is_optimal_on_a_hand_checkable_case():
    w = torch.tensor([-1.1, -0.9, -1.0, 2.0, 2.2, 1.8])
    delta, codebook = lc.kmeans_c_step(w, 2)
    assert torch.allclose(codebook, torch.tensor([-1.0, 2.0]))
    assert torch.allclose(delta, torch.tensor([-1.0, -1.0, -1.0, 2.0, 2.0, 2.0]))
    # no other 2-value assignment has lower squared error: check all 2**6 splits' optimal centroids
    best = min(
        sum(((w[[i for i in range(6) if mask >> i & 1 == g]] - w[[i for i in range(6) if mask >> i & 1 == g]].mean()) ** 2).sum()
            for g in (0, 1) if any(mask >> i & 1 == g for i in range(6)))
        for mask in range(64)
    )  # fmt: skip
    assert float(((w - delta) ** 2).sum()) == pytest.approx(float(best))


def test_binary_and_ternary_closed_forms():
    w = torch.tensor([0.1, -0.2, 3.0, -2.0])
    delta, codebook = lc.binary_c_step(w)
    assert torch.allclose(codebook, torch.tensor([-1.325, 1.325])) and torch.allclose(delta, torch.tensor([1.325, -1.325, 1.325, -1.325]))
    delta, codebook = lc.ternary_c_step(w)  # j = 2 maximises (sum of top-j |w|)^2 / j: 25/2 > 9, 26.6/3
    assert torch.allclose(delta, torch.tensor([0.0, 0.0, 2.5, -2.5])) and torch.allclose(codebook, torch.tensor([-2.5, 0.0, 2.5]))


def test_penalty_gradient_and_multiplier_update():
    w, delta, lam = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0]), torch.tensor([0.1, -0.3])
    assert torch.allclose(lc.penalty_gradient(w, delta, lam, 2.0), torch.tensor([2.0 * 0.5 - 0.1, 2.0 * -2.0 + 0.3]))
    lc.update_multiplier(lam, w, delta, 2.0)
    assert torch.allclose(lam, torch.tensor([0.1 - 1.0, -0.3 + 4.0]))
    assert lc.mu_at(3, 1e-3, 1.1, 1.0) == pytest.approx(1e-3 * 1.1**3) and lc.mu_at(200, 1e-3, 1.1, 1.0) == 1.0


def test_l_step_lr_restarts_at_every_c_step_and_anneals_to_zero():
    # C steps at 10, 30, 50 (first 10, every 20, 3 of them); the run has 70 steps, so the last stretch is 50..69.
    lr = [lc.l_step_lr(step, 10, 20, 3, 70, 0.1, 0.5) for step in range(70)]
    assert lr[:10] == [None] * 10  # the user's schedule before C step 0
    assert (lr[10], lr[30], lr[50]) == pytest.approx((0.1, 0.05, 0.025))  # base · decay^k at each restart
    assert (lr[20], lr[40], lr[60]) == pytest.approx((0.05, 0.025, 0.0125))  # halfway through: half of it
    for start in (10, 30, 50):
        stretch = lr[start : start + 20]
        assert all(a > b for a, b in zip(stretch, stretch[1:])) and 0 < stretch[-1] < 0.01 * stretch[0]
    assert lc.l_step_lr(500, 10, 20, 3, 70, 0.1, 0.5) == 0.0  # past the end it stays annealed


def test_constant_l_step_schedule_holds_the_published_rate_within_each_l_step():
    lr = [lc.l_step_lr(step, 10, 20, 3, 70, 0.1, 0.5, "constant") for step in range(70)]
    assert lr[:10] == [None] * 10
    assert lr[10:30] == pytest.approx([0.1] * 20) and lr[30:50] == pytest.approx([0.05] * 20)
    assert lr[50:] == pytest.approx([0.025] * 20)  # lr · decay^k, held, as the reference code's fresh SGD per L step
    assert lc.l_step_lr(25, 10, 20, 3, 70, 0.1, 0.5) < 0.1  # the default stays the cosine
    with pytest.raises(ValueError, match=r"`l_step_schedule` must be one of \('cosine', 'constant'\), got 'step'"):
        LearningCompression(l_step_lr=0.1, l_step_schedule="step")


def test_constant_l_step_schedule_sets_the_optimizer_learning_rate(digits_model, make_trainer, tmp_path, digits):
    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.lrs = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.lrs.append(optimizer.param_groups[0]["lr"])

    callback = LearningCompression(sparsity=0.5, lc_steps=3, steps_per_l=10, first_l_steps=5, l_step_lr=0.02,
                                   l_step_lr_decay=0.5, l_step_schedule="constant", verbose=False)  # fmt: skip
    recorder = Recorder()
    make_trainer(tmp_path, [callback, recorder], max_epochs=2).fit(digits_model(), digits)
    assert recorder.lrs[5:15] == pytest.approx([0.02] * 10) and recorder.lrs[15:25] == pytest.approx([0.01] * 10)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mu_init": 0.0}, r"`mu_init` must be a number > 0, got 0.0"),
        ({"mu_multiplier": 0.9}, r"`mu_multiplier` must be a number >= 1, got 0.9"),
        ({"lc_steps": 0}, r"`lc_steps` must be an int >= 1 \(C steps\), got 0"),
        ({"steps_per_l": 0}, r"`steps_per_l` must be an int >= 1"),
        ({"codebook_size": 1}, r"`codebook_size` must be an int >= 2, got 1"),
        ({"bits": 0}, r"`bits` must be an int in 1..8, got 0"),
        ({"compression": "distill"}, r"`compression` must be one of \('prune', 'quantize', 'prune\+quantize'\)"),
        ({"codebook": "quaternary"}, r"`codebook` must be one of \('kmeans', 'binary', 'ternary'\)"),
        ({"sparsity": 1.0}, r"`sparsity` must be a number in \[0, 1\)"),
        ({"first_l_steps": -1}, r"`first_l_steps` must be an int >= 0"),
        ({"epochs_per_l": 0}, r"`epochs_per_l` must be an int >= 1 \(epochs\), got 0"),
        ({"steps_per_l": 10, "epochs_per_l": 1}, r"Give `steps_per_l` or `epochs_per_l`, not both \(got 10 and 1\)"),
        ({"keep_best": ""}, r"`keep_best` must be a metric name such as 'val_acc', or None, got ''"),
        ({"l_step_lr": 0.0}, r"`l_step_lr` must be a number > 0 or None, got 0.0"),
        ({"l_step_lr": float("inf")}, r"`l_step_lr` must be a number > 0 or None, got inf \(it must be finite\)"),
        ({"l_step_lr": float("nan")}, r"`l_step_lr` must be a number > 0 or None, got nan"),
        ({"mu_multiplier": float("nan")}, r"`mu_multiplier` must be a number >= 1, got nan"),
        ({"mu_multiplier": float("inf")}, r"`mu_multiplier` must be a number >= 1, got inf \(it must be finite\)"),
        ({"mu_init": float("inf")}, r"`mu_init` must be a number > 0, got inf \(it must be finite\)"),
        ({"mu_init": float("nan")}, r"`mu_init` must be a number > 0, got nan"),
        ({"mu_max": float("nan")}, r"`mu_max` must be a number > 0 \(inf for no cap\), got nan"),
        ({"mu_init": 10.0, "mu_max": 1.0}, r"`mu_init`=10.0 must not exceed `mu_max`=1.0 \(it would be capped silently\)"),
        ({"l_step_lr_decay": 1.5}, r"`l_step_lr_decay` must be a number in \(0, 1\], got 1.5"),
        ({"keep_best": "val_acc", "keep_best_mode": "best"}, r"`keep_best_mode` must be one of \('max', 'min'\), got 'best'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearningCompression(**kwargs)


def test_steps_per_l_longer_than_the_run_is_refused(digits_model, make_trainer, tmp_path, digits):
    callback = LearningCompression(lc_steps=5, steps_per_l=30)  # needs 120 steps, the run has 80
    with pytest.raises(ValueError, match=r"`steps_per_l`=30 with `lc_steps`=5 and `first_l_steps`=0 needs 120 optimizer steps, but the run has 80"):
        make_trainer(tmp_path, [callback]).fit(digits_model(), digits)


def test_another_pruning_callback_on_the_same_layers_is_refused(digits_model, make_trainer, tmp_path, digits):
    callbacks = [LearningCompression(exclude=["net.5.*"]), GradualMagnitudePruning(include=["net.3.weight", "net.5.weight"])]
    with pytest.raises(ValueError, match=r"LearningCompression and GradualMagnitudePruning both compress \['net.3.weight'\]"):
        make_trainer(tmp_path, callbacks).fit(digits_model(), digits)


def test_epochs_per_l_longer_than_the_run_is_refused(digits_model, make_trainer, tmp_path, digits):
    callback = LearningCompression(lc_steps=5, epochs_per_l=2)  # 4 L steps of 2 epochs of 20 steps: 160 > 80
    with pytest.raises(ValueError, match=r"`epochs_per_l`=2 \(40 steps\) with `lc_steps`=5 .* needs 160 optimizer steps, but the run has 80"):
        make_trainer(tmp_path, [callback]).fit(digits_model(), digits)


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (QuantizationAwareTraining(bits=4, include=["net.3.weight"]), r"LearningCompression and QuantizationAwareTraining both compress \['net.3.weight'\]"),
        (LearningCompression(compression="quantize", include=["net.1.weight"]), r"LearningCompression and LearningCompression both compress \['net.1.weight'\]"),
    ],
)
def test_qat_or_a_second_lc_on_the_same_layers_is_refused(digits_model, make_trainer, tmp_path, digits, other, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, [LearningCompression(exclude=["net.5.*"]), other]).fit(digits_model(), digits)


def test_lc_composes_with_gmp_and_qat_on_disjoint_layers(digits_model, make_trainer, tmp_path, digits):
    lc_cb = LearningCompression(sparsity=0.8, include=["net.1.weight"], lc_steps=3, first_l_steps=10, verbose=False)
    gmp = GradualMagnitudePruning(0.5, include=["net.3.weight"], start=0, end=0.5, frequency=10, verbose=False)
    qat = QuantizationAwareTraining(bits=4, include=["net.5.weight"], verbose=False)
    model = digits_model()
    make_trainer(tmp_path, [lc_cb, gmp, qat]).fit(model, digits)
    assert (model.get_parameter("net.1.weight") == 0).float().mean().item() == pytest.approx(0.8, abs=1e-3)
    assert (model.get_parameter("net.3.weight") == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)


# ----------------------------------------------------------------------------- inside Trainer.fit
class PenaltyProbe(pl.Callback):
    """Listed after L-C: compares the gradient before and after L-C's hook with μ(w - Δ) - λ."""

    def __init__(self, callback: LearningCompression) -> None:
        self.callback, self.raw, self.checked = callback, {}, 0

    def on_after_backward(self, trainer, pl_module) -> None:
        self.raw = {n: p.grad.detach().clone() for n, p in self.callback.params.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        cb = self.callback
        if cb.delta:
            for name, param in cb.params.items():
                expected = self.raw[name] + cb.mu * (param.detach() - cb.delta[name]) - cb.lam[name]
                assert torch.allclose(param.grad, expected, atol=1e-7, rtol=1e-5), name
            self.checked += 1


def _lc_log(log_dir: Path) -> list[dict[str, float]]:
    with open(log_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f) if r.get("lc/mu")]


def test_lc_pruning_ends_feasible_with_the_penalty_applied_every_l_step(digits_model, make_trainer, tmp_path, digits):
    callback = LearningCompression(sparsity=0.9, lc_steps=6, steps_per_l=12, first_l_steps=10, mu_init=5e-2, mu_multiplier=2.0)
    probe = PenaltyProbe(callback)
    logger = CSVLogger(tmp_path)
    model = digits_model()
    make_trainer(tmp_path, [callback, probe], logger=logger).fit(model, digits)
    assert probe.checked == 80 - 10  # every optimizer step after C step 0
    total = sum(model.get_parameter(n).numel() for n in LAYERS)
    assert sum(int((model.get_parameter(n) == 0).sum()) for n in LAYERS) == round_half_up(0.9 * total)  # feasible
    rows = _lc_log(Path(logger.log_dir))
    assert [int(r["lc/c_step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["lc/mu"] for r in rows] == pytest.approx([5e-2 * 2.0**k for k in (0, 0, 1, 2, 3, 4)])
    assert rows[-1]["lc/distance"] < rows[1]["lc/distance"]  # the L steps pull w towards Δ(Θ) as μ grows
    accuracy = make_trainer(tmp_path, []).test(model, digits, verbose=False)[0]["test_acc"]
    assert accuracy > 0.6  # a sanity bound: 4 short epochs on 8x8 digits (chance is 0.1)


@pytest.mark.parametrize(("compression", "codebook", "distinct"), [("quantize", "kmeans", 2), ("quantize", "ternary", 3), ("prune+quantize", "kmeans", 4)])
def test_lc_quantization_ends_with_k_values_per_layer(digits_model, make_trainer, tmp_path, digits, compression, codebook, distinct):
    pruning = {"sparsity": 0.8} if "prune" in compression else {}  # `sparsity` with "quantize" alone is refused
    callback = LearningCompression(compression=compression, bits=1 if distinct == 2 else 2, codebook=codebook, **pruning,
                                   lc_steps=5, first_l_steps=20, mu_init=1e-2, mu_multiplier=1.5)  # fmt: skip
    model = digits_model()
    make_trainer(tmp_path, [callback]).fit(model, digits)
    for name in LAYERS:
        values = torch.unique(model.get_parameter(name).detach())
        assert values.numel() <= distinct, name  # at most 2**bits values, the zero of pruning among them
        if compression == "prune+quantize":
            assert (model.get_parameter(name) == 0).float().mean().item() >= 0.8 - 1e-3 or name != "net.3.weight"


@pytest.mark.parametrize("keep_best", [None, "val_loss"])
def test_lc_resumes_bit_identically(digits_model, make_trainer, tmp_path, keep_best):
    def run(root, stop=None, ckpt=None):
        pl.seed_everything(4)
        model = digits_model(optimizer="adam", lr=2e-3)
        callback = LearningCompression(compression="prune+quantize", sparsity=0.8, bits=2, lc_steps=6, steps_per_l=11,
                                       first_l_steps=8, mu_init=1e-2, keep_best=keep_best, l_step_lr=3e-3)  # fmt: skip
        callbacks = [callback] + ([StopAfterEpoch(stop, root / "cut.ckpt")] if stop is not None else [])
        make_trainer(root, callbacks).fit(model, DigitsDataModule(batch_size=64), ckpt_path=ckpt)
        return model, callback

    full, full_cb = run(tmp_path / "full")
    _, cut_cb = run(tmp_path / "cut", stop=1)
    assert 0 < cut_cb.c_steps_done < 6
    resumed, resumed_cb = run(tmp_path / "resumed", ckpt=tmp_path / "cut" / "cut.ckpt")
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(torch.equal(full_cb.lam[n], resumed_cb.lam[n]) for n in LAYERS)
    if keep_best:
        assert cut_cb.best is not None and full_cb.best["c_step"] == resumed_cb.best["c_step"]
        assert full_cb.best["score"] == resumed_cb.best["score"]


def test_epochs_per_l_runs_each_c_step_at_an_epoch_end(digits_model, make_trainer, tmp_path, digits):
    seen = []

    class CStepSteps(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if callback.c_steps_done > len(seen):
                seen.append(trainer.global_step)

    callback = LearningCompression(lc_steps=3, epochs_per_l=1, first_l_steps=20, verbose=False)  # 20 steps an epoch
    make_trainer(tmp_path, [callback, CStepSteps()]).fit(digits_model(), digits)
    assert seen == [20, 40, 60]


class ValidationProbe(pl.Callback):
    """Listed after L-C: records what the model holds while validation runs and the validation accuracy."""

    def __init__(self, callback: LearningCompression) -> None:
        self.callback, self.runs = callback, []

    def on_validation_batch_start(self, trainer, pl_module, *args) -> None:
        if self.callback.delta and not trainer.sanity_checking:
            assert all(torch.equal(p, self.callback.delta[n]) for n, p in self.callback.params.items())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.callback.delta and not trainer.sanity_checking:
            delta = {n: t.clone() for n, t in self.callback.delta.items()}
            self.runs.append((float(trainer.callback_metrics["val_acc"]), self.callback.c_steps_done, delta))

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if self.callback.delta:  # training goes on with w, not Δ(Θ)
            assert not all(torch.equal(p, self.callback.delta[n]) for n, p in self.callback.params.items())


def test_validation_measures_the_compressed_model_and_logs_it_per_c_step(digits_model, make_trainer, tmp_path, digits):
    callback = LearningCompression(sparsity=0.9, lc_steps=4, epochs_per_l=1, first_l_steps=20, mu_init=1e-2, verbose=False)
    probe, logger = ValidationProbe(callback), CSVLogger(tmp_path)
    make_trainer(tmp_path, [callback, probe], logger=logger).fit(digits_model(), digits)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f) if r.get("lc/val_acc")]
    assert [int(r["lc/c_step"]) for r in rows] == [1, 2, 3, 4] == [c for _, c, _ in probe.runs]  # one per C step
    assert [r["lc/val_acc"] for r in rows] == pytest.approx([acc for acc, _, _ in probe.runs])


@pytest.mark.parametrize(("metric", "pick"), [("val_acc", max), ("val_loss", min)])
def test_keep_best_ends_with_the_best_evaluated_c_step_iterate(digits_model, make_trainer, tmp_path, digits, metric, pick):
    callback = LearningCompression(compression="quantize", bits=1, lc_steps=4, epochs_per_l=1, first_l_steps=0,
                                   mu_init=1e-3, mu_multiplier=3.0, keep_best=metric, verbose=False)  # fmt: skip
    scores = []

    class Scores(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            if callback.delta and not trainer.sanity_checking:
                scores.append((float(trainer.callback_metrics[metric]), {n: t.clone() for n, t in callback.delta.items()}))

    model = digits_model()
    make_trainer(tmp_path, [callback, Scores()]).fit(model, digits)
    assert callback.keep_best_mode == ("max" if pick is max else "min") and len(scores) == 4
    best_score, best_delta = pick(scores, key=lambda s: s[0])
    assert callback.best["score"] == best_score
    for name in LAYERS:
        assert torch.equal(model.get_parameter(name).detach(), best_delta[name]), name
        assert torch.unique(model.get_parameter(name).detach()).numel() <= 2  # still feasible


def test_keep_best_with_an_unknown_metric_is_an_error(digits_model, make_trainer, tmp_path, digits):
    callback = LearningCompression(lc_steps=2, epochs_per_l=1, keep_best="val_f1")
    with pytest.raises(ValueError, match=r"`keep_best`='val_f1' is not among the logged metrics"):
        make_trainer(tmp_path, [callback]).fit(digits_model(), digits)


@pytest.mark.parametrize("reset", [True, False])
def test_momentum_is_reset_after_each_c_step_unless_told_not_to(digits_model, make_trainer, tmp_path, digits, reset):
    callback = LearningCompression(lc_steps=3, steps_per_l=10, first_l_steps=10, reset_momentum=reset, verbose=False)
    checked = []

    class MomentumProbe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if callback.c_steps_done > len(checked):
                state = trainer.optimizers[0].state
                checked.append(all(bool(state[p]["momentum_buffer"].eq(0).all()) for p in callback.params.values()))

    make_trainer(tmp_path, [callback, MomentumProbe()], max_epochs=2).fit(digits_model(momentum=0.9), digits)
    assert checked == [reset] * 3


def test_l_step_lr_sets_the_learning_rate_of_every_l_step(digits_model, make_trainer, tmp_path, digits):
    callback = LearningCompression(lc_steps=3, steps_per_l=20, first_l_steps=20, l_step_lr=0.2, l_step_lr_decay=0.5,
                                   verbose=False)  # fmt: skip
    used = {}

    class LearningRateProbe(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            used[trainer.global_step] = {group["lr"] for group in optimizer.param_groups}

    model = digits_model(lr=0.05, lr_schedule="cosine")  # 4 epochs of 20 steps: C steps at 20, 40, 60
    make_trainer(tmp_path, [callback, LearningRateProbe()]).fit(model, digits)
    assert len(used) == 80 and all(len(rates) == 1 for rates in used.values())
    rate = {step: rates.pop() for step, rates in used.items()}
    assert rate[0] == pytest.approx(0.05) and rate[19] < 0.05  # the model's own cosine schedule until C step 0
    assert (rate[20], rate[40], rate[60]) == pytest.approx((0.2, 0.1, 0.05))  # a fresh start per L step
    assert (rate[30], rate[50], rate[70]) == pytest.approx((0.1, 0.05, 0.025))
    assert rate[59] < rate[60] and rate[79] < 0.01 * rate[60]
