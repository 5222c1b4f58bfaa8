"""Attention heads and MLP neurons pruned whole (granularity 'head' / 'neuron') and removed at deploy: the groups found
in nn.MultiheadAttention, CharGPT, Hugging Face BERT and GPT-2 and an MLP, exact masks after real training, deployed
outputs equal to the pruned model's on real inputs, loading without the training code, and the refusals."""

import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse import GradualMagnitudePruning, MovementPruning
from lightning_sparse.core.heads import find_group_layers, zero_groups
from lightning_sparse.data import DigitsDataModule, ShakespeareDataModule, load_shakespeare_works, shakespeare_archive
from lightning_sparse.deployment import deploy_model, save_deployed
from lightning_sparse.deployment.groups import HeadPrunedMultiheadAttention, HeadPrunedSelfAttention
from lightning_sparse.models import Classifier, CharGPT

transformers = pytest.importorskip("transformers")

GROUPS = {"*.attn.*": "head", "*.mlp.*": "neuron"}


def fit(model, callbacks, data, steps=12, root=None, **kwargs):
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=bool(root), enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root, callbacks=list(callbacks), **kwargs,
    )  # fmt: skip
    trainer.fit(model, data)
    return model


@pytest.fixture(scope="module")
def hamlet(tmp_path_factory):
    try:
        works = load_shakespeare_works(str(shakespeare_archive()))
    except FileNotFoundError as error:
        pytest.skip(str(error))
    path = tmp_path_factory.mktemp("text") / "hamlet.txt"
    path.write_text(works["hamlet"][:40_000], encoding="utf-8")
    return str(path)


def text(path):
    module = ShakespeareDataModule(path=path, block_size=16, batch_size=8)
    module.setup()
    return module


def tiny_gpt(vocab_size, **kwargs):
    torch.manual_seed(0)
    return CharGPT(vocab_size=vocab_size, **{**dict(n_layer=2, n_head=4, n_embd=32, block_size=16, warmup_steps=0, lr=3e-3, bias=True), **kwargs})


