"""Coupled channel groups (residual streams, concats, depthwise convs): found from a trace, pruned together by
GradualMagnitudePruning(granularity="channel") on real digits, removed by deploy with the pruned model's outputs."""


import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from support import StopAfterEpoch, digits_model, make_trainer, run_without_training_code
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.core.groups import GroupError, find_groups
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.deployment import deploy_model, save_deployed
from lightning_sparse.models import Classifier

FAST = {"repeats": 3}


def _images(data: DigitsDataModule) -> torch.Tensor:
    return data.splits["test"].tensors[0]


def _train(model: pl.LightningModule, callback: GradualMagnitudePruning, data, tmp_path, epochs: int = 1) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    make_trainer(tmp_path, [callback], max_epochs=epochs).fit(model, data)
    return model.eval()


def _gmp(**kwargs) -> GradualMagnitudePruning:
    options = dict(sparsity=0.5, granularity="channel", start=0, end=0.5, frequency=5, verbose=False)
    options.update(kwargs)
    return GradualMagnitudePruning(**options)


def _zero_channels(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.detach().reshape(tensor.shape[0], -1) == 0).all(1)


def _assert_same(deployed: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        got, want = deployed(x), model(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), float((got - want).abs().max())
    assert torch.equal(got.argmax(1), want.argmax(1))


class Concat(nn.Module):
    """Two conv branches (4 and 8 channels) concatenated into one 3×3 conv, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mix = nn.Conv2d(12, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.mix(torch.cat([self.a(x), self.b(x)], dim=1))))


class Depthwise(nn.Module):
    """A MobileNet block: 1×1 expand → BN → ReLU → depthwise 3×3 → BN → ReLU → 1×1 project, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(1, 16, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn2 = nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn2(self.dw(torch.relu(self.bn1(self.expand(x))))))
        return self.head(torch.relu(self.project(h)).flatten(1))


class Broadcast(nn.Module):
    """A 1-channel conv added to an 8-channel one: broadcasting, so the 'group' has members of two sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Conv2d(1, 1, 3, padding=1)
        self.body = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.gate(x) + self.body(x)).flatten(1))


class Transposed(nn.Module):
    """A conv whose output is transposed before the head: its channel coupling is not proved."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.conv(x).transpose(1, 2).flatten(1))))


def _module(net: nn.Module, **kwargs) -> Classifier:
    model = digits_model(**kwargs)
    model.net = net
    return model


# --- groups found ------------------------------------------------------------------------------------------------


def test_resnet_residual_stream_is_one_group_with_its_norms_and_readers():
    plan = find_groups(Classifier(arch="resnet8", input_shape=(1, 8, 8)), torch.zeros(2, 1, 8, 8))
    stream = plan.group_of("net.stem.0.weight")
    assert stream.channels == 16 and stream.prunable and stream.removable
    assert sorted(stream.members) == sorted([
        "net.stem.0.weight", "net.stem.1.weight", "net.stem.1.bias",
        "net.layers.0.conv2.weight", "net.layers.0.bn2.weight", "net.layers.0.bn2.bias",
    ])  # fmt: skip
    assert sorted(stream.consumers) == ["net.layers.0.conv1", "net.layers.1.conv1", "net.layers.1.shortcut.0"]
    downsampled = plan.group_of("net.layers.1.shortcut.0.weight")  # the 1×1 shortcut writes into stage 2's stream
    assert downsampled is plan.group_of("net.layers.1.conv2.weight") and downsampled.channels == 32
    inner = plan.group_of("net.layers.0.conv1.weight")
    assert sorted(inner.members) == ["net.layers.0.bn1.bias", "net.layers.0.bn1.weight", "net.layers.0.conv1.weight"]
    head = plan.group_of("net.fc.weight")
    assert head.prunable and not head.removable and "reach the model's output" in head.reason
    assert len(plan.groups) == 7


def test_concat_parts_are_separate_groups_read_at_their_offsets():
    plan = find_groups(Concat(), torch.zeros(2, 1, 8, 8))
    a, b = plan.group_of("a.0.weight"), plan.group_of("b.0.weight")
    assert a is not b and (a.channels, b.channels) == (4, 8)
    assert a.consumers["mix"].tolist() == [0, 1, 2, 3] + [-1] * 8
    assert b.consumers["mix"].tolist() == [-1] * 4 + list(range(8))


def test_depthwise_conv_shares_the_channels_of_its_input():
    group = find_groups(Depthwise(), torch.zeros(2, 1, 8, 8)).group_of("expand.weight")
    assert sorted(group.members) == sorted(["expand.weight", "bn1.weight", "bn1.bias", "dw.weight", "dw.bias", "bn2.weight", "bn2.bias"])
    assert list(group.consumers) == ["project"]


def test_flatten_into_a_linear_reads_each_channel_as_a_block_of_columns():
    group = find_groups(Depthwise(), torch.zeros(2, 1, 8, 8)).group_of("project.weight")
    assert group.consumers["head"].tolist() == torch.arange(8).repeat_interleave(64).tolist()


# --- pruned together, exactly ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet(data, tmp_path_factory):
    model = digits_model("resnet8")
    callback = _gmp(exclude=["net.fc.weight"])
    return _train(model, callback, data, tmp_path_factory.mktemp("resnet"), epochs=2), callback


def test_every_member_of_a_group_loses_the_same_channels(resnet):
    model, callback = resnet
    params = dict(model.named_parameters())
    for group, _ in callback.pruner.groups.selected:
        zero = None
        for name, (member, slots) in group.members.items():
            slot_zero = torch.zeros(group.channels, dtype=torch.bool)
            slot_zero[slots[_zero_channels(params[name]) if params[name].dim() > 1 else params[name].detach() == 0]] = True
            zero = slot_zero if zero is None else zero
            assert torch.equal(slot_zero, zero), name  # the same slots, in weights, biases and BatchNorm alike
        assert int(zero.sum()) == group.channels // 2  # exactly the target
        for name in group.weights:
            kept = params[name].detach().reshape(params[name].shape[0], -1)[~_zero_channels(params[name])]
            assert bool((kept != 0).any(1).all()), name  # nothing else pruned inside the kept channels
    assert not bool((model.net.fc.weight == 0).any())  # excluded: dense


def test_group_pruned_checkpoint_keeps_dense_keys(resnet, tmp_path):
    model, _ = resnet
    plain = Classifier(arch="resnet8", input_shape=(1, 8, 8))
    assert set(model.state_dict()) == set(plain.state_dict())


def _resumable(tmp_path, stop_epoch=None, ckpt=None):
    pl.seed_everything(3, verbose=False)
    model = digits_model("resnet8", optimizer="adam", lr=1e-3)
    callback = _gmp(sparsity=0.5, start=0.1, end=0.8, frequency=4, exclude=["net.fc.weight"])
    extra = [StopAfterEpoch(stop_epoch, tmp_path / "cut.ckpt")] if stop_epoch is not None else []
    trainer = make_trainer(tmp_path, [callback, *extra], max_epochs=2, limit_train_batches=10)
    trainer.fit(model, DigitsDataModule(batch_size=64), ckpt_path=ckpt)
    return model, callback


def test_interrupted_and_resumed_group_pruning_is_bit_identical(tmp_path):
    full, full_cb = _resumable(tmp_path / "full")
    _, cut_cb = _resumable(tmp_path / "cut", stop_epoch=0)
    assert 0 < cut_cb.masks.sparsity() < 0.5  # interrupted mid-ramp
    resumed, resumed_cb = _resumable(tmp_path / "resumed", ckpt=tmp_path / "cut" / "cut.ckpt")
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed_cb.masks.checksum() == full_cb.masks.checksum()
    assert "net.stem.1.bias" in resumed_cb.masks  # BatchNorm entries are masked (and checkpointed) with the weights


# --- removed by deploy ---------------------------------------------------------------------------------------------


def test_resnet_residual_streams_are_thinned_with_equal_outputs(resnet, data):
    model, _ = resnet
    result = deploy_model(model, _images(data)[:64], kernel="dense", **FAST)
    thin = result.model
    assert thin.get_submodule("net_stem_0").weight.shape == (8, 1, 3, 3)
    assert thin.get_submodule("net_layers_0_conv2").weight.shape == (8, 8, 3, 3)  # writes into the 8-channel stream
    assert thin.get_submodule("net_layers_1_shortcut_0").weight.shape == (16, 8, 1, 1)
    assert thin.get_submodule("net_layers_2_conv2").weight.shape == (32, 32, 3, 3)
    assert thin.get_submodule("net_layers_2_shortcut_1").num_features == 32
    assert thin.get_submodule("net_fc").weight.shape == (10, 32)
    _assert_same(thin, model, _images(data))  # all 360 test digits
    stream = next(line for line in result.report.groups if line.startswith("group 0:"))
    assert "members net.stem.0.weight (weight), net.stem.1.weight (norm)" in stream and "8 of 16 channels removed" in stream
    assert "read by net.layers.0.conv1, net.layers.1.conv1, net.layers.1.shortcut.0" in stream
    assert result.report.layer("net.layers.1.shortcut.0").deployed_as == "thinned"


@pytest.mark.parametrize(
    ("sparsity", "channels", "multiple", "pruned"),
    [(0.3, 16, 1, 5), (0.3, 16, 8, 8), (0.3, 16, 16, 0), (0.3, 64, 16, 16), (0.3, 45, 8, 13), (0.05, 64, 16, 0),
     (0.9, 64, 16, 48), (0.3, 6, 8, 0)],
)  # fmt: skip
def test_channel_multiple_rounds_the_kept_channels_to_a_multiple(sparsity, channels, multiple, pruned):
    from lightning_sparse.core.structured import channels_to_prune

    # 16 at 0.3: 11 kept -> 8 (multiple 8) or 16 (multiple 16, nothing pruned); 64: 45 -> 48; 45: 31 -> 32
    assert channels_to_prune("layer", sparsity, channels, multiple) == pruned


def test_resnet_pruned_with_a_channel_multiple_deploys_at_widths_of_that_multiple(digits_model, data, tmp_path):
    model = digits_model("resnet8")
    callback = _gmp(sparsity=0.3, channel_multiple=8, exclude=["net.fc.weight"])
    model = _train(model, callback, data, tmp_path, epochs=2)
    widths = {}
    for group, _ in callback.pruner.groups.selected:
        name = group.weights[0]
        kept = int((~_zero_channels(dict(model.named_parameters())[name])).sum())
        widths[name] = kept
    # 16-channel groups keep 8 (11 rounded), 32 keep 24 (22.4), 64 keep 48 (44.8): multiples of 8, not round(0.7 x C)
    assert sorted(set(widths.values())) == [8, 24, 48], widths
    thin = deploy_model(model, _images(data)[:64], kernel="dense", **FAST).model
    convs = [m for m in thin.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.out_channels % 8 == 0 for m in convs), [m.out_channels for m in convs]
    _assert_same(thin, model, _images(data))


def test_channel_multiple_on_a_users_sequential_convnet(digits_model, data, tmp_path):
    """A convnet written inline, as users write one (no library model): widths 12 and 20 at 0.4 keep 7 and 12
    channels, rounded to 8 and 12 with ``channel_multiple=4``; deploy cuts them and gives the same outputs."""
    net = nn.Sequential(
        nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 20, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(80, 10),
    )  # fmt: skip
    model = digits_model()
    model.net = net
    model = _train(model, _gmp(sparsity=0.4, channel_multiple=4, exclude=["net.6.weight"]), data, tmp_path, epochs=2)
    kept = [int((~_zero_channels(model.net[i].weight)).sum()) for i in (0, 2)]
    assert kept == [8, 12]  # round(0.6 x 12) = 7 -> 8; round(0.6 x 20) = 12 stays
    thin = deploy_model(model, _images(data)[:64], kernel="dense", **FAST).model
    assert sorted(m.out_channels for m in thin.modules() if isinstance(m, nn.Conv2d)) == [8, 12]
    _assert_same(thin, model, _images(data))


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "16"])
def test_channel_multiple_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=r"`channel_multiple` must be an int >= 1 \(1: no rounding\), got"):
        _gmp(channel_multiple=bad)


