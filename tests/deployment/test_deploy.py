"""``lightning_sparse.deploy`` on models pruned by GradualMagnitudePruning on sklearn's real digits."""

import re

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from support import digits_model, make_trainer, run_without_training_code
from lightning_sparse import GradualMagnitudePruning, deploy
from lightning_sparse.cli import main as cli_main
from lightning_sparse.core.structured import nm_counts
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.deployment import FoldedConv, SparseLinear, TransposedChain, chains, deploy_model, fallback, load_deployed, save_deployed

FAST = {"repeats": 3}  # timing runs per layer: enough to exercise the choice, not to decide it well


def _test_images(data: DigitsDataModule) -> torch.Tensor:
    return data.splits["test"].tensors[0]


def _train(model: pl.LightningModule, callback: GradualMagnitudePruning, data, tmp_path, epochs: int = 1) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [callback], max_epochs=epochs)
    trainer.fit(model, data)
    return trainer


def bn_cnn() -> nn.Sequential:
    """conv → BN → ReLU → conv → ReLU → pool → flatten → linear → ReLU → linear, for 8×8 digits."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def unstructured(data, tmp_path_factory):
    """LeNet-300-100 at 95% unstructured sparsity, and its checkpoint."""
    tmp = tmp_path_factory.mktemp("unstructured")
    model = digits_model()
    callback = GradualMagnitudePruning(sparsity=0.95, distribution="global", start=0, end=0.5, frequency=5, verbose=False)
    trainer = _train(model, callback, data, tmp)
    trainer.save_checkpoint(tmp / "sparse.ckpt")
    return model.eval(), tmp / "sparse.ckpt"


@pytest.fixture(scope="module")
def channel(data, tmp_path_factory):
    """A conv net with BatchNorm, half its output channels pruned in every layer but the last; the BatchNorm left
    dense (excluded), so its pruned channels carry constants that deploy folds."""
    model = digits_model()
    model.net = bn_cnn()
    callback = GradualMagnitudePruning(sparsity=0.5, granularity="channel", exclude=["net.9.weight", "net.1.*"], start=0, end=0.5,
                                       frequency=5, verbose=False)  # fmt: skip
    _train(model, callback, data, tmp_path_factory.mktemp("channel"))
    return model.eval()


@pytest.fixture(scope="module")
def nm(data, tmp_path_factory):
    model = digits_model()
    callback = GradualMagnitudePruning(granularity={"net.1.*": "2:4", "net.3.*": "2:4"}, sparsity=0.5, start=0, end=0.5,
                                       frequency=5, verbose=False)  # fmt: skip
    _train(model, callback, data, tmp_path_factory.mktemp("nm"))
    return model.eval()


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def assert_same_outputs(deployed: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    got, want = _outputs(deployed, x), _outputs(model, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), want.argmax(1))  # same predictions, so the same test accuracy


def test_unstructured_sparse_kernels_give_the_dense_outputs_on_the_test_set(unstructured, data):
    model, _ = unstructured
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = deploy_model(model, _test_images(data)[:64], kernel="sparse", **FAST)
    for name in ("net.1", "net.3", "net.5"):
        assert isinstance(result.model.get_submodule(name.replace(".", "_")), SparseLinear), name
        assert result.report.layer(name).deployed_as in ("csr", "bsr4", "bsr8", "bsr16", "bsr32")
    assert_same_outputs(result.model, model, _test_images(data))  # all 360 test digits, not only the example batch
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input model is untouched


def test_auto_choice_is_timed_per_layer_and_explained(unstructured, data):
    model, _ = unstructured
    report = deploy_model(model, _test_images(data)[:64], **FAST).report
    for name in ("net.1", "net.3", "net.5"):
        row = report.layer(name)
        assert row.dense_ms > 0 and row.sparse_ms > 0
        assert re.search(rf"(csr|bsr\d+) {row.sparse_ms:.4f} ms vs dense {row.dense_ms:.4f} ms", row.reason), row.reason
        # sparse where faster alone, unless the whole model was not faster with its sparse kernels (then it says so)
        kept = report.returned == "deployed"
        assert (row.deployed_as not in ("dense", "thinned")) == (row.sparse_ms < 0.95 * row.dense_ms and kept)
        if row.sparse_ms < 0.95 * row.dense_ms and not kept:
            assert "the whole model was not faster with the sparse kernels" in row.reason or report.returned == "input"
    assert report.forward_ms is not None and report.param_bytes[0] > 0 and report.peak_forward_bytes[0] > 0


def test_channel_pruning_is_thinned_with_the_right_inputs_and_equal_outputs(channel, data):
    result = deploy_model(channel, _test_images(data)[:64], **FAST)
    net, thin = channel.net, result.model
    kept = {i: ~(net[i].weight.reshape(net[i].weight.shape[0], -1) == 0).all(1) for i in (0, 3, 7)}
    assert [int(k.sum()) for k in kept.values()] == [4, 8, 16]
    assert thin.get_submodule("net_0").weight.shape == (4, 1, 3, 3)
    assert thin.get_submodule("net_1").num_features == 4
    torch.testing.assert_close(thin.get_submodule("net_1").running_mean, net[1].running_mean[kept[0]])
    # conv → BN → ReLU → zero-padded conv: the kept inputs are exactly the producer's kept channels, and the
    # removed (constant) channels come back through the border-aware FoldedConv
    folded = thin.get_submodule("net_3")
    assert isinstance(folded, FoldedConv)
    torch.testing.assert_close(folded.conv.weight, net[3].weight[kept[3]][:, kept[0]])
    # conv → ReLU → pool → flatten → linear: each kept channel's 4×4 block of inputs stays, in order
    columns = kept[3].repeat_interleave(16)
    torch.testing.assert_close(thin.get_submodule("net_7").weight, net[7].weight[kept[7]][:, columns])
    # linear → ReLU → linear
    torch.testing.assert_close(thin.get_submodule("net_9").weight, net[9].weight[:, kept[7]])
    assert_same_outputs(thin, channel, _test_images(data))
    report = result.report
    assert report.param_bytes[1] < report.param_bytes[0] and report.peak_forward_bytes[1] < report.peak_forward_bytes[0]
    assert "constant folded, zero padding included" in report.layer("net.0").reason
    assert report.layer("net.3").pattern == "channel (8/16 zero)" and report.layer("net.3").deployed_shape == (8, 4, 3, 3)


def test_nm_pattern_is_exact_kept_dense_on_cpu_and_explained(nm, data):
    for layer, groups in ((nm.net[1], 16), (nm.net[3], 75)):
        assert torch.equal(nm_counts(layer.weight, 4), torch.full((layer.out_features, groups), 2))
    result = deploy_model(nm, _test_images(data)[:64], **FAST)
    row = result.report.layer("net.1")
    assert row.pattern == "2:4"
    assert "2:4 pattern, semi-structured (N:M) kernels need a CUDA GPU; the device is cpu: kept dense" in row.reason
    assert_same_outputs(result.model, nm, _test_images(data))


def test_deployed_model_loads_in_a_process_without_the_training_code(unstructured, channel, data, tmp_path):
    x = _test_images(data)
    paths = []
    for name, model, kernel in (("csr", unstructured[0], "sparse"), ("thinned", channel, "auto")):
        deployed = deploy_model(model, x[:64], kernel=kernel, **FAST).model
        paths.append(save_deployed(deployed, tmp_path / f"{name}.pt"))
        torch.save({"x": x, "y": _outputs(model, x)}, tmp_path / f"{name}.io")
    stdout = run_without_training_code(f"""
        for name in ("csr", "thinned"):
            model = torch.load(r"{tmp_path}/" + name + ".pt", weights_only=False)
            io = torch.load(r"{tmp_path}/" + name + ".io")
            with torch.inference_mode():
                torch.testing.assert_close(model(io["x"]), io["y"], rtol=1e-4, atol=1e-4)
        print("loaded", sorted(m for m in sys.modules if m.startswith("lightning_sparse.deployment.")))
    """)  # fmt: skip
    assert "lightning_sparse.deployment.modules" in stdout
    with pytest.warns(UserWarning, match="runs any code"):  # a pickled module: trusted, as this test wrote it
        assert isinstance(load_deployed(paths[0], trusted=True).get_submodule("net_1"), SparseLinear)
    with pytest.raises(ValueError, match="unpickling it can run any code"):
        load_deployed(paths[0])


def test_model_without_sparsity_is_returned_unchanged_and_says_so(digits_model, data, capsys):
    model = digits_model()
    assert deploy(model, _test_images(data)[:8]) is model
    assert "no Linear/Conv weight has a zero" in capsys.readouterr().out


def test_wrong_input_shape_names_the_first_layer_that_rejects_it(unstructured):
    with pytest.raises(ValueError, match=r"`example_input` of shape \[4, 1, 9, 9\] is rejected by layer 'net.1' \(Linear\(in_features=64"):
        deploy_model(unstructured[0], torch.randn(4, 1, 9, 9))


def test_bad_kernel_choice_names_the_argument(unstructured, data):
    with pytest.raises(ValueError, match=r"`kernel` must be one of \('auto', 'sparse', 'dense'\), got 'fast'"):
        deploy_model(unstructured[0], _test_images(data)[:8], kernel="fast")


class Residual(nn.Module):
    """A skip connection around fc1 (channels meet another tensor) and a channel-pruned output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc2(torch.relu(self.fc1(x)) + x)