def head_rows(weight, heads, fused=3):
    """Per head: True where its q/k/v rows of a fused (3E, E) weight are all zero."""
    e = weight.shape[1]
    return (weight.view(fused, heads, e // heads, -1) == 0).flatten(2).all(-1).all(0)


# ----------------------------------------------------------------------------- models on digits
class DigitsAttention(pl.LightningModule):
    """Digits as 8 rows of 8 pixels: a Linear embedding, nn.MultiheadAttention, mean pooling, an MLP classifier."""

    def __init__(self, separate_kv: bool = False):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        kv = dict(kdim=24, vdim=24) if separate_kv else {}
        self.kv = nn.Linear(8, 24) if separate_kv else None
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True, **kv)
        self.mlp = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))

    def forward(self, x):
        rows = x.view(x.shape[0], 8, 8)
        h = self.embed(rows)
        kv = self.kv(rows) if self.kv is not None else h
        h = h + self.attn(h, kv, kv, need_weights=False)[0]
        return self.mlp(h.mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def digits_tokens(batch_size=32):
    """Real 8×8 digits as sequences of 64 pixel intensities (0..16, the token ids) with their labels."""
    digits = load_digits()
    ids = torch.tensor(digits.data, dtype=torch.long)
    labels = torch.tensor(digits.target, dtype=torch.long)
    return DataLoader(TensorDataset(ids, labels), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


class DigitsEncoder(pl.LightningModule):
    """A user's encoder: token embedding, two nn.TransformerEncoderLayer (batch-first, GELU), mean pooling, a head."""

    def __init__(self, activation="gelu", nested=False):
        super().__init__()
        self.embed = nn.Embedding(17, 32)
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True,
                                           activation=activation)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=nested)
        self.head = nn.Linear(32, 10)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)).mean(1))

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return nn.functional.cross_entropy(self(ids), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


def tiny_bert():
    config = transformers.BertConfig(vocab_size=17, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=10,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def tiny_gpt2(vocab_size, use_cache=False):
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=use_cache)  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


class HFClassifier(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


class HFLanguageModel(HFClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(input_ids=x).logits
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# ----------------------------------------------------------------------------- groups found
def test_groups_found_in_every_architecture():
    mha = {g.module: g for g in find_group_layers(DigitsAttention())}
    assert (mha["attn"].kind, mha["attn"].count, mha["attn"].width) == ("head", 4, 8)
    assert [m.param for m in mha["attn"].members] == ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight"]
    assert mha["attn"].members[0].offsets == (0, 32, 64) and mha["attn"].members[2].axis == 1
    assert (mha["mlp.0"].kind, mha["mlp.0"].count) == ("neuron", 48)
    assert [m.param for m in mha["mlp.0"].members] == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight"]
    separate = {g.module: g for g in find_group_layers(DigitsAttention(separate_kv=True))}
    assert [m.param for m in separate["attn"].members][:3] == ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"]

    gpt = {g.module: g for g in find_group_layers(tiny_gpt(30))}
    assert (gpt["model.transformer.h.1.attn"].count, gpt["model.transformer.h.1.attn"].width) == (4, 8)
    assert gpt["model.transformer.h.0.mlp"].count == 128

    bert = {g.module: g for g in find_group_layers(tiny_bert())}
    attention = bert["bert.encoder.layer.0.attention"]
    assert (attention.kind, attention.count, attention.width) == ("head", 4, 8)
    assert [m.param for m in attention.members] == [
        f"bert.encoder.layer.0.attention.self.{p}.{w}" for p in ("query", "key", "value") for w in ("weight", "bias")
    ] + ["bert.encoder.layer.0.attention.output.dense.weight"]
    assert bert["bert.encoder.layer.1"].kind == "neuron" and bert["bert.encoder.layer.1"].count == 64
    assert "bert.pooler" not in bert and "classifier" not in bert

    gpt2 = {g.module: g for g in find_group_layers(tiny_gpt2(30))}
    heads = gpt2["transformer.h.0.attn"]
    assert heads.members[0].param == "transformer.h.0.attn.c_attn.weight" and heads.members[0].axis == 1  # Conv1D (in, out)
    assert heads.members[-1].param == "transformer.h.0.attn.c_proj.weight" and heads.members[-1].axis == 0
    assert gpt2["transformer.h.0.mlp"].count == 128 and gpt2["transformer.h.0.mlp"].members[-1].axis == 0


# ----------------------------------------------------------------------------- exact masks, real training
def test_chargpt_heads_and_neurons_pruned_exactly(hamlet):
    module = text(hamlet)
    model = tiny_gpt(module.vocab_size)
    callback = GradualMagnitudePruning(0.5, start=0, end=8, frequency=2, granularity=GROUPS, verbose=False)
    fit(model, [callback], module)
    for i in range(2):
        attn, mlp = model.model.transformer.h[i].attn, model.model.transformer.h[i].mlp
        zero = head_rows(attn.c_attn.weight, 4)
        assert int(zero.sum()) == 2  # half the heads: their q/k/v rows, q/k/v biases and out-projection columns
        assert torch.equal((attn.c_attn.bias.view(3, 4, 8) == 0).all(-1).all(0), zero)
        assert torch.equal((attn.c_proj.weight.view(32, 4, 8) == 0).all(-1).all(0), zero)
        assert bool((attn.c_attn.weight.view(3, 4, 8, 32)[:, ~zero] != 0).all())  # kept heads: nothing masked
        neurons = (mlp.c_fc.weight == 0).all(1)
        assert int(neurons.sum()) == 64
        assert torch.equal(mlp.c_fc.bias == 0, neurons) and torch.equal((mlp.c_proj.weight == 0).all(0), neurons)
        for name in (f"model.transformer.h.{i}.attn.c_attn.bias", f"model.transformer.h.{i}.mlp.c_proj.weight"):
            mask = callback.masks.mask(name)
            assert torch.equal(mask, dict(model.named_parameters())[name] != 0)  # the MaskSet holds exactly these


def test_movement_pruning_prunes_bert_heads_and_neurons_on_digits():
    model = HFClassifier(tiny_bert())
    callback = MovementPruning(0.5, start=0, end=8, frequency=2, granularity={"*.attention.*": "head", "*.intermediate.*": "neuron",
                               "*.layer.?.output.*": "neuron"}, exclude=["*pooler*", "*classifier*"], verbose=False)  # fmt: skip
    fit(model, [callback], digits_tokens())
    params = dict(model.named_parameters())
    for layer in find_group_layers(model):
        zero = zero_groups(layer, params)
        assert int(zero.sum()) == layer.count // 2, layer.module
        for member in layer.members:
            assert torch.equal(callback.masks.mask(member.param), params[member.param] != 0), member.param


def test_group_masks_resume_bit_exactly(tmp_path, hamlet):
    def run(root, ckpt_path=None):
        module = text(hamlet)
        model = tiny_gpt(module.vocab_size, lr_schedule="constant")
        callbacks = [GradualMagnitudePruning(0.5, start=2, end=10, frequency=2, granularity=GROUPS, verbose=False),
                     ModelCheckpoint(dirpath=root, every_n_train_steps=5, save_top_k=-1)]  # fmt: skip
        trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks)  # fmt: skip
        trainer.fit(model, module, ckpt_path=ckpt_path)
        return model, callbacks[0]

    whole, callback = run(tmp_path / "whole")
    (middle,) = (tmp_path / "whole").glob("*step=5.ckpt")
    checkpoint = torch.load(middle, weights_only=True)
    assert set(checkpoint["state_dict"]) == set(whole.state_dict())  # dense keys
    resumed, again = run(tmp_path / "resumed", ckpt_path=middle)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert callback.masks.checksum() == again.masks.checksum()


# ----------------------------------------------------------------------------- deploy
LOAD = """
import sys, torch
from lightning_sparse.deployment import load_deployed
model = load_deployed(sys.argv[1], trusted=True)
inputs, expected = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(inputs)
out = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
print("ok", type(model).__name__)
"""


def loads_elsewhere(tmp_path, model, inputs, expected):
    """Saved, then loaded in a fresh interpreter that has lightning_sparse and torch but not this test module."""
    save_deployed(model, tmp_path / "deployed.pt")
    torch.save((inputs, expected), tmp_path / "io.pt")
    result = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "deployed.pt"), str(tmp_path / "io.pt")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def logits(output):
    return output[0] if isinstance(output, tuple) else getattr(output, "logits", output)


def test_multihead_attention_and_mlp_deploy_without_pruned_heads_and_neurons(tmp_path):
    model = DigitsAttention()
    torch.manual_seed(0)
    callback = GradualMagnitudePruning(0.5, start=0, end=10, frequency=2, granularity={"attn*": "head", "mlp.0.*": "neuron", "mlp.2.*": "neuron"},
                                       exclude=["embed.*"], verbose=False)  # fmt: skip
    data = DigitsDataModule(batch_size=32)
    fit(model, [callback], data, steps=16)
    data.setup("fit")
    x = next(iter(data.val_dataloader()))[0]
    model.eval()
    result = deploy_model(model, x, repeats=3)
    deployed = result.model
    attn = next(m for m in deployed.modules() if isinstance(m, HeadPrunedMultiheadAttention))
    assert attn.num_heads == 2 and attn.q_proj.out_features == 16 and attn.out_proj.in_features == 16
    assert [m for m in deployed.modules() if isinstance(m, nn.Linear) and m.out_features == 24]  # 48 → 24 neurons
    rows = {row.module: row for row in result.report.removed_groups}
    assert rows["attn"].after == 2 and len(rows["attn"].removed) == 2 and len(rows["attn"].members) == 3
    assert rows["mlp.0"].after == 24
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(deployed(x), expected, atol=1e-5)
    assert "ok" in loads_elsewhere(tmp_path, deployed, x, expected)


def test_multihead_attention_replacement_matches_masks_and_layouts():
    """The rebuilt attention gives nn.MultiheadAttention's outputs with masks, padding, unbatched and seq-first inputs."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4).eval()
    with torch.no_grad():  # heads 1 and 3 pruned: their q/k/v rows, biases and out-projection columns
        for h in (1, 3):
            for o in (0, 16, 32):
                mha.in_proj_weight[o + 4 * h : o + 4 * h + 4] = 0
                mha.in_proj_bias[o + 4 * h : o + 4 * h + 4] = 0
            mha.out_proj.weight[:, 4 * h : 4 * h + 4] = 0
    holder = nn.Module()
    holder.attn = mha
    from lightning_sparse.deployment.groups import remove_zero_groups

    (row,) = remove_zero_groups(holder)
    assert row.removed == [1, 3]
    new = holder.attn
    digits = torch.tensor(load_digits().data[:3], dtype=torch.float32).view(3, 4, 16).transpose(0, 1) / 16  # (L, N, E)
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
    padding = torch.tensor([[False, False, False, True]] * 3)
    per_head = torch.randn(3 * 4, 4, 4)
    with torch.no_grad():
        for kwargs in ({}, {"attn_mask": causal}, {"key_padding_mask": padding}, {"attn_mask": per_head}):
            assert torch.allclose(new(digits, digits, digits, **kwargs)[0], mha(digits, digits, digits, **kwargs)[0], atol=1e-5), kwargs
        single = digits[:, 0]
        assert torch.allclose(new(single, single, single)[0], mha(single, single, single)[0], atol=1e-5)


def test_chargpt_deploys_with_fewer_heads_and_neurons(tmp_path, hamlet):
    module = text(hamlet)
    model = tiny_gpt(module.vocab_size)
    fit(model, [GradualMagnitudePruning(0.5, start=0, end=8, frequency=2, granularity=GROUPS, verbose=False)], module)
    x = next(iter(module.val_dataloader()))[0]
    model.eval()
    result = deploy_model(model, x, repeats=3)
    blocks = result.model.model.transformer.h
    assert all(isinstance(b.attn, HeadPrunedSelfAttention) and b.attn.n_head == 2 for b in blocks)
    assert all(b.mlp.c_fc.out_features == 64 and b.mlp.c_proj.in_features == 64 for b in blocks)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(result.model(x), expected, atol=1e-5)
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())
    assert "ok" in loads_elsewhere(tmp_path, result.model, x, expected)


def test_bert_deploys_with_fewer_heads_and_neurons(tmp_path):
    model = HFClassifier(tiny_bert())
    granularity = {"*.attention.*": "head", "*.intermediate.*": "neuron", "*.layer.?.output.*": "neuron"}
    fit(model, [GradualMagnitudePruning(0.5, start=0, end=8, frequency=2, granularity=granularity,
                                        exclude=["*pooler*", "*classifier*"], verbose=False)], digits_tokens())  # fmt: skip
    bert = model.model.eval()
    ids = next(iter(digits_tokens(16)))[0]
    result = deploy_model(bert, ids, repeats=3)
    for layer in result.model.bert.encoder.layer:
        assert layer.attention.self.num_attention_heads == 2 and layer.attention.self.query.out_features == 16
        assert layer.attention.output.dense.in_features == 16 and layer.intermediate.dense.out_features == 32
    with torch.no_grad():
        expected = bert(input_ids=ids).logits
        assert torch.allclose(result.model(input_ids=ids).logits, expected, atol=1e-5)
    assert "ok" in loads_elsewhere(tmp_path, result.model, ids, expected)


def test_gpt2_deploys_with_fewer_heads_and_neurons(tmp_path, hamlet):
    module = text(hamlet)
    model = HFLanguageModel(tiny_gpt2(module.vocab_size))
    callback = GradualMagnitudePruning(0.5, start=0, end=8, frequency=2, granularity=GROUPS, verbose=False)
    fit(model, [callback], module)
    assert callback.masks.is_masked("model.transformer.h.0.attn.c_attn.bias")  # Conv1D biases are members too
    gpt2 = model.model.eval()
    x = next(iter(module.val_dataloader()))[0]
    result = deploy_model(gpt2, x, repeats=3)
    for block in result.model.transformer.h:
        assert block.attn.num_heads == 2 and block.attn.c_attn.weight.shape == (32, 48) and block.attn.c_proj.weight.shape == (16, 32)
        assert block.mlp.c_fc.weight.shape == (32, 64) and block.mlp.c_proj.weight.shape == (64, 32)
    with torch.no_grad():
        expected = gpt2(input_ids=x).logits
        assert torch.allclose(result.model(input_ids=x).logits, expected, atol=1e-5)
    assert "ok" in loads_elsewhere(tmp_path, result.model, x, expected)


def test_gpt2_with_its_cache_on_keeps_its_heads_and_says_why_until_the_cache_is_off(hamlet):
    module = text(hamlet)
    model = HFLanguageModel(tiny_gpt2(module.vocab_size, use_cache=True))
    fit(model, [GradualMagnitudePruning(0.5, start=0, end=8, frequency=2, granularity=GROUPS, verbose=False)], module)
    gpt2 = model.model.eval()
    x = next(iter(module.val_dataloader()))[0]
    assert type(gpt2(input_ids=x).past_key_values).__name__ == "DynamicCache"

    kept = deploy_model(gpt2, x, repeats=1)  # the cache has a slice per head: with fewer heads it cannot be equal
    assert all(block.attn.num_heads == 4 for block in kept.model.transformer.h)
    rows = kept.report.removed_groups
    assert rows and all(not row.removed for row in rows)
    assert all("DynamicCache" in row.reason and "use_cache = False" in row.reason for row in rows)

    gpt2.config.use_cache = False
    removed = deploy_model(gpt2, x, repeats=1)
    assert all(block.attn.num_heads == 2 for block in removed.model.transformer.h)


def test_gpt2_with_its_cache_on_loses_mlp_neurons_as_the_cache_stays_the_same(hamlet):
    module = text(hamlet)
    model = HFLanguageModel(tiny_gpt2(module.vocab_size, use_cache=True))
    callback = GradualMagnitudePruning(0.5, start=0, end=8, frequency=2, granularity={"*.mlp.*": "neuron"},
                                       exclude=["*.attn.*"], verbose=False)  # fmt: skip
    fit(model, [callback], module)
    gpt2 = model.model.eval()
    x = next(iter(module.val_dataloader()))[0]
    result = deploy_model(gpt2, x, repeats=1)  # deploy compares the key/value tensors inside the two caches
    assert all(block.mlp.c_fc.weight.shape == (32, 64) for block in result.model.transformer.h)
    with torch.no_grad():
        got, want = result.model(input_ids=x), gpt2(input_ids=x)
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    assert torch.allclose(got.past_key_values.layers[1].values, want.past_key_values.layers[1].values, atol=1e-5)

    from lightning_sparse.deployment.api import _same  # and a cache that differs in one value does not compare equal

    assert _same(got, want)
    want.past_key_values.layers[1].values[0, 0, 0, 0] += 1.0
    assert not _same(got, want)


def test_transformer_encoder_layers_deploy_with_fewer_heads_and_neurons(tmp_path):
    torch.manual_seed(0)
    model = DigitsEncoder()
    found = {g.module: (g.kind, g.count) for g in find_group_layers(model)}
    assert found["encoder.layers.1"] == ("neuron", 64) and found["encoder.layers.1.self_attn"] == ("head", 4)
    granularity = {"*.self_attn.*": "head", "*.linear?.*": "neuron"}
    fit(model, [GradualMagnitudePruning(0.5, start=0, end=8, frequency=2, granularity=granularity, exclude=["head.*"],
                                        verbose=False)], digits_tokens())  # fmt: skip
    model.eval()
    ids = next(iter(digits_tokens(16)))[0]
    result = deploy_model(model, ids, repeats=1)
    for layer in result.model.encoder.layers:  # torch's fused encoder kernel needs all heads: the regular path runs
        assert isinstance(layer.self_attn, HeadPrunedMultiheadAttention) and layer.self_attn.num_heads == 2
        assert layer.linear1.out_features == 32 and layer.linear2.in_features == 32
    with torch.no_grad():
        expected = model(ids)
        assert torch.allclose(result.model(ids), expected, atol=1e-5)
    assert "ok" in loads_elsewhere(tmp_path, result.model, ids, expected)


def test_a_deployed_encoder_with_nested_tensors_still_takes_a_padding_mask():
    torch.manual_seed(0)
    model = DigitsEncoder(nested=True)
    assert model.encoder.use_nested_tensor  # torch packs padded batches into nested tensors in eval
    fit(model, [GradualMagnitudePruning(0.5, start=0, end=8, frequency=2, granularity={"*.self_attn.*": "head"},
                                        exclude=["head.*", "*.linear?.*"], verbose=False)], digits_tokens())  # fmt: skip
    model.eval()
    ids = next(iter(digits_tokens(16)))[0]
    deployed = deploy_model(model, ids, repeats=1).model
    assert all(layer.self_attn.num_heads == 2 for layer in deployed.encoder.layers)
    padding = torch.zeros(ids.shape, dtype=torch.bool)
    padding[:, 40:] = True  # the last 24 positions of every row are padding (left-aligned, as the nested path needs)
    with torch.no_grad():
        x = model.embed(ids)
        want = model.encoder(x, src_key_padding_mask=padding)
        got = deployed.encoder(x, src_key_padding_mask=padding)  # the regular path: no nested tensors without all heads
    assert torch.allclose(got[:, :40], want[:, :40], atol=1e-5)  # padded positions are not outputs (nested: zeros)


def test_a_transformer_layer_with_a_callable_activation_offers_no_neurons():
    model = DigitsEncoder(activation=lambda x: x * torch.sigmoid(x))  # elementwise, but a callable could mix units
    kinds = {g.module: g.kind for g in find_group_layers(model)}
    assert "encoder.layers.0" not in kinds and kinds["encoder.layers.0.self_attn"] == "head"


# ----------------------------------------------------------------------------- bad input, before training
def assert_refused(model, callback, data, match):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        fit(model, [callback], data, steps=2)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # before any training step


def test_head_on_a_layer_that_is_not_attention_is_refused():
    model = Classifier(arch="lenet300", input_shape=(1, 8, 8), num_classes=10)
    assert_refused(model, GradualMagnitudePruning(0.5, granularity="head", verbose=False), DigitsDataModule(batch_size=32),
            r"`granularity`='head' on 'net\.1\.weight'.*not an attention projection.*Attention modules found: none")


def test_neuron_on_an_attention_projection_is_refused(hamlet):
    module = text(hamlet)
    assert_refused(tiny_gpt(module.vocab_size), GradualMagnitudePruning(0.5, granularity="neuron", verbose=False), module,
            r"'neuron' on 'model\.transformer\.h\.0\.attn\.c_attn\.weight'.*not an MLP")


def test_head_count_pruned_to_zero_is_refused(hamlet):
    module = text(hamlet)
    assert_refused(tiny_gpt(module.vocab_size, n_head=2), GradualMagnitudePruning(0.8, granularity=GROUPS, verbose=False), module,
            r"head pruning at sparsity 0\.8 would remove every one of the 2 heads of 'model\.transformer\.h\.0\.attn'")


def test_group_members_with_another_granularity_are_refused(hamlet):
    module = text(hamlet)
    granularity = {"*.attn.c_attn.*": "head", "*.attn.c_proj.*": "channel", "*.mlp.*": "neuron"}
    assert_refused(tiny_gpt(module.vocab_size), GradualMagnitudePruning(0.5, granularity=granularity, verbose=False), module,
            r"'model\.transformer\.h\.0\.attn\.c_proj\.weight' is a member of the head groups of 'model\.transformer\.h\.0\.attn'")


def test_group_members_that_disagree_in_size_are_refused():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj, self.n_head = nn.Linear(32, 96), nn.Linear(48, 32), 4

    with pytest.raises(ValueError, match=r"head groups of 'attn'.*'attn\.c_proj\.weight' of shape \[32, 48\].*disagree in size"):
        find_group_layers(nn.ModuleDict({"attn": Attention()}))


def test_movement_pruning_refuses_channel_granularity():
    with pytest.raises(ValueError, match=r"`granularity` of MovementPruning must be one of \('unstructured', 'head', 'neuron'\)"):
        MovementPruning(0.5, granularity="channel")


def test_per_layer_sparsity_sets_each_modules_heads(hamlet):
    module = text(hamlet)
    model = tiny_gpt(module.vocab_size)
    callback = GradualMagnitudePruning({"*.h.0.attn.*": 0.5, "*.h.1.attn.*": 0.25}, start=0, end=4, frequency=2, granularity="head", verbose=False)
    fit(model, [callback], module, steps=6)
    assert [int(head_rows(b.attn.c_attn.weight, 4).sum()) for b in model.model.transformer.h] == [2, 1]
    assert not any(bool((b.mlp.c_fc.weight == 0).any()) for b in model.model.transformer.h)  # not selected: dense


def test_group_members_with_different_sparsities_are_refused(hamlet):
    module = text(hamlet)
    sparsity = {"*.h.0.attn.c_attn.*": 0.5, "*.h.0.attn.c_proj.*": 0.25}
    assert_refused(tiny_gpt(module.vocab_size), GradualMagnitudePruning(sparsity, granularity="head", verbose=False), module,
            r"head groups of 'model\.transformer\.h\.0\.attn' are pruned together, but their members are given different sparsities")
