"""Mixture-of-experts weights are default targets on their real axes: the 3-D expert parameters of transformers 5
(``(experts, out, in)``, used as ``linear(x, w[e])``) are pruned exactly, take N:M groups along each expert's inputs
and per-expert-row QAT scales, and the router stays dense; the set-up summary names both. Tiny Mixtral and Qwen2-MoE
models built from configs in the test (no download), trained with a real Trainer on a slice of Shakespeare."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from support import CausalLM
from lightning_sparse.callbacks import GradualMagnitudePruning, QuantizationAwareTraining
from lightning_sparse.core.layouts import EXPERTS_KIND, ROUTER_KIND
from lightning_sparse.core.structured import check_shape, expand_granularity
from lightning_sparse.core.targets import describe_targets, format_targets, select_targets
from lightning_sparse.data import ShakespeareDataModule

transformers = pytest.importorskip("transformers")

EXPERTS = ["gate_up_proj", "down_proj"]


@pytest.fixture(scope="module")
def sonnets(sonnets_path) -> ShakespeareDataModule:
    """Shakespeare's sonnets (their first 20,000 characters) in windows of 16."""
    data = ShakespeareDataModule(path=sonnets_path, block_size=16, batch_size=8)
    data.setup()
    return data

def moe(kind: str, vocab: int = 64) -> nn.Module:
    """A two-layer MoE decoder with 4 experts of which 2 run per token (hidden 32)."""
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=32, use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **common)
    else:
        config = transformers.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=40, shared_expert_intermediate_size=56,
                                             num_experts=4, num_experts_per_tok=2, **common)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


def expert_names(model: nn.Module) -> list[str]:
    return [f"model.layers.{i}.mlp.experts.{w}" for i in range(len(model.model.layers)) for w in EXPERTS]


def router_names(kind: str, model: nn.Module) -> list[str]:
    gates = ["gate"] if kind == "mixtral" else ["gate", "shared_expert_gate"]
    return [f"model.layers.{i}.mlp.{g}.weight" for i in range(len(model.model.layers)) for g in gates]


def fit(model: nn.Module, data, callback, steps: int = 6) -> nn.Module:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=[callback])  # fmt: skip
    trainer.fit(CausalLM(model), data)
    return model.eval()


