"""One-shot pruning and distillation on Hugging Face models built from tiny configs (no download), trained on real
Shakespeare text: a Llama (decoder layers in ``model.layers``) and GPT-2 (``Conv1D`` weights stored (in, out))."""

import pytest
import pytorch_lightning as pl
import torch

from support import CausalLM
from lightning_sparse import Distillation, OneShotPruning
from lightning_sparse.core.calibration import find_blocks, find_layers
from lightning_sparse.core.structured import nm_counts
from lightning_sparse.core.targets import select_targets
from lightning_sparse.data import ShakespeareDataModule, load_shakespeare_works, shakespeare_archive

transformers = pytest.importorskip("transformers")
try:
    shakespeare_archive()
except FileNotFoundError as error:
    pytest.skip(str(error), allow_module_level=True)


@pytest.fixture(scope="module")
def hamlet(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "hamlet.txt"
    path.write_text(load_shakespeare_works()["hamlet"][:30_000], encoding="utf-8")
    module = ShakespeareDataModule(path=str(path), block_size=16, batch_size=8)
    module.setup()
    return module


def llama(vocab_size: int) -> CausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)  # fmt: skip
    return CausalLM(transformers.LlamaForCausalLM(config), lr=1e-3)


def fit(module, data, callbacks, tmp_path, steps=4):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0, callbacks=callbacks)  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer


def test_llama_blocks_are_its_decoder_layers(hamlet):
    module = llama(hamlet.vocab_size)
    targets = select_targets(module, exclude="*lm_head*")
    blocks = find_blocks(module, find_layers(module, targets))
    assert list(blocks) == ["model.model.layers.0", "model.model.layers.1"]
    assert len(blocks["model.model.layers.0"]) == 7  # q, k, v, o, gate, up, down


def test_llama_sparsegpt_2_4_in_fit_with_distillation_holds_the_pattern(hamlet, tmp_path):
    module = llama(hamlet.vocab_size)
    oneshot = OneShotPruning(method="sparsegpt", granularity="2:4", calibration_batches=4, exclude=["*lm_head*"], verbose=False)
    distill = Distillation(alpha=0.5, temperature=2.0, module="model", hidden_weight=0.5)
    fit(module, hamlet, [oneshot, distill], tmp_path)
    for name in oneshot.masks:
        weight = module.get_parameter(name)
        assert (nm_counts(weight, 4) == 2).all(), name  # exactly 2 of every 4 inputs kept, after recovery steps
    assert all(p.requires_grad is False for p in distill.teacher.parameters())
    dense = distill.teacher.get_parameter("model.layers.0.mlp.up_proj.weight")
    assert float((dense == 0).float().mean()) == 0.0  # the teacher is the dense model


def test_gpt2_conv1d_wanda_prunes_per_output_along_its_inputs(hamlet, tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=hamlet.vocab_size, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    module = CausalLM(transformers.GPT2LMHeadModel(config), lr=1e-3)
    oneshot = OneShotPruning(0.5, method="wanda", calibration_batches=3, verbose=False)
    fit(module, hamlet, [oneshot], tmp_path, steps=2)
    for name in oneshot.masks:  # Conv1D weights are (in, out): Wanda's per-output rows are columns here
        zeros = module.get_parameter(name) == 0
        assert (zeros.sum(0) == zeros.shape[0] // 2).all(), name
