"""The structure plan: units found once at set-up, stored in the pruning callback's checkpoint state, and reused by
deploy. A tiny Hugging Face Llama trained on Shakespeare with heads (KV groups) and neurons pruned deploys to the same
model with the stored plan as by finding its units again; a model whose attention layout was registered only while it
trained deploys with its plan (nothing finds its heads without it); a plan that is not the model's is refused."""

import pytest
import pytorch_lightning as pl
import torch

from support import CausalLM
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.core.heads import find_group_layers
from lightning_sparse.deployment import deploy_model
from lightning_sparse.structure import StructurePlan, register_attention, unregister_pattern

transformers = pytest.importorskip("transformers")


def llama(vocab, layers=2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                                      use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def trained(hamlet, tmp_path_factory):
    """A Llama after a short fit with half its KV groups and MLP neurons pruned; its callback; its checkpoint."""
    model = llama(hamlet.vocab_size)
    gmp = GradualMagnitudePruning(0.5, start=0, end=4, frequency=2, granularity={"*.self_attn.*": "head", "*.mlp.*": "neuron"},
                                  exclude=["*lm_head*"], verbose=False)  # fmt: skip
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[gmp])  # fmt: skip
    trainer.fit(CausalLM(model), hamlet)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    trainer.save_checkpoint(path)
    return model.eval(), gmp, path


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_the_plan_is_plain_data_in_the_checkpoint_and_holds_the_units_found_at_setup(trained):
    model, gmp, path = trained
    plan = gmp.structure_plan.relative_to("model")  # stored for the LightningModule, which holds the Llama as `model`
    assert {layer.module for layer in plan.layers} == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn", "mlp")}
    assert all(layer in find_group_layers(model) for layer in plan.layers)
    assert all(len(plan.kept(layer)) == layer.count // 2 for layer in plan.layers)  # 1 of 2 KV groups, 24 of 48 neurons
    stored = torch.load(path, weights_only=True)["callbacks"][gmp.state_key]["structure_plan"]  # plain data only
    assert StructurePlan.from_state(stored) == gmp.structure_plan
    assert StructurePlan.from_state(stored).for_model(model) == plan


def test_deploy_with_the_stored_plan_gives_the_model_rediscovery_gives(trained, hamlet):
    model, gmp, path = trained
    x = next(iter(hamlet.train_dataloader()))[0]
    stored = torch.load(path, weights_only=True)["callbacks"][gmp.state_key]["structure_plan"]
    found = deploy_model(model, x, kernel="dense", repeats=1)
    for plan in (gmp.structure_plan, stored):
        planned = deploy_model(model, x, kernel="dense", repeats=1, plan=plan)
        assert planned.report.changed, planned.report.notes
        assert [(r.module, r.kind, r.removed) for r in planned.report.removed_groups] == [
            (r.module, r.kind, r.removed) for r in found.report.removed_groups
        ]
        ours, theirs = planned.model.state_dict(), found.model.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert planned.model.config.to_dict() == found.model.config.to_dict()
        assert (planned.model.config.num_key_value_heads, planned.model.config.intermediate_size) == (1, 24)
        assert torch.equal(logits(planned.model, x), logits(found.model, x))
        assert torch.allclose(logits(planned.model, x), logits(model, x), atol=1e-5)


def test_a_plan_that_is_not_the_models_is_refused_naming_the_difference(trained, hamlet):
    model, gmp, _ = trained
    x = next(iter(hamlet.train_dataloader()))[0]
    plan = gmp.structure_plan.state_dict()
    with pytest.raises(ValueError, match=r"`plan` does not describe `model`.*has no module 'model\.layers\.1\.self_attn'"):
        deploy_model(llama(hamlet.vocab_size, layers=1), x, kernel="dense", repeats=1, plan=plan)
    wider = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**model.config.to_dict(), "intermediate_size": 64}))
    with pytest.raises(ValueError, match=r"`plan` does not describe `model`.*'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[64, 32\]"):
        deploy_model(wider, x, kernel="dense", repeats=1, plan=plan)
    with pytest.raises(ValueError, match=r"drops heads \[\d\] of 'model\.layers\.0\.self_attn', which are not zero in the model"):
        deploy_model(llama(hamlet.vocab_size), x, kernel="dense", repeats=1, plan=plan)  # same shapes, untrained weights
    renamed = {**plan, "layers": [{**plan["layers"][0], "module": "model.layers.0.attn"}, *plan["layers"][1:]]}
    with pytest.raises(ValueError, match=r"has no module 'model\.layers\.0\.attn'"):
        deploy_model(model, x, kernel="dense", repeats=1, plan=renamed)
    with pytest.raises(ValueError, match=r"`plan` must be a StructurePlan or the dict its state_dict\(\) gives"):
        deploy_model(model, x, kernel="dense", repeats=1, plan={"layers": "?"})