def test_concat_groups_are_thinned_with_equal_outputs(data, tmp_path):
    model = _train(_module(Concat()), _gmp(exclude=["net.head.3.weight"]), data, tmp_path)
    result = deploy_model(model, _images(data)[:64], kernel="dense", **FAST)
    assert result.model.get_submodule("net_a_0").weight.shape[0] == 2
    assert result.model.get_submodule("net_b_0").weight.shape[0] == 4
    assert result.model.get_submodule("net_mix").weight.shape == (8, 6, 3, 3)  # 2 + 4 inputs read at their offsets
    _assert_same(result.model, model, _images(data))


def test_depthwise_group_is_thinned_with_equal_outputs(data, tmp_path):
    model = _train(_module(Depthwise()), _gmp(exclude=["net.head.weight"]), data, tmp_path)
    assert torch.equal(_zero_channels(model.net.expand.weight), _zero_channels(model.net.dw.weight))
    result = deploy_model(model, _images(data)[:64], kernel="dense", **FAST)
    dw = result.model.get_submodule("net_dw")
    assert dw.weight.shape == (8, 1, 3, 3) and dw.groups == 8
    assert result.model.get_submodule("net_project").weight.shape == (4, 8, 1, 1)
    assert result.model.get_submodule("net_head").weight.shape == (10, 4 * 64)
    _assert_same(result.model, model, _images(data))


