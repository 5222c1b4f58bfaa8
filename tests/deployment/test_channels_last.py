"""``deploy(..., memory_format=)``: convolution weights channels-last where asked or measured faster, kept as they are
where the forward needs its activations in the default layout (a ``view`` of a convolution's output)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from support import make_trainer
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.cli import main as cli_main
from lightning_sparse.deployment import MEMORY_FORMATS, deploy_model, load_deployed
from lightning_sparse.models import Classifier

X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class ConvNet(nn.Module):
    """Conv-BN-ReLU-pool twice, then a classifier; ``flatten`` reads the last feature map as users write it."""

    def __init__(self, flatten: str = "flatten") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Linear(32 * 4 * 4, 10)
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.view(x.shape[0], -1) if self.flatten == "view" else torch.flatten(x, 1)
        return self.classifier(x)


def pruned(flatten: str = "flatten") -> nn.Module:
    """A trained-looking ConvNet with half the first conv's output channels pruned (so deploy has work to do)."""
    torch.manual_seed(0)
    model = ConvNet(flatten).eval()
    with torch.no_grad():
        for bn in (model.features[1], model.features[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        model.features[0].weight[::2] = 0
        model.features[0].bias[::2] = 0
    return model


def conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_channels_last_weights_give_the_same_outputs_and_are_named_in_the_report():
    model = pruned()
    result = deploy_model(model, X, memory_format="channels_last", kernel="dense", repeats=3)
    weights = conv_weights(result.model)
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights)
    assert result.report.memory_format == "channels_last"
    assert any("2 convolution weights in the channels-last memory format" in note for note in result.report.notes)
    outputs = []  # the activations follow the weights: channels-last from the first convolution on
    first = next(m for m in result.model.modules() if isinstance(m, nn.Conv2d))
    first.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.inference_mode():
        torch.testing.assert_close(result.model(X), model(X), rtol=1e-4, atol=1e-5)
    assert outputs[0].is_contiguous(memory_format=torch.channels_last) and not outputs[0].is_contiguous()


def test_contiguous_leaves_the_weights_as_they_are():
    result = deploy_model(pruned(), X, memory_format="contiguous", kernel="dense", repeats=3)
    assert all(w.is_contiguous() for w in conv_weights(result.model))
    assert result.report.memory_format == "contiguous"
    assert not any("memory format" in note for note in result.report.notes)


def test_a_view_of_a_convolution_output_keeps_the_default_format_and_says_why():
    model = pruned("view")
    result = deploy_model(model, X, memory_format="channels_last", kernel="dense", repeats=3)
    assert all(w.is_contiguous() for w in conv_weights(result.model))
    assert result.report.memory_format == "contiguous"
    note = next(note for note in result.report.notes if "memory format" in note)
    assert "kept in the default memory format" in note and "view" in note, note
    with torch.inference_mode():
        torch.testing.assert_close(result.model(X), model(X), rtol=1e-4, atol=1e-5)


def test_auto_measures_both_and_reports_the_times():
    result = deploy_model(pruned(), X, memory_format="auto", kernel="dense", repeats=10)
    note = next(note for note in result.report.notes if "memory format" in note)
    assert "ms vs" in note and "interleaved runs" in note, note
    chosen = "channels_last" if "kept in the default" not in note else "contiguous"
    assert result.report.memory_format == chosen
    contiguous = [w.is_contiguous() for w in conv_weights(result.model)]
    assert contiguous == [chosen == "contiguous"] * len(contiguous)


@pytest.mark.parametrize("value", ["nhwc", "channels-last", None])
def test_a_memory_format_not_offered_is_refused_naming_the_argument(value):
    with pytest.raises(ValueError, match=rf"`memory_format` must be one of {MEMORY_FORMATS!r}".replace("(", r"\(").replace(")", r"\)")):
        deploy_model(pruned(), X, memory_format=value)


def test_cli_deploy_memory_format_reaches_the_saved_model(data, tmp_path, capsys):
    pl.seed_everything(0, verbose=False)
    model = Classifier(arch="cnn", input_shape=(1, 8, 8))
    pruning = GradualMagnitudePruning(sparsity=0.5, granularity="channel", exclude=["net.3.weight"], start=0, end=0.5, frequency=5,
                                      verbose=False)
    trainer = make_trainer(tmp_path, [pruning], max_epochs=1)
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "channel.ckpt")
    out = tmp_path / "deployed.pt"
    cli_main(["deploy", str(tmp_path / "channel.ckpt"), str(out), "--input_shape", "1,8,8", "--memory-format", "channels_last"])
    assert "convolution weights in the channels-last memory format (memory_format='channels_last')" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="runs any code"):
        deployed = load_deployed(out, trusted=True)
    weights = conv_weights(deployed)  # a 1-channel input's weight is both layouts at once: the next one is not
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not weights[1].is_contiguous()
    x = data.splits["test"].tensors[0]
    with torch.inference_mode():
        torch.testing.assert_close(deployed(x), model.eval()(x), rtol=1e-4, atol=1e-4)
