"""The ``lightning-sparse`` command, run as a user runs it (a subprocess), on real digits."""

import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lightning_sparse.core.masks import unpack
from support import CLI, DIGITS, ROOT, checkpoint_sparsity, run_cli

pytestmark = pytest.mark.slow  # subprocesses / several processes: `make test` runs it, `make test-fast` does not


def _wait_for_files(folder: Path, pattern: str, seconds: float = 60.0) -> list[Path]:
    """The files matching ``pattern``, waiting for W&B's service, which writes the run file after the CLI exits."""
    deadline = time.monotonic() + seconds
    while not (found := list(folder.glob(pattern))) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def test_fit_with_callback_flags(tmp_path):
    run_cli(
        "fit", *DIGITS, f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning_sparse.GradualMagnitudePruning",
        "--trainer.callbacks.sparsity=0.8", "--trainer.callbacks.start=0", "--trainer.callbacks.end=0.5",
        "--trainer.callbacks.frequency=5",
        cwd=tmp_path,
    )  # fmt: skip
    assert checkpoint_sparsity(tmp_path) == pytest.approx(0.8, abs=1e-4)


def test_fit_with_preset_then_report_and_test(tmp_path):
    output = run_cli(
        "fit", *DIGITS, f"--trainer.default_root_dir={tmp_path}", f"--trainer.callbacks={ROOT / 'callbacks' / 'gmp.yaml'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert "GradualMagnitudePruning: sparsity per layer" in output
    assert checkpoint_sparsity(tmp_path) == pytest.approx(0.9, abs=1e-4)

    (ckpt,) = tmp_path.glob("**/checkpoints/*.ckpt")
    plot = tmp_path / "sparsity.png"
    report = run_cli("report", str(ckpt), "--plot", str(plot), cwd=tmp_path)
    assert "net.3.weight" in report and "90.00%" in report and "global" in report
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tested = run_cli("test", *DIGITS, f"--ckpt_path={ckpt}", cwd=tmp_path)
    assert "test_acc" in tested


def test_demo_config_compares_with_dense_and_logs_wandb_offline(tmp_path):
    output = run_cli(
        "fit", "--config", str(ROOT / "examples" / "digits_gmp.yaml"), "--trainer.max_epochs=4",
        "--trainer.enable_progress_bar=false", cwd=tmp_path,
    )  # fmt: skip
    assert "Test metrics: dense baseline vs compressed" in output
    assert "saved offline in runs/wandb/offline-run-" in output
    assert len(_wait_for_files(tmp_path / "runs" / "wandb", "offline-run-*/run-*.wandb")) == 1
    assert "sparsity" in output.split("dense baseline vs compressed")[1]
    # only the demo's own lines: no Lightning tips, no third-party deprecations, no colour codes off a terminal
    for noise in ("💡 Tip", "LeafSpec", "anonymous setting", "\x1b["):
        assert noise not in output, noise
    assert not re.search(r"\b0\s+Total Flops", output)


def test_report_on_a_missing_file_fails_cleanly(tmp_path):
    result = subprocess.run([CLI, "report", str(tmp_path / "nope.ckpt")], capture_output=True, text=True)
    assert result.returncode != 0
    assert "nope.ckpt" in result.stderr


def test_rigl_by_flags_and_set_by_preset_override(tmp_path):
    run_cli(
        "fit", *DIGITS, f"--trainer.default_root_dir={tmp_path / 'rigl'}",
        "--trainer.callbacks+=lightning_sparse.RigL", "--trainer.callbacks.sparsity=0.8",
        "--trainer.callbacks.frequency=10", "--trainer.callbacks.distribution=uniform",
        cwd=tmp_path,
    )  # fmt: skip
    assert checkpoint_sparsity(tmp_path / "rigl") == pytest.approx(0.8, abs=1e-4)

    output = run_cli(
        "fit", *DIGITS, f"--trainer.default_root_dir={tmp_path / 'set'}",
        f"--trainer.callbacks={ROOT / 'callbacks' / 'rigl.yaml'}", "--trainer.callbacks.grow=random",
        "--trainer.callbacks.frequency=10",
        cwd=tmp_path,
    )  # fmt: skip
    assert "RigL: sparsity per layer" in output
    (ckpt,) = (tmp_path / "set").glob("**/checkpoints/*.ckpt")
    ((key, state),) = [(k, v) for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if k.startswith("RigL")]
    assert "'grow': 'random'" in key
    kept = sum(int(unpack(packed, state["masks"]["shapes"][name]).sum()) for name, packed in state["masks"]["packed"].items())
    assert kept == 5020  # exactly 10% of the 50,200 weights active
    # randomly grown weights on always-blank pixels get no gradient and stay 0, so zeros >= 90%
    assert 0.9 <= checkpoint_sparsity(tmp_path / "set") < 0.91


def test_qat_by_flags_with_per_layer_bits(tmp_path):
    run_cli(
        "fit", *DIGITS, f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning_sparse.QuantizationAwareTraining",
        '--trainer.callbacks.bits={"net.1.weight": 2, "net.3.*": 4}', "--trainer.callbacks.scale=per_tensor",
        cwd=tmp_path,
    )  # fmt: skip
    (path,) = tmp_path.glob("**/checkpoints/*.ckpt")
    state = torch.load(path, weights_only=False)["state_dict"]
    assert torch.unique(state["net.1.weight"]).numel() <= 3 and torch.unique(state["net.3.weight"]).numel() <= 15
    assert torch.unique(state["net.5.weight"]).numel() > 100  # not named: full precision


def test_joint_preset_then_export_round_trip(tmp_path):
    from lightning_sparse.export import load_compressed

    output = run_cli(
        "fit", *DIGITS, f"--trainer.default_root_dir={tmp_path}", f"--trainer.callbacks={ROOT / 'callbacks' / 'gmp_qat.yaml'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert "QuantizationAwareTraining (kmeans): weights per layer" in output
    (ckpt,) = tmp_path.glob("**/checkpoints/*.ckpt")
    exported = run_cli("export", str(ckpt), str(tmp_path / "model.lsz"), cwd=tmp_path)
    assert "whole file" in exported and "smaller than fp32 dense" in exported
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    loaded = load_compressed(tmp_path / "model.lsz")
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    weight = state["net.1.weight"]
    assert (weight == 0).float().mean().item() >= 0.9 - 1e-4 and torch.unique(weight[weight != 0]).numel() <= 16


def test_lc_preset_with_overrides(tmp_path):
    output = run_cli(
        "fit", *DIGITS, f"--trainer.default_root_dir={tmp_path}", f"--trainer.callbacks={ROOT / 'callbacks' / 'lc.yaml'}",
        "--trainer.callbacks.lc_steps=4", "--trainer.callbacks.steps_per_l=8", "--trainer.callbacks.first_l_steps=10",
        "--trainer.callbacks.sparsity=0.9",
        cwd=tmp_path,
    )  # fmt: skip
    assert "LearningCompression (prune): per layer" in output
    assert checkpoint_sparsity(tmp_path) == pytest.approx(0.9, abs=1e-4)


def test_lc_1bit_preset_with_fresh_l_steps(tmp_path):
    output = run_cli(
        "fit", *DIGITS, f"--trainer.default_root_dir={tmp_path}", f"--trainer.callbacks={ROOT / 'callbacks' / 'lc_1bit.yaml'}",
        "--trainer.callbacks.lc_steps=3", "--trainer.callbacks.steps_per_l=8", "--trainer.callbacks.first_l_steps=10",
        "--model.lr_schedule=cosine", "--model.lr_schedule_steps=10", "--model.weight_decay=0",
        cwd=tmp_path,
    )  # fmt: skip
    assert "LearningCompression (quantize): per layer" in output
    (ckpt,) = tmp_path.glob("**/checkpoints/*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert [torch.unique(state[f"net.{i}.weight"]).numel() for i in (1, 3, 5)] == [2, 2, 2]


def test_dense_baseline_drops_every_compression_callback(tmp_path):
    output = run_cli(
        "fit", *DIGITS, "--compare_dense=true", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning_sparse.LearningCompression", "--trainer.callbacks.lc_steps=3",
        "--trainer.callbacks.first_l_steps=10", "--trainer.callbacks.sparsity=0.8",
        "--trainer.callbacks.exclude=[net.5.weight]",
        "--trainer.callbacks+=lightning_sparse.QuantizationAwareTraining", "--trainer.callbacks.bits=4",
        "--trainer.callbacks.include=[net.5.weight]",
        cwd=tmp_path,
    )  # fmt: skip
    table = output.split("dense baseline vs compressed")[1]
    sparsity_row = next(line for line in table.splitlines() if "sparsity" in line)
    assert "0.0000" in sparsity_row and "0.8000" in sparsity_row  # dense trained without L-C (and without QAT)
