"""The Ax sweeper end to end on sklearn's digits: real `lightning-sparse fit` subprocesses, a real Ax client, W&B offline."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lightning_sparse.cli import main as cli_main
from lightning_sparse.sweep import load_sweep, run_sweep
from lightning_sparse.sweep.config import Constraint, Objective
from lightning_sparse.sweep.overrides import Key, get_value, set_value, split_arguments
from lightning_sparse.sweep.results import TrialRecord, best_trial, pareto_front
from lightning_sparse.sweep.wandb_sweep import export_wandb_sweep
from wandb_records import wandb_history, wandb_run

TESTS = Path(__file__).resolve().parents[1]  # tests/: its helper modules and data

FIT = {
    "seed_everything": 0,
    "trainer": {
        "max_epochs": 8,
        "accelerator": "cpu",
        "log_every_n_steps": 5,
        "enable_model_summary": False,
        "callbacks": [
            {"class_path": "lightning_sparse.GradualMagnitudePruning",
             "init_args": {"sparsity": 0.8, "start": 0.0, "end": 0.5, "frequency": 5, "verbose": False}},
        ],
    },
    "model": {"class_path": "lightning_sparse.models.Classifier",
              "init_args": {"arch": "lenet300", "input_shape": [1, 8, 8], "lr": 0.1}},
    "data": {"class_path": "lightning_sparse.data.DigitsDataModule", "init_args": {"batch_size": 32}},
}  # fmt: skip

SPARSITY = {"sparsity": {"key": "trainer.callbacks.0.init_args.sparsity", "bounds": [0.5, 0.95]}}


def short_fit(epochs: int = 2) -> dict:
    """``FIT`` in fewer epochs, for the tests that check what the sweeper does with its trials, not their accuracy."""
    fit = json.loads(json.dumps(FIT))
    fit["trainer"]["max_epochs"] = epochs
    return fit


@pytest.fixture(autouse=True)
def one_thread_per_trial(monkeypatch):
    """Trial subprocesses on a shared 2-core machine: one torch thread each; they can import tests' helpers."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


def write_sweep(tmp_path: Path, fit: dict | None = None, **spec) -> Path:
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(fit or FIT))
    spec = {"name": "test-sweep", "fit_config": "fit.yaml", "parameters": SPARSITY, "max_trials": 3, "seed": 0, **spec}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def ax_trials(folder: Path) -> dict:
    """The trials of the Ax experiment saved in ``folder`` (Ax is imported here, not at collection: it takes seconds
    to import and only the real sweeps read it)."""
    from ax import Client

    return Client.load_from_json_file(str(folder / "ax_state.json"))._experiment.trials


def read_trials(folder: Path) -> list[dict]:
    with open(folder / "trials.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------- keys and small pieces
def test_keys_address_list_items_init_args_and_per_layer_globs():
    config = {"trainer": {"callbacks": [{"class_path": "A", "init_args": {"sparsity": 0.5}}]}, "model": {"init_args": {}}}
    set_value(config, "trainer.callbacks.0.sparsity", 0.7)  # init_args implied
    assert config["trainer"]["callbacks"][0]["init_args"]["sparsity"] == 0.7
    set_value(config, "trainer.callbacks.0.init_args.sparsity[fc1.*]", 0.9)
    set_value(config, "trainer.callbacks.0.init_args.sparsity[fc2.*]", 0.6)
    assert config["trainer"]["callbacks"][0]["init_args"]["sparsity"] == {"fc1.*": 0.9, "fc2.*": 0.6}
    assert get_value(config, "trainer.callbacks.0.init_args.sparsity[fc2.*]") == 0.6
    set_value(config, "model.init_args.lr", 0.1)
    assert config["model"]["init_args"]["lr"] == 0.1
    with pytest.raises(KeyError, match="not a position in a list of 1"):
        set_value(config, "trainer.callbacks.3.init_args.sparsity", 0.5)
    with pytest.raises(ValueError, match="is not a config key"):
        Key.parse("trainer..callbacks")


def test_only_keys_jsonargparse_cannot_parse_are_split_off():
    plain, overrides = split_arguments(["fit", "--model.init_args.lr=0.1", "--trainer.callbacks.0.init_args.sparsity=0.7",
                                        "--trainer.callbacks.0.sparsity[fc*]=0.9", "--config", "x.yaml"])  # fmt: skip
    assert plain == ["fit", "--model.init_args.lr=0.1", "--config", "x.yaml"]
    assert [(str(k), v) for k, v in overrides] == [("trainer.callbacks.0.init_args.sparsity", 0.7), ("trainer.callbacks.0.sparsity[fc*]", 0.9)]


def test_fit_accepts_indexed_callback_and_per_layer_keys(tmp_path, capsys):
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(FIT))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(tmp_path / "fit.yaml"), "--trainer.callbacks.0.init_args.sparsity[net.1.*]=0.9",
                  "--trainer.callbacks.0.init_args.end=0.7", "--print_config"])  # fmt: skip
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    gmp = printed["trainer"]["callbacks"][0]["init_args"]
    assert gmp["sparsity"] == {"net.1.*": 0.9} and gmp["end"] == 0.7


