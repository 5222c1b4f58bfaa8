"""Recurrent hidden units and transposed-convolution channels as structured units (issue 28, point 3).

With ``granularity="channel"`` a hidden unit of an LSTM/GRU/RNN layer (its rows in every gate of ``weight_ih``,
``weight_hh`` and both biases, its column of ``weight_hh`` and the columns of whatever reads it) and an output
channel of a ConvTranspose with the input channel of the layer reading it are pruned whole in training and removed
by ``deploy``: outputs equal to the masked model's, ``hidden_size``/channels and MACs reduced. Models are written as
users write them and trained with a real Trainer on real data (a slice of Shakespeare; the digits)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from support import step_trainer
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.core.heads import extend_targets, find_group_layers, prune_groups_by_magnitude, select_groups
from lightning_sparse.core.masks import MaskSet
from lightning_sparse.core.structured import check_shape, expand_granularity
from lightning_sparse.core.targets import select_targets
from lightning_sparse.data import DigitsDataModule, ShakespeareDataModule
from lightning_sparse.deployment import deploy_model


class CharLM(pl.LightningModule):
    """A character language model as users write it: embedding, a recurrent stack, dropout, a Linear decoder."""

    def __init__(self, vocab: int, kind: type[nn.RNNBase] = nn.LSTM, layers: int = 2, bidirectional: bool = False,
                 hidden: int = 32, proj_size: int = 0) -> None:  # fmt: skip
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, 16)
        extra = {"proj_size": proj_size} if proj_size else {}
        self.rnn = kind(16, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional, **extra)
        self.drop = nn.Dropout(0.1)
        width = proj_size or hidden
        self.decoder = nn.Linear(width * (2 if bidirectional else 1), vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.drop(self.rnn(self.embed(x))[0]))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class ConvDecoder(pl.LightningModule):
    """Digits 8×8 → a strided Conv2d (4×4) → ConvTranspose2d back to 8×8 → ConvTranspose2d to one channel."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        def bn(channels: int) -> list[nn.Module]:
            return [nn.BatchNorm2d(channels)] if norm else []

        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), *bn(16), nn.ReLU(),
            nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1, output_padding=1), *bn(16), nn.ReLU(),
            nn.ConvTranspose2d(16, 1, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return F.mse_loss(self(x), x)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.fixture(scope="module")
def sonnets(sonnets_path) -> ShakespeareDataModule:
    """Shakespeare's sonnets (their first 20,000 characters) in windows of 32."""
    data = ShakespeareDataModule(path=sonnets_path, block_size=32, batch_size=16)
    data.setup()
    return data

def recurrent_macs(model: nn.Module, tokens: int) -> int:
    """Multiply-accumulates of the recurrent stacks and Linear layers for ``tokens`` tokens (torch's FLOP counter
    does not count ``aten.lstm``): per token and direction, ``G·H·(in + H)`` per layer, ``in × out`` per Linear."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
            directions = 2 if module.bidirectional else 1
            for k in range(module.num_layers):
                inputs = module.input_size if k == 0 else module.hidden_size * directions
                total += directions * gates * module.hidden_size * (inputs + module.hidden_size)
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
    return total * tokens


def conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def hidden_outputs(model: CharLM, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.rnn(model.embed(x))[0]


def prune_with_core(model: nn.Module, sparsity: float) -> None:
    """GMP's channel step through the core objects: select the units, prune the lowest group norms, apply."""
    targets = select_targets(model)
    groups = select_groups(model, targets, expand_granularity("channel", targets))
    masks = MaskSet(dict(extend_targets(model, targets, groups)))
    prune_groups_by_magnitude(masks, groups, sparsity)
    masks.apply_()


# ----------------------------------------------------------------------------------------------- recurrent units
def test_a_char_lstm_lm_loses_half_its_hidden_units_in_training_and_at_deploy(tmp_path, sonnets):
    model = CharLM(len(sonnets.chars))
    callback = GradualMagnitudePruning(sparsity=0.5, granularity="channel", frequency=4, end=8, verbose=False)
    step_trainer(tmp_path, [callback]).fit(model, sonnets)
    model.eval()
    x = next(iter(sonnets.val_dataloader()))[0][:4]
    hidden = hidden_outputs(model, x)
    dead = (hidden == 0).all(0).all(0)  # units whose output is exactly zero at every step of every sequence
    assert int(dead.sum()) == 16  # round(0.5 × 32) pruned in the last layer: their gate rows and biases all zero
    assert model.rnn.bias_ih_l1[:32][dead].eq(0).all() and model.rnn.weight_hh_l1[:, dead].eq(0).all()
    assert model.decoder.weight[:, dead].eq(0).all()
    reference = model(x)

    deployed = deploy_model(model, x, kernel="dense").model
    assert deployed.rnn.hidden_size == 16 and deployed.rnn.weight_ih_l1.shape == (64, 16)
    assert deployed.decoder.in_features == 16
    assert torch.allclose(deployed(x), reference, atol=1e-5)
    before, after = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in deployed.parameters())
    assert after < 0.45 * before
    tokens = x.numel()
    removed = recurrent_macs(model, tokens) - recurrent_macs(deployed, tokens)
    # layer 0: 4·16·(16 + 32) - 4·16·(16 + 16) units; layer 1: 4·32·64 - 4·16·32; decoder: 16 columns × vocab
    assert removed == tokens * (4 * 32 * 48 - 4 * 16 * 32 + 4 * 32 * 64 - 4 * 16 * 32 + 16 * len(sonnets.chars))


