"""The sweep loop on Ax's ``Client``: configure, measure the baseline, then ask for trials, run them as
``lightning-sparse fit`` subprocesses, complete or fail them, save after every change, report."""

from __future__ import annotations

import logging
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from lightning_sparse import files, wandb_mode
from lightning_sparse.sweep.config import (
    MAX_TRIALS,
    Parameter,
    SweepConfig,
    check_fit_config,
    check_parallel,
    is_plain_name,
    load_sweep,
)
from lightning_sparse.sweep.launchers import LOG_FILE, Launcher, TrialJob, TrialOutcome, make_launcher, read_metrics
from lightning_sparse.sweep.processes import end_stale
from lightning_sparse.sweep.metrics import write_json
from lightning_sparse.sweep.results import (
    TrialRecord,
    best_trial,
    is_feasible,
    pareto_front,
    plot_sweep,
    results_table,
    write_csv,
)
from lightning_sparse.sweep.trials import baseline_config, best_config, trial_config, write_yaml

AX_STATE = "ax_state.json"
SWEEP_STATE = "sweep_state.json"


@dataclass
class SweepResult:
    """What :func:`run_sweep` leaves behind (all of it also in ``folder``)."""

    folder: Path
    records: list[TrialRecord]
    baseline: float | None
    best: TrialRecord | None
    pareto: list[TrialRecord]
    best_config: Path | None
    plot: Path | None


def _ax_parameter(parameter: Parameter) -> Any:
    from ax import ChoiceParameterConfig, RangeParameterConfig

    if parameter.values is not None:
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in parameter.values)
        kind = ("int" if all(isinstance(v, int) for v in parameter.values) else "float") if numeric else "str"
        values = list(parameter.values) if numeric else [str(v) for v in parameter.values]
        return ChoiceParameterConfig(name=parameter.name, values=values, parameter_type=kind, is_ordered=numeric)
    scaling = "log" if parameter.log_scale else "linear"
    return RangeParameterConfig(name=parameter.name, bounds=parameter.bounds, parameter_type=parameter.kind, scaling=scaling)


def _quiet_ax() -> None:
    """Ax logs every generated and completed trial at INFO; our own progress lines say what matters."""
    for name in list(logging.root.manager.loggerDict):
        if name == "ax" or name.startswith("ax."):
            logging.getLogger(name).setLevel(logging.WARNING)


def _new_client(sweep: SweepConfig, baseline: float | None) -> Any:
    from ax import Client

    _quiet_ax()
    client = Client(random_seed=sweep.seed)
    client.configure_experiment(parameters=[_ax_parameter(p) for p in sweep.parameters], name=sweep.name)
    client.configure_optimization(
        objective=", ".join(str(o) for o in sweep.objective),
        outcome_constraints=[c.for_ax(baseline) for c in sweep.constraints] or None,
    )
    random = sweep.strategy == "random"
    client.configure_generation_strategy(
        method="random_search" if random else "fast",
        initialization_budget=sweep.initial_trials,
        initialization_random_seed=sweep.seed,
        initialize_with_center=not random,
    )
    return client


