"""A trial's process, identified by more than its PID, so that a sweep folder cannot aim a signal.

When the sweeper starts a trial it gives the process a random token and the trial folder in its environment
(children such as the W&B service and DDP workers inherit both) and writes a pid file with the PID, the start time
(``/proc/<pid>/stat`` field 22, clock ticks since boot), the boot id and the host name. On ``--resume`` a process is
signalled only when all of this still holds: same host and boot, a PID above 1 that is neither the sweeper nor its
group, and ``/proc/<pid>/environ`` holding this folder and this token. A forged or copied pid file therefore names
no process we signal; a folder from another machine or boot is reported as *lost*. Without ``/proc`` (macOS,
Windows) nothing is signalled and running trials are reported as lost, to be checked by hand.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from lightning_sparse import files

PID_FILE = "pid"
TOKEN_ENV = "LIGHTNING_SPARSE_TRIAL_TOKEN"
FOLDER_ENV = "LIGHTNING_SPARSE_TRIAL_FOLDER"
_PROC = Path("/proc")
_MAX_PID_FILE = 4096


def new_identity(folder: Path) -> dict[str, str]:
    """The environment that marks a new trial process as ours: a fresh random token and the resolved folder."""
    return {TOKEN_ENV: secrets.token_hex(16), FOLDER_ENV: str(folder.resolve())}


def boot_id() -> str | None:
    """This boot's id (Linux), or None where the system has none to read."""
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None if unknown/gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # field 2 (the command) is in parentheses and may itself hold spaces and ")": split after the last ")"
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def record(folder: Path, pid: int, identity: dict[str, str]) -> None:
    """Write ``folder/pid`` for a process we just started with ``identity`` in its environment."""
    payload = {"pid": pid, "start_time": start_time(pid), "boot_id": boot_id(), "host": socket.gethostname(),
               "token": identity[TOKEN_ENV]}  # fmt: skip
    files.write_json(folder / PID_FILE, payload)


@dataclass(frozen=True)
class StaleTrial:
    """What became of the process a previous sweeper left in a trial folder.

    ``state`` is ``none`` (no pid file), ``ended`` (ours, still running, now killed), ``gone`` (ours, no longer
    running: safe to run again) or ``lost`` (cannot be checked from here, or not ours: nothing was signalled, and
    the trial must not run again in the same folder); ``reason`` says why in words.
    """

    state: str
    reason: str


def end_stale(folder: Path) -> StaleTrial:
    """Kill what is left of the trial a previous, killed sweeper started in ``folder``, once proven to be ours."""
    pid_file = folder / PID_FILE
    if not pid_file.exists():
        return StaleTrial("none", "no pid file")
    outcome = _end_stale(pid_file, folder)
    if outcome.state in ("ended", "gone"):
        pid_file.unlink(missing_ok=True)
    return outcome


def _end_stale(pid_file: Path, folder: Path) -> StaleTrial:
    try:
        if not pid_file.is_file() or pid_file.stat().st_size > _MAX_PID_FILE:
            raise ValueError("not a small regular file")
        saved = json.loads(pid_file.read_text())
        if not isinstance(saved, dict):
            raise ValueError("a bare number names a PID but not which process")
        pid, token = saved.get("pid"), saved.get("token")
        if type(pid) is not int or not isinstance(token, str) or len(token) < 16:
            raise ValueError("it lacks an integer `pid` and a `token`")
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return StaleTrial("lost", f"{pid_file} does not identify a process this sweeper started ({error}); nothing "
                                  f"was signalled")  # fmt: skip
    here, boot = socket.gethostname(), boot_id()
    if saved.get("host") != here or boot is None or saved.get("boot_id") != boot:
        where = f"host {saved.get('host')!r}" if saved.get("host") != here else "another boot of this machine"
        return StaleTrial("lost", f"started on {where}; nothing was signalled")
    if pid <= 1 or pid in (os.getpid(), os.getpgrp()):
        return StaleTrial("lost", f"{pid_file} names PID {pid}, which is never a trial's; nothing was signalled")
    ours = _processes_with(token, str(folder.resolve()))
    if not ours:
        return StaleTrial("gone", f"no process of this trial is running (PID {pid} has ended)")
    leader_ours = pid in ours and start_time(pid) == saved.get("start_time")
    errors = []
    for target in sorted(ours, key=lambda p: p != pid):  # the trial first, then what it started
        try:
            if target == pid and leader_ours and os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)  # the trial's own session: it and everything it started
            else:
                os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except OSError as error:
            errors.append(f"PID {target}: {error}")
    if errors:
        return StaleTrial("lost", f"could not end this trial's processes ({'; '.join(errors)})")
    return StaleTrial("ended", f"killed PID(s) {sorted(ours)} left running by the previous sweeper")


def _processes_with(token: str, folder: str) -> list[int]:
    """PIDs (> 1, not this process or its group) whose environment holds this trial's token and folder."""
    wanted = {f"{TOKEN_ENV}={token}".encode(), f"{FOLDER_ENV}={folder}".encode()}
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) <= 1 or int(entry.name) in (os.getpid(), os.getpgrp()):
            continue
        try:
            environment = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:  # gone meanwhile, or another user's: not ours either way
            continue
        if wanted <= environment:
            found.append(int(entry.name))
    return found


__all__ = ["PID_FILE", "StaleTrial", "end_stale", "new_identity", "record"]
