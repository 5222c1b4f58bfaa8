"""``torch.onnx.export`` of a deployed model: a tiny Hugging Face Llama trained on Shakespeare with half its KV groups
and MLP neurons pruned, deployed (the units removed, the config updated), exports with torch's default exporter
(``dynamo=True`` in torch 2.13; the TorchScript exporter, ``dynamo=False``, cannot: Llama's mask code calls
``aten::diff``), and onnxruntime gives the deployed model's logits. Deploy with ``kernel="dense"`` for ONNX: a CSR
``SparseLinear`` (``kernel="auto"``/``"sparse"`` on unstructured zeros) does not export ("Sparse CSR tensors do not
have is_contiguous")."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from support import CausalLM
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.data import ShakespeareDataModule, load_shakespeare_works, shakespeare_archive
from lightning_sparse.deployment import deploy_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


class Logits(torch.nn.Module):
    """The model called with token ids, returning its logits (one tensor in, one out: what ONNX holds)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def test_a_deployed_llama_with_fewer_kv_groups_and_neurons_exports_to_onnx_and_onnxruntime_gives_its_logits(tmp_path):
    try:
        works = load_shakespeare_works(str(shakespeare_archive()))
    except FileNotFoundError as error:
        pytest.skip(str(error))
    (tmp_path / "hamlet.txt").write_text(works["hamlet"][:20_000], encoding="utf-8")
    data = ShakespeareDataModule(path=str(tmp_path / "hamlet.txt"), block_size=16, batch_size=8)
    data.setup()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=data.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                                      use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    gmp = GradualMagnitudePruning(0.5, start=0, end=4, frequency=2, granularity={"*.self_attn.*": "head", "*.mlp.*": "neuron"},
                                  exclude=["*lm_head*"], verbose=False)  # fmt: skip
    pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, callbacks=[gmp]).fit(CausalLM(model), data)  # fmt: skip
    x = next(iter(data.train_dataloader()))[0]
    deployed = deploy_model(model.eval(), x, kernel="dense", repeats=1).model
    assert (deployed.config.num_key_value_heads, deployed.config.intermediate_size) == (1, 24)

    wrapped = Logits(deployed).eval()
    torch.onnx.export(wrapped, (x,), tmp_path / "llama.onnx", input_names=["ids"], output_names=["logits"])  # dynamo=True
    session = ort.InferenceSession(str(tmp_path / "llama.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"ids": x.numpy()})
    with torch.no_grad():
        want = wrapped(x).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4