class _Sweep:
    """One sweep's state on disk: the Ax client, the trial records and the baseline, saved after every change."""

    def __init__(self, sweep: SweepConfig, folder: Path, console: Console) -> None:
        self.sweep, self.folder, self.console = sweep, folder, console
        self.client: Any = None
        self.records: dict[int, TrialRecord] = {}
        self.baseline: float | None = sweep.baseline

    # ------------------------------------------------------------- persistence
    def save(self) -> None:
        """Ax state and our records, each replaced atomically: a kill at any moment leaves a loadable sweep."""
        with files.atomic_path(self.folder / AX_STATE) as partial:  # Ax writes its JSON to a path
            self.client.save_to_json_file(str(partial))
        records = [r.as_dict() for r in sorted(self.records.values(), key=lambda r: r.index)]
        write_json(self.folder / SWEEP_STATE, {"baseline": self.baseline, "space": _space(self.sweep), "records": records})
        write_csv(self.folder / "trials.csv", list(self.records.values()), self.sweep, self.baseline)

    def load(self) -> None:
        """The saved sweep, after checking that the sweep file still describes the same search space."""
        from ax import Client

        state = files.read_json(self.folder / SWEEP_STATE)
        records = {r["index"]: TrialRecord(**r) for r in state["records"]}
        _check_same_space(self.sweep, state.get("space"), records, self.folder)
        _quiet_ax()
        self.client = Client.load_from_json_file(str(self.folder / AX_STATE))
        self.baseline = state["baseline"]
        self.records = records

    # ------------------------------------------------------------- trials
    def job(self, label: str, config: dict[str, Any], folder: Path) -> TrialJob:
        config_path = write_yaml(folder / "trial.yaml", config, f"# {self.sweep.name}: {label}\n")
        return TrialJob(label, config_path, folder, self.sweep.trial_timeout, {"LIGHTNING_SPARSE_TRIAL": label})

    def trial_folder(self, index: int) -> Path:
        return self.folder / "trials" / f"{index:04d}"

    def launch(self, launcher: Launcher, record: TrialRecord) -> Future[TrialOutcome]:
        folder = self.trial_folder(record.index)
        config = trial_config(self.sweep, record.parameters, f"trial-{record.index}", folder)
        record.log = str((folder / LOG_FILE).relative_to(self.folder))
        described = ", ".join(f"{k}={_short(v)}" for k, v in record.parameters.items())
        self.console.print(f"[bold]trial {record.index}[/bold] started: {described}")
        return launcher.submit(self.job(f"trial-{record.index}", config, folder))

    def finish(self, record: TrialRecord, outcome: TrialOutcome | BaseException) -> None:
        """Hand the outcome to Ax (completed, or failed with its reason) and to the records."""
        if isinstance(outcome, BaseException):
            outcome = TrialOutcome(str(record.index), None, f"launcher error: {outcome!r}", self.folder / record.log, 0.0)
        record.seconds = outcome.seconds
        missing = [m for m in self.sweep.metrics if m not in (outcome.metrics or {})]
        if outcome.error is None and missing:
            outcome = replace(outcome, error=f"metrics.json lacks {missing} (it has {sorted(outcome.metrics or {})})")
        if outcome.error is not None:
            record.status, record.error = "failed", outcome.error
            self.client.mark_trial_failed(record.index, failed_reason=outcome.error)
            self.console.print(f"[red]trial {record.index} failed[/red]: {outcome.error} (log: {self.folder / record.log})")
            return
        record.status, record.metrics = "completed", dict(outcome.metrics or {})
        self.client.complete_trial(record.index, raw_data={m: float(record.metrics[m]) for m in self.sweep.metrics})
        measured = ", ".join(f"{m}={_short(record.metrics[m])}" for m in self.sweep.metrics)
        self.console.print(f"trial {record.index} done in {outcome.seconds:.0f} s: {measured}")

    def lose(self, record: TrialRecord, reason: str) -> None:
        """A trial the previous sweeper left running that this one cannot check or end: abandoned, not rerun."""
        record.status, record.error = "lost", reason
        self.client.mark_trial_abandoned(record.index)
        self.console.print(f"[yellow]trial {record.index} lost[/yellow]: {reason} (folder: {self.trial_folder(record.index)})")

    def next_record(self) -> TrialRecord | None:
        trials = self.client.get_next_trials(max_trials=1)
        if not trials:
            return None
        ((index, parameters),) = trials.items()
        record = TrialRecord(index, dict(parameters))
        self.records[index] = record
        return record


def _space(sweep: SweepConfig) -> dict[str, dict[str, Any]]:
    """The search space as saved with the sweep: what a resumed sweep must match."""
    return {
        p.name: {"key": p.key, "bounds": list(p.bounds) if p.bounds else None,
                 "values": list(p.values) if p.values is not None else None, "type": p.kind, "log_scale": p.log_scale}
        for p in sweep.parameters
    }  # fmt: skip