def test_resuming_into_a_model_whose_units_differ_with_the_same_shapes_is_refused(trained, hamlet):
    """16 query heads of 2 in 4 KV groups have the weight shapes of 8 heads of 4 in 2 groups: the masks would load and
    cut the heads in the wrong places. The stored plan is compared with the units found at set-up, and differs."""
    _, _, path = trained
    config = transformers.LlamaConfig(vocab_size=hamlet.vocab_size, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=16, num_key_value_heads=4, head_dim=2, intermediate_size=48,
                                      max_position_embeddings=32, use_cache=False, pad_token_id=0, bos_token_id=0,
                                      eos_token_id=0)  # fmt: skip
    other = transformers.AutoModelForCausalLM.from_config(config)
    assert {n: p.shape for n, p in other.named_parameters()} == {n: p.shape for n, p in llama(hamlet.vocab_size).named_parameters()}
    gmp = GradualMagnitudePruning(0.5, start=0, end=4, frequency=2, granularity={"*.self_attn.*": "head", "*.mlp.*": "neuron"},
                                  exclude=["*lm_head*"], verbose=False)  # fmt: skip
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[gmp])  # fmt: skip
    with pytest.raises(ValueError, match=r"units of 'model\.model\.layers\.0\.self_attn' differ from this model's \(count: 2 "
                                         r"in the checkpoint, 4 here.*changed since the checkpoint was written"):  # fmt: skip
        trainer.fit(CausalLM(other), hamlet, ckpt_path=path)
    same = GradualMagnitudePruning(0.5, start=0, end=4, frequency=2, granularity={"*.self_attn.*": "head", "*.mlp.*": "neuron"},
                                   exclude=["*lm_head*"], verbose=False)  # fmt: skip
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[same])  # fmt: skip
    trainer.fit(CausalLM(llama(hamlet.vocab_size)), hamlet, ckpt_path=path)  # the same layout resumes
    assert same.structure_plan.keep == trained[1].structure_plan.keep


class MyAttention(torch.nn.Module):
    """Attention with ``wq/wk/wv/wo`` and 4 heads: no built-in pattern knows it."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, -1, 8).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class Rows(pl.LightningModule):
    """Digits as 8 tokens of 8 pixels through one attention block."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.attn, self.head = torch.nn.Linear(8, 32), MyAttention(), torch.nn.Linear(32, 10)

    def forward(self, x):
        h = self.embed(x)
        return self.head((h + self.attn(h)).mean(1))

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_a_layout_registered_only_while_training_deploys_with_its_plan_and_not_without():
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16
    loader = DataLoader(TensorDataset(x, torch.tensor(data.target)), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    register_attention(MyAttention, q="wq", k="wk", v="wv", o="wo", heads="heads")
    try:
        model = Rows()
        gmp = GradualMagnitudePruning(0.5, start=0, end=2, frequency=1, granularity={"attn.*": "head"}, include=["attn.*.weight"],
                                      verbose=False)  # fmt: skip
        pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[gmp]).fit(model, loader)  # fmt: skip
    finally:
        unregister_pattern("attention:MyAttention")
    model.eval()
    plan = gmp.structure_plan.state_dict()
    assert not find_group_layers(model)  # the registry no longer knows the layout
    bare = deploy_model(model, x[:32], kernel="dense", repeats=1)
    assert not bare.report.removed_groups
    planned = deploy_model(model, x[:32], kernel="dense", repeats=1, plan=plan)
    assert [(r.module, r.kind, r.after) for r in planned.report.removed_groups] == [("attn", "head", 2)]
    removed = 3 * 16 * (32 + 1) + 32 * 16  # q/k/v rows and biases, output columns of 2 heads of 8
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in planned.model.parameters()) == removed
    with torch.no_grad():
        assert torch.allclose(planned.model(x[:32]), model(x[:32]), atol=1e-5)


def test_the_deploy_command_reads_the_plan_the_callback_stored(trained):
    import argparse

    from lightning_sparse.cli.deploy import build_parser, stored_plan
    from lightning_sparse.export import load_checkpoint

    _, gmp, path = trained
    checkpoint = load_checkpoint(path)
    parsed = argparse.Namespace(checkpoint=str(path))
    assert stored_plan(build_parser(), parsed, checkpoint) == gmp.structure_plan.state_dict()
    other = gmp.structure_plan.state_dict()
    other["layers"][0]["keep"] = [1 - other["layers"][0]["keep"][0]]
    checkpoint["callbacks"]["another"] = {"structure_plan": other}
    with pytest.raises(SystemExit):
        stored_plan(build_parser(), parsed, checkpoint)