def test_thinned_resnet_loads_in_a_process_without_the_training_code(resnet, data, tmp_path):
    model, _ = resnet
    x = _images(data)
    save_deployed(deploy_model(model, x[:64], **FAST).model, tmp_path / "resnet.pt")
    with torch.inference_mode():
        torch.save({"x": x, "y": model(x)}, tmp_path / "resnet.io")
    stdout = run_without_training_code(f"""
        model = torch.load(r"{tmp_path}/resnet.pt", weights_only=False)
        io = torch.load(r"{tmp_path}/resnet.io")
        with torch.inference_mode():
            torch.testing.assert_close(model(io["x"]), io["y"], rtol=1e-4, atol=1e-5)
        print("stem", tuple(model.net_stem_0.weight.shape))
    """)  # fmt: skip
    assert "stem (8, 1, 3, 3)" in stdout


# --- what is not proved, and bad input -----------------------------------------------------------------------------


def test_layer_whose_coupling_is_not_proved_stays_dense_and_says_why(data, tmp_path, capsys):
    model = _module(Transposed())
    with pytest.warns(UserWarning, match=r"net.conv.weight: its channels reach flatten in net \(Transposed\): a reshape from \[2, 8, 8, 8\] to \[2, 512\] that moves the channels"):
        _train(model, _gmp(verbose=True, exclude=["net.fc2.weight"]), data, tmp_path)
    assert not bool((model.net.conv.weight == 0).any())  # unproved: left dense
    assert int(_zero_channels(model.net.fc1.weight).sum()) == 16  # its own group: pruned
    assert "net.conv.weight: left dense, its channel coupling is not proved" in capsys.readouterr().out