def _check_same_space(sweep: SweepConfig, saved: Any, records: dict[int, TrialRecord], folder: Path) -> None:
    """Refuse to resume when the sweep file's parameters are not those the saved sweep ran with, naming how.

    Sweeps saved before the space was recorded are compared by parameter names (those their trials have).
    """
    current = _space(sweep)
    if saved is None:
        names = {name for r in records.values() for name in r.parameters}
        saved = {name: current.get(name) for name in names} if names else current
    if saved == current:
        return
    differences = [f"`{name}` is new" for name in current if name not in saved]
    differences += [f"`{name}` is gone" for name in saved if name not in current]
    differences += [
        f"`{name}` changed from {saved[name]} to {current[name]}"
        for name in current if name in saved and saved[name] is not None and saved[name] != current[name]
    ]  # fmt: skip
    raise ValueError(
        f"{folder} holds a sweep over other parameters than the sweep file: {'; '.join(differences)}; resume with "
        f"the sweep file it was started with, or start a new sweep with another `--output`"
    )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _measure_baseline(state: _Sweep, launcher: Launcher) -> dict[str, float]:
    """Run the dense baseline (or, when the baseline is given, a one-batch smoke run) and return its metrics."""
    sweep, folder = state.sweep, state.folder / "baseline"
    smoke = sweep.baseline is not None or sweep.baseline_metric is None
    state.console.print("checking the base config with a one-batch run..." if smoke else "training the dense baseline...")
    config = baseline_config(sweep, folder, smoke=smoke)
    outcome = launcher.submit(state.job("baseline", config, folder)).result()
    if outcome.error is not None:
        raise RuntimeError(f"the {'smoke' if smoke else 'baseline'} run of the base config failed: {outcome.error}; "
                           f"see {outcome.log}")  # fmt: skip
    metrics = outcome.metrics or {}
    unknown = [m for m in sweep.metrics if m not in metrics]
    if unknown:
        raise ValueError(f"the objective/constraints name metrics no trial logs: {unknown}; a run of the base config "
                         f"logs {sorted(metrics)}")  # fmt: skip
    if not smoke:
        state.baseline = metrics[sweep.baseline_metric]
        state.console.print(f"baseline {sweep.baseline_metric} = {state.baseline:.4f} (dense, {outcome.seconds:.0f} s)")
    return metrics


def run_sweep(
    config: SweepConfig | str | os.PathLike,
    *,
    max_trials: int | None = None,
    parallel: int | None = None,
    output: str | os.PathLike | None = None,
    resume: bool = False,
    launcher: str | Launcher = "local",
    console: Console | None = None,
    force_parallel: bool = False,
) -> SweepResult:
    """Find the best compression settings that meet the sweep's constraints, in at most ``max_trials`` runs.

    ``config`` is a sweep file (see ``examples/sweep_digits.yaml``) or a loaded :class:`SweepConfig`; the keyword
    arguments override its ``max_trials`` and ``parallel``. Results go to ``output`` (default
    ``sweeps/<name>``); with ``resume`` a killed sweep continues there, keeping every completed trial.
    ``parallel`` may exceed this machine's cores only with ``force_parallel`` (or the file's ``force_parallel``).
    """
    wandb_mode.default_to_offline()  # trials and the summary log to W&B: no account needed
    sweep = config if isinstance(config, SweepConfig) else load_sweep(config)
    sweep = replace(sweep, max_trials=max_trials or sweep.max_trials, parallel=parallel or sweep.parallel,
                    force_parallel=sweep.force_parallel or force_parallel)
    if not (type(sweep.max_trials) is int and 1 <= sweep.max_trials <= MAX_TRIALS):
        raise ValueError(f"`max_trials` must be an int in [1, {MAX_TRIALS}], got {sweep.max_trials!r}")
    check_parallel(sweep.parallel, sweep.force_parallel)
    console = console or Console(width=None if sys.stdout.isatty() else 160)  # no squeezed table in a log file
    if output is None and not is_plain_name(sweep.name):
        raise ValueError(f"the sweep `name` {sweep.name!r} is not a plain file name, so it cannot name its folder under "
                         f"sweeps/: rename it, or give the results folder with `--output`")  # fmt: skip
    folder = Path(output) if output is not None else Path("sweeps") / sweep.name
    state = _Sweep(sweep, folder, console)
    resuming = resume and (folder / AX_STATE).is_file()
    if not resuming and (folder / AX_STATE).exists():
        raise FileExistsError(f"{folder} already holds a sweep: pass `--resume` to continue it, or another `--output`")
    folder.mkdir(parents=True, exist_ok=True)
    if not resuming:
        lowest = {p.name: p.bound_values()[0] for p in sweep.parameters}
        check = write_yaml(folder / "check.yaml", trial_config(sweep, lowest, "check", folder))
        check_fit_config(check)
        check.unlink()
    runner = make_launcher(launcher, sweep.parallel) if isinstance(launcher, str) else launcher
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        if resuming:
            state.load()
            console.print(f"resuming {folder}: {sum(r.status != 'running' for r in state.records.values())} trials done")
        else:
            _measure_baseline(state, runner)
            state.client = _new_client(sweep, state.baseline)
            state.save()
        _loop(state, runner)
    finally:
        runner.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return _report(state)


