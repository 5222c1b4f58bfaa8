"""MovementPruning (Sanh, Wolf & Rush 2020): movement scores in core, the callback in real Trainer.fit runs on digits."""

import copy
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn

from support import DIGITS, ROOT, StopAfterEpoch, checkpoint_sparsity, digits_model, make_trainer
from lightning_sparse import GradualMagnitudePruning, MovementPruning
from lightning_sparse.core.allocation import erk_sparsities, round_half_up
from lightning_sparse.core.criteria import exact_mask
from lightning_sparse.core.masks import MaskSet
from lightning_sparse.core.pruners import MovementPruner
from lightning_sparse.core.schedules import StepSchedule
from lightning_sparse.core.movement import (
    NOISE_MEDIAN_ABS_T, SIGNAL_MEDIAN_ABS_T, MovementScores, prune_by_movement, signal_warning,
)
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import Classifier

LAYERS = ("net.1.weight", "net.3.weight", "net.5.weight")  # LeNet-300-100's Linear weights


# ----------------------------------------------------------------- core
def test_scores_accumulate_minus_w_times_grad_and_pruned_weights_keep_scoring():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [0.1, 0.0, -0.3]]))
    masks = MaskSet({"weight": layer.weight})
    scores = MovementScores(masks.params)
    x1, x2 = torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([[0.0, -1.0, 3.0]])
    w0 = layer.weight.detach().clone()
    layer(x1).sum().backward()
    g1 = layer.weight.grad.clone()
    scores.accumulate_()
    assert torch.equal(scores.scores["weight"], -(w0 * g1))

    prune_by_movement(masks, scores, sparsity=0.5)  # the three lowest of -w*g go, whatever their magnitude
    expected_mask = exact_mask(-(w0 * g1), 3)
    assert torch.equal(masks.mask("weight"), expected_mask)
    assert torch.equal(layer.weight.detach(), torch.where(expected_mask, w0, torch.zeros(())))

    layer.weight.grad = None
    layer(x2).sum().backward()  # the gradient is dense: pruned positions get one too
    g2 = layer.weight.grad.clone()
    scores.accumulate_()
    # Pruned weights keep scoring with the value they had when pruned (hard movement: the mask may change).
    assert torch.allclose(scores.scores["weight"], -(w0 * g1) - (w0 * g2))
    assert scores.steps == {"weight": 2}


def test_a_pruned_weight_whose_score_rises_comes_back_with_its_value():
    weight = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 4.0]))
    masks = MaskSet({"w": weight})
    scores = MovementScores(masks.params)
    weight.grad = torch.tensor([-1.0, -1.0, -1.0, 1.0])  # scores 1, -2, 3, -4
    scores.accumulate_()
    prune_by_movement(masks, scores, sparsity=0.5)
    assert weight.detach().tolist() == [1.0, 0.0, 3.0, 0.0]
    weight.grad = torch.tensor([0.0, 10.0, 0.0, 0.0])  # -2 - (-2 * 10) = 18: now the best score
    scores.accumulate_()
    prune_by_movement(masks, scores, sparsity=0.5)
    assert masks.mask("w").tolist() == [False, True, True, False]
    assert weight.detach().tolist() == [0.0, -2.0, 3.0, 0.0]
    assert scores.latent["w"].tolist() == [1.0, 0.0, 0.0, 4.0]