def test_members_that_disagree_in_size_are_refused_before_training(make_trainer, data, tmp_path):
    model = _module(Broadcast())
    before = model.net.body.weight.detach().clone()
    with pytest.raises(GroupError, match=r"layers \['net.body', 'net.gate'\] meet at add .* channels that disagree in size"):
        make_trainer(tmp_path, [_gmp()]).fit(model, data)
    assert torch.equal(model.net.body.weight, before)


def test_one_group_given_two_sparsities_is_refused_before_training(digits_model, make_trainer, data, tmp_path):
    model = digits_model("resnet8")
    callback = _gmp(sparsity={"net.stem.*": 0.5, "net.layers.0.conv2.*": 0.25, "net.layers.0.conv1.*": 0.5})
    with pytest.raises(ValueError, match=r"coupled channel group 0 \(net.stem.0.weight, net.layers.0.conv2.weight\).*"
                                         r"net.stem.0.weight: 0.5, net.layers.0.conv2.weight: 0.25"):  # fmt: skip
        make_trainer(tmp_path, [callback]).fit(model, data)


def test_group_sparsity_that_removes_every_channel_is_refused(digits_model, make_trainer, data, tmp_path):
    with pytest.raises(ValueError, match=r"would remove every one of the 16 output channels of 'net.stem.0.weight'"):
        make_trainer(tmp_path, [_gmp(sparsity={"net.stem.*": 0.99, "net.layers.0.conv2.*": 0.99})]).fit(digits_model("resnet8"), data)