@pytest.mark.parametrize(("kind", "layers", "bidirectional"), [(nn.GRU, 2, True), (nn.RNN, 1, False), (nn.LSTM, 2, True)])
def test_gru_rnn_and_bidirectional_units_are_removed_with_equal_outputs(kind, layers, bidirectional, sonnets):
    model = CharLM(len(sonnets.chars), kind, layers, bidirectional).eval()
    prune_with_core(model, 0.5)
    x = next(iter(sonnets.val_dataloader()))[0][:4]
    hidden = hidden_outputs(model, x)
    directions = 2 if bidirectional else 1
    assert int((hidden == 0).all(0).all(0).sum()) == 16 * directions  # both directions' unit j go together
    reference = model(x)
    deployed = deploy_model(model, x, kernel="dense").model
    assert deployed.rnn.hidden_size == 16
    assert torch.allclose(deployed(x), reference, atol=1e-5)
    assert recurrent_macs(deployed, 1) < 0.5 * recurrent_macs(model, 1)
    assert sum(p.numel() for p in deployed.parameters()) < sum(p.numel() for p in model.parameters())


def test_layers_of_one_module_keeping_different_unit_counts_stay_whole_saying_why(sonnets):
    model = CharLM(len(sonnets.chars)).eval()
    prune_with_core(model, 0.5)
    with torch.no_grad():
        model.rnn.weight_ih_l0[[0, 32, 64, 96]] = 1.0  # revive one unit of layer 0 only (its ih rows)
    x = next(iter(sonnets.val_dataloader()))[0][:2]
    result = deploy_model(model, x, kernel="dense")
    rows = [row for row in result.report.removed_groups if row.module.startswith("rnn/")]
    assert rows and all(not row.removed for row in rows)
    assert "different numbers of all-zero hidden units" in rows[0].reason
    assert torch.allclose(result.model(x), model(x), atol=1e-6)


# ----------------------------------------------------------------------------------------------- transposed convolutions
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "batchnorm"])
def test_a_conv_transpose_decoder_loses_half_its_channels_in_training_and_at_deploy(tmp_path, norm):
    data = DigitsDataModule(batch_size=64)
    data.setup()
    model = ConvDecoder(norm)
    layers = {layer.module: layer for layer in find_group_layers(model)}
    convt, last = ("net.3", "net.6") if norm else ("net.2", "net.4")
    assert set(layers) == {"net.0", convt}  # Conv2d → ConvT, ConvT → ConvT; the last one is the model's output
    norm_members = [("net.4.weight", 0), ("net.4.bias", 0)] if norm else []
    assert [(m.param, m.axis) for m in layers[convt].members] == [(f"{convt}.weight", 1), (f"{convt}.bias", 0), *norm_members, (f"{last}.weight", 0)]
    callback = GradualMagnitudePruning(sparsity=0.5, granularity="channel", frequency=4, end=8, verbose=False)
    step_trainer(tmp_path, [callback]).fit(model, data)
    model.eval()
    x = next(iter(data.val_dataloader()))[0][:16]
    pruned = model.get_submodule(convt).weight.abs().sum((0, 2, 3)).eq(0)
    assert int(pruned.sum()) == 8  # 8 of 16 output channels (axis 1) pruned
    reference = model(x)
    deployed = deploy_model(model, x, kernel="dense").model
    convs = [m for m in deployed.modules() if isinstance(m, nn.modules.conv._ConvNd)]  # deploy flattens the graph
    assert [tuple(m.weight.shape[:2]) for m in convs] == [(8, 1), (8, 8), (8, 1)]
    assert convs[1].out_channels == 8 and convs[2].in_channels == 8
    norms = [m for m in deployed.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [(m.num_features, m.running_mean.shape[0], m.weight.shape[0]) for m in norms] == [(8, 8, 8)] * (2 if norm else 0)
    assert torch.allclose(deployed(x), reference, atol=1e-5)
    assert conv_macs(deployed, x) < 0.4 * conv_macs(model, x)
    assert sum(p.numel() for p in deployed.parameters()) < 0.4 * sum(p.numel() for p in model.parameters())


def test_a_grouped_conv_transpose_keeps_its_channels_saying_why():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 8, 3, groups=2))
    assert not find_group_layers(model)
    targets = select_targets(model)
    from lightning_sparse.core.heads import _find

    reasons = " ".join(reason for _, reason in _find(model)[1])
    assert "'0' (Conv2d) feed '2' (ConvTranspose2d) through a grouped convolution" in reasons
    assert not select_groups(model, targets, expand_granularity("channel", targets))


