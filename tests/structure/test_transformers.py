"""Heads (key/value groups) and MLP neurons of today's transformers, found by the structure registry: structured GMP at
0.5 in a short real fit on Shakespeare text, deploy with outputs equal to the masked model and fewer parameters,
valid grouped-query shapes, and ``save_pretrained`` → the stock ``from_pretrained`` giving the deployed logits.
Tiny Hugging Face models built from configs in the test (no download)."""

import pytest
import pytorch_lightning as pl
import torch

from support import CausalLM
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.core.heads import find_group_layers
from lightning_sparse.deployment import deploy_model

transformers = pytest.importorskip("transformers")

DECODER = {"*.self_attn.*": "head", "*.mlp.*": "neuron"}


def fit(model, data, granularity, steps=6, **options):
    gmp = GradualMagnitudePruning(0.5, start=0, end=4, frequency=2, granularity=granularity, exclude=["*lm_head*"],
                                  verbose=False, **options)  # fmt: skip
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[gmp])  # fmt: skip
    trainer.fit(CausalLM(model), data)
    return model.eval()


def small(kind, vocab, **extra):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=8, max_position_embeddings=32,
                  use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    configs = {
        "llama": lambda: transformers.LlamaConfig(intermediate_size=48, num_key_value_heads=2, **common),
        "qwen2": lambda: transformers.Qwen2Config(intermediate_size=48, num_key_value_heads=2, **common),
        "qwen3": lambda: transformers.Qwen3Config(intermediate_size=48, num_key_value_heads=2, head_dim=8, **common),
        "mistral": lambda: transformers.MistralConfig(intermediate_size=48, num_key_value_heads=4, **common),
        "gemma": lambda: transformers.GemmaConfig(intermediate_size=48, num_key_value_heads=2, head_dim=16, **common),
        "phi3": lambda: transformers.Phi3Config(intermediate_size=48, num_key_value_heads=2, **common),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(intermediate_size=48, **common),
        "opt": lambda: transformers.OPTConfig(ffn_dim=48, word_embed_proj_dim=32, **common),
    }
    config = configs[kind]()
    for key, value in extra.items():
        setattr(config, key, value)
    return transformers.AutoModelForCausalLM.from_config(config)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def deploy_and_reload(model, x, tmp_path):
    """Deploy; the deployed logits equal the masked model's; returns (deployed, report, reloaded or None)."""
    result = deploy_model(model, x, kernel="dense", repeats=1)
    deployed = result.model
    assert result.report.changed, result.report.notes
    assert torch.allclose(logits(deployed, x), logits(model, x), atol=1e-5)
    assert param_count(deployed) < param_count(model)
    return deployed, result.report