def test_adam_scores_are_torch_adam_on_the_straight_through_gradient_w_times_g():
    """rule="adam" is the paper's code: S is a parameter whose gradient is w·g (through the straight-through top-k),
    stepped by Adam (no weight decay) at lr × the weights' schedule; pruned weights score with their kept value."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 5))
    masks = MaskSet({"w": weight})
    scores = MovementScores(masks.params, rule="adam", lr=1e-2)
    reference = nn.Parameter(torch.zeros(4, 5))
    adam = torch.optim.Adam([reference], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for step, factor in enumerate((0.5, 1.0, 0.75, 0.25)):
        dense = weight.detach() + scores.latent.get("w", torch.zeros(()))
        weight.grad = torch.randn(4, 5)
        reference.grad = dense * weight.grad
        for group in adam.param_groups:
            group["lr"] = 1e-2 * factor
        adam.step()
        scores.accumulate_(lr_factor=factor)
        assert torch.allclose(scores.scores["w"], reference.detach(), rtol=1e-5, atol=1e-8), step
        if step == 1:
            prune_by_movement(masks, scores, sparsity=0.5)  # from here the pruned half scores with its kept value
    assert "w" in scores.latent and scores.steps == {"w": 4}
    with pytest.raises(ValueError, match=r"`rule` must be one of \('sum', 'adam'\), got 'sgd'"):
        MovementScores(masks.params, rule="sgd")


def test_pruned_weights_move_under_adamw_as_the_papers_dense_weight_until_the_last_update():
    """Issue 31's cause: the paper's code (``emmental.MaskedLinear``) keeps a dense ``W``, multiplies it by the mask in
    forward and lets AdamW step all of it, so a pruned weight keeps moving (momentum, decoupled weight decay) and
    comes back changed. Holding it at its pruned value collapsed the port to a constant predictor at 600 steps on
    six layers. Against that reference, fed the same masks, the weights in the model plus the latent copy are ``W``
    bit for bit at every step up to the last mask update, and the model's pruned weights are exact zeros."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    reference = copy.deepcopy(net)
    pruner = MovementPruner(net, 0.75, StepSchedule(2, 14, 1), check_signal=False)  # top-k of every matmul weight each step to 14
    pruner.start(20)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.5)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.5)
    names = list(pruner.masks)
    moved, revived = 0, 0
    for step in range(20):
        batch = slice(step % 4 * 16, step % 4 * 16 + 16)
        forward_masks = {name: pruner.masks.mask(name) for name in names}  # what this step's forward uses
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
        pruner.step(step, [optimizer.state])
        optimizer.step()
        pruner.after_optimizer_step()

        reference_optimizer.zero_grad()
        weights = {name: p * forward_masks[name] if name in names else p for name, p in reference.named_parameters()}
        logits = torch.func.functional_call(reference, weights, (x[batch],))
        nn.functional.cross_entropy(logits, y[batch]).backward()  # the gradient of W is that of W * M, times M
        reference_optimizer.step()
        for name in names:
            param, mask, dense = net.get_parameter(name), pruner.masks.mask(name), reference.get_parameter(name)
            assert torch.equal(param.detach(), torch.where(mask, dense.detach(), 0)), (step, name)  # zeros where pruned
            if step < 14:  # pruned weights stepped as W's
                assert torch.equal(param.detach() + pruner.scores.latent.get(name, 0), dense.detach()), (step, name)
            if step >= 2:
                revived += int((mask & ~forward_masks[name]).sum())
        if 2 <= step < 14:
            moved += sum(int((pruner.scores.latent[n] != 0).sum()) for n in names)
    assert moved > 0 and revived > 0  # pruned weights held values and some came back: the check compared something
    assert pruner.masks.sparsity() == pytest.approx(0.75, abs=0.01)


def test_a_plain_loop_that_skips_after_optimizer_step_is_told_what_to_call():
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    pruner = MovementPruner(net, 0.5, StepSchedule(0, 4, 1))
    pruner.start(6)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 6), torch.randint(0, 2, (8,))
    for step in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if step == 1:
            with pytest.raises(RuntimeError, match=r"call `pruner.after_optimizer_step\(\)` after every `optimizer.step\(\)`"):
                pruner.step(step, [optimizer.state])
            break
        pruner.step(step, [optimizer.state])
        optimizer.step()
        pruner.masks.apply_()  # not enough: the pruned weights' values are still lent to the model


# ----------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"`sparsity` must be a number in \[0, 1\), got 1.0"),
        ({"start": 0.5, "end": 0.2}, r"`end` must not come before `start`"),
        ({"frequency": 0}, r"`frequency` must be an int >= 1"),
        ({"schedule": "exp"}, r"`schedule` must be one of \('cubic', 'linear', 'constant'\)"),
        ({"distribution": "layerwise"}, r"`distribution` must be one of \('uniform', 'global', 'erk'\)"),
        ({"sparsity": 0.5, "initial_sparsity": 0.6}, r"`initial_sparsity` must be in \[0, sparsity=0.5\]"),
        ({"score_rule": "sgd"}, r"`score_rule` must be one of \('sum', 'adam'\), got 'sgd'"),
        ({"score_lr": 0}, r"`score_lr` must be a finite number > 0, got 0"),
    ],
)
def test_bad_arguments_name_the_argument_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MovementPruning(**kwargs)