class Untraceable(nn.Module):
    """Data-dependent control flow (fx cannot trace it) around an nn.Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > float("-inf"):
            x = self.features(x)
        return self.head(x.flatten(1))


def test_untraceable_model_is_followed_through_its_branch_by_a_real_forward():
    plan = find_groups(Untraceable(), torch.zeros(2, 1, 8, 8))  # torch.fx cannot trace it; the real forward takes the branch
    assert plan.traced and not plan.note
    inside = plan.group_of("features.0.weight")
    assert inside.prunable and sorted(inside.members) == ["features.0.bias", "features.0.weight", "features.1.bias", "features.1.weight"]
    assert list(inside.consumers) == ["features.3"]
    leaving = plan.group_of("features.3.weight")  # what leaves the Sequential is followed into the head (8×8 columns each)
    assert leaving.prunable and leaving.removable and list(leaving.consumers) == ["head"]
    assert leaving.consumers["head"].tolist() == torch.arange(8).repeat_interleave(64).tolist()
    head = plan.group_of("head.weight")
    assert head.prunable and not head.removable and "reach the model's output" in head.reason


def test_a_forward_that_fails_on_the_example_input_proves_nothing_and_says_why():
    plan = find_groups(Untraceable(), torch.zeros(2, 3, 8, 8))  # 3 channels into a 1-channel conv
    assert not plan.traced and not plan.groups
    assert "the example forward of Untraceable failed (RuntimeError" in plan.note


def test_groups_prune_from_a_plain_pytorch_loop(data):
    from lightning_sparse.core.groups import GroupedChannels
    from lightning_sparse.core.masks import MaskSet
    from lightning_sparse.core.targets import select_targets

    torch.manual_seed(0)
    net = Classifier(arch="resnet8", input_shape=(1, 8, 8)).net
    x, y = data.splits["train"].tensors
    targets = select_targets(net, exclude=["fc.weight"])
    grouped = GroupedChannels(find_groups(net, x[:2]), targets, list(targets), dict(net.named_parameters()))
    masks = MaskSet({**targets, **grouped.companions})
    grouped.prune(masks, 0.25)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for i in range(0, 640, 64):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x[i : i + 64]), y[i : i + 64]).backward()
        masks.mask_grads_()
        optimizer.step()
    stream = _zero_channels(net.stem[0].weight)
    assert int(stream.sum()) == 4  # round(0.25 × 16)
    for tensor in (net.layers[0].conv2.weight, net.stem[1].weight, net.stem[1].bias, net.layers[0].bn2.bias):
        assert torch.equal(_zero_channels(tensor) if tensor.dim() > 1 else tensor.detach() == 0, stream)