# GQA models: the config states fewer heads and KV heads of the same head_dim, so the stock loader rebuilds them
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"])
def test_gqa_decoder_loses_half_its_kv_groups_and_neurons_and_reloads_with_stock_from_pretrained(kind, hamlet, tmp_path):
    model = small(kind, hamlet.vocab_size)
    config = model.config
    heads, kv, d, inner = config.num_attention_heads, config.num_key_value_heads, model.model.layers[0].self_attn.head_dim, config.intermediate_size
    layers = {layer.module: layer for layer in find_group_layers(model)}
    attention = layers["model.layers.0.self_attn"]
    assert (attention.count, attention.query_heads, attention.width) == (kv, heads // kv, d)  # a unit is a KV group

    fit(model, hamlet, DECODER)
    x = next(iter(hamlet.train_dataloader()))[0]
    deployed, report = deploy_and_reload(model, x, tmp_path)

    assert (deployed.config.num_attention_heads, deployed.config.num_key_value_heads) == (heads // 2, kv // 2)
    assert deployed.config.intermediate_size == inner // 2
    for layer in deployed.model.layers:
        attn = layer.self_attn
        q_rows = attn.q_proj.weight.shape[0] if hasattr(attn, "q_proj") else deployed.config.num_attention_heads * d
        kv_rows = attn.k_proj.weight.shape[0] if hasattr(attn, "k_proj") else (attn.qkv_proj.weight.shape[0] - q_rows) // 2
        assert (q_rows, kv_rows) == (heads // 2 * d, kv // 2 * d)
        assert (q_rows // d) % (kv_rows // d) == 0 and (q_rows // d) // (kv_rows // d) == heads // kv  # GQA group size kept
        assert attn.o_proj.weight.shape[1] == q_rows
    deployed.save_pretrained(tmp_path / kind)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / kind).eval()
    assert type(reloaded) is type(deployed)
    assert (logits(reloaded, x) - logits(deployed, x)).abs().max() <= 1e-5


# GPT-NeoX and OPT derive head_dim from hidden / heads: the MLP width is saved, fewer heads are not expressible
@pytest.mark.parametrize(("kind", "granularity", "mlp_key"), [
    ("gpt_neox", {"*.attention.*": "head", "*.mlp.*": "neuron"}, "intermediate_size"),
    ("opt", {"*.self_attn.*": "head", "*.fc?.*": "neuron"}, "ffn_dim"),
])  # fmt: skip
def test_mha_decoder_deploys_and_its_config_says_what_it_cannot_express(kind, granularity, mlp_key, hamlet, tmp_path):
    model = small(kind, hamlet.vocab_size)
    inner = getattr(model.config, mlp_key)
    fit(model, hamlet, granularity)
    x = next(iter(hamlet.train_dataloader()))[0]
    deployed, report = deploy_and_reload(model, x, tmp_path)
    assert getattr(deployed.config, mlp_key) == inner // 2
    assert deployed.config.num_attention_heads == 8  # unchanged: the config cannot say fewer heads of the same width
    assert any("cannot express the deployed attention heads" in note for note in report.notes), report.notes

    # neurons alone: the config describes the deployed model, and the stock loader rebuilds it
    model = small(kind, hamlet.vocab_size)
    fit(model, hamlet, {key: value for key, value in granularity.items() if value == "neuron"})
    deployed, _ = deploy_and_reload(model, x, tmp_path)
    deployed.save_pretrained(tmp_path / kind)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / kind).eval()
    assert (logits(reloaded, x) - logits(deployed, x)).abs().max() <= 1e-5


def test_layers_keeping_different_counts_deploy_but_the_config_says_it_cannot_express_them(hamlet, tmp_path):
    model = small("llama", hamlet.vocab_size)
    sparsity = {"*.layers.0.mlp.*": 0.5, "*.layers.1.mlp.*": 0.25}
    gmp = GradualMagnitudePruning(sparsity, start=0, end=4, frequency=2, granularity="neuron", verbose=False)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[gmp])  # fmt: skip
    trainer.fit(CausalLM(model), hamlet)
    model.eval()
    x = next(iter(hamlet.train_dataloader()))[0]
    deployed, report = deploy_and_reload(model, x, tmp_path)
    assert [layer.mlp.up_proj.out_features for layer in deployed.model.layers] == [24, 36]
    assert deployed.config.intermediate_size == 48
    assert any("kept different numbers of units ([24, 36])" in note for note in report.notes), report.notes


# mixture of experts: 3-D expert parameters; a neuron is one hidden unit of every expert; the router stays dense
@pytest.mark.parametrize("include", [["*.self_attn.*", "*.experts.*"], None], ids=["include", "default"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_expert_neurons_and_kv_groups_deploy_and_reload_with_stock_from_pretrained(kind, include, hamlet, tmp_path):
    torch.manual_seed(0)
    common = dict(vocab_size=hamlet.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=32, use_cache=False, pad_token_id=0, bos_token_id=0,
                  eos_token_id=0)  # fmt: skip
    if kind == "mixtral":
        config, key = transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **common), "intermediate_size"
    else:
        config = transformers.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=40, shared_expert_intermediate_size=56,
                                             num_experts=4, num_experts_per_tok=2, **common)  # fmt: skip
        key = "moe_intermediate_size"
    model = transformers.AutoModelForCausalLM.from_config(config)
    inner = getattr(config, key)
    experts = {layer.module: layer for layer in find_group_layers(model) if layer.pattern == "mlp:experts"}
    assert set(experts) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    router = model.model.layers[0].mlp.gate.weight.detach().clone()

    granularity = {"*.self_attn.*": "head", "*.experts.*": "neuron"}
    gmp = GradualMagnitudePruning(0.5, start=0, end=4, frequency=2, granularity=granularity,
                                  include=include, verbose=False)  # fmt: skip  # experts are default targets
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[gmp])  # fmt: skip
    trainer.fit(CausalLM(model), hamlet)
    model.eval()
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj
    zero_rows = (gate_up == 0).all(2).all(0)  # rows zero in every expert
    assert int(zero_rows[:inner].sum()) == inner // 2 and torch.equal(zero_rows[:inner], zero_rows[inner:])
    assert bool((model.model.layers[0].mlp.gate.weight != 0).all()) and not torch.equal(router, model.model.layers[0].mlp.gate.weight)

    x = next(iter(hamlet.train_dataloader()))[0]
    deployed, report = deploy_and_reload(model, x, tmp_path)
    assert getattr(deployed.config, key) == inner // 2 and deployed.config.num_key_value_heads == 1
    assert tuple(deployed.model.layers[0].mlp.experts.down_proj.shape) == (4, 32, inner // 2)
    deployed.save_pretrained(tmp_path / kind)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / kind).eval()
    assert (logits(reloaded, x) - logits(deployed, x)).abs().max() <= 1e-5


def test_multi_query_attention_loses_query_heads_and_keeps_its_one_kv_head(hamlet, tmp_path):
    model = small("gemma", hamlet.vocab_size, num_key_value_heads=1)  # 8 query heads of 16 share one KV head
    model = transformers.AutoModelForCausalLM.from_config(model.config)
    attention = {layer.module: layer for layer in find_group_layers(model)}["model.layers.0.self_attn"]
    assert (attention.count, attention.width, attention.kv_heads) == (8, 16, 1)  # a unit is a query head
    fit(model, hamlet, DECODER)
    x = next(iter(hamlet.train_dataloader()))[0]
    deployed, report = deploy_and_reload(model, x, tmp_path)
    assert (deployed.config.num_attention_heads, deployed.config.num_key_value_heads) == (4, 1)
    attn = deployed.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features, attn.num_key_value_groups) == (64, 16, 64, 4)
    deployed.save_pretrained(tmp_path / "mqa")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mqa").eval()
    assert (logits(reloaded, x) - logits(deployed, x)).abs().max() <= 1e-5
