"""Hugging Face convnets (tiny configs, none of which traces with torch.fx): coupled channel groups found from one
real forward, pruned by GradualMagnitudePruning(granularity="channel") on real digits, removed by deploy with the
masked model's outputs; what cannot be proved stays dense with the reason."""

import pytest
import torch
from torch import nn

from benchmarks.resnet import macs
from support import make_trainer
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.core.groups import find_groups
from lightning_sparse.deployment import deploy_model
from lightning_sparse.models import Classifier

transformers = pytest.importorskip("transformers")


class Logits(nn.Module):
    """The model's logits on the pixel values (upsampled to ``size``: EfficientNet's valid-padded strides need 32×32)."""

    def __init__(self, model: nn.Module, size: int = 8) -> None:
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            x = nn.functional.interpolate(x, size=self.size)
        return self.model(pixel_values=x).logits


def _hf(kind: str) -> nn.Module:
    t = transformers
    torch.manual_seed(0)
    if kind == "resnet":
        return t.ResNetForImageClassification(t.ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10))
    if kind == "convnext":
        return t.ConvNextForImageClassification(t.ConvNextConfig(num_channels=1, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], patch_size=2, num_labels=10))
    if kind == "regnet":
        return t.RegNetForImageClassification(t.RegNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=4, layer_type="y", num_labels=10))
    if kind == "mobilenet_v2":
        return t.MobileNetV2ForImageClassification(t.MobileNetV2Config(num_channels=1, image_size=8, depth_multiplier=0.25, num_labels=10))
    return t.EfficientNetForImageClassification(t.EfficientNetConfig(num_channels=1, image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=10))


def _module(kind: str) -> Classifier:
    model = Classifier(arch="lenet300", input_shape=(1, 8, 8))
    model.net = Logits(_hf(kind), 32 if kind == "efficientnet" else 8)
    return model


#: Per model: the channel-pruned weights that stay dense, each with a phrase of its reason (naming layer and op).
DENSE = {
    "resnet": {},
    "regnet": {},
    "mobilenet_v2": {},
    "efficientnet": {},
    "convnext": {  # the residual stream is normalized over its channels by LayerNorm; each block's MLP is pruned
        "net.model.convnext.embeddings.patch_embeddings.weight": "LayerNorm net.model.convnext.embeddings.layernorm normalizes over the channels",
        "net.model.convnext.encoder.stages.0.layers.0.dwconv.weight": "LayerNorm net.model.convnext.embeddings.layernorm normalizes over the channels",
        "net.model.convnext.encoder.stages.0.layers.0.pwconv2.weight": "LayerNorm net.model.convnext.embeddings.layernorm normalizes over the channels",
        "net.model.convnext.encoder.stages.1.downsampling_layer.1.weight": "LayerNorm net.model.convnext.encoder.stages.1.layers.0.layernorm normalizes over the channels",
        "net.model.convnext.encoder.stages.1.layers.0.dwconv.weight": "LayerNorm net.model.convnext.encoder.stages.1.layers.0.layernorm normalizes over the channels",
        "net.model.convnext.encoder.stages.1.layers.0.pwconv2.weight": "LayerNorm net.model.convnext.encoder.stages.1.layers.0.layernorm normalizes over the channels",
    },
}


@pytest.mark.parametrize("kind", list(DENSE))
def test_hf_convnet_channel_groups_pruned_in_training_and_removed_by_deploy(kind, data, tmp_path):
    model = _module(kind)
    callback = GradualMagnitudePruning(sparsity=0.5, granularity="channel", exclude=["net.model.classifier*"], start=0, end=2,
                                       frequency=1, verbose=False)  # fmt: skip
    torch.manual_seed(0)
    make_trainer(tmp_path, [callback], max_steps=4, limit_val_batches=0).fit(model, data)
    model.eval()
    unpruned = callback.pruner.groups.unpruned
    assert set(unpruned) == set(DENSE[kind])
    for name, phrase in DENSE[kind].items():
        assert phrase in unpruned[name], unpruned[name]
    pruned = [name for group, names in callback.pruner.groups.selected for name in names]
    assert pruned and all(bool((callback.masks.mask(name).reshape(callback.masks.mask(name).shape[0], -1).any(1)).float().mean() <= 0.5) for name in pruned)

    x = data.splits["test"].tensors[0]
    result = deploy_model(model, x[:64], kernel="dense", repeats=1, memory_format="channels_last")  # the layout HF code must take
    with torch.inference_mode():
        want, got = model(x), result.model(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())
    convs = [m.weight for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert result.report.memory_format == "channels_last" and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    before, after = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in result.model.parameters())
    assert after < before
    assert macs(result.model, x[:64]) < 0.8 * macs(model, x[:64])
    assert any("removed" in line for line in result.report.groups)