class WithUnusedLayer(Classifier):
    """LeNet-300-100 plus a Linear layer the forward never uses: it never gets a gradient."""

    def __init__(self) -> None:
        super().__init__(arch="lenet300", input_shape=(1, 8, 8), lr=0.05)
        self.spare = nn.Linear(8, 8)


def test_pruning_a_weight_that_never_got_a_gradient_names_the_callback_and_the_parameter(make_trainer, tmp_path, digits):
    callback = MovementPruning(sparsity=0.5, start=2, end=10, frequency=2)
    with pytest.raises(ValueError, match=r"MovementPruning: no gradient has reached parameter 'spare.weight' by optimizer step 2.*`exclude`"):
        make_trainer(tmp_path, [callback], max_epochs=1).fit(WithUnusedLayer(), digits)
    callback = MovementPruning(sparsity=0.5, start=2, end=10, frequency=2, exclude=["spare.*"], verbose=False)
    make_trainer(tmp_path, [callback], max_epochs=1).fit(WithUnusedLayer(), digits)
    assert callback.masks.sparsity() == pytest.approx(0.5, abs=1e-4)


# ----------------------------------------------------------------- training on digits
def test_scores_are_the_hand_computed_sum_of_minus_w_times_grad(digits_model, make_trainer, tmp_path, digits):
    """Ten SGD steps in Trainer.fit against the same ten steps in a plain loop computing -Σ w·g by hand."""
    pl.seed_everything(3)
    model = digits_model()  # SGD, momentum 0.9, lr 0.05
    reference = copy.deepcopy(model)
    callback = MovementPruning(sparsity=0.6, start=9, end=9, schedule="constant", score_rule="sum", verbose=False)  # prunes at the last step
    make_trainer(tmp_path, [callback], max_steps=10).fit(model, digits)

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    loader = digits.train_dataloader()
    loader.sampler.set_epoch(0)
    by_hand = {name: torch.zeros_like(p) for name, p in reference.named_parameters() if name in LAYERS}
    for _, (x, y) in zip(range(10), loader):
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        for name, p in reference.named_parameters():
            if name in by_hand:
                by_hand[name] -= p.detach() * p.grad
        optimizer.step()
    for name in LAYERS:
        assert torch.allclose(callback.scores.scores[name], by_hand[name], rtol=1e-4, atol=1e-7), name
        assert callback.scores.steps[name] == 10
        # the one-shot update at step 9 kept the top 40% of those scores in every layer
        count = round_half_up(0.6 * by_hand[name].numel())
        assert torch.equal(callback.masks.mask(name), exact_mask(callback.scores.scores[name], count))
        assert (callback.masks.mask(name) == exact_mask(by_hand[name], count)).float().mean() > 0.999


class PrunedZeros(pl.Callback):
    """After every batch (after the pruning callback): the model's pruned weights are exact zeros, nothing is lent."""

    def __init__(self, movement: MovementPruning) -> None:
        self.movement, self.batches, self.latent_nonzero = movement, 0, 0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # noqa: ANN001
        pruner = self.movement.pruner
        assert not pruner.lent and self.movement._after_step_hook is None
        for name, param in pruner.masks.params.items():
            assert not param.detach()[~pruner.masks.mask(name)].any(), (trainer.global_step, name)
        self.latent_nonzero += sum(int(v.count_nonzero()) for v in pruner.scores.latent.values())
        self.batches += 1


