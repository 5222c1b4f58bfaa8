"""Deploy never breaks a model that runs: autograd on, modules that cannot take a sparse weight, and a returned model
never measurably slower than its input (the rule tested as a function of times; end-to-end runs assert invariants)."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from support import digits_model, make_trainer
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.deployment import SparseLinear, TransposedChain, deploy_model, fallback, kernels
from lightning_sparse.deployment.fallback import Decision, decide, settled
from lightning_sparse.deployment.kernels import MIN_ROUNDS, timings, verdict

FAST = {"repeats": 3}


def _images(data) -> torch.Tensor:
    return data.splits["test"].tensors[0]


def _train(net: nn.Module, sparsity: float, data, tmp_path, epochs: int = 1) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    model = digits_model()
    model.net = net
    callback = GradualMagnitudePruning(sparsity=sparsity, distribution="uniform", start=0, end=0.5, frequency=5, verbose=False)
    make_trainer(tmp_path, [callback], max_epochs=epochs).fit(model, data)
    return model.eval()


@pytest.fixture(scope="module")
def lenet(data, tmp_path_factory):
    """LeNet-300-100 at 95% sparsity in every layer."""
    return _train(digits_model().net, 0.95, data, tmp_path_factory.mktemp("lenet"))


def _input_gradient(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    out = model(x)  # autograd on: no no_grad, no inference_mode
    (out.log_softmax(-1)[:, 0]).sum().backward()
    return out.detach(), x.grad


def _inference_tensors(model: nn.Module) -> list[str]:
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_inference()]


# --- autograd on ----------------------------------------------------------------------------------------------


def test_sparse_layers_run_with_autograd_on_and_give_the_input_gradients(lenet, data):
    """The failure of issue 27: a CSR layer built under inference mode raised "Inference tensors cannot be saved for
    backward" at the first call outside torch.no_grad()."""
    x = _images(data)[:64]
    deployed = deploy_model(lenet, x, kernel="sparse", **FAST).model
    assert sum(isinstance(m, SparseLinear) for m in deployed.modules()) == 3
    assert _inference_tensors(deployed) == []
    got, grad = _input_gradient(deployed, _images(data))
    want, want_grad = _input_gradient(lenet, _images(data))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5)


def test_transposed_chain_runs_with_autograd_on(lenet, data, monkeypatch):
    monkeypatch.setattr(kernels, "MARGIN", float("inf"))  # every layer sparse, the chain used: deterministic
    monkeypatch.setattr(fallback, "decide", lambda samples, kernel: Decision("deployed", "kept by the test"))
    from lightning_sparse.deployment import chains

    monkeypatch.setattr(chains, "MARGIN", float("inf"))
    deployed = deploy_model(lenet, _images(data)[:64], **FAST).model
    assert any(isinstance(m, TransposedChain) for m in deployed.modules())
    assert _inference_tensors(deployed) == []
    got, grad = _input_gradient(deployed, _images(data))
    want, want_grad = _input_gradient(lenet, _images(data))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("layout", "blocksize"), [("csr", None), ("bsr", 4)])