# ----------------------------------------------------------------------------------------------- bad input (issue 28)
def test_channel_on_an_lstm_with_proj_size_is_refused_naming_it(tmp_path, sonnets):
    callback = GradualMagnitudePruning(sparsity=0.5, granularity="channel", verbose=False)
    with pytest.raises(ValueError, match=r"'rnn\.weight_ih_l0' \(LSTM\).*proj_size=8.*'unstructured' or 'N:M'"):
        step_trainer(tmp_path, [callback]).fit(CharLM(len(sonnets.chars), proj_size=8), sonnets)


class HiddenReader(nn.Module):
    """The LSTM's output goes through a LayerNorm (registered between them) before the decoder: not proved."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.decoder = nn.Linear(16, 5)

    def forward(self, x):
        return self.decoder(self.norm(self.rnn(x)[0]))


def test_channel_on_units_whose_reader_is_not_proved_is_refused_naming_the_layer():
    model = HiddenReader()
    targets = select_targets(model)
    with pytest.raises(ValueError, match=r"'rnn\.weight_ih_l0' \(LSTM\).*reader of 'rnn' \(LSTM\) layer 0 is not proved"):
        select_groups(model, targets, expand_granularity("channel", targets))


class NormedLM(CharLM):
    """The decoder is registered right after the LSTM, but the forward normalises the LSTM's output first (a
    functional LayerNorm: no module between them tells)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(self.embed(x))[0]
        return self.decoder(F.layer_norm(out, out.shape[-1:]))


def test_a_reader_that_does_not_read_the_lstm_output_as_it_is_is_refused_at_setup(tmp_path, sonnets):
    callback = GradualMagnitudePruning(sparsity=0.5, granularity="channel", verbose=False)
    with pytest.raises(ValueError, match=r"hidden units of 'rnn' \(LSTM\).*'decoder', reads something other than its output"):
        step_trainer(tmp_path, [callback]).fit(NormedLM(len(sonnets.chars)), sonnets)


def test_channel_on_a_recurrent_cell_is_refused_naming_it():
    model = nn.Sequential(nn.LSTMCell(8, 16), nn.Linear(16, 4))
    targets = select_targets(model)
    with pytest.raises(ValueError, match=r"'0\.weight_ih' \(LSTMCell\).*a recurrent cell"):
        select_groups(model, targets, expand_granularity("channel", targets))


def test_two_four_on_an_lstm_fan_in_that_four_does_not_divide_is_refused_naming_it():
    targets = select_targets(nn.Sequential(nn.LSTM(6, 8)))
    granularity = expand_granularity("2:4", targets)
    with pytest.raises(ValueError, match=r"M=4 does not divide the input dimension 6 of '0\.weight_ih_l0'"):
        for name, param in targets.items():
            check_shape(name, param.shape, granularity[name])


def test_channel_on_an_lstm_bias_alone_is_refused_naming_it():
    targets = select_targets(nn.Sequential(nn.LSTM(8, 8)), include=["0.bias_ih_l0"])
    granularity = expand_granularity("channel", targets)
    with pytest.raises(ValueError, match=r"'0\.bias_ih_l0' has shape \[32\]"):
        check_shape("0.bias_ih_l0", targets["0.bias_ih_l0"].shape, granularity["0.bias_ih_l0"])


def test_an_lstm_bias_included_with_channel_goes_with_its_units(tmp_path, sonnets):
    model = CharLM(len(sonnets.chars), layers=1)
    callback = GradualMagnitudePruning(sparsity=0.5, granularity="channel", include=["rnn.*", "decoder.weight"],
                                       frequency=4, end=8, verbose=False)  # fmt: skip
    step_trainer(tmp_path, [callback]).fit(model, sonnets)
    dead = model.rnn.weight_hh_l0.abs().sum(0) == 0
    assert int(dead.sum()) == 16
    for gate in range(4):  # the bias entries of a pruned unit, in every gate, are zero; the others are not
        assert model.rnn.bias_ih_l0[gate * 32 : (gate + 1) * 32][dead].eq(0).all()
        assert model.rnn.bias_ih_l0[gate * 32 : (gate + 1) * 32][~dead].ne(0).all()