def _loop(state: _Sweep, launcher: Launcher) -> None:
    sweep = state.sweep
    running: dict[Future[TrialOutcome], TrialRecord] = {}
    for record in [r for r in state.records.values() if r.status == "running"]:
        folder = state.trial_folder(record.index)
        metrics = read_metrics(folder)
        if metrics is not None:  # it finished after the previous sweeper was killed
            state.finish(record, TrialOutcome(str(record.index), metrics, None, folder / LOG_FILE, 0.0))
            continue
        stale = end_stale(folder)
        if stale.state == "lost":  # maybe still running elsewhere, or not ours: never run twice in one folder
            state.lose(record, stale.reason)
            continue
        running[state.launch(launcher, record)] = record
    state.save()
    while True:
        while len(running) < sweep.parallel and len(state.records) < sweep.max_trials:
            record = state.next_record()
            if record is None:
                break
            running[state.launch(launcher, record)] = record
            state.save()
        if not running:
            break
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            record = running.pop(future)
            state.finish(record, future.exception() or future.result())
            state.save()


def _report(state: _Sweep) -> SweepResult:
    sweep, folder, records = state.sweep, state.folder, list(state.records.values())
    state.console.print(results_table(records, sweep, state.baseline))
    plot = plot_sweep(folder / "sweep.png", records, sweep, state.baseline)
    best = best_trial(records, sweep, state.baseline)
    best_path = None
    if best is not None:
        header = f"# Best feasible trial ({best.index}) of sweep {sweep.name}: lightning-sparse fit --config {folder / 'best.yaml'}\n"
        best_path = write_yaml(folder / "best.yaml", best_config(sweep, best.parameters), header)
        state.console.print(f"best feasible: trial {best.index} {best.parameters}; config {best_path}")
    else:
        state.console.print("[red]no trial meets the constraints[/red]")
    feasible = [r for r in records if is_feasible(r, sweep, state.baseline)]
    pareto = pareto_front(feasible, sweep.objective) if len(sweep.objective) > 1 else ([best] if best else [])
    if len(sweep.objective) > 1:
        state.console.print(f"Pareto front (feasible): trials {[r.index for r in pareto]}")
    from lightning_sparse.sweep.wandb_sweep import log_summary

    try:  # everything above is already on disk: a W&B problem must not lose the sweep
        state.console.print(f"W&B summary run: {log_summary(sweep, folder, records, state.baseline, plot)}")
    except Exception as error:  # noqa: BLE001
        state.console.print(f"[yellow]W&B summary run not written: {error!r}[/yellow]")
    return SweepResult(folder, sorted(records, key=lambda r: r.index), state.baseline, best, pareto, best_path, plot)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