def test_sparse_linear_built_in_inference_mode_is_differentiable_in_its_input(layout, blocksize, data):
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        blocks = torch.rand(8, 16) < 0.8  # whole 4×4 blocks zero, so BSR applies
        layer.weight[blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)] = 0
    with torch.inference_mode():  # as deploy builds it
        sparse = SparseLinear.from_linear(layer, layout, blocksize)
    assert not sparse.weight.is_inference() and not sparse.bias.is_inference()
    x = _images(data)[:16].flatten(1)
    got, grad = _input_gradient(sparse, x)
    want, want_grad = _input_gradient(layer, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


# --- a module that cannot take a sparse weight ----------------------------------------------------------------


class DigitEncoder(nn.Module):
    """A transformer written as users write one: the 8 rows of a digit as tokens, torch's nn.TransformerEncoder
    (fused fast path in eval under no_grad), mean-pooled into a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.reshape(x.shape[0], 8, 8))).mean(1))


@pytest.fixture(scope="module")
def encoder(data, tmp_path_factory):
    return _train(DigitEncoder(), 0.9, data, tmp_path_factory.mktemp("encoder"))


def _fused_path_taken(model: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad(), torch.autograd.profiler.profile() as profile:
        model(x)
    return any(event.name == "aten::_transformer_encoder_layer_fwd" for event in profile.function_events)


def test_encoder_layers_keep_dense_weights_for_torchs_fused_path_and_the_rest_goes_sparse(encoder, data):
    x = _images(data)
    assert _fused_path_taken(encoder, x)  # the condition the deployed model must survive
    result = deploy_model(encoder, x[:64], kernel="sparse", **FAST)
    deployed, report = result.model, result.report
    for i in range(2):
        for name in (f"net.encoder.layers.{i}.linear1", f"net.encoder.layers.{i}.linear2"):
            row = report.layer(name)
            assert row.sparsity > 0.85 and row.deployed_as == "dense", (name, row.deployed_as)
            assert f"kept dense: 'net.encoder.layers.{i}' (TransformerEncoderLayer) fails with autograd off" in row.reason
            assert "_transformer_encoder_layer_fwd" in row.reason and "Sparse" in row.reason
    for name in ("net_embed", "net_head"):  # outside the fused layers the sparse kernels stay (traced: flat names)
        assert isinstance(deployed.get_submodule(name), SparseLinear), name
    assert _fused_path_taken(deployed, x)
    with torch.no_grad():  # eval mode under no_grad: the fused path
        torch.testing.assert_close(deployed(x), encoder(x), rtol=1e-4, atol=1e-4)
    got, grad = _input_gradient(deployed, x)  # autograd on: the regular path
    want, want_grad = _input_gradient(encoder, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5)


def test_encoder_deployed_with_automatic_choice_runs_both_ways(encoder, data):
    x = _images(data)
    result = deploy_model(encoder, x[:64], **FAST)
    _assert_consistent(result)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), encoder(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_input_gradient(result.model, x)[1], _input_gradient(encoder, x)[1], rtol=1e-4, atol=1e-5)


# --- never slower than the input: the rule, as a function of measured times ------------------------------------


def test_sparse_kernels_that_do_not_make_the_whole_model_faster_are_dropped():
    samples = {"input": [10.0, 10.1, 10.2, 9.9, 10.0], "deployed": [11.0, 11.2, 10.9, 11.1, 11.0], "dense layers": [9.0, 9.1, 9.0, 8.9, 9.0]}
    decision = decide(samples)
    assert decision.variant == "dense layers"
    assert decision.reason.startswith("sparse kernels dropped, every layer dense: the whole model runs 11.0000 ms with them vs 9.0000 ms")


def test_sparse_kernels_that_make_the_whole_model_faster_are_kept():
    samples = {"input": [10.0, 10.1, 10.2, 9.9, 10.0], "deployed": [5.0, 5.1, 5.0, 4.9, 5.0], "dense layers": [9.0, 9.1, 9.0, 8.9, 9.0]}
    decision = decide(samples)
    assert decision.variant == "deployed" and "sparse kernels kept" in decision.reason and "(1.80×)" in decision.reason


def test_input_model_is_returned_when_measurably_faster():
    samples = {"input": [5.0, 5.1, 5.0, 4.9, 5.0] * 2, "deployed": [11.0, 11.2, 10.9, 11.1, 11.0] * 2, "dense layers": [9.0, 9.1, 9.0, 8.9, 9.0] * 2}
    decision = decide(samples)
    assert decision.variant == "input" and "the input model is returned: it is measurably faster" in decision.reason
    assert decide({"input": samples["input"], "deployed": samples["dense layers"]}).variant == "input"
    # five runs each are not enough to undo a deployment: the deployed model stays, with dense layers
    assert decide({name: values[:5] for name, values in samples.items()}).variant == "dense layers"


def test_a_tie_with_the_input_keeps_the_smaller_deployed_model():
    """Removed heads and channels stay unless the input is measurably faster: overlapping times are a tie."""
    samples = {"input": [10.0, 9.0, 11.0, 10.5, 9.5], "deployed": [10.2, 9.4, 11.3, 10.0, 9.9]}
    decision = decide(samples)
    assert decision.variant == "deployed" and "not measurably slower than the input" in decision.reason


def test_explicit_kernel_requests_are_kept_and_a_slower_result_is_said():
    samples = {"input": [5.0, 5.1, 5.0, 4.9, 5.0] * 2, "deployed": [11.0, 11.2, 10.9, 11.1, 11.0] * 2}
    decision = decide(samples, kernel="sparse")
    assert decision.variant == "deployed" and decision.reason.startswith("kernel='sparse' asked for") and decision.reason.endswith("(slower)")


def test_timing_stops_early_once_the_comparison_is_settled():
    runs = {"a": lambda: None, "b": lambda: None}
    assert [len(v) for v in timings(runs, 30, torch.device("cpu"), warmup=0, settled=lambda t: True).values()] == [MIN_ROUNDS] * 2
    assert [len(v) for v in timings(runs, 30, torch.device("cpu"), warmup=0).values()] == [30, 30]
    assert verdict([1.0, 1.1, 1.0, 0.9, 1.0], [2.0, 2.1, 2.0, 1.9, 2.0]) is True
    assert verdict([2.0, 2.1, 2.0, 1.9, 2.0], [1.0, 1.1, 1.0, 0.9, 1.0]) is False
    assert verdict([1.0, 2.0, 1.0, 2.0, 1.5], [1.2, 1.9, 1.1, 2.1, 1.5]) is None
    assert verdict([1.0, 1.1, 1.0], [2.0, 2.1, 2.0]) is None  # three runs: too few to say
    tie = {"input": [1.0, 2.0, 1.0, 2.0, 1.5], "deployed": [1.2, 1.9, 1.1, 2.1, 1.5]}
    assert settled(tie)  # medians within the 5% margin: the rule keeps the deployed model either way
    unclear = {"input": [1.0, 2.0, 1.0, 2.0, 1.5], "deployed": [1.2, 1.9, 1.1, 2.1, 1.7]}
    assert not settled(unclear)  # 12% apart, overlapping: more runs
    slower = {"input": [2.0, 2.1, 2.0, 1.9, 2.0], "deployed": [1.0, 1.1, 1.0, 0.9, 1.0]}
    assert settled(slower)  # the input is clearly slower: keep the deployed model
    faster = {"input": [1.0, 1.1, 1.0, 0.9, 1.0], "deployed": [2.0, 2.1, 2.0, 1.9, 2.0]}
    assert not settled(faster) and settled({name: values * 2 for name, values in faster.items()})  # undoing takes 10 runs
    kernels_lose = {**slower, "dense layers": [0.5, 0.55, 0.5, 0.45, 0.5]}
    assert settled(kernels_lose) and decide(kernels_lose).variant == "dense layers"


# --- end to end: invariants, whatever the clock says -------------------------------------------------------------


def _assert_consistent(result) -> None:
    """The report names the variant returned, its reason and times agree with the rule, and the model matches."""
    report, model = result.report, result.model
    assert report.returned in fallback.VARIANTS and report.decision
    assert decide(report.variant_runs).variant == report.returned  # the rule applied to the runs it reports
    assert report.forward_ms == (report.variant_ms["input"], report.variant_ms[report.returned])
    sparse_modules = [name for name, m in model.named_modules()
                      if isinstance(m, SparseLinear) or (isinstance(m, TransposedChain) and set(m.forms) != {"dense"})]  # fmt: skip
    sparse_rows = [row.name for row in report.layers if row.deployed_as not in ("dense", "thinned", "unused")]
    assert bool(sparse_modules) == bool(sparse_rows), (sparse_modules, sparse_rows)
    if report.returned != "deployed":
        assert not sparse_modules


def test_deploy_returns_the_variant_its_report_names_with_equal_outputs(lenet, data):
    x = _images(data)
    result = deploy_model(lenet, x[:64], repeats=10)
    _assert_consistent(result)
    if "dense layers" in result.report.variant_runs and result.report.returned == "dense layers":
        faster_alone = [row for row in result.report.layers if row.sparse_ms and row.sparse_ms < 0.95 * row.dense_ms]
        assert all("the whole model was not faster with the sparse kernels" in row.reason for row in faster_alone)
    with torch.inference_mode():
        torch.testing.assert_close(result.model(x), lenet(x), rtol=1e-4, atol=1e-4)


def test_layers_of_the_same_shape_input_and_nonzeros_share_their_timings(data):
    """Four 64→64 layers at exactly 90%: the second is timed (its input is the first's transposed output), the third and
    fourth get the same input layout and reuse its times, and say so."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), *[m for _ in range(4) for m in (nn.Linear(64, 64), nn.ReLU())], nn.Linear(64, 10)).eval()
    with torch.no_grad():
        for layer in net[1:9:2]:
            weight = layer.weight
            weight[weight.abs() < weight.abs().flatten().kthvalue(int(0.9 * weight.numel())).values] = 0
    result = deploy_model(net, _images(data)[:64], kernel="sparse", **FAST)
    reasons = {name: result.report.layer(name).reason for name in ("1", "3", "5", "7")}
    assert "times shared" not in reasons["1"] and "times shared" not in reasons["3"]
    assert "times shared with 3 (same shape and input, non-zeros within 2%)" in reasons["5"]
    assert "times shared with 3" in reasons["7"]
    with torch.inference_mode():
        torch.testing.assert_close(result.model(_images(data)), net(_images(data)), rtol=1e-4, atol=1e-4)


def test_sparse_chargpt_deployed_runs_with_autograd_on_and_its_blocks_share_timings():
    """A 90%-sparse CharGPT (real Shakespeare characters as input): every block layer sparse (kernel='sparse'), the
    model called as in training (autograd on, gradients of the logits to the dense embeddings), same-shape layers
    in later blocks not timed again."""
    from lightning_sparse.data import load_shakespeare_works, shakespeare_archive
    from lightning_sparse.models import CharGPT

    try:
        text = load_shakespeare_works(str(shakespeare_archive()))["hamlet"][:2000]
    except FileNotFoundError as error:
        pytest.skip(str(error))
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text[: 4 * 32]]).reshape(4, 32)
    torch.manual_seed(0)
    model = CharGPT(vocab_size=len(vocab), block_size=32, n_layer=3, n_head=2, n_embd=32).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) is nn.Linear and "lm_head" not in name:
                weight = module.weight
                weight[weight.abs() <= weight.abs().flatten().kthvalue(int(0.9 * weight.numel())).values] = 0
    result = deploy_model(model, ids, kernel="sparse", **FAST)
    deployed = result.model
    assert sum(isinstance(m, SparseLinear) for m in deployed.modules()) == 12
    shared = [row.name for row in result.report.layers if "times shared with model.transformer.h.0." in row.reason]
    rows = {row.name: row for row in result.report.layers if row.name.startswith("model.transformer.h.")}
    same = [name for name, row in rows.items() if name.split(".")[3] != "0"
            and row.deployed_shape == rows[name.replace(f".h.{name.split('.')[3]}.", ".h.0.")].deployed_shape]  # fmt: skip
    # blocks 1 and 2 reuse block 0's times where their shapes match (the attention layers; each MLP lost its own
    # all-zero hidden units, a coupled channel group found from the real forward, so their widths differ)
    assert shared == same and [name.split(".")[3] for name in shared] == ["1", "1", "2", "2"]
    logits = deployed(ids)  # autograd on
    logits.float().logsumexp(-1).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids), rtol=1e-4, atol=1e-4)
    assert deployed.model.transformer.wte.weight.grad is not None  # the dense (tied) embedding gets its gradient
