"""How trials run: each is a ``lightning-sparse fit`` subprocess; a launcher decides where and how many at once.

A launcher is anything with ``submit(job) -> Future[TrialOutcome]`` and ``shutdown()``: :class:`LocalLauncher`
runs subprocesses on this machine, :class:`RayLauncher` runs each one as a Ray task (``pip install ray``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lightning_sparse import files
from lightning_sparse.sweep.processes import PID_FILE, new_identity, record

METRICS_FILE = "metrics.json"
LOG_FILE = "trial.log"


@dataclass(frozen=True)
class TrialJob:
    """One ``fit`` run: the config it runs, the folder it writes to (log, metrics, pid), its time limit and extra
    environment (the sweeper sets ``LIGHTNING_SPARSE_TRIAL`` to the label: ``trial-3``, ``baseline``)."""

    label: str
    config: Path
    folder: Path
    timeout: float
    env: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "lightning_sparse.cli", "fit", "--config", str(self.config)]


@dataclass(frozen=True)
class TrialOutcome:
    """What came back: the metrics, or why there are none."""

    label: str
    metrics: dict[str, float] | None
    error: str | None
    log: Path
    seconds: float


class Launcher(Protocol):
    """Runs trial jobs somewhere and hands back futures."""

    def submit(self, job: TrialJob) -> Future[TrialOutcome]: ...

    def shutdown(self) -> None: ...


def read_metrics(folder: Path) -> dict[str, float] | None:
    """The metrics a finished trial wrote, or None."""
    path = folder / METRICS_FILE
    return files.read_json(path) if path.is_file() else None


_running: dict[str, subprocess.Popen] = {}
_lock = threading.Lock()


def run_trial(job: TrialJob) -> TrialOutcome:
    """Run ``job`` in its own process group, wait at most ``job.timeout`` seconds, read its metrics."""
    job.folder.mkdir(parents=True, exist_ok=True)
    (job.folder / METRICS_FILE).unlink(missing_ok=True)
    log = job.folder / LOG_FILE
    started = time.perf_counter()
    with open(log, "w") as output:
        env = {name: value for name, value in os.environ.items() if name != "WANDB_SERVICE"}  # its own W&B service
        identity = new_identity(job.folder)  # checked before a later sweeper signals it
        process = subprocess.Popen(job.command, stdout=output, stderr=subprocess.STDOUT,
                                   env={**env, **job.env, **identity}, start_new_session=True)
        record(job.folder, process.pid, identity)
        with _lock:
            _running[job.label] = process
        try:
            code = process.wait(timeout=job.timeout)
            error = None if code == 0 else f"exited with code {code}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {job.timeout:.0f} s"
        finally:
            _kill_group(process)
            with _lock:
                _running.pop(job.label, None)
            (job.folder / PID_FILE).unlink(missing_ok=True)
    metrics = read_metrics(job.folder) if error is None else None
    if error is None and metrics is None:
        error = f"finished without writing {METRICS_FILE}"
    return TrialOutcome(job.label, metrics, error, log, time.perf_counter() - started)


def _kill_group(process: subprocess.Popen) -> None:
    """The trial and everything it started (W&B service, DDP workers)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def stop_running() -> None:
    """Kill every trial this process started that is still running."""
    with _lock:
        started = list(_running.values())
    for process in started:
        _kill_group(process)


class LocalLauncher:
    """Up to ``parallel`` trials at once on this machine, each with ``cpu_count // parallel`` torch threads."""

    def __init__(self, parallel: int = 1) -> None:
        self.parallel = parallel
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="trial")

    def submit(self, job: TrialJob) -> Future[TrialOutcome]:
        threads = str(max(1, (os.cpu_count() or 1) // self.parallel))
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads), **job.env}
        return self._pool.submit(run_trial, TrialJob(job.label, job.config, job.folder, job.timeout, env))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        stop_running()


class RayLauncher:
    """Each trial is a Ray task needing ``cpus_per_trial``, so a sweep can use a Ray cluster: ``address`` and
    ``init_kwargs`` go to ``ray.init`` (no address: a local instance). Trial folders must be on storage every node
    sees."""

    def __init__(self, address: str | None = None, cpus_per_trial: float = 1, **init_kwargs: Any) -> None:
        try:
            import ray
        except ImportError as error:
            raise ImportError("the ray launcher needs Ray: pip install 'lightning-sparse[ray]'") from error
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **init_kwargs)
        self._task = ray.remote(num_cpus=cpus_per_trial)(run_trial)
        self._refs: list[Any] = []

    def submit(self, job: TrialJob) -> Future[TrialOutcome]:
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **job.env}
        ref = self._task.remote(TrialJob(job.label, job.config, job.folder, job.timeout, env))
        self._refs.append(ref)
        return ref.future()

    def shutdown(self) -> None:
        for ref in self._refs:
            self._ray.cancel(ref, force=True)
        if self._started:
            self._ray.shutdown()


LAUNCHERS = ("local", "ray")


def make_launcher(name: str, parallel: int) -> Launcher:
    """``local`` or ``ray`` (a local Ray instance unless ``RAY_ADDRESS`` names a cluster)."""
    if name == "local":
        return LocalLauncher(parallel)
    if name == "ray":
        return RayLauncher(address=os.environ.get("RAY_ADDRESS"))
    raise ValueError(f"`launcher` must be one of {LAUNCHERS}, got {name!r}")


__all__ = ["TrialJob", "TrialOutcome", "Launcher", "LocalLauncher", "RayLauncher", "make_launcher", "run_trial"]