def test_squeeze_excitation_gate_and_grouped_conv_are_members_of_the_channels_they_scale():
    regnet = find_groups(_hf("regnet"), torch.zeros(2, 1, 8, 8))
    layer = "regnet.encoder.stages.0.layers.0.layer"
    inner = regnet.group_of(f"{layer}.0.convolution.weight")  # 1×1 conv → grouped 3×3 (groups of 4) → SE gate → 1×1
    assert inner.channels == 4 and inner.prunable and inner.removable  # a slot is a whole conv group of 4 channels
    assert inner.members[f"{layer}.1.convolution.weight"][0].role == "grouped"
    assert f"{layer}.2.attention.2.weight" in inner.members  # the SE expand conv scales these channels: one slot
    assert sorted(inner.consumers) == [f"{layer}.2.attention.0", f"{layer}.3.convolution"]
    effnet = find_groups(_hf("efficientnet"), torch.zeros(2, 1, 32, 32))
    expanded = effnet.group_of("efficientnet.encoder.blocks.1.expansion.expand_conv.weight")
    assert {"efficientnet.encoder.blocks.1.depthwise_conv.depthwise_conv.weight", "efficientnet.encoder.blocks.1.squeeze_excite.expand.weight"} <= set(expanded.members)
    assert expanded.removable


def test_convnext_layer_scale_is_a_member_of_the_stream_and_its_mlp_is_a_removable_group():
    plan = find_groups(_hf("convnext"), torch.zeros(2, 1, 8, 8))
    block = "convnext.encoder.stages.1.layers.0"
    stream = plan.group_of(f"{block}.layer_scale_parameter")
    assert stream.members[f"{block}.layer_scale_parameter"][0].role == "scale" and f"{block}.pwconv2.weight" in stream.members
    assert not stream.prunable and "normalizes over the channels" in stream.reason
    hidden = plan.group_of(f"{block}.pwconv1.weight")
    assert hidden.prunable and hidden.removable and list(hidden.consumers) == [f"{block}.pwconv2"]


class SlicedChannels(nn.Module):
    """A conv whose first 4 channels are sliced off (an indexing the analysis does not follow)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x)[:, :4].flatten(1))


def test_channel_on_a_layer_feeding_something_unprovable_states_the_reason_naming_the_layer(data, tmp_path):
    model = Classifier(arch="lenet300", input_shape=(1, 8, 8))
    model.net = SlicedChannels()
    callback = GradualMagnitudePruning(sparsity=0.5, granularity="channel", exclude=["net.head.*"], start=0, end=2, frequency=1, verbose=False)
    with pytest.warns(UserWarning, match=r"net.conv.weight: its channels reach getitem in net \(SlicedChannels\)"):
        make_trainer(tmp_path, [callback], max_steps=2, limit_val_batches=0).fit(model, data)
    assert not bool((model.net.conv.weight == 0).any())


def test_channel_multiple_keeps_every_deployed_hf_resnet_width_a_multiple(data, tmp_path):
    model = _module("resnet")
    callback = GradualMagnitudePruning(sparsity=0.4, granularity="channel", channel_multiple=8, exclude=["net.model.classifier*"],
                                       start=0, end=2, frequency=1, verbose=False)  # fmt: skip
    make_trainer(tmp_path, [callback], max_steps=3, limit_val_batches=0).fit(model, data)
    x = data.splits["test"].tensors[0]
    result = deploy_model(model.eval(), x[:64], kernel="dense", repeats=1)
    widths = [m.out_channels for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [8, 8, 8, 16, 16, 16]  # 16-16-16-32-32-32 at 0.4, rounded to multiples of 8
    with torch.inference_mode():
        assert torch.allclose(result.model(x), model(x), atol=1e-5, rtol=1e-4)
