"""Encoders and encoder-decoders, found by the structure registry: BERT, ViT, DistilBERT, ALBERT (one shared layer),
BART (self- and cross-attention) and T5 (gated MLP; heads, with the position bias its layers share). Structured GMP
at 0.5 in a short real fit on the digits (8×8 images; as pixels for ViT, as 64 tokens of 17 grey levels for the text
models), deploy with outputs equal to the masked model, fewer parameters, and the config rewritten so that
``save_pretrained`` → the stock ``from_pretrained`` gives the deployed outputs where the config can say it."""

import fnmatch

import pytest
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.core.heads import find_group_layers
from lightning_sparse.deployment import deploy_model

transformers = pytest.importorskip("transformers")


class Wrapped(nn.Module):
    """A Hugging Face model called with positional tensors (what deploy's example input is), returning its logits."""

    def __init__(self, model: nn.Module, seq2seq: bool = False, image: bool = False) -> None:
        super().__init__()
        self.model, self.seq2seq, self.image = model, seq2seq, image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image:
            return self.model(pixel_values=x).logits
        if self.seq2seq:
            return self.model(input_ids=x, decoder_input_ids=torch.zeros_like(x[:, :1])).logits
        return self.model(input_ids=x).logits


class Classify(pl.LightningModule):
    def __init__(self, net: Wrapped) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        logits = self.net(x)
        return nn.functional.cross_entropy(logits.reshape(len(y), -1), y)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    tokens = torch.tensor(data.images, dtype=torch.long).reshape(-1, 64)  # grey levels 0..16 as token ids
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    return tokens, images, torch.tensor(data.target)


def common(**extra):
    return dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=48, **extra)


