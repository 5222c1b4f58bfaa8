"""What many tests share: the repository's paths, quiet trainers and models on sklearn's real digits, an interrupting
callback for exact-resume checks, and the ``lightning-sparse`` command run as a user runs it.

Tests take these as fixtures (see ``conftest.py``); helper functions inside a test module import them from here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_sparse.models import Classifier

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CLI = str(Path(sys.executable).with_name("lightning-sparse"))
DIGITS = [  # `lightning-sparse fit` on digits: a small MLP, two quiet epochs
    "--model=lightning_sparse.models.Classifier",
    "--model.arch=lenet300",
    "--model.input_shape=[1, 8, 8]",
    "--data=lightning_sparse.data.DigitsDataModule",
    "--trainer.max_epochs=2",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--seed_everything=0",
]


def digits_model(arch: str = "lenet300", **kwargs) -> Classifier:
    kwargs.setdefault("lr", 0.05)
    return Classifier(arch=arch, input_shape=(1, 8, 8), **kwargs)


def step_trainer(tmp_path, callbacks, steps: int = 12) -> pl.Trainer:
    """A CPU trainer for ``steps`` optimizer steps: no logger, checkpoints, progress bar or validation."""
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=list(callbacks), limit_val_batches=0)  # fmt: skip


def make_trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


class StopAfterEpoch(pl.Callback):
    """Interrupt training: save a checkpoint at the end of ``epoch`` and stop (to test exact resume)."""

    def __init__(self, epoch: int, path) -> None:
        self.epoch, self.path = epoch, path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def run_cli(*args: str, cwd: Path, pythonpath: Path | None = None) -> str:
    """Run ``lightning-sparse *args`` in a subprocess as from a user's shell: without ``WANDB_MODE`` (the CLI must
    choose offline itself) and without ``WANDB_SERVICE`` (the W&B service an earlier in-process test started, which
    a user's shell does not have); ``pythonpath``: the user's own modules, importable by class path. Fails the test
    on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_SERVICE")}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH", "")]))
    result = subprocess.run([CLI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def checkpoint_sparsity(root: Path) -> float:
    """Zeros over all weights of the LeNet-300-100 in the one checkpoint under ``root``."""
    (path,) = root.glob("**/checkpoints/*.ckpt")
    state = torch.load(path, weights_only=False)["state_dict"]
    weights = [state[f"net.{i}.weight"] for i in (1, 3, 5)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


_WITHOUT_TRAINING_CODE = """
import sys, torch
class Block:  # the training code must not be needed: importing it fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pytorch_lightning" or name in ("lightning_sparse.models", "lightning_sparse.data"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


def run_without_training_code(script: str) -> str:
    """Run ``script`` in a fresh Python where Lightning and the library's models and data cannot be imported (what
    loading a deployed model elsewhere looks like); fails the test on a non-zero exit, returns its stdout."""
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TRAINING_CODE + textwrap.dedent(script)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


class CausalLM(pl.LightningModule):
    """A Hugging Face causal LM (``model(input_ids=x).logits``) trained to predict the next character, as a user writes
    it; AdamW at ``lr``."""

    def __init__(self, model: torch.nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        logits = self.model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