def test_patterns_thinning_does_not_understand_stay_dense_and_are_named(digits_model, data, tmp_path):
    model = digits_model()
    model.net = Residual()
    callback = GradualMagnitudePruning(sparsity=0.3, granularity="channel", start=0, end=0.5, frequency=5, verbose=False)
    _train(model.train(), callback, data, tmp_path)
    model.eval()
    assert int((model.net.fc1.weight == 0).all(1).sum()) == 19 and int((model.net.fc2.weight == 0).all(1).sum()) == 3
    result = deploy_model(model, _test_images(data)[:64], kernel="dense", **FAST)
    assert "zero channels kept: its channels meet another tensor at add" in result.report.layer("net.fc1").reason
    assert "zero channels kept: its channels reach the model's output" in result.report.layer("net.fc2").reason
    assert result.model.get_submodule("net_fc1").weight.shape == (64, 64)
    assert_same_outputs(result.model, model, _test_images(data))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if bool(x.abs().sum() > 0) else torch.zeros(x.shape[0], 10)


def test_untraceable_model_still_gets_sparse_kernels_and_says_what_it_could_not_do(unstructured, data):
    model = Branchy(unstructured[0].net).eval()
    result = deploy_model(model, _test_images(data)[:64], kernel="sparse", **FAST)
    assert any("torch.fx could not trace Branchy" in note for note in result.report.notes)
    assert isinstance(result.model.net[1], SparseLinear)
    assert_same_outputs(result.model, model, _test_images(data))


