"""Structure set-ups the code cannot save as a standard model are refused or said aloud, naming what would work:
layers keeping different numbers of units (Phi-3's fused projections, a layer left whole), ``distribution="global"``
with heads/neurons, grouped-query attention asked for a fraction of heads that whole KV groups cannot give. The other
bad inputs of issue 27 are tested beside the code they reach: a glob naming a module with no heads
(tests/core/test_heads.py), a head count that does not divide and an unknown attention layout
(tests/structure/test_registry.py)."""

import pytest
import pytorch_lightning as pl
import torch

from support import CausalLM
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.deployment import deploy_model

transformers = pytest.importorskip("transformers")


def phi3(vocab):
    torch.manual_seed(0)
    config = transformers.Phi3Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                     num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                                     use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


def fit(model, data, sparsity, granularity, **options):
    gmp = GradualMagnitudePruning(sparsity, start=0, end=4, frequency=2, granularity=granularity, verbose=False, **options)
    pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, callbacks=[gmp]).fit(CausalLM(model), data)  # fmt: skip
    return model.eval()


@pytest.mark.parametrize(("sparsity", "granularity", "include", "note"), [
    ({"*.layers.0.mlp.*": 0.5, "*.layers.1.mlp.*": 0.25}, "neuron", None, "([24, 36]) for `intermediate_size`"),
    (0.5, {"*.layers.0.self_attn.*": "head"}, ["*.layers.0.self_attn.*"], "([4, 8]) for `num_attention_heads`"),
    (0.5, {"*.layers.0.mlp.*": "neuron"}, ["*.layers.0.mlp.*"], "([24, 48]) for `intermediate_size`"),
], ids=["mlp-counts-differ", "one-layer-heads", "one-layer-neurons"])  # fmt: skip
def test_phi3_layers_keeping_different_counts_deploy_and_the_config_says_it_cannot_express_them(sparsity, granularity, include,
                                                                                                note, hamlet):  # fmt: skip
    model = fit(phi3(hamlet.vocab_size), hamlet, sparsity, granularity, include=include)
    config = dict(model.config.to_dict())
    x = next(iter(hamlet.train_dataloader()))[0]
    result = deploy_model(model, x, kernel="dense", repeats=1)
    with torch.no_grad():
        assert torch.allclose(result.model(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
    if isinstance(granularity, dict) and "head" in granularity.values():  # Phi-3's forward splits qkv_proj at config.num_attention_heads: it cannot run them
        assert not any(row.removed for row in result.report.removed_groups)
        assert any("rebuilt model fails" in n and "different numbers of units" in n and "distribution='uniform'" in n
                   for n in result.report.notes), result.report.notes  # fmt: skip
    else:
        assert result.report.changed, result.report.notes
        assert any("kept different numbers of units " + note in n and "cannot express" in n for n in result.report.notes), result.report.notes
    # the config still describes the layers that kept every unit (it was left as it was, not set for one layer)
    assert result.model.config.to_dict() == config


def test_global_distribution_with_heads_or_neurons_is_refused_saying_save_pretrained_needs_equal_counts():
    for granularity in ({"*.self_attn.*": "head"}, {"*.mlp.*": "neuron"}):
        with pytest.raises(ValueError, match=r"`distribution`='global' ranks single weights.*standard config for "
                                             r"`save_pretrained`.*distribution='uniform'"):  # fmt: skip
            GradualMagnitudePruning(0.5, distribution="global", granularity=granularity)


def test_gqa_asked_for_a_fraction_whole_kv_groups_cannot_give_says_what_it_removes(hamlet):
    with pytest.warns(UserWarning, match=r"sparsity 0\.3 removes 1 of the 2 key/value groups of 'model\.model\.layers\.0\."
                                         r"self_attn' \(4 of its 8 query heads, 0\.5\).*a unit is a KV head with its 4 query heads"):
        fit(phi3(hamlet.vocab_size), hamlet, 0.3, {"*.self_attn.*": "head"}, include=["*.self_attn.*"])
