"""Every weight that does a matrix product is a default target, compressed on its real axes: ConvTranspose (outputs
on axis 1), LSTM/GRU/RNN (gate blocks stacked on the output axis), Bilinear. Models are written as users write them
and trained with a real Trainer on real data (digits; a slice of Shakespeare for the language models)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from support import step_trainer
from lightning_sparse.callbacks import (
    GradualMagnitudePruning,
    LearningCompression,
    QuantizationAwareTraining,
    RigL,
)
from lightning_sparse.core.allocation import erk_sparsities, zero_counts
from lightning_sparse.core.layouts import Layout, register_layout
from lightning_sparse.core.masks import MaskSet, unpack
from lightning_sparse.core.pruning import prune_by_magnitude
from lightning_sparse.core.structured import check_shape, expand_granularity
from lightning_sparse.core.targets import (
    describe_targets,
    format_targets,
    select_targets,
)
from lightning_sparse.data import DigitsDataModule, ShakespeareDataModule
from lightning_sparse.export import load_compressed, save_compressed


# ----------------------------------------------------------------------------------------------- models, as users write them
class DigitsAutoencoder(pl.LightningModule):
    """8×8 digits through a conv encoder and a ConvTranspose decoder, trained to reconstruct them."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.decoder = nn.Sequential(  # 2×2 -> 4×4 -> 8×8, then a pointwise conv to one channel
            nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, groups=groups), nn.ReLU(),
            nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return F.mse_loss(self(x), x)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class BilinearClassifier(pl.LightningModule):
    """Digits: a Linear feature map, then a Bilinear layer of the features with themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(64, 16)
        self.pairs = nn.Bilinear(16, 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.features(x.flatten(1)))
        return self.pairs(h, h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CharRNN(pl.LightningModule):
    """A character language model: embedding, a recurrent stack (LSTM with a projection, or a bidirectional GRU),
    a Linear decoder."""

    def __init__(self, vocab: int, kind: str = "LSTM") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        if kind == "LSTM":
            self.rnn = nn.LSTM(16, 32, num_layers=2, batch_first=True, proj_size=16)
            width = 16
        else:
            self.rnn = nn.GRU(16, 32, num_layers=2, batch_first=True, bidirectional=True)
            width = 64
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def text_data(path: str) -> ShakespeareDataModule:
    data = ShakespeareDataModule(path=path, block_size=32, batch_size=16)
    data.setup()
    return data


RECURRENT = {
    "LSTM": ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_hr_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1", "rnn.weight_hr_l1"],
    "GRU": [f"rnn.weight_{w}_l{layer}{suffix}" for layer in (0, 1) for suffix in ("", "_reverse") for w in ("ih", "hh")],
}


def group_counts(fan_in: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros in each group of M consecutive entries of every row of ``fan_in`` (one row per output unit)."""
    return (fan_in != 0).reshape(fan_in.shape[0], -1, m).sum(-1)