@pytest.mark.parametrize("skips", [False, True])
def test_lent_weights_are_taken_back_after_every_step_and_every_skipped_step(make_trainer, tmp_path, digits, skips):
    """Pruned weights are lent to the model for the optimizer step alone; with ``skips`` an fp16 gradient scaler
    that grows its scale 2^30-fold after every good step overflows every other step, so ``optimizer.step`` is not
    called there and the weights are taken back at the end of the batch."""
    pl.seed_everything(0)
    movement = MovementPruning(sparsity=0.5, start=2, end=12, frequency=1, verbose=False, check_signal=False)
    check, scales = PrunedZeros(movement), []
    options = {}
    if skips:
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_factor=2.0**30, backoff_factor=2.0**-30, growth_interval=1)
        options["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
        check.on_train_batch_start = lambda *args: scales.append(scaler.get_scale())
    make_trainer(tmp_path, [movement, check], max_epochs=1, limit_train_batches=16, **options).fit(digits_model(), digits)
    assert check.batches == 16 and check.latent_nonzero > 0  # the pruned weights had values to lend
    if skips:
        assert scales[1:] == [2.0**30, 1.0] * 7 + [2.0**30]  # a skipped step after every good one
    assert movement.masks.sparsity() == pytest.approx(0.5, abs=0.01)


def test_scores_accumulate_once_per_optimizer_step_under_gradient_accumulation(digits_model, make_trainer, tmp_path, digits):
    callback = MovementPruning(sparsity=0.5, start=2, end=6, frequency=2, verbose=False)
    trainer = make_trainer(tmp_path, [callback], max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(digits_model(), digits)
    assert trainer.global_step == 10  # 20 batches, 2 per optimizer step
    assert callback.scores.steps == {name: 7 for name in LAYERS}  # steps 0..6, then scores stop with the masks


@pytest.mark.parametrize("distribution", ["uniform", "global", "erk"])
def test_exact_sparsity_per_distribution(digits_model, make_trainer, tmp_path, digits, distribution):
    callback = MovementPruning(sparsity=0.9, start=0.1, end=0.5, frequency=5, distribution=distribution, verbose=False)
    model = digits_model()
    make_trainer(tmp_path, [callback], max_epochs=3).fit(model, digits)
    params = dict(model.named_parameters())
    zeros = {name: int((params[name] == 0).sum()) for name in LAYERS}
    sizes = {name: params[name].numel() for name in LAYERS}
    if distribution == "uniform":
        assert zeros == {name: round_half_up(0.9 * n) for name, n in sizes.items()}
    elif distribution == "global":
        assert sum(zeros.values()) == round_half_up(0.9 * sum(sizes.values()))
    else:
        erk = erk_sparsities({name: tuple(params[name].shape) for name in LAYERS}, 0.9)
        assert zeros == {name: round_half_up(erk[name] * n) for name, n in sizes.items()}
    assert callback.masks.sparsity() == pytest.approx(0.9, abs=1e-4)


class MaskHistory(pl.Callback):
    """Record every layer's mask and scores after each optimizer step (MovementPruning runs before this callback)."""

    def __init__(self, pruning: MovementPruning) -> None:
        self.pruning, self.masks, self.scores = pruning, [], []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.masks.append({name: self.pruning.masks.mask(name) for name in LAYERS})
        self.scores.append({name: self.pruning.scores.scores[name].clone() for name in LAYERS})


def test_masks_are_the_top_scores_and_differ_from_magnitude_pruning(digits_model, make_trainer, tmp_path, digits):
    schedule = dict(sparsity=0.9, start=0.1, end=0.6, frequency=4, verbose=False)
    pl.seed_everything(0)
    magnitude_model, movement_model = digits_model(), None
    movement_model = copy.deepcopy(magnitude_model)
    gmp = GradualMagnitudePruning(**schedule)
    make_trainer(tmp_path / "gmp", [gmp], max_epochs=3).fit(magnitude_model, digits)
    movement = MovementPruning(**schedule)
    history = MaskHistory(movement)
    make_trainer(tmp_path / "movement", [movement, history], max_epochs=3).fit(movement_model, digits)

    for name in LAYERS:
        mask = movement.masks.mask(name)
        # masks come from the scores of the last update (step 36), after which scores stop accumulating
        assert torch.equal(mask, exact_mask(movement.scores.scores[name], int((~mask).sum())))
        overlap = (mask & gmp.masks.mask(name)).sum() / mask.sum()
        assert overlap < 0.9, f"{name}: movement kept mostly the weights magnitude kept ({overlap:.2f})"
    assert movement.masks.checksum() != gmp.masks.checksum()

    # Hard movement: pruned weights keep scoring, so some pruned at one update are kept again at a later one.
    updates = [history.masks[step] for step in range(10, 37, 4)]  # after the updates at steps 10, 14, ..., 34
    revived = sum(int((~before[name] & after[name]).sum()) for before, after in zip(updates, updates[1:]) for name in LAYERS)
    assert revived > 0
    pruned = ~history.masks[20]["net.3.weight"]
    assert not torch.equal(history.scores[20]["net.3.weight"][pruned], history.scores[24]["net.3.weight"][pruned])


class HalfDigits(DigitsDataModule):
    """Digits with one half of every image blanked: ``keep="top"`` keeps rows 0-3, ``"bottom"`` rows 4-7."""

    def __init__(self, keep: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.keep = keep

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        super().setup(stage)
        for split, dataset in self.splits.items():
            images, labels = dataset.tensors
            images = images.clone()
            (images[:, :, 4:, :] if self.keep == "top" else images[:, :, :4, :]).zero_()
            self.splits[split] = torch.utils.data.TensorDataset(images, labels)


def test_movement_keeps_what_fine_tuning_needs_where_magnitude_keeps_what_pretraining_grew(tmp_path):
    # Sanh et al.'s case in miniature: a model pretrained on the top halves of the digits is fine-tuned, at a learning
    # rate small beside its pretrained weights, on the bottom halves. The first layer's large weights read the top
    # rows, which fine-tuning no longer uses; magnitude pruning keeps them, movement pruning keeps the weights
    # fine-tuning grows (seed 0: 100% of its first-layer weights on the bottom rows against 26%, accuracy 83.6% against
    # 81.4%; seeds 0-4: movement ahead by 0.8 to 4.4 points).
    pl.seed_everything(0)
    pretrained = Classifier(arch="lenet300", input_shape=(1, 8, 8), lr=0.05)
    make_trainer(tmp_path, max_epochs=10).fit(pretrained, HalfDigits("top"))
    results = {}
    for method in (GradualMagnitudePruning, MovementPruning):
        pl.seed_everything(0)
        model = Classifier(arch="lenet300", input_shape=(1, 8, 8), lr=0.003)
        model.load_state_dict(pretrained.state_dict())
        pruning = method(sparsity=0.95, start=0.1, end=0.7, frequency=5, exclude=["net.5.*"], verbose=False)
        trainer = make_trainer(tmp_path, [pruning], max_epochs=20)
        trainer.fit(model, HalfDigits("bottom"))
        kept = pruning.masks.mask("net.1.weight").reshape(300, 8, 8)  # first layer: (outputs, rows, columns)
        results[method.__name__] = {
            "accuracy": trainer.test(model, HalfDigits("bottom"), verbose=False)[0]["test_acc"],
            "bottom_share": float(kept[:, 4:, :].sum() / kept.sum()),
        }
    magnitude, movement = results["GradualMagnitudePruning"], results["MovementPruning"]
    assert magnitude["bottom_share"] < 0.5 < movement["bottom_share"], results
    assert movement["accuracy"] > magnitude["accuracy"] + 0.01, results


def _movement_run(tmp_path: Path, stop_epoch: int | None = None, ckpt: Path | None = None):
    pl.seed_everything(7)
    model = digits_model(optimizer="adam", lr=1e-3)
    callback = MovementPruning(sparsity=0.85, start=0.1, end=0.7, frequency=6, verbose=False)
    callbacks = [callback] + ([StopAfterEpoch(stop_epoch, tmp_path / "interrupted.ckpt")] if stop_epoch is not None else [])
    trainer = make_trainer(tmp_path, callbacks)
    trainer.fit(model, DigitsDataModule(batch_size=64), ckpt_path=ckpt)
    return model, callback, trainer


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    full_model, full_cb, _ = _movement_run(tmp_path / "full")
    _, cut_cb, cut_trainer = _movement_run(tmp_path / "cut", stop_epoch=1)
    assert cut_trainer.global_step == 40 and 0 < cut_cb.masks.sparsity() < 0.85  # mid-ramp (steps 8..56)
    saved = torch.load(tmp_path / "cut" / "interrupted.ckpt", weights_only=True)["callbacks"][cut_cb.state_key]
    assert saved["movement"]["steps"] == {name: 40 for name in LAYERS}
    resumed_model, resumed_cb, resumed_trainer = _movement_run(tmp_path / "resumed", ckpt=tmp_path / "cut" / "interrupted.ckpt")
    assert resumed_trainer.global_step == 80
    for (name, full), (_, resumed) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(full, resumed), name
    assert resumed_cb.masks.checksum() == full_cb.masks.checksum()
    for name in LAYERS:
        assert torch.equal(resumed_cb.scores.scores[name], full_cb.scores.scores[name]), name
        assert torch.equal(resumed_cb.scores.latent[name], full_cb.scores.latent[name]), name


def test_fit_with_the_movement_preset(run_cli, tmp_path):
    output = run_cli(
        "fit", *DIGITS, f"--trainer.default_root_dir={tmp_path}", f"--trainer.callbacks={ROOT / 'callbacks' / 'movement.yaml'}",
        "--trainer.callbacks.sparsity=0.8",
        cwd=tmp_path,
    )  # fmt: skip
    assert "MovementPruning: sparsity per layer" in output
    assert checkpoint_sparsity(tmp_path) == pytest.approx(0.8, abs=1e-4)


# ----------------------------------------------------------------- score-signal warning (issue 31)
class RandomLabels(Classifier):
    """LeNet-300-100 on digits trained on labels drawn at random for every batch: every w·g is minibatch noise."""

    def __init__(self) -> None:
        super().__init__(arch="lenet300", input_shape=(1, 8, 8), lr=0.05)
        self.generator = torch.Generator().manual_seed(0)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return super().training_step((x, torch.randint(0, 10, y.shape, generator=self.generator)), batch_idx)


def _signal_after(model: nn.Module, steps: int, labels_at_random: bool) -> float:
    """``MovementScores.signal()`` after ``steps`` SGD steps of ``model`` on digits (plain loop)."""
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    params = {name: p for name, p in model.named_parameters() if name in LAYERS}
    scores = MovementScores(params, rule="adam", track_signal=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _, (x, y) in zip(range(steps), data.train_dataloader()):
        if labels_at_random:
            y = torch.randint(0, 10, y.shape, generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        scores.accumulate_()
        optimizer.step()
    return scores.signal()


@pytest.mark.parametrize("seed", [0, 1])
def test_score_signal_is_noise_level_on_random_labels_and_well_above_on_true_ones(seed):
    pl.seed_everything(seed)
    noise = _signal_after(digits_model(), 20, labels_at_random=True)
    pl.seed_everything(seed)
    signal = _signal_after(digits_model(), 20, labels_at_random=False)
    assert abs(noise - NOISE_MEDIAN_ABS_T) < 0.1 < SIGNAL_MEDIAN_ABS_T - noise
    assert signal > 1.5 * SIGNAL_MEDIAN_ABS_T
    assert "median |t| = " in signal_warning(noise, 20, 20, "adam")
    assert signal_warning(signal, 20, 20, "adam") is None
    assert "only 3 scored step(s)" in signal_warning(signal, 3, 3, "adam")  # too few steps to tell


def _signal_warnings(model, make_trainer, tmp_path, digits, **kwargs) -> list[str]:
    callback = MovementPruning(sparsity=0.5, start=20, end=26, frequency=2, verbose=False, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [callback], max_steps=28).fit(model, digits)
    assert not callback.scores.signal_sums  # freed after the first pruning update
    return [str(w.message) for w in caught if "movement scores" in str(w.message)]


def test_callback_warns_once_when_scores_at_the_first_update_are_noise(make_trainer, tmp_path, digits):
    pl.seed_everything(0)
    messages = _signal_warnings(RandomLabels(), make_trainer, tmp_path, digits)
    assert len(messages) == 1
    # step 20 (start) decides the masks of step 21's forward, at step 21's sparsity: the first that prunes
    assert "optimizer step 20, 21 scored steps" in messages[0] and "`start`" in messages[0]


def test_callback_does_not_warn_on_a_clear_signal_or_when_switched_off(digits_model, make_trainer, tmp_path, digits):
    pl.seed_everything(0)
    assert _signal_warnings(digits_model(), make_trainer, tmp_path, digits) == []
    pl.seed_everything(0)
    assert _signal_warnings(RandomLabels(), make_trainer, tmp_path, digits, check_signal=False) == []
