"""A sweep folder cannot aim a signal: resume signals only processes proven to be the trial's (issue 30)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from lightning_sparse.sweep.config import load_sweep
from lightning_sparse.sweep.launchers import LocalLauncher
from lightning_sparse.sweep.processes import PID_FILE, boot_id, end_stale, new_identity, record, start_time
from lightning_sparse.sweep.runner import _loop, _new_client, _Sweep

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="the identity checks read /proc")


@pytest.fixture
def bystander():
    """An unrelated process in its own group, as a victim would be: it must survive every forged pid file."""
    process = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def alive(process: subprocess.Popen) -> bool:
    time.sleep(0.05)
    return process.poll() is None


def forged(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"pid": 0, "start_time": None, "boot_id": boot_id(), "host": socket.gethostname(), "token": "0" * 32}
    (folder / PID_FILE).write_text(json.dumps({**payload, **fields}))
    return folder


def test_a_plain_pid_file_naming_an_unrelated_process_signals_nothing(tmp_path, bystander):
    # what today's sweeper wrote and what an attacker can write: a bare number (main killed this `sleep`)
    (tmp_path / PID_FILE).write_text(str(bystander.pid))
    stale = end_stale(tmp_path)
    assert stale.state == "lost" and "nothing was signalled" in stale.reason
    assert alive(bystander)


def test_a_forged_pid_file_with_the_right_pid_and_start_time_signals_nothing(tmp_path, bystander):
    # everything an attacker can read about the victim (/proc/<pid>/stat) is copied: only the token is missing
    forged(tmp_path, pid=bystander.pid, start_time=start_time(bystander.pid))
    stale = end_stale(tmp_path)
    assert stale.state == "gone"  # no process holds this trial's token: none is ours, the trial may run again
    assert alive(bystander)


@pytest.mark.parametrize("pid", ["-5", "0", "1", "abc", "99999999999999999999", "[1]", "", "-1"])
def test_pid_files_naming_no_process_or_this_one_end_nothing_and_raise_nothing(tmp_path, pid):
    # main: "-5" raised an uncaught OSError, "0" aimed at the sweeper's own process group
    (tmp_path / PID_FILE).write_text(pid)
    assert end_stale(tmp_path).state == "lost"
    forged(tmp_path, pid=int(pid)) if pid.lstrip("-").isdigit() else None
    assert end_stale(tmp_path).state in ("lost", "gone")


def test_the_sweepers_own_pid_and_group_are_never_signalled(tmp_path):
    for pid in (os.getpid(), os.getpgrp()):
        stale = end_stale(forged(tmp_path / str(pid), pid=pid))
        assert stale.state == "lost" and "never a trial's" in stale.reason


def test_a_pid_file_from_another_boot_or_machine_is_lost_not_running(tmp_path, bystander):
    other_boot = forged(tmp_path / "boot", pid=bystander.pid, boot_id="00000000-0000-0000-0000-000000000000")
    assert end_stale(other_boot) == end_stale(other_boot)  # kept: it is still the record of that trial
    assert end_stale(other_boot).state == "lost" and "another boot" in end_stale(other_boot).reason
    other_host = forged(tmp_path / "host", pid=bystander.pid, host="elsewhere.example")
    assert end_stale(other_host).state == "lost" and "'elsewhere.example'" in end_stale(other_host).reason
    assert (other_host / PID_FILE).exists() and alive(bystander)


def test_a_directory_fifo_or_huge_pid_file_is_refused_without_reading_it(tmp_path):
    (tmp_path / "dir" / PID_FILE).mkdir(parents=True)
    os.mkfifo(tmp_path / PID_FILE)  # reading it would block the resume forever
    assert end_stale(tmp_path / "dir").state == "lost"
    assert end_stale(tmp_path).state == "lost"


def trial_process(folder: Path) -> subprocess.Popen:
    """A process started the way the launcher starts a trial (own session, identity in its environment), which
    itself starts a child, as a trial starts its W&B service."""
    folder.mkdir(parents=True, exist_ok=True)
    identity = new_identity(folder)
    code = "import subprocess, time; subprocess.Popen(['sleep', '120']); time.sleep(120)"
    process = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **identity}, start_new_session=True)
    record(folder, process.pid, identity)
    return process


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the group: a killed orphan stays a zombie until init reaps it."""
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and _pgid(int(p.name)) == pgid and not _zombie(p)]  # fmt: skip


def _zombie(proc: Path) -> bool:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_a_trial_this_sweeper_started_is_ended_with_what_it_started(tmp_path, bystander):
    process = trial_process(tmp_path / "trials" / "0000")
    deadline = time.monotonic() + 30
    while len(group_members(process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(group_members(process.pid)) == 2
    stale = end_stale(tmp_path / "trials" / "0000")
    assert stale.state == "ended", stale.reason
    process.wait(timeout=10)
    time.sleep(0.1)
    assert group_members(process.pid) == [] and not (tmp_path / "trials" / "0000" / PID_FILE).exists()
    assert alive(bystander)
    # the same pid file copied into another folder names no process of that folder's trial
    copy = trial_process(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / PID_FILE).write_bytes((tmp_path / "a" / PID_FILE).read_bytes())
    try:
        assert end_stale(tmp_path / "b").state == "gone" and alive(copy)
    finally:
        end_stale(tmp_path / "a")
        copy.wait(timeout=10)


def test_resume_marks_a_trial_started_on_another_boot_lost_and_does_not_rerun_it(tmp_path, bystander):
    (tmp_path / "fit.yaml").write_text("trainer: {}\n")
    (tmp_path / "sweep.yaml").write_text(
        "name: s\nfit_config: fit.yaml\nbaseline: 0.9\nmax_trials: 1\nseed: 0\n"
        "parameters: {sparsity: {key: trainer.callbacks.0.init_args.sparsity, bounds: [0.5, 0.9]}}\n"
    )
    sweep = load_sweep(tmp_path / "sweep.yaml")
    state = _Sweep(sweep, tmp_path / "out", Console(file=open(os.devnull, "w")))
    state.client = _new_client(sweep, 0.9)
    trial = state.next_record()  # what a killed sweeper leaves: a trial marked running, its pid file
    forged(state.trial_folder(trial.index), pid=bystander.pid, boot_id="another-boot")
    launcher = LocalLauncher(1)
    try:
        _loop(state, launcher)  # nothing to launch: the lost trial is not rerun and max_trials is reached
    finally:
        launcher.shutdown()
    assert trial.status == "lost" and "another boot" in trial.error
    assert state.client._experiment.trials[trial.index].status.name == "ABANDONED"
    assert alive(bystander)