def per_expert_forward(experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e`` written out by the definition (``linear(x, w[e])``), to prove which axes are its outputs/inputs."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


# ----------------------------------------------------------------------------------------------- default targets, axes
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_expert_weights_are_default_targets_with_their_real_axes_and_the_router_is_not(kind):
    model = moe(kind)
    targets = select_targets(model)
    params = dict(model.named_parameters())
    assert set(expert_names(model)) <= set(targets)
    assert not set(router_names(kind, model)) & set(targets)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(5, 32)
    for name in expert_names(model):
        layout = targets.layouts[name]
        assert targets.kinds[name] == EXPERTS_KIND and (layout.experts, layout.output, layout.inputs(3)) == (0, 1, (2,))
        e, out, inputs = params[name].shape
        assert layout.fan_in(params[name].shape) == inputs  # one expert's inputs, not experts × inputs
        units = layout.units(params[name].detach())
        assert units.shape == (e * out, inputs) and torch.equal(units[2 * out + 3], params[name][2, 3])
        assert torch.equal(layout.from_units(units, params[name].shape), params[name])
    # the axes are those the forward uses: zeroing input column j of expert 1's gate_up_proj = zeroing x[:, j]
    with torch.no_grad():
        expected = per_expert_forward(experts, x * (torch.arange(32) != 7), 1)
        experts.gate_up_proj[1, :, 7] = 0
        assert torch.allclose(per_expert_forward(experts, x, 1), expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_summary_names_moe_experts_and_the_dense_router(kind):
    model = moe(kind)
    summary = format_targets(describe_targets(model, select_targets(model)), "GMP")
    compressed, dense = summary.splitlines()[:2]
    assert f"{EXPERTS_KIND} ×4" in compressed and ROUTER_KIND not in compressed
    assert f"{ROUTER_KIND} ×{len(router_names(kind, model))}" in dense
    rows = {(row.kind, row.compressed): row for row in describe_targets(model, select_targets(model))}
    other = rows.get(("other", False))
    assert other is None or all(p.dim() < 2 for n, p in model.named_parameters() if n in other.names), other
    included = select_targets(model, include=["*.gate.*"])  # a router may be opted in, on its real axes
    assert set(included) == {name for name in router_names(kind, model) if ".gate." in name}
    assert all(included.layouts[name].output == 0 for name in included)


# ----------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_default_gmp_prunes_every_expert_weight_exactly_and_leaves_the_router_dense(kind, sonnets, capsys):
    model = moe(kind, len(sonnets.chars))
    routers = {name: p.detach().clone() for name, p in model.named_parameters() if name in router_names(kind, model)}
    callback = GradualMagnitudePruning(0.5, start=0, end=4, frequency=2)
    fit(model, sonnets, callback)
    params = dict(model.named_parameters())
    for name in expert_names(model):
        assert f"model.{name}" in callback.masks  # the LightningModule holds the model as `model`
        assert int((params[name] == 0).sum()) == params[name].numel() // 2, name
    for name, before in routers.items():  # trained, never pruned
        assert bool((params[name] != 0).all()) and not torch.equal(params[name], before), name
    summary = capsys.readouterr().out
    assert f"{EXPERTS_KIND} ×4" in summary and f"{ROUTER_KIND} ×" in summary.split("left dense:")[1]


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_2_4_groups_run_along_each_experts_real_input_axis(kind, sonnets):
    model = moe(kind, len(sonnets.chars))
    callback = GradualMagnitudePruning(0.5, start=0, end=4, frequency=2, granularity={"*.experts.*": "2:4"},
                                       include=["*.experts.*"], verbose=False)  # fmt: skip
    fit(model, sonnets, callback)
    params = dict(model.named_parameters())
    for name in expert_names(model):
        weight = params[name].detach()  # (experts, out, in): groups of 4 along `in` of each expert's row
        counts = (weight != 0).reshape(*weight.shape[:2], -1, 4).sum(-1)
        assert (counts == 2).all(), f"{name}: {counts.flatten().bincount(minlength=5).tolist()} groups hold 0..4"


def test_n_m_must_divide_one_experts_inputs_and_channels_are_refused_with_the_reason():
    model = moe("qwen2_moe")  # down_proj (4, 32, 40): 8 divides 4 × 40 = 160, not one expert's 40 inputs
    targets = select_targets(model, include=["*.experts.down_proj"])
    name = "model.layers.0.mlp.experts.down_proj"
    with pytest.raises(ValueError, match=r"M=16 does not divide the input dimension 40"):
        check_shape(name, (4, 32, 40), expand_granularity("2:16", targets)[name])
    check_shape(name, (4, 32, 40), expand_granularity("2:8", targets)[name])
    with pytest.raises(ValueError, match=r"cannot prune .*expert.*granularity='neuron'"):
        check_shape(name, (4, 32, 40), expand_granularity("channel", targets)[name])


def test_qat_scales_are_per_expert_row(sonnets):
    model = moe("mixtral", len(sonnets.chars))
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():  # expert 0 on a far smaller range: a scale shared across experts would flatten it to 0
        experts.down_proj[0] *= 0.01
    callback = QuantizationAwareTraining(bits=4, include=["*.layers.0.mlp.experts.down_proj"], verbose=False)
    fit(model, sonnets, callback, steps=3)
    weight = experts.down_proj.detach()  # q(w) after fit: (experts, hidden, I)
    for e in range(weight.shape[0]):
        for row in weight[e]:  # each expert's row on its own symmetric 4-bit grid: max |w| = 7 steps
            codes = row / (row.abs().max() / 7)
            assert torch.allclose(codes, codes.round(), atol=1e-4), e
    assert bool((weight[0] != 0).any(1).all())  # expert 0's small rows kept their own resolution


class TransposedExperts(nn.Module):
    """Experts stored ``(experts, in, out)`` and run as ``x @ w[e]``, as transformers' ``is_transposed`` ones."""

    def __init__(self, experts: int = 3, hidden: int = 8, inner: int = 12) -> None:
        super().__init__()
        self.num_experts, self.is_transposed = experts, True
        self.up = nn.Parameter(torch.randn(experts, hidden, inner))
        self.down = nn.Parameter(torch.randn(experts, inner, hidden))


def test_transposed_experts_have_their_outputs_last():
    targets = select_targets(nn.ModuleDict({"experts": TransposedExperts(), "router": nn.Linear(8, 3)}))
    assert list(targets) == ["experts.up", "experts.down"]
    layout = targets.layouts["experts.up"]
    assert (targets.kinds["experts.up"], layout.output, layout.inputs(3)) == (EXPERTS_KIND, 2, (1,))
    weight = torch.randn(3, 8, 12)
    assert torch.equal(layout.units(weight)[12 + 5], weight[1, :, 5])  # expert 1's output 5 reads all 8 inputs
