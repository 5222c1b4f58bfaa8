"""The structure registry as a user meets it: a module of their own is refused with what to register, works once
registered (grouped-query heads pruned in a real fit on the digits and removed at deploy), and layouts whose counts
do not fit their projections are kept dense with the reason."""

import pytest
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.core.heads import find_group_layers
from lightning_sparse.deployment import deploy_model
from lightning_sparse.structure import register_attention, register_mlp, register_pattern, unregister_pattern


class MyAttention(nn.Module):
    """Grouped-query attention written the way users write it: ``wq/wk/wv/wo``, ``n_heads`` query heads sharing
    ``n_kv`` key/value heads; reshapes with ``-1`` heads, so fewer heads of the same width still run."""

    def __init__(self, dim=32, n_heads=8, n_kv=2, head_dim=4):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.wq, self.wk = nn.Linear(dim, n_heads * head_dim), nn.Linear(dim, n_kv * head_dim)
        self.wv, self.wo = nn.Linear(dim, n_kv * head_dim), nn.Linear(n_heads * head_dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MyMLP(nn.Module):
    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.w_in, self.w_out = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w_out(torch.relu(self.w_in(x)))


class RowTransformer(pl.LightningModule):
    """Digits as 8 tokens (the image rows) of 8 pixels: embed, one attention + MLP block, mean-pool, classify."""

    def __init__(self, attention=None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 32)
        self.attn, self.mlp = attention or MyAttention(), MyMLP()
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h)
        return self.head((h + self.mlp(h)).mean(1))

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.fixture(scope="module")
def loader():
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16
    return DataLoader(TensorDataset(x, torch.tensor(data.target)), batch_size=64, shuffle=True,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip


@pytest.fixture
def registered():
    register_attention(MyAttention, q="wq", k="wk", v="wv", o="wo", heads="n_heads", kv_heads="n_kv", head_dim="head_dim")
    register_mlp(MyMLP, up="w_in", down="w_out")
    yield
    unregister_pattern("attention:MyAttention")
    unregister_pattern("mlp:MyMLP")


def fit(model, loader, granularity, steps=8):
    gmp = GradualMagnitudePruning(0.5, start=0, end=4, frequency=2, granularity=granularity, exclude=["embed.*", "head.*"],
                                  verbose=False)  # fmt: skip
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[gmp])  # fmt: skip
    trainer.fit(model, loader)
    return model.eval()


def test_an_unknown_attention_layout_is_refused_naming_what_to_register(loader):
    with pytest.raises(ValueError, match=r"'head' on 'attn\.wq\.weight'.*register_attention"):
        fit(RowTransformer(), loader, {"attn.*": "head"})


def test_a_registered_gqa_attention_and_mlp_lose_half_their_units_in_training_and_at_deploy(registered, loader):
    model = RowTransformer()
    layers = {layer.module: layer for layer in find_group_layers(model)}
    assert (layers["attn"].count, layers["attn"].query_heads, layers["attn"].width) == (2, 4, 4)  # 2 KV groups of 4 heads
    assert layers["mlp"].count == 64
    fit(model, loader, {"attn.*": "head", "mlp.*": "neuron"})
    zero_q_rows = (model.attn.wq.weight == 0).all(1).view(2, 16).all(1)  # per KV group: its 4 query heads' 16 rows
    assert zero_q_rows.sum() == 1 and bool(((model.attn.wk.weight == 0).all(1).view(2, 4).all(1) == zero_q_rows).all())
    x = next(iter(loader))[0][:16]
    result = deploy_model(model, x, kernel="dense", repeats=1)
    deployed = result.model
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-5)
    rows = {row.module: row for row in result.report.removed_groups}
    assert (rows["attn"].before, rows["attn"].after, rows["mlp"].after) == (2, 1, 32)
    assert rows["attn"].rebuilt_as == "MyAttention (1 KV groups × 4 query heads)"
    removed = 16 * 33 + 4 * 33 + 4 * 33 + 16 * 32 + 32 * 33 + 32 * 32  # q rows (+bias), k, v, o columns; MLP row + column
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in deployed.parameters()) == removed
    shapes = sorted(tuple(p.shape) for p in deployed.parameters())
    assert (16, 32) in shapes and (4, 32) in shapes and (32, 16) in shapes and (32, 32) in shapes  # wq, wk/wv, wo, w_out


def test_the_surgery_updates_the_counts_a_registered_module_states(registered, loader):
    from lightning_sparse.deployment.groups import remove_zero_groups

    model = fit(RowTransformer(), loader, {"attn.*": "head"})
    remove_zero_groups(model)
    attn = model.attn
    assert (attn.wq.out_features, attn.wk.out_features, attn.wv.out_features, attn.wo.in_features) == (16, 4, 4, 16)
    assert (attn.n_heads, attn.n_kv, attn.head_dim) == (4, 1, 4)  # still 4 query heads per KV head


def test_a_head_count_that_does_not_divide_the_projection_is_kept_dense_saying_why(registered, loader):
    model = RowTransformer(MyAttention(n_heads=8, n_kv=2, head_dim=4))
    model.attn.n_heads = 5  # 32 query rows are not 5 heads of 4
    with pytest.raises(ValueError, match=r"kept dense because 'attn' \(MyAttention\) has 5 heads of 4, which does not give its 32 query rows"):
        fit(model, loader, {"attn.*": "head"})


def test_key_value_rows_that_are_not_whole_groups_are_kept_dense_saying_why(registered):
    model = RowTransformer(MyAttention(n_heads=8, n_kv=3, head_dim=4))  # 8 query heads cannot share 3 KV heads
    from lightning_sparse.core.heads import _find

    layers, dense = _find(model)
    assert not any(layer.module == "attn" for layer in layers)
    assert "not whole key/value heads of 4 dividing its 8 query heads" in dict(dense)["attn"]


def test_register_pattern_checks_its_arguments():
    with pytest.raises(ValueError, match=r"`name` must be 'attention:<label>' or 'mlp:<label>'"):
        register_pattern("mine", lambda name, module: None)
    with pytest.raises(TypeError, match=r"`pattern` must be callable"):
        register_pattern("attention:mine", "not a function")


def test_gqa_asked_to_remove_every_kv_group_is_refused_saying_what_a_unit_is(registered, loader):
    with pytest.raises(ValueError, match=r"remove every one of the 2 key/value groups of 'attn' \(MyAttention: grouped-query "
                                         r"attention, 4 query heads per KV head\).*fraction of KV groups"):
        gmp = GradualMagnitudePruning(0.75, granularity={"attn.*": "head"}, include=["attn.*.weight"], verbose=False)
        pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[gmp]).fit(RowTransformer(), loader)