def build(kind):
    torch.manual_seed(0)
    t = transformers
    if kind == "bert":
        config = t.BertConfig(vocab_size=17, max_position_embeddings=64, num_labels=10, **common())
        return Wrapped(t.BertForSequenceClassification(config)), t.AutoModelForSequenceClassification
    if kind == "vit":
        config = t.ViTConfig(image_size=8, patch_size=2, num_channels=1, num_labels=10, **common())
        return Wrapped(t.ViTForImageClassification(config), image=True), t.AutoModelForImageClassification
    if kind == "distilbert":
        config = t.DistilBertConfig(vocab_size=17, max_position_embeddings=64, n_layers=2, n_heads=4, dim=32, hidden_dim=48,
                                    num_labels=10)  # fmt: skip
        return Wrapped(t.DistilBertForSequenceClassification(config)), t.AutoModelForSequenceClassification
    if kind == "albert":
        config = t.AlbertConfig(vocab_size=17, embedding_size=16, max_position_embeddings=64, num_labels=10, **common())
        return Wrapped(t.AlbertForSequenceClassification(config)), t.AutoModelForSequenceClassification
    if kind == "swin":
        config = t.SwinConfig(image_size=8, patch_size=2, num_channels=1, embed_dim=16, depths=[1, 1], num_heads=[4, 4],
                              window_size=2, mlp_ratio=3.0, num_labels=10)  # fmt: skip
        return Wrapped(t.SwinForImageClassification(config), image=True), t.AutoModelForImageClassification
    if kind == "bart":
        config = t.BartConfig(vocab_size=17, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                              decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                              use_cache=False, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0)  # fmt: skip
        return Wrapped(t.BartForConditionalGeneration(config), seq2seq=True), t.AutoModelForSeq2SeqLM
    if kind == "t5":
        config = t.T5Config(vocab_size=17, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                            feed_forward_proj="gated-gelu", use_cache=False, decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
        return Wrapped(t.T5ForConditionalGeneration(config), seq2seq=True), t.AutoModelForSeq2SeqLM
    raise AssertionError(kind)


#: output layers and poolers stay dense, where the model has them (an `exclude` glob that matches nothing is refused)
OUTPUT_LAYERS = ("*classifier*", "*pooler*", "*lm_head*")


def fit(net, data, granularity, exclude=()):
    names = [name for name, _ in net.named_parameters()]
    outputs = [glob for glob in OUTPUT_LAYERS if any(fnmatch.fnmatchcase(name, glob) for name in names)]
    gmp = GradualMagnitudePruning(0.5, start=0, end=4, frequency=2, granularity=granularity,
                                  exclude=[*outputs, *exclude], verbose=False)  # fmt: skip
    loader = DataLoader(TensorDataset(*data), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[gmp])  # fmt: skip
    trainer.fit(Classify(net), loader)
    return net.eval()


def outputs(net, x):
    with torch.no_grad():
        return net(x)


CASES = {  # kind: (granularity, the config's MLP width key, whether the config can state fewer heads of the same width)
    "bert": ({"*.attention.*": "head", "*.intermediate.*": "neuron", "*.layer.?.output.*": "neuron"}, "intermediate_size", False),
    "vit": ({"*.attention.*": "head", "*.mlp.*": "neuron"}, "intermediate_size", True),
    "distilbert": ({"*.attention.*": "head", "*.ffn.*": "neuron"}, "hidden_dim", False),
    "albert": ({"*.attention.*": "head", "*.ffn*": "neuron"}, "intermediate_size", False),
    "bart": ({"*_attn.*": "head", "*.fc?.*": "neuron"}, "encoder_ffn_dim", False),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_encoder_heads_and_neurons_deploy_and_the_config_follows(kind, digits, tmp_path):
    granularity, mlp_key, heads_expressible = CASES[kind]
    net, auto = build(kind)
    config = net.model.config
    inner = getattr(config, mlp_key)
    heads = [layer for layer in find_group_layers(net) if layer.kind == "head"]
    assert heads and all(layer.count == 4 for layer in heads)
    data = (digits[1],) if kind in ("vit", "swin") else (digits[0],)
    fit(net, (*data, digits[2]), granularity)
    x = data[0][:16]
    result = deploy_model(net, x, kernel="dense", repeats=1)
    deployed = result.model
    assert result.report.changed, result.report.notes
    assert torch.allclose(outputs(deployed, x), outputs(net, x), atol=1e-5)
    before, after = (sum(p.numel() for p in m.parameters()) for m in (net, deployed))
    assert after < before
    assert getattr(deployed.model.config, mlp_key) == inner // 2
    removed = [row for row in result.report.removed_groups if row.kind == "head"]
    assert removed and all(row.after == 2 for row in removed)
    if heads_expressible:
        assert deployed.model.config.num_attention_heads == 2
    else:
        assert any("cannot express the deployed attention heads" in note for note in result.report.notes), result.report.notes

    # the MLP width alone is what every one of these configs can state: the stock loader rebuilds that model
    net, _ = build(kind)
    fit(net, (*data, digits[2]), granularity if heads_expressible else {k: v for k, v in granularity.items() if v == "neuron"})
    deployed = deploy_model(net, x, kernel="dense", repeats=1).model
    deployed.model.save_pretrained(tmp_path / kind)
    reloaded = Wrapped(auto.from_pretrained(tmp_path / kind), seq2seq=net.seq2seq, image=net.image).eval()
    assert type(reloaded.model) is type(deployed.model)
    assert (outputs(reloaded, x) - outputs(deployed, x)).abs().max() <= 1e-5


def test_t5_heads_are_pruned_together_across_the_layers_sharing_the_position_bias_and_reload_with_stock_t5(digits, tmp_path):
    net, auto = build("t5")
    layers = {layer.module: layer for layer in find_group_layers(net)}
    self_attention = layers["model.encoder.block.0.layer.0.SelfAttention"]  # head h of both encoder layers is one unit
    assert (self_attention.pattern, self_attention.count, self_attention.width) == ("attention:shared-position-bias", 4, 8)
    assert {m.param.split(".layer.")[0] for m in self_attention.members} == {"model.encoder.block.0", "model.encoder.block.1"}
    assert self_attention.members[-1].param.endswith("block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    assert "model.decoder.block.0.layer.1.EncDecAttention" in layers  # cross-attention: its zero bias is shared too
    assert any(layer.pattern == "mlp:gated" for layer in layers.values())  # wi_0 / wi_1 rows with the wo column

    fit(net, (digits[0], digits[2]), {"*Attention.*": "head", "*.DenseReluDense.*": "neuron"})
    encoder = net.model.encoder.block
    table = encoder[0].layer[0].SelfAttention.relative_attention_bias.weight
    pruned = (table == 0).all(0)
    assert int(pruned.sum()) == 2  # the pruned heads' bias columns
    for block in encoder:  # the same heads are zero in every layer that adds the shared bias
        rows = block.layer[0].SelfAttention.q.weight.view(4, 8, -1)
        assert torch.equal((rows == 0).flatten(1).all(1), pruned)
    x = digits[0][:16]
    result = deploy_model(net, x, kernel="dense", repeats=1)
    deployed = result.model
    assert result.report.changed, result.report.notes
    assert torch.allclose(outputs(deployed, x), outputs(net, x), atol=1e-5)
    assert (deployed.model.config.num_heads, deployed.model.config.d_ff) == (2, 24)
    attention = deployed.model.decoder.block[1].layer[1].EncDecAttention
    assert (attention.n_heads, attention.inner_dim, attention.q.out_features) == (2, 16, 16)
    assert tuple(deployed.model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape) == (32, 2)
    deployed.model.save_pretrained(tmp_path / "t5")
    reloaded = Wrapped(auto.from_pretrained(tmp_path / "t5"), seq2seq=True).eval()
    assert type(reloaded.model) is type(deployed.model)
    assert (outputs(reloaded, x) - outputs(deployed, x)).abs().max() <= 1e-5


def test_swin_heads_with_their_relative_position_table_and_neurons_deploy(digits):
    net, _ = build("swin")
    attention = {layer.module: layer for layer in find_group_layers(net)}["model.swin.encoder.layers.0.blocks.0.attention"]
    assert attention.members[-1].param.endswith("relative_position_bias.relative_position_bias_table")  # a column per head
    fit(net, (digits[1], digits[2]), {"*.attention.*": "head", "*.mlp.*": "neuron"})
    table = net.model.swin.encoder.layers[0].blocks[0].attention.relative_position_bias.relative_position_bias_table
    assert int((table == 0).all(0).sum()) == 2  # the pruned heads' bias columns
    x = digits[1][:16]
    result = deploy_model(net, x, kernel="dense", repeats=1)
    assert result.report.changed, result.report.notes
    assert torch.allclose(outputs(result.model, x), outputs(net, x), atol=1e-5)
    rows = [row for row in result.report.removed_groups if row.removed]
    assert {(row.kind, row.after) for row in rows} == {("head", 2), ("neuron", 24), ("neuron", 48)}
    # Swin states its MLP width as mlp_ratio × the stage width and its heads per stage: no count-valued key to rewrite
    assert any("cannot express" in note for note in result.report.notes), result.report.notes
