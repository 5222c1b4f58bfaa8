"""Fixtures for every test: W&B offline, quiet trainers and models on sklearn's real digits (see ``support.py``)."""

from __future__ import annotations

import pytest

import support
from lightning_sparse.data import DigitsDataModule


@pytest.fixture(autouse=True, scope="session")
def wandb_offline():
    """No test talks to W&B's servers: every run (and every subprocess a test starts) is offline and quiet. Session
    scope, so module-scoped fixtures that train are covered too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        yield


@pytest.fixture
def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64)


@pytest.fixture(scope="module")
def data() -> DigitsDataModule:
    """Digits, set up once per module (``data.splits["test"]`` holds the test images and labels)."""
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return dm


@pytest.fixture
def digits_model():
    """``digits_model(arch="lenet300", **kwargs)``: a :class:`~lightning_sparse.models.Classifier` for 8×8 digits."""
    return support.digits_model


@pytest.fixture
def make_trainer():
    """``make_trainer(tmp_path, callbacks=(), **kwargs)``: a quiet CPU ``Trainer`` (4 epochs, no logger/checkpoints)."""
    return support.make_trainer


@pytest.fixture
def run_cli():
    """``run_cli(*args, cwd, pythonpath=None)``: the ``lightning-sparse`` command in a subprocess; its output."""
    return support.run_cli