def test_cli_deploy_rebuilds_the_checkpoint_and_saves_a_loadable_model(unstructured, data, tmp_path, capsys):
    model, checkpoint = unstructured
    out = tmp_path / "deployed.pt"
    cli_main(["deploy", str(checkpoint), str(out), "--data", "lightning_sparse.data.DigitsDataModule", "--batch-size", "32"])
    printed = capsys.readouterr().out
    assert "Deploy on cpu: per layer" in printed and "parameter bytes:" in printed and f"Saved {out}" in printed
    assert_same_outputs(load_deployed(out, trusted=True), model, _test_images(data))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.ckpt", "out.pt"], "checkpoint missing.ckpt does not exist"),
        (["CKPT", "out.pt", "--model", "lightning_sparse.models.Nothing"], "--model 'lightning_sparse.models.Nothing' cannot be imported"),
        (["CKPT", "out.pt", "--input_shape", "1,a,8"], "--input_shape must be positive sizes of one sample"),
    ],
)
def test_cli_deploy_refusals_name_the_option(unstructured, tmp_path, capsys, args, message):
    args = [str(unstructured[1]) if a == "CKPT" else a for a in args]
    with pytest.raises(SystemExit):
        cli_main(["deploy", *args])
    assert message in capsys.readouterr().err