def test_constraints_objectives_pareto_and_best():
    constraint = Constraint.parse("val_acc >= baseline - 0.005")
    assert constraint.threshold(0.97) == pytest.approx(0.965) and constraint.holds(0.966, 0.97) and not constraint.holds(0.96, 0.97)
    assert Constraint.parse("compressed_bytes <= 5000").holds(4000, None)
    with pytest.raises(ValueError, match="is not `METRIC >= BOUND`"):
        Constraint.parse("val_acc >= __import__('os')")
    size, acc = Objective("compressed_bytes", True), Objective("val_acc", False)
    records = [TrialRecord(i, {}, "completed", {"compressed_bytes": b, "val_acc": a})
               for i, (b, a) in enumerate([(100, 0.90), (200, 0.95), (150, 0.89), (300, 0.94)])]  # fmt: skip
    assert [r.index for r in pareto_front(records, [size, acc])] == [0, 1]
    sweep = load_sweep(write_sweep(Path(__import__("tempfile").mkdtemp()), constraints=["val_acc >= 0.93"]))
    assert best_trial(records, sweep, None).index == 1  # the smallest model among those meeting val_acc >= 0.93


# ---------------------------------------------------------------------- bad input: refused before any trial
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"parameters": {}}, "the search space has no parameters"),
        ({"parameters": {"s": {"key": "trainer.callbacks.0.init_args.sparsity", "bounds": [0.9, 0.5]}}}, "reversed"),
        ({"parameters": {"s": {"key": "trainer.callbacks.0.init_args.sparsity", "bounds": [0.5, 1.2]}}},
         "1.2 is outside what GradualMagnitudePruning accepts: `sparsity` must be a number in \\[0, 1\\)"),
        ({"parameters": {"s": {"key": "trainer.callbacks.2.init_args.sparsity", "bounds": [0.5, 0.9]}}}, "not a position in a list of 1"),
        ({"parameters": {"s": {"key": "trainer.callbacks.0.init_args.sparsity"}}}, "needs exactly one of `bounds"),
        ({"strategy": "grid"}, "`strategy` must be one of"),
        ({"constraints": ["val_acc > 0.9"]}, "is not `METRIC >= BOUND`"),
    ],
)
def test_bad_sweep_files_are_refused_with_the_reason(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(write_sweep(tmp_path, **changes))


def test_base_config_that_fails_validation_is_refused_before_any_trial(tmp_path):
    fit = json.loads(json.dumps(FIT))
    fit["model"]["init_args"]["no_such_argument"] = 1
    with pytest.raises(ValueError, match="the base fit config fails validation"):
        run_sweep(write_sweep(tmp_path, fit=fit), output=tmp_path / "out")
    assert not (tmp_path / "out" / "trials").exists()


def test_constraint_on_a_metric_no_trial_logs_is_refused_before_any_trial(tmp_path):
    sweep = write_sweep(tmp_path, constraints=["val_accuracy >= 0.9"], baseline=0.9)
    with pytest.raises(ValueError, match=r"metrics no trial logs: \['val_accuracy'\].*'val_acc'"):
        run_sweep(sweep, output=tmp_path / "out")
    assert not (tmp_path / "out" / "trials").exists()


# ---------------------------------------------------------------------- real sweeps
def test_sweep_finds_the_smallest_feasible_model_and_writes_its_outputs(tmp_path):
    result = run_sweep(write_sweep(tmp_path), output=tmp_path / "out")
    folder = tmp_path / "out"
    rows = read_trials(folder)
    assert [row["status"] for row in rows] == ["completed"] * 3
    assert result.baseline is not None and 0.9 < result.baseline <= 1.0  # the dense run's val_acc
    for row in rows:  # GMP reached the sparsity Ax asked for, and the export shrank accordingly
        assert float(row["sparsity"]) == pytest.approx(float(row["param/sparsity"]), abs=0.01)
    feasible = [row for row in rows if row["feasible"] == "True"]
    assert feasible, "GMP at 50-95% on digits keeps val_acc within 0.5 points of dense for some trial"
    smallest = min(feasible, key=lambda row: float(row["compressed_bytes"]))
    assert result.best is not None and result.best.index == int(smallest["index"])
    assert (folder / "sweep.png").stat().st_size > 10_000
    assert len(ax_trials(folder)) == 3
    # every trial logged to W&B offline, in the sweep's group, with its parameters in the run config
    runs = sorted((folder / "trials").glob("*/wandb/offline-run-*"))
    assert len(runs) == 3
    info = wandb_run(runs[0])
    assert info["group"] == "test-sweep" and info["name"] == "test-sweep-trial-0"
    assert info["config"]["sparsity"] == pytest.approx(float(rows[0]["param/sparsity"]))
    assert any("compressed_bytes" in row for row in wandb_history(runs[0]))
    (summary,) = folder.glob("wandb/offline-run-*")
    assert wandb_run(summary)["job_type"] == "sweep-summary"
    # best.yaml runs as is
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["trainer"]["callbacks"][0]["init_args"]["sparsity"] == pytest.approx(result.best.parameters["sparsity"])
    run = subprocess.run([sys.executable, "-m", "lightning_sparse.cli", "fit", "--config", str(folder / "best.yaml"),
                          "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path / 'best'}"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]


def test_failed_and_hanging_trials_mark_only_themselves(tmp_path):
    fit = short_fit()  # trial 2 must finish well inside the timeout on a loaded machine
    fit["trainer"]["callbacks"].append({"class_path": "sweep_helpers.FailInTrial", "init_args": {"crash": "trial-0", "hang": "trial-1"}})
    # the timeout leaves a normal trial room on a loaded 2-core machine (a trial that only crashes took 26 s there)
    sweep = write_sweep(tmp_path, fit=fit, baseline=0.95, trial_timeout=90)
    result = run_sweep(sweep, output=tmp_path / "out", parallel=2)
    rows = {row["index"]: row for row in read_trials(tmp_path / "out")}
    assert rows["0"]["status"] == "failed" and "exited with code 1" in rows["0"]["error"]
    assert rows["0"]["log"] == "trials/0000/trial.log"
    assert "trial-0 crashes on purpose" in (tmp_path / "out" / rows["0"]["log"]).read_text()
    assert rows["1"]["status"] == "failed" and rows["1"]["error"] == "timed out after 90 s"
    assert rows["2"]["status"] == "completed"
    statuses = {i: t.status.name for i, t in ax_trials(tmp_path / "out").items()}
    assert statuses == {0: "FAILED", 1: "FAILED", 2: "COMPLETED"}
    assert result.best is None or result.best.index == 2


def test_per_layer_bounds_and_values_become_one_parameter_per_glob(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, parameters={
        "sparsity": {"key": "trainer.callbacks.0.init_args.sparsity", "bounds": {"net.1.*": [0.5, 0.9], "net.3.*": [0.6, 0.95]}},
        "distribution": {"key": "trainer.callbacks.0.init_args.distribution", "values": ["uniform", "global"]},
    }))  # fmt: skip
    assert [(p.name, p.key, p.bounds or p.values) for p in sweep.parameters] == [
        ("sparsity[net.1.*]", "trainer.callbacks.0.init_args.sparsity[net.1.*]", (0.5, 0.9)),
        ("sparsity[net.3.*]", "trainer.callbacks.0.init_args.sparsity[net.3.*]", (0.6, 0.95)),
        ("distribution", "trainer.callbacks.0.init_args.distribution", ("uniform", "global")),
    ]
    with pytest.raises(ValueError, match="'uniformish'"):
        load_sweep(write_sweep(tmp_path, parameters={"d": {"key": "trainer.callbacks.0.init_args.distribution", "values": ["uniformish", "global"]}}))


def test_a_killed_sweep_resumes_without_losing_or_rerunning_trials(tmp_path):
    # two objectives: the result also reports the Pareto front
    sweep = write_sweep(tmp_path, fit=short_fit(), baseline=0.95, max_trials=3, objective="val_acc, -compressed_bytes")
    folder = tmp_path / "out"
    command = [sys.executable, "-m", "lightning_sparse.cli", "sweep", "--config", str(sweep), "--output", str(folder)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    done: list[dict] = []
    while time.monotonic() < deadline and not done:
        time.sleep(0.5)
        if (folder / "sweep_state.json").is_file():
            done = [r for r in json.loads((folder / "sweep_state.json").read_text())["records"] if r["status"] == "completed"]
    assert done, "no trial completed within 300 s"
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {r["index"]: r for r in done}
    logs = {i: (folder / r["log"]).stat().st_mtime_ns for i, r in before.items()}

    result = run_sweep(sweep, output=folder, resume=True)
    assert len(result.records) == 3 and [r.index for r in result.records] == [0, 1, 2]
    assert all(r.status == "completed" for r in result.records)
    for record in result.records:
        if record.index in before:  # kept as it was: same metrics, log untouched (not run again)
            assert record.metrics == before[record.index]["metrics"]
            assert (folder / record.log).stat().st_mtime_ns == logs[record.index]
    trials = ax_trials(folder)
    assert len(trials) == 3 and all(t.status.name == "COMPLETED" for t in trials.values())
    points = {r.index: (r.metrics["val_acc"], -r.metrics["compressed_bytes"]) for r in result.records}
    front = [i for i, p in points.items() if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points.values())]
    assert front and sorted(r.index for r in result.pareto) == front
    with pytest.raises(FileExistsError, match="pass `--resume`"):
        run_sweep(sweep, output=folder)


def test_wandb_agent_command_line_runs_a_trial(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, fit=short_fit(), parameters={**SPARSITY, "end": {"key": "trainer.callbacks.0.init_args.end", "bounds": [0.3, 0.8]}}))
    path = export_wandb_sweep(sweep, tmp_path / "wandb_sweep.yaml")
    spec = yaml.safe_load(path.read_text())
    assert spec["method"] == "bayes" and spec["metric"] == {"name": "compressed_bytes", "goal": "minimize"}
    assert spec["parameters"]["trainer.callbacks.0.init_args.sparsity"] == {"min": 0.5, "max": 0.95, "distribution": "uniform"}
    values = {"trainer.callbacks.0.init_args.sparsity": 0.77, "trainer.callbacks.0.init_args.end": 0.4}
    args = [f"--{name}={value}" for name, value in values.items()]  # what a W&B agent passes for ${args}
    command = [part for item in spec["command"] for part in (args if item == "${args}" else ["env"] if item == "${env}" else [item])]
    assert command[1:3] == ["lightning-sparse", "fit"]
    command[1:2] = [sys.executable, "-m", "lightning_sparse.cli"]  # the same entry point, from this venv
    env = {name: value for name, value in os.environ.items() if name != "WANDB_SERVICE"}  # as on an agent's machine
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (run_dir,) = tmp_path.glob("wandb/offline-run-*")
    final = [row for row in wandb_history(run_dir) if "sparsity" in row]
    assert final and final[-1]["sparsity"] == pytest.approx(0.77, abs=0.01) and final[-1]["compressed_bytes"] > 0
    assert wandb_run(run_dir)["group"] == "test-sweep"


def test_ray_launcher_runs_trials_as_ray_tasks(tmp_path):
    pytest.importorskip("ray")
    from lightning_sparse.sweep import RayLauncher

    launcher = RayLauncher(cpus_per_trial=1, num_cpus=2)  # a local Ray instance, started here
    result = run_sweep(write_sweep(tmp_path, fit=short_fit(), baseline=0.95, max_trials=1), output=tmp_path / "out", launcher=launcher)
    assert [r.status for r in result.records] == ["completed"] and result.records[0].metrics["sparsity"] > 0.45
