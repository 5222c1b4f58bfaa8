"""QuantizationAwareTraining alone and together with GMP / RigL, inside real Trainer.fit runs on digits."""

import csv
import itertools
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from support import StopAfterEpoch, digits_model, make_trainer
from lightning_sparse import GradualMagnitudePruning, QuantizationAwareTraining, RigL
from lightning_sparse.core.allocation import round_half_up
from lightning_sparse.core.quantize import (
    codebook_quantize,
    distortion,
    fit_codebook,
    kmeans_1d,
    lloyd_1d,
    uniform_quantize,
    zero_smallest,
)
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import Classifier

LAYERS = ("net.1.weight", "net.3.weight", "net.5.weight")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, r"`bits` must be an int in 2..8, got 1"),
        ({"bits": 9}, r"`bits` must be an int in 2..8, got 9"),
        ({"bits": {"net.1.*": 12}}, r"`bits\['net.1.\*'\]` must be an int in 2..8, got 12"),
        ({"scale": "per_row"}, r"`scale` must be one of \('per_channel', 'per_tensor'\)"),
        ({"method": "lloyd"}, r"`method` must be one of \('uniform', 'kmeans'\)"),
        ({"activations": 16}, r"`activations` must be an int in 2..8"),
        ({"start": 1.5}, r"`start` as a fraction of training must be in \[0, 1\]"),
        ({"frequency": 0}, r"`frequency` must be an int >= 1"),
        ({"sparsity": 1.0}, r"`sparsity` must be a number in \[0, 1\)"),
        ({"symmetric": "no"}, r"`symmetric` must be a bool \(true or false\), got 'no'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


@pytest.mark.parametrize("old", ["granularity", "codebook_frequency", "prune"])
def test_the_pre_release_argument_names_are_gone(old):
    """``scale``, ``frequency`` and ``sparsity`` are the only names (the package was never released with the old)."""
    with pytest.raises(TypeError, match=old):
        QuantizationAwareTraining(**{old: 1})


def test_bits_pattern_matching_nothing_is_refused(digits_model, make_trainer, tmp_path, digits):
    callback = QuantizationAwareTraining(bits={"encoder.*": 4})
    with pytest.raises(ValueError, match=r"`bits` pattern 'encoder.\*' matches no selected parameter; selected: \['net.1"):
        make_trainer(tmp_path, [callback]).fit(digits_model(), digits)


# ----------------------------------------------------------------------------- core quantizers
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_uniform_grid_keeps_zeros_and_level_count(symmetric, granularity):
    weight = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    weight[weight.abs() < 0.7] = 0
    q = uniform_quantize(weight, 3, granularity, symmetric)
    assert torch.all(q[weight == 0] == 0)
    rows = q if granularity == "per_channel" else q.reshape(1, -1)
    assert max(torch.unique(row).numel() for row in rows) <= (7 if symmetric else 8)
    assert not torch.signbit(q[q == 0]).any()  # +0.0 only
    if symmetric:
        assert torch.equal(uniform_quantize(q, 3, granularity, symmetric), q)  # already on the grid


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_is_torchs_kernel_bit_for_bit(bits, symmetric):
    # the grid is torch's fake_quantize arithmetic as plain tensor ops (10x faster on a CPU): the same bits, signs
    # of zero included, on weights of several scales and on values exactly halfway between two levels
    from lightning_sparse.core.quantize import fake_quantize

    generator = torch.Generator().manual_seed(bits)
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    for rows, cols, magnitude in [(1, 1, 1.0), (7, 33, 1e-3), (64, 128, 0.02), (5, 9, 30.0)]:
        weight = torch.randn(rows, cols, generator=generator) * magnitude
        scale = weight.abs().amax(dim=1) / qmax + 1e-12
        zero_point = torch.zeros(rows, dtype=torch.int32) if symmetric else torch.randint(qmin, qmax + 1, (rows,), dtype=torch.int32)
        halves = (torch.randint(qmin, qmax, (rows, cols), generator=generator) - zero_point[:, None] + 0.5) * scale[:, None]
        for values in (weight, halves, -halves):
            reference = torch.fake_quantize_per_channel_affine(values, scale, zero_point, 0, qmin, qmax)
            ours = fake_quantize(values, scale[:, None], zero_point[:, None], qmin, qmax)
            assert torch.equal(ours, reference) and torch.equal(ours.signbit(), reference.signbit())
            reference = torch.fake_quantize_per_tensor_affine(values, float(scale[0]), int(zero_point[0]), qmin, qmax)
            ours = fake_quantize(values, scale[0], zero_point[0], qmin, qmax)
            assert torch.equal(ours, reference) and torch.equal(ours.signbit(), reference.signbit())


def test_kmeans_finds_the_obvious_clusters():
    values = torch.tensor([-2.0, -2.2, -1.8, 0.9, 1.0, 1.1, 5.0, 5.2])
    assert torch.allclose(kmeans_1d(values, 3), torch.tensor([-2.0, 1.0, 5.1]))
    codebook = fit_codebook(torch.tensor([[0.0, -2.1, 1.2], [0.0, 4.0, -1.9]]), bits=2)
    assert codebook.numel() == 4 and torch.all(codebook[1:] >= codebook[:-1])
    assert codebook_quantize(torch.tensor([0.0, 3.9]), codebook).tolist() == [0.0, 4.0]


def _brute_force_kmeans(values: list[float], k: int) -> float:
    """The optimal k-means distortion by trying every split of the sorted values into k contiguous runs."""
    v = sorted(values)
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(v)), k - 1):
        bounds = [0, *cuts, len(v)]
        runs = [v[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        best = min(best, sum(sum((x - sum(run) / len(run)) ** 2 for x in run) for run in runs))
    return best


def test_kmeans_is_the_exact_optimum_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    for trial in range(120):
        n = int(torch.randint(2, 10, (1,), generator=generator))
        values = torch.randn(n, generator=generator, dtype=torch.float64)
        if trial % 3 == 0:
            values = torch.round(values * 2) / 2  # repeated values
        distinct = torch.unique(values).numel()
        for k in range(1, n + 1):
            codebook = kmeans_1d(values, k)
            assert codebook.numel() == min(k, distinct)
            assert torch.all(codebook[1:] > codebook[:-1])  # sorted and distinct
            codes = torch.bucketize(values, (codebook[1:] + codebook[:-1]) / 2)
            assert torch.unique(codes).numel() == codebook.numel()  # no empty cluster
            optimum = _brute_force_kmeans(values.tolist(), min(k, distinct))
            assert distortion(values, codebook) == pytest.approx(optimum, rel=1e-9, abs=1e-12)


def test_kmeans_beats_lloyd_on_an_outlier_and_uses_every_code():
    values = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 0.05
    values[0] = 2.5  # one outlier: Lloyd from linear seeds left 11 of 16 clusters empty
    codebook = kmeans_1d(values, 16)
    seeds = torch.linspace(0, 1, 16) * (values.max() - values.min()) + values.min()
    assert codebook.numel() == 16 and torch.unique(torch.bucketize(values, (codebook[1:] + codebook[:-1]) / 2)).numel() == 16
    assert distortion(values, lloyd_1d(values, seeds)) > 5 * distortion(values, codebook)


def test_kmeans_warm_start_keeps_an_equally_good_codebook_and_refuses_nan():
    values = torch.randn(500, generator=torch.Generator().manual_seed(1))
    codebook = kmeans_1d(values, 8)
    assert torch.equal(kmeans_1d(values, 8, init=codebook), codebook)
    worse = torch.linspace(-1, 1, 8)
    assert torch.equal(kmeans_1d(values, 8, init=worse), codebook)  # a worse previous codebook is replaced
    values[3] = float("nan")
    with pytest.raises(ValueError, match="NaN/infinite"):
        kmeans_1d(values, 8)


# ----------------------------------------------------------------------------- QAT in Trainer.fit
def _quant_log(log_dir: Path) -> list[dict[str, float]]:
    with open(log_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f) if r.get("qat/error/global")]


def test_qat_trains_with_quantized_weights_and_saves_them(digits_model, make_trainer, tmp_path, digits):
    pl.seed_everything(0)  # not the global RNG state earlier tests left (seeds 0-5: test_acc 0.933-0.961)
    callback = QuantizationAwareTraining(bits=4)
    logger = CSVLogger(tmp_path)
    model = digits_model()
    keys = list(model.state_dict())
    trainer = make_trainer(tmp_path, [callback], logger=logger, log_every_n_steps=10)
    trainer.fit(model, digits)
    for name in LAYERS:
        weight = model.get_parameter(name).detach()
        assert max(torch.unique(row).numel() for row in weight) <= 15  # 4-bit symmetric grid per output channel
        latent = callback.quantizer.latent[name]
        assert not torch.equal(weight, latent)  # the latent weights are full precision...
        assert torch.equal(weight, callback.quantize_layer(name, latent))  # ...and the model holds q(latent)
    accuracy = trainer.test(model, digits, verbose=False)[0]["test_acc"]
    assert accuracy > 0.9

    path = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert list(state) == keys
    plain = Classifier(arch="lenet300", input_shape=(1, 8, 8))
    plain.load_state_dict(state)
    x = torch.stack([digits.splits["test"][i][0] for i in range(64)])
    model.eval(), plain.eval()
    assert torch.equal(plain(x), model(x))  # the checkpoint's weights are the ones the model evaluated with

    rows = _quant_log(Path(logger.log_dir))
    assert [int(r["step"]) for r in rows][:3] == [9, 19, 29]  # with Lightning's own train metrics (log_every_n_steps=10)
    assert all(rows[-1][f"qat/bits/{n}"] == 4 for n in LAYERS)
    assert 0 < rows[-1]["qat/error/global"] < 0.2


def test_kmeans_codebook_per_layer(digits_model, make_trainer, tmp_path, digits):
    callback = QuantizationAwareTraining(bits=2, method="kmeans", frequency=10)
    model = digits_model()
    make_trainer(tmp_path, [callback], max_epochs=2).fit(model, digits)
    for name in LAYERS:
        weight = model.get_parameter(name).detach()
        values = torch.unique(weight[weight != 0])
        assert values.numel() <= 4 and torch.all(torch.isin(values, callback.codebooks[name]))


def test_per_layer_bits_and_unmatched_layers_stay_full_precision(digits_model, make_trainer, tmp_path, digits):
    callback = QuantizationAwareTraining(bits={"net.1.weight": 2, "net.3.*": 3}, scale="per_tensor")
    model = digits_model()
    make_trainer(tmp_path, [callback], max_epochs=1).fit(model, digits)
    assert callback.quantizer.bits == {"net.1.weight": 2, "net.3.weight": 3}
    assert torch.unique(model.net[1].weight).numel() <= 3
    assert torch.unique(model.net[3].weight).numel() <= 7
    assert torch.unique(model.net[5].weight).numel() > 100


def test_activation_quantization_hooks_live_only_during_the_run(digits_model, make_trainer, tmp_path, digits):
    callback = QuantizationAwareTraining(bits=8, activations=4)
    model = digits_model()
    seen = []
    model.net[3].register_forward_hook(lambda m, inputs, out: seen.append(torch.unique(inputs[0]).numel()))  # after pre-hooks
    trainer = make_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(model, digits)
    assert max(seen) <= 16  # the hidden activations entering net.3 were 4-bit
    assert all(not model.get_submodule(n.rsplit(".", 1)[0])._forward_pre_hooks for n in LAYERS)  # removed at teardown


def _joint_run(tmp_path, order, pruner, seed=5, **trainer_kwargs):
    pl.seed_everything(seed)
    model = digits_model(optimizer="adam", lr=2e-3)
    callbacks = {"prune": pruner(), "qat": QuantizationAwareTraining(bits=4, start=0.1)}
    trainer = make_trainer(tmp_path, [callbacks[k] for k in order], **trainer_kwargs)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    return model, callbacks, trainer


PRUNERS = {
    "gmp": lambda: GradualMagnitudePruning(sparsity=0.8, start=0.2, end=0.6, frequency=5),
    "rigl": lambda: RigL(sparsity=0.8, frequency=8, end=0.75),
}


@pytest.mark.parametrize("pruner", ["gmp", "rigl"])
def test_pruning_and_qat_in_one_trainer_in_either_order(tmp_path, pruner):
    first, callbacks, _ = _joint_run(tmp_path / "a", ("prune", "qat"), PRUNERS[pruner])
    second, _, _ = _joint_run(tmp_path / "b", ("qat", "prune"), PRUNERS[pruner])
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name  # the order of the callbacks does not change the result
    masks, qat = callbacks["prune"].masks, callbacks["qat"]
    assert masks.sparsity() == pytest.approx(0.8, abs=1e-3)
    for name in LAYERS:
        weight = first.get_parameter(name).detach()
        assert torch.all(weight[~masks.mask(name)] == 0)  # pruned weights stay exactly zero through quantization
        assert torch.equal(weight, qat.quantize_layer(name, qat.quantizer.latent[name]))  # and the rest is on the 4-bit grid
        assert max(torch.unique(row).numel() for row in weight) <= 15


RESUMABLE = {
    "gmp": lambda: GradualMagnitudePruning(sparsity=0.7, start=0.1, end=0.7, frequency=6),
    "rigl": lambda: RigL(sparsity=0.7, frequency=6, end=0.8),
}


@pytest.mark.parametrize(("pruner", "method"), [("gmp", "uniform"), ("gmp", "kmeans"), ("rigl", "uniform")])
def test_qat_with_pruning_resumes_bit_identically(digits_model, make_trainer, tmp_path, pruner, method):
    def run(root, stop=None, ckpt=None):
        pl.seed_everything(9)
        model = digits_model(optimizer="adam", lr=2e-3)
        callbacks = [RESUMABLE[pruner](), QuantizationAwareTraining(bits=3, method=method, frequency=7, start=5)]
        if stop is not None:
            callbacks.append(StopAfterEpoch(stop, root / "cut.ckpt"))
        make_trainer(root, callbacks).fit(model, DigitsDataModule(batch_size=64), ckpt_path=ckpt)
        return model, callbacks

    full, full_cbs = run(tmp_path / "full")
    run(tmp_path / "cut", stop=1)
    resumed, resumed_cbs = run(tmp_path / "resumed", ckpt=tmp_path / "cut" / "cut.ckpt")
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    for name in LAYERS:
        assert torch.equal(full_cbs[1].quantizer.latent[name], resumed_cbs[1].quantizer.latent[name])


def test_clipq_mode_prunes_the_quantized_weights_only(digits_model, make_trainer, tmp_path, digits):
    callback = QuantizationAwareTraining(bits=4, sparsity={"net.1.weight": 0.9, "net.3.weight": 0.5})
    model = digits_model()
    make_trainer(tmp_path, [callback], max_epochs=2).fit(model, digits)
    for name, fraction in (("net.1.weight", 0.9), ("net.3.weight", 0.5), ("net.5.weight", 0.0)):
        weight, latent = model.get_parameter(name).detach(), callback.quantizer.latent[name]
        assert (weight == 0).float().mean().item() >= fraction - 1e-4
        assert (latent == 0).float().mean().item() < 0.01  # the latent weights keep every connection
    assert (model.net[1].weight == 0).float().mean().item() == pytest.approx(0.9, abs=0.02)


@pytest.mark.parametrize("method", ["uniform", "kmeans"])
@pytest.mark.parametrize("bits", [2, 4])
def test_clipq_zero_count_is_exact_and_values_fit_the_bits(digits_model, make_trainer, tmp_path, digits, bits, method):
    # 2-bit uniform used to give 79-95% zeros for prune=0.5 ({-s, 0, s} rounded most survivors to 0), and k-means
    # 2**bits non-zero codes plus the zero
    callback = QuantizationAwareTraining(bits=bits, method=method, sparsity=0.5, frequency=10)
    model = digits_model()
    make_trainer(tmp_path, [callback], max_epochs=1).fit(model, digits)
    for name in LAYERS:
        weight = model.get_parameter(name).detach()
        assert int((weight == 0).sum()) == round_half_up(0.5 * weight.numel()), name
        assert torch.unique(weight).numel() <= 2**bits, name
        survivors = zero_smallest(callback.quantizer.latent[name], 0.5) != 0
        assert torch.equal(weight != 0, survivors)  # the survivors are exactly the largest latent weights


def test_exported_qat_model_reloads_to_the_weights_it_was_evaluated_with(tmp_path, digits):
    from lightning_sparse.export import load_compressed, save_compressed

    model, callbacks, trainer = _joint_run(tmp_path, ("prune", "qat"), PRUNERS["gmp"], max_epochs=4)
    accuracy = trainer.test(model, DigitsDataModule(batch_size=64), verbose=False)[0]["test_acc"]
    report = save_compressed(model, tmp_path / "model.lsz", verbose=False)
    state = load_compressed(tmp_path / "model.lsz")
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    reloaded = Classifier(arch="lenet300", input_shape=(1, 8, 8))
    reloaded.load_state_dict(state)
    assert trainer.test(reloaded, DigitsDataModule(batch_size=64), verbose=False)[0]["test_acc"] == accuracy
    assert {layer.name: layer.encoding for layer in report.layers}["net.1.weight"].startswith("sparse")
    assert report.ratio > 10  # 80% zeros and 4-bit values, biases raw


def test_clipq_and_a_pruning_callback_on_the_same_layers_are_refused(digits_model, make_trainer, tmp_path, digits):
    callbacks = [GradualMagnitudePruning(sparsity=0.5, exclude=["net.5.*"]), QuantizationAwareTraining(sparsity=0.5)]
    message = r"GradualMagnitudePruning and QuantizationAwareTraining both compress \['net.1.weight', 'net.3.weight'\]"
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, callbacks).fit(digits_model(), digits)


def test_a_nan_latent_weight_is_an_error_naming_the_layer_and_the_step(digits_model, make_trainer, tmp_path, digits):
    # a NaN weight used to be quantized to -7.0 and its channel rounded to 0
    class PoisonLatent(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args) -> None:
            if trainer.global_step == 3:
                qat.quantizer.latent["net.3.weight"][0, 0] = float("nan")

    qat = QuantizationAwareTraining(bits=4)
    with pytest.raises(FloatingPointError, match=r"QuantizationAwareTraining: NaN or infinite latent weights in \['net.3.weight'\] at optimizer step 4"):
        make_trainer(tmp_path, [qat, PoisonLatent()], max_epochs=1).fit(digits_model(), digits)
