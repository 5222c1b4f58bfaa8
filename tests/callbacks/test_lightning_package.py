"""The unified `lightning` package (`lightning.pytorch`) works as `pytorch_lightning` does: callbacks in
`lightning.Trainer`, and `lightning-sparse fit --model=...` with modules subclassing `lightning.pytorch` classes."""

import lightning
import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
import torch

from unified_modules import UnifiedClassifier, UnifiedDigits
from support import ROOT
from lightning_sparse import GradualMagnitudePruning, LearningCompression, QuantizationAwareTraining, RigL


@pytest.mark.parametrize("cls", [GradualMagnitudePruning, RigL, QuantizationAwareTraining, LearningCompression])
def test_callbacks_are_callbacks_of_both_packages(cls):
    assert issubclass(cls, pl.Callback) and issubclass(cls, L.Callback) and issubclass(cls, lightning.Callback)


def test_gmp_and_qat_in_lightning_trainer_reach_exact_sparsity_and_resume(tmp_path):
    torch.manual_seed(0)
    model = UnifiedClassifier()
    gmp = GradualMagnitudePruning(sparsity=0.75, start=0, end=0.5, frequency=5, verbose=False)
    qat = QuantizationAwareTraining(bits=4, verbose=False)
    trainer = lightning.Trainer(
        max_epochs=2, callbacks=[gmp, qat], logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(model, UnifiedDigits())
    assert gmp.masks.sparsity() == pytest.approx(0.75, abs=1e-3)
    weights = [model.net[i].weight for i in (1, 3, 5)]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) == pytest.approx(0.75, abs=1e-3)
    assert all(torch.unique(row).numel() <= 16 for w in weights for row in w)  # 4 bits per output channel
    (path,) = tmp_path.glob("**/checkpoints/*.ckpt")  # lightning's own ModelCheckpoint found our state
    checkpoint = torch.load(path, weights_only=True)
    assert any("GradualMagnitudePruning" in key for key in checkpoint["callbacks"])
    resumed_gmp = GradualMagnitudePruning(sparsity=0.75, start=0, end=0.5, frequency=5, verbose=False)
    resumed = lightning.Trainer(
        max_epochs=3, callbacks=resumed_gmp, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path / "resumed", accelerator="cpu", devices=1,
    )  # fmt: skip — one callback, not a list: lightning's isinstance(callbacks, Callback) check must accept it
    resumed.fit(UnifiedClassifier(), UnifiedDigits(), ckpt_path=path)
    assert resumed_gmp.masks.sparsity() == pytest.approx(0.75, abs=1e-3)


def test_cli_fits_a_lightning_pytorch_module_and_datamodule(run_cli, tmp_path):
    # Before: "Import path tests.unified_modules.UnifiedClassifier does not correspond to a subclass of LightningModule"
    output = run_cli(
        "fit", "--model=unified_modules.UnifiedClassifier", "--data=unified_modules.UnifiedDigits",
        "--trainer.max_epochs=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--seed_everything=0",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.callbacks={ROOT / 'callbacks' / 'gmp.yaml'}",
        "--trainer.callbacks.frequency=5", "--trainer.callbacks.start=0", "--trainer.callbacks.end=0.5",
        cwd=tmp_path, pythonpath=ROOT / "tests",
    )  # fmt: skip
    assert "GradualMagnitudePruning compresses" in output and "GradualMagnitudePruning: sparsity per layer" in output
    (path,) = tmp_path.glob("**/checkpoints/*.ckpt")
    state = torch.load(path, weights_only=True)
    weights = [state["state_dict"][f"net.{i}.weight"] for i in (1, 3, 5)]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) == pytest.approx(0.9, abs=1e-3)
    assert state["hyper_parameters"]["lr"] == 0.05