def test_chain_finder_takes_linear_elementwise_linear_and_stops_at_other_modules(data):
    """Flatten → Linear → ReLU → Dropout → Linear is one chain (the flatten included); PReLU (a weight per channel)
    is not elementwise, so the last Linear stays out; the chain's outputs equal the layers' on real digits."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 16), nn.PReLU(), nn.Linear(16, 10))
    with torch.no_grad():
        net[1].weight[torch.rand(32, 64) < 0.9] = 0
        net[1].weight[:, :5] = 0  # five input pixels no weight reads
    gm = torch.fx.symbolic_trace(net.eval())
    paths = chains.find_chains(gm)
    assert [[str(n.target) for n in path] for path in paths] == [["0", "1", "2", "3", "4"]]
    x = _test_images(data)
    want = _outputs(net, x)
    result = chains.build(gm, paths[0], x, "auto", repeats=3)
    assert isinstance(result.module, TransposedChain) and result.module.start_dim == 1 and result.names == ["1", "4"]
    read = (net[1].weight != 0).any(0).nonzero().flatten().tolist()  # the 5 pixels above and any column zero by chance
    assert read[0] >= 5 and (result.module.keep is None or result.module.keep.tolist() == read)
    chains.replace(gm, paths[0], result.module)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "call_module", "output"]
    assert_same_outputs(gm, net, x)
    torch.testing.assert_close(_outputs(gm, x), want, rtol=1e-4, atol=1e-4)


def test_transposed_chain_is_used_reported_and_exact_on_the_test_set(unstructured, data, tmp_path, monkeypatch):
    """Whether the chain is used is decided by timing; a margin that accepts any time makes it deterministic here,
    and so does a whole-model choice that keeps the deployed model (its rule is tested on its own in test_fallback)."""
    monkeypatch.setattr(chains, "MARGIN", float("inf"))
    monkeypatch.setattr(fallback, "decide", lambda samples, kernel: fallback.Decision("deployed", "kept by the test"))
    model, _ = unstructured
    result = deploy_model(model, _test_images(data)[:64], **FAST)
    chain = result.model.get_submodule("chain_net_1_net_3_net_5")
    assert isinstance(chain, TransposedChain) and chain.names == ["net.1", "net.3", "net.5"]
    assert [n.op for n in result.model.graph.nodes] == ["placeholder", "call_module", "output"]  # the flatten inside too
    assert len(result.report.chains) == 1 and result.report.chains[0].startswith("transposed chain net.1 → net.3 → net.5: ")
    assert ", used; input: " in result.report.chains[0]
    for name, form in zip(chain.names, chain.forms):
        row = result.report.layer(name)
        assert "in net.1 → net.3 → net.5, run on transposed activations" in row.reason, row.reason
        assert form in ("dense", "csr", "bsr4", "bsr8", "bsr16", "bsr32")
        assert row.deployed_as == form if form != "dense" else row.deployed_as in ("dense", "thinned")
    assert_same_outputs(result.model, model, _test_images(data))  # all 360 test digits
    save_deployed(result.model, tmp_path / "chain.pt")
    assert_same_outputs(load_deployed(tmp_path / "chain.pt", trusted=True), model, _test_images(data))
    with torch.no_grad():  # plain tensors: the deployed chain also runs outside inference mode
        torch.testing.assert_close(result.model(_test_images(data)), _outputs(model, _test_images(data)), rtol=1e-4, atol=1e-4)