def convtranspose_fan_in(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """One row per real output channel of a ConvTranspose weight ``(in, out/groups, k…)``: the weights that feed it,
    written out by the definition (output ``g·out/groups + j`` reads inputs ``g·in/groups …`` through ``weight[:, j]``)."""
    inputs, per_group = weight.shape[0] // groups, weight.shape[1]
    rows = [weight[g * inputs : (g + 1) * inputs, j].reshape(-1) for g in range(groups) for j in range(per_group)]
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------- N:M on the true input axis
@pytest.mark.parametrize("how", ["default", "include"])
def test_conv_transpose_2_4_groups_run_along_its_real_input_axis(tmp_path, how):
    torch.manual_seed(0)
    model = DigitsAutoencoder()
    include = ["decoder.0.weight", "decoder.2.weight"] if how == "include" else None
    granularity = "2:4" if how == "include" else {"decoder.*": "2:4"}  # default targets: the encoder's fan-in 9 cannot
    callback = GradualMagnitudePruning(sparsity=0.5, granularity=granularity, include=include, frequency=4, end=8, verbose=False)
    step_trainer(tmp_path, [callback]).fit(model, DigitsDataModule(batch_size=64))
    for layer in (model.decoder[0], model.decoder[2]):
        counts = group_counts(convtranspose_fan_in(layer.weight.detach(), 1), 4)
        assert (counts == 2).all(), f"{counts.flatten().bincount(minlength=5).tolist()} groups hold 0..4 non-zeros"


def test_grouped_conv_transpose_n_m_groups_stay_inside_one_output_channel():
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(8, 6, 2, groups=2)  # weight (8, 3, 2, 2): each output reads 4 inputs × 4 positions
    targets = select_targets(nn.Sequential(layer))
    prune_by_magnitude(MaskSet(targets), 0.5, granularity=expand_granularity("2:4", targets))
    assert (group_counts(convtranspose_fan_in(layer.weight.detach(), 2), 4) == 2).all()


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_weights_take_n_m_along_their_inputs(tmp_path, sonnets_path, kind):
    torch.manual_seed(0)
    data = text_data(sonnets_path)
    model = CharRNN(len(data.chars), kind)
    callback = GradualMagnitudePruning(sparsity=0.5, granularity="2:4", frequency=4, end=8, verbose=False)
    step_trainer(tmp_path, [callback]).fit(model, data)
    params = dict(model.named_parameters())
    assert set(RECURRENT[kind]) <= set(callback.masks)
    for name in RECURRENT[kind]:  # (gates × hidden, inputs): groups of 4 along each row's inputs
        assert (group_counts(params[name].detach(), 4) == 2).all(), name


# ----------------------------------------------------------------------------------------------- exact sparsity by default
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_language_model_is_pruned_exactly_on_every_matmul_weight_by_default(tmp_path, sonnets_path, kind, capsys):
    torch.manual_seed(0)
    data = text_data(sonnets_path)
    model = CharRNN(len(data.chars), kind)
    callback = GradualMagnitudePruning(sparsity=0.9, frequency=4, end=8)
    step_trainer(tmp_path, [callback]).fit(model, data)
    assert list(callback.masks) == RECURRENT[kind] + ["head.weight"]
    params = dict(model.named_parameters())
    for name in callback.masks:
        weight = params[name].detach()
        assert int((weight == 0).sum()) == round(0.9 * weight.numel()), name
    assert not bool((model.embed.weight == 0).any()) and not bool((model.rnn.bias_ih_l0 == 0).any())
    summary = capsys.readouterr().out
    assert "GradualMagnitudePruning compresses" in summary and f"{kind} ×{len(RECURRENT[kind])}" in summary
    assert "other" not in summary


def test_conv_transpose_decoder_is_pruned_exactly_by_default(tmp_path):
    torch.manual_seed(0)
    model = DigitsAutoencoder()
    callback = GradualMagnitudePruning(sparsity=0.8, frequency=4, end=8, verbose=False)
    step_trainer(tmp_path, [callback]).fit(model, DigitsDataModule(batch_size=64))
    assert list(callback.masks) == ["encoder.0.weight", "encoder.2.weight", "decoder.0.weight", "decoder.2.weight", "decoder.4.weight"]
    for name, param in model.named_parameters():
        if name in callback.masks:
            assert int((param == 0).sum()) == round(0.8 * param.numel()), name


def test_bilinear_model_is_pruned_exactly_by_default(tmp_path):
    torch.manual_seed(0)
    model = BilinearClassifier()
    callback = GradualMagnitudePruning(sparsity=0.75, frequency=4, end=8, verbose=False)
    step_trainer(tmp_path, [callback]).fit(model, DigitsDataModule(batch_size=64))
    assert list(callback.masks) == ["features.weight", "pairs.weight"]
    assert int((model.pairs.weight == 0).sum()) == round(0.75 * model.pairs.weight.numel())


def test_bilinear_channel_pruning_removes_whole_outputs():
    torch.manual_seed(0)
    model = BilinearClassifier()
    targets = select_targets(model, include=["pairs.weight"])
    prune_by_magnitude(MaskSet(targets), 0.3, granularity=expand_granularity("channel", targets))
    kept = (model.pairs.weight != 0).flatten(1).any(1)
    assert int((~kept).sum()) == 3 and (model.pairs.weight[~kept] == 0).all()


# ----------------------------------------------------------------------------------------------- QAT, RigL, export, ERK
@pytest.mark.parametrize("groups", [1, 2])
def test_qat_scales_are_per_real_output_channel_of_a_conv_transpose(tmp_path, groups):
    torch.manual_seed(0)
    model = DigitsAutoencoder(groups)
    with torch.no_grad():  # the second half of the inputs (group 2 of 2) on a smaller range: one shared scale shows
        model.decoder[0].weight[8:] *= 0.3
    callback = QuantizationAwareTraining(bits=4, include=["decoder.0.weight"], verbose=False)
    step_trainer(tmp_path, [callback], steps=4).fit(model, DigitsDataModule(batch_size=64))
    weight = model.decoder[0].weight.detach()  # (in 16, out 8 / groups, 3, 3), holding q(w) after fit
    channels = convtranspose_fan_in(weight, groups)
    assert channels.shape == (8, 16 // groups * 9)
    for out, channel in enumerate(channels):  # each output channel on its own symmetric 4-bit grid: max |w| = 7 steps
        codes = channel / (channel.abs().max() / 7)
        assert torch.allclose(codes, codes.round(), atol=1e-4), out
    per_input = weight[0] / (weight[0].abs().max() / 7)  # the wrong axis: an input's weights are on no common grid
    assert not torch.allclose(per_input, per_input.round(), atol=1e-4)


def test_layout_units_are_the_real_output_channels_and_invert():
    layer = nn.ConvTranspose2d(6, 4, 3, groups=2)  # weight (6, 2, 3, 3)
    layout = select_targets(nn.Sequential(layer)).layouts["0.weight"]
    weight = torch.randn(layer.weight.shape)
    units = layout.units(weight)
    assert torch.equal(units, convtranspose_fan_in(weight, 2)) and layout.fan_in(weight.shape) == units.shape[1] == 27
    assert torch.equal(layout.from_units(units, weight.shape), weight)
    lstm = select_targets(nn.LSTM(5, 3)).layouts["weight_ih_l0"]
    w = torch.randn(12, 5)
    assert torch.equal(lstm.units(w), w) and torch.equal(lstm.from_units(w, w.shape), w)


def test_rigl_moves_connections_of_an_lstm_and_export_round_trips_it(tmp_path, sonnets_path):
    torch.manual_seed(0)
    data = text_data(sonnets_path)
    model = CharRNN(len(data.chars), "LSTM")
    callback = RigL(sparsity=0.8, frequency=3, end=12, verbose=False)
    step_trainer(tmp_path, [callback], steps=14).fit(model, data)
    assert set(RECURRENT["LSTM"]) <= set(callback.masks)
    counts = zero_counts("erk", callback.masks.params, 0.8)  # what the random start gave each layer
    for name in callback.masks:  # drop-and-grow keeps every layer's count
        assert int((~callback.masks.mask(name)).sum()) == counts[name], name
    moved = [name for name in RECURRENT["LSTM"]
             if bool((callback.masks.mask(name) & ~unpack(callback.pruner.initial[name], callback.masks.params[name].shape)).any())]
    assert moved == RECURRENT["LSTM"]  # connections of every recurrent weight were regrown elsewhere

    path = tmp_path / "lstm.lsz"
    save_compressed(model, path, verbose=False)
    restored = CharRNN(len(data.chars), "LSTM")
    restored.load_state_dict(load_compressed(path))
    x = data.splits["val"][:64].view(2, 32)
    assert torch.equal(restored(x), model(x))
    assert path.stat().st_size < 0.6 * sum(p.numel() * 4 for p in model.parameters())


def test_lc_prunes_every_matmul_weight_of_a_gru_language_model(tmp_path, sonnets_path):
    torch.manual_seed(0)
    data = text_data(sonnets_path)
    model = CharRNN(len(data.chars), "GRU")
    callback = LearningCompression(sparsity=0.8, distribution="uniform", lc_steps=3, steps_per_l=4, verbose=False)
    step_trainer(tmp_path, [callback], steps=12).fit(model, data)
    params = dict(model.named_parameters())
    assert list(callback.params) == RECURRENT["GRU"] + ["head.weight"]
    for name in callback.params:
        assert int((params[name] == 0).sum()) == round(0.8 * params[name].numel()), name


def test_erk_counts_a_conv_transpose_by_its_real_fan_in_and_fan_out():
    shapes = {"transposed": (16, 8, 4, 4), "conv": (8, 16, 4, 4), "linear": (10, 64)}  # ConvT(16→8), Conv(16→8)
    sparsities = erk_sparsities(shapes, 0.8)
    assert sparsities["transposed"] == pytest.approx(sparsities["conv"])
    density = {name: 1 - s for name, s in sparsities.items()}
    assert density["transposed"] / density["linear"] == pytest.approx(((16 + 8 + 4 + 4) / (16 * 8 * 16)) / ((10 + 64) / 640))
    er = erk_sparsities(shapes, 0.8, kernel=False)  # Erdős–Rényi: channels only, n_in = 16 and n_out = 8 either way
    assert er["transposed"] == pytest.approx(er["conv"])
    assert (1 - er["transposed"]) / (1 - er["linear"]) == pytest.approx(((16 + 8) / (16 * 8)) / ((10 + 64) / 640))


# ----------------------------------------------------------------------------------------------- summary, bad input
class EveryKind(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 8)
        self.gru = nn.GRU(8, 8)
        self.rnn = nn.RNN(8, 8)
        self.cell = nn.LSTMCell(8, 8)
        self.up = nn.ConvTranspose1d(8, 4, 3)
        self.pairs = nn.Bilinear(8, 8, 4)
        self.head = nn.Linear(8, 20)


def test_summary_names_every_matmul_kind_and_nothing_is_other():
    model = EveryKind()
    rows = describe_targets(model, select_targets(model))
    compressed = {row.kind: row.tensors for row in rows if row.compressed}
    assert compressed == {"LSTM": 2, "GRU": 2, "RNN": 2, "LSTMCell": 2, "ConvTranspose1d": 1, "Bilinear": 1, "Linear": 1}
    dense = {row.kind for row in rows if not row.compressed}
    assert dense == {"Embedding", "LSTM bias", "GRU bias", "RNN bias", "LSTMCell bias", "bias"}
    text = format_targets(rows, "RigL")
    assert "ConvTranspose1d ×1" in text and "LSTM bias ×2" in text and "other" not in text


def test_layouts_give_each_weight_its_real_axes():
    targets = select_targets(EveryKind())
    assert targets.output_axis["up.weight"] == 1 and targets.layouts["up.weight"].fan_in((8, 4, 3)) == 24
    assert targets.layouts["lstm.weight_ih_l0"].gates == 4 and targets.layouts["gru.weight_hh_l0"].gates == 3
    assert targets.layouts["pairs.weight"].inputs(3) == (1, 2)


class LowRank(nn.Module):
    """A user's own layer: ``x @ (u @ v)ᵀ`` with two factor matrices stored ``(out, rank)`` and ``(in, rank)``."""

    def __init__(self, inputs: int, outputs: int, rank: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.randn(outputs, rank))
        self.v = nn.Parameter(torch.randn(inputs, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.v @ self.u.T


def test_a_registered_module_kind_becomes_a_default_target_on_its_axes():
    model = nn.Sequential(LowRank(8, 6, 4), nn.Linear(6, 2))
    assert list(select_targets(model)) == ["1.weight"]  # unknown: "other", left dense
    # v maps 8 inputs to 4 ranks: its outputs (ranks) are axis 1, as GPT-2's Conv1D
    register_layout(LowRank, lambda module, attribute: {"u": ("LowRank", Layout(0)), "v": ("LowRank", Layout(1))}.get(attribute))
    targets = select_targets(model)
    assert list(targets) == ["0.u", "0.v", "1.weight"] and targets.output_axis["0.v"] == 1
    prune_by_magnitude(MaskSet(targets), 0.5, granularity=expand_granularity("2:4", targets))
    assert (group_counts(model[0].v.detach().T, 4) == 2).all()  # groups of 4 of v's 8 inputs, per rank


@pytest.mark.parametrize(
    "layer, include, message",
    [
        (nn.ConvTranspose2d(3, 8, 1), None, r"M=4 does not divide the input dimension 3 of '0\.weight'"),
        (nn.ConvTranspose2d(8, 8, 1, groups=4), None, r"M=4 does not divide the input dimension 2 of '0\.weight'"),
        (nn.LSTM(6, 8), None, r"M=4 does not divide the input dimension 6 of '0\.weight_ih_l0'"),
        (nn.LSTM(8, 8), ["0.bias_ih_l0"], r"'0\.bias_ih_l0' has shape \[32\]"),
    ],
)
def test_n_m_that_a_layer_cannot_hold_is_refused_naming_it(layer, include, message):
    targets = select_targets(nn.Sequential(layer), include=include)
    granularity = expand_granularity("2:4", targets)
    with pytest.raises(ValueError, match=message):
        for name, param in targets.items():
            check_shape(name, param.shape, granularity[name])


def test_channel_granularity_on_lstm_gate_rows_is_refused_with_the_reason(tmp_path, sonnets_path):
    data = text_data(sonnets_path)
    callback = GradualMagnitudePruning(sparsity=0.5, granularity="channel")
    with pytest.raises(ValueError, match=r"'rnn\.weight_ih_l0' \(LSTM\).*proj_size=16"):
        step_trainer(tmp_path, [callback]).fit(CharRNN(len(data.chars), "LSTM"), data)


def test_lstm_bias_opted_in_is_named_in_the_summary_and_pruned_unstructured(tmp_path, sonnets_path, capsys):
    data = text_data(sonnets_path)
    model = CharRNN(len(data.chars), "LSTM")
    callback = GradualMagnitudePruning(sparsity=0.5, include=["rnn.*_l0"], frequency=4, end=8)
    step_trainer(tmp_path, [callback]).fit(model, data)
    assert "LSTM bias ×2" in capsys.readouterr().out.split("left dense")[0]
    assert int((model.rnn.bias_ih_l0 == 0).sum()) == 64


def test_report_of_a_plain_state_dict_lists_the_recurrent_weights(tmp_path):
    from lightning_sparse.report import checkpoint_stats

    model = CharRNN(20, "GRU")
    with torch.no_grad():
        model.rnn.weight_hh_l1_reverse[:, :16] = 0
    torch.save(model.state_dict(), tmp_path / "gru.pt")
    stats = {row.name: row for row in checkpoint_stats(tmp_path / "gru.pt")}
    assert set(RECURRENT["GRU"]) | {"embed.weight", "head.weight"} == set(stats)
    assert stats["rnn.weight_hh_l1_reverse"].sparsity == pytest.approx(0.5)
