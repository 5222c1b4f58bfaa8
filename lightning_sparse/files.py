"""Writing files so that a reader, a crash or a kill never sees half of one; reading JSON with bounded size.

Every file the library writes (compressed exports, sweep state, trial configs, deployed models) goes through
:func:`atomic_writer`: the bytes go to a hidden temporary file beside the target (``.NAME.<hex>.tmp``), which is
flushed, fsynced and renamed over the target only once complete; the directory is fsynced after the rename. A
killed writer leaves at most its temporary file, which the next write of the same target removes
(:func:`remove_stale_temporaries`), as does a ``SIGTERM`` during the write.

Pure standard library: no torch, no Lightning.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_path",
    "atomic_writer",
    "read_json",
    "remove_stale_temporaries",
    "temporary_name",
    "write_json",
    "write_text_atomic",
]

#: Largest JSON file :func:`read_json` reads by default (sweep state and metrics are a few kB to a few MB).
MAX_JSON_BYTES = 64 << 20

_writing: set[Path] = set()  # temporary files being written now, removed on SIGTERM
_lock = threading.Lock()


def temporary_name(path: Path) -> Path:
    """A fresh hidden temporary file beside ``path``: ``.NAME.<8 hex digits>.tmp``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of ``path`` left behind (``.NAME.<hex>.tmp`` beside it); the removed files.

    Only files of exactly that pattern for this target are touched, and none that a writer in this process is
    still writing. A writer in another process that is writing the same target at the same moment would lose its
    temporary file and fail cleanly (its target untouched); two processes writing one file is a race anyway.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[0-9a-f]{{8}}\.tmp$")
    removed = []
    with contextlib.suppress(OSError), os.scandir(path.parent if str(path.parent) else ".") as entries:
        for entry in entries:
            candidate = path.with_name(entry.name)
            if pattern.match(entry.name) and entry.is_file(follow_symlinks=False):
                with _lock:
                    if candidate in _writing:
                        continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(candidate)
                    removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A file beside ``path`` that replaces it only once fully written and fsynced, and is removed on error.

    Stale temporary files of the same target (from a killed earlier write) are removed first; a ``SIGTERM``
    while writing removes this one before the process ends.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f  # atomic_path fsyncs the file once it is closed, then renames it


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_writer` for a writer that wants a path to write to (such as Ax's ``save_to_json_file``): the
    temporary file's path, fsynced and renamed over ``path`` once the block ends without an error."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for torch.save
    _track(tmp)
    try:
        with _removed_on_sigterm(tmp):
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        _untrack(tmp)
    _fsync_directory(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_writer` (creating its folder): never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        f.write(text.encode())
    return path


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented, key-sorted JSON through :func:`write_text_atomic`."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``, or a ``ValueError`` naming the file when it is too large or not JSON."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path}: larger than {max_bytes:,} bytes, which no file of this kind should be")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


# --- internals ------------------------------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable where the platform allows."""
    with contextlib.suppress(OSError):
        fd = os.open(directory if str(directory) else ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _track(tmp: Path) -> None:
    with _lock:
        _writing.add(tmp)


def _untrack(tmp: Path) -> None:
    with _lock:
        _writing.discard(tmp)


@contextlib.contextmanager
def _removed_on_sigterm(tmp: Path) -> Iterator[None]:
    """While writing ``tmp`` (from the main thread): a SIGTERM removes it, then does what it did before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError):
        previous = None

    def on_sigterm(signum: int, frame: Any) -> None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if callable(previous):
            previous(signum, frame)  # e.g. the sweeper's: raises KeyboardInterrupt, the write unwinds
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the default action: end by the same signal
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except (ValueError, OSError):  # not settable here (an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError, TypeError):
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
