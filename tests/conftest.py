"""Fixtures for every test: W&B offline, quiet trainers and models on sklearn's real digits (see ``support.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import support
from lightning_sparse.data import DigitsDataModule, load_shakespeare_works


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


#: Tests that start subprocesses or several processes, or train for many epochs, listed by file here (rather than
#: with a decorator in each file) so the fast tier is defined in one place: ``make test-fast`` (``pytest -m "not
#: slow"``) leaves them out, ``make test`` runs them. A whole file can instead say ``pytestmark = pytest.mark.slow``.
SLOW = {
    "callbacks/test_gmp.py": [
        "test_sparse_model_still_classifies_digits",  # 12 epochs of a CNN
        "test_interrupted_and_resumed_run_is_bit_identical",  # resume checks: three runs each
        "test_sparsity_reaches_wandb_offline_run",  # W&B's service process
    ],
    "callbacks/test_lc.py": ["test_lc_resumes_bit_identically"],
    "callbacks/test_rigl.py": ["test_interrupted_and_resumed_run_is_bit_identical"],
    "callbacks/test_qat.py": ["test_qat_with_pruning_resumes_bit_identically"],  # three interrupted-and-resumed runs
    "core/test_channel_groups.py": ["test_thinned_resnet_loads_in_a_process_without_the_training_code"],
    "deployment/test_deploy.py": ["test_deployed_model_loads_in_a_process_without_the_training_code"],
    "callbacks/test_lightning_package.py": ["test_cli_fits_a_lightning_pytorch_module_and_datamodule"],
    "callbacks/test_movement.py": [
        "test_interrupted_and_resumed_run_is_bit_identical",
        "test_movement_keeps_what_fine_tuning_needs_where_magnitude_keeps_what_pretraining_grew",  # 30 epochs
        "test_fit_with_the_movement_preset",
    ],
    "core/test_heads.py": [  # trained transformers deployed and timed, a subprocess
        "test_group_masks_resume_bit_exactly",
        "test_chargpt_deploys_with_fewer_heads_and_neurons",
        "test_bert_deploys_with_fewer_heads_and_neurons",
        "test_gpt2_deploys_with_fewer_heads_and_neurons",
        "test_transformer_encoder_layers_deploy_with_fewer_heads_and_neurons",
        "test_multihead_attention_and_mlp_deploy_without_pruned_heads_and_neurons",
    ],
    "models/test_chargpt.py": ["test_compiled_forward_trains_with_gmp"],  # torch.compile
    "models/test_finetune.py": [  # a pretrained MiniLM layer fine-tuned under three movement settings
        "test_movement_pruning_keeps_a_pretrained_encoder_where_the_papers_code_does",
    ],
    "models/test_data_models.py": ["test_mnist_from_wheel_then_from_a_user_npz"],  # parses 70k CSV rows
    "export/test_export.py": ["test_cli_export_prints_the_table_and_writes_a_loadable_file"],
    "export/test_security.py": [
        "test_bombs_are_refused_within_a_memory_bound",
        "test_a_large_all_zero_tensor_loads_with_an_explicit_budget",  # decodes gigabytes
        "test_fuzz_of_the_format_gives_no_wrong_weights_and_only_value_errors",
        "test_exported_granularity_and_glob_sweep_runs_through_the_agent_command_line",
        "test_sigterm_during_a_write_removes_its_temporary_file",
    ],
    "sweep/test_sweep.py": [  # every one starts `lightning-sparse fit` trial subprocesses (or Ray workers)
        "test_failed_and_hanging_trials_mark_only_themselves",
        "test_ray_launcher_runs_trials_as_ray_tasks",
        "test_constraint_on_a_metric_no_trial_logs_is_refused_before_any_trial",
        "test_base_config_that_fails_validation_is_refused_before_any_trial",
        "test_sweep_finds_the_smallest_feasible_model_and_writes_its_outputs",
        "test_a_killed_sweep_resumes_without_losing_or_rerunning_trials",
        "test_wandb_agent_command_line_runs_a_trial",
    ],
    "structure/test_onnx.py": [
        "test_a_deployed_llama_with_fewer_kv_groups_and_neurons_exports_to_onnx_and_onnxruntime_gives_its_logits",  # ~30 s export
    ],
}


def pytest_collection_modifyitems(config, items):
    """Mark the tests named in :data:`SLOW` ``slow``; a name there that its file no longer defines fails the run (so
    the fast tier cannot silently grow when a slow test is renamed)."""
    tests = Path(__file__).resolve().parent
    modules = {}
    for item in items:
        file = Path(item.fspath).resolve().relative_to(tests).as_posix()
        modules[file] = item.module
        if item.originalname in SLOW.get(file, ()):
            item.add_marker(pytest.mark.slow)
    missing = [f"{file}::{name}" for file, module in modules.items() for name in SLOW.get(file, ()) if not hasattr(module, name)]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {missing}")
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # a pytest-xdist worker (`make test` runs `-n auto`)
        _slow_files_first(items)


def pytest_configure(config):
    """Under pytest-xdist each worker gets its share of the cores as torch threads (and so does every process a test
    starts, through ``OMP_NUM_THREADS``): two workers of two threads each on two cores would only contend."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        threads = int(os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers))))
        torch.set_num_threads(threads)


def _slow_files_first(items) -> None:
    """Files holding the most slow tests (counted by name, not by parametrization) first; a stable sort keeps the
    order inside a file. ``--dist loadfile`` hands out whole files in this order, so the long ones start at once and
    the many short files fill the end, instead of one long file running alone after the rest."""
    slow: dict[Path, set[str]] = {}
    for item in items:
        names = slow.setdefault(item.path, set())
        if item.get_closest_marker("slow") is not None:
            names.add(item.originalname)
    items.sort(key=lambda item: -len(slow[item.path]))


@pytest.fixture(scope="session")
def sonnets_path(tmp_path_factory) -> str:
    """The first 20,000 characters of Shakespeare's sonnets, as a text file (skipped where the works are not on disk)."""
    try:
        text = load_shakespeare_works()["sonnets"][:20_000]
    except FileNotFoundError as error:
        pytest.skip(str(error))
    path = tmp_path_factory.mktemp("text") / "sonnets.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)
