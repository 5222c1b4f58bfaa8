"""The plain-loop example (examples/plain_loop.py) drives the same core objects as the callbacks: same weights, bit for bit."""

import importlib.util
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_sparse import GradualMagnitudePruning, LearningCompression, MovementPruning, QuantizationAwareTraining, RigL
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import Classifier

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plain_loop.py"


def _example():
    spec = importlib.util.spec_from_file_location("plain_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CALLBACKS = {
    "gmp": lambda: GradualMagnitudePruning(sparsity=0.9, start=8, end=40, frequency=8, verbose=False),
    "movement": lambda: MovementPruning(sparsity=0.9, start=8, end=40, frequency=1, verbose=False),
    "rigl": lambda: RigL(sparsity=0.9, frequency=10, alpha=0.3, end=60, seed=0, verbose=False),
    "qat": lambda: QuantizationAwareTraining(bits=4, start=8, verbose=False),
    "lc": lambda: LearningCompression(sparsity=0.8, lc_steps=4, steps_per_l=15, first_l_steps=10, verbose=False),
}


@pytest.mark.parametrize("method", list(CALLBACKS))
def test_plain_loop_and_callback_give_bit_identical_weights(tmp_path, method):
    example = _example()
    plain = example.METHODS[method]()
    torch.manual_seed(0)  # the example's network() seeds the same way
    model = Classifier(arch="lenet300", input_shape=(1, 8, 8), lr=0.05)
    trainer = pl.Trainer(
        max_epochs=example.EPOCHS, callbacks=[CALLBACKS[method]()], accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, DigitsDataModule(batch_size=64))
    assert trainer.global_step == 80
    expected = model.net.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, expected[name]), f"{method}: {name} differs by {float((tensor - expected[name]).abs().max())}"
    weight = plain[1].weight.detach()
    if method == "qat":  # what makes the run QAT: every output channel on its 4-bit grid
        assert max(torch.unique(row).numel() for row in weight) <= 15
    elif method == "lc":  # the model ends at Δ(Θ): exactly 80% of all weights zero (one global κ)
        weights = [p.detach() for n, p in plain.named_parameters() if n.endswith("weight")]
        assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))
    else:
        assert float((weight == 0).float().mean()) >= 0.8


def test_fabric_example_matches_gmp_and_qat_in_a_trainer(tmp_path):
    spec = importlib.util.spec_from_file_location("fabric_example", EXAMPLE.with_name("fabric.py"))
    fabric_example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fabric_example)
    plain = fabric_example.train()
    torch.manual_seed(0)
    model = Classifier(arch="lenet300", input_shape=(1, 8, 8), lr=0.05)
    callbacks = [
        GradualMagnitudePruning(sparsity=0.9, start=8, end=40, frequency=8, verbose=False),
        QuantizationAwareTraining(bits=4, start=40, verbose=False),
    ]
    trainer = pl.Trainer(
        max_epochs=4, callbacks=callbacks, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, DigitsDataModule(batch_size=64))
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, model.net.state_dict()[name]), name
    weight = plain[1].weight.detach()
    assert int((weight == 0).sum()) >= round(0.9 * weight.numel())  # the grid may round a small survivor to 0 too
    assert max(torch.unique(row).numel() for row in weight) <= 15
