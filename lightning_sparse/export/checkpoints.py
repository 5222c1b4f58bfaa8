"""Safe checkpoint loading: a Lightning checkpoint (or ``torch.save``'d state dict) read without running its code.

Checkpoints are read with ``torch.load(weights_only=True)`` (:func:`load_checkpoint`): a pickle in them cannot run
code unless ``trusted=True``. Before anything is read, the file must be what it claims (a ``torch.save`` zip archive
whose members declare a bounded size); a distributed checkpoint folder's pickled index is read only when trusted.
"""

from __future__ import annotations

import os
import pickle
import stat
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_sparse.export.format import MAGIC

__all__ = [
    "CHECKPOINT_EXPANSION",
    "CHECKPOINT_MIN_BUDGET_BYTES",
    "check_checkpoint_path",
    "checkpoint_state_dict",
    "load_checkpoint",
    "load_distributed_checkpoint",
]


def load_distributed_checkpoint(path: str | os.PathLike, *, trusted: bool = False) -> dict[str, Any]:
    """A distributed (sharded) checkpoint folder, as ``ModelParallelStrategy(save_distributed_checkpoint=True)``
    writes it, read whole into one process: the full ``state_dict`` and optimizer states, plus the callbacks' and
    loops' state from its ``meta.pt``. Callback masks and quantizer state are saved whole already, so the result is
    an ordinary Lightning checkpoint (``optimizer_states`` as a list).

    The folder's ``.metadata`` index is a pickle (``torch.distributed.checkpoint`` writes it so), which can run code
    when read: it is refused unless ``trusted``.
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a distributed checkpoint folder (it has no .metadata file)")
    if not trusted:
        raise ValueError(
            f"{path} is a distributed checkpoint folder, whose .metadata index is a pickle that can run code when "
            f"read: pass `--trust` (`trusted=True`) only if you trust where it came from"
        )
    warnings.warn(f"unpickling {path}/.metadata in full (trusted=True): this runs any code the file holds", stacklevel=2)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    checkpoint: dict[str, Any] = {}
    _load_state_dict(checkpoint, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    meta = path / "meta.pt"  # Lightning's file beside the shards: everything but weights and optimizer states
    if meta.is_file():  # weights-only when it can be (it can for this library's callbacks), in full only if not
        try:
            checkpoint.update(load_checkpoint(meta))
        except ValueError:
            checkpoint.update(load_checkpoint(meta, trusted=trusted))
    count = sum(1 for key in checkpoint if key.startswith("optimizer_") and key[len("optimizer_"):].isdigit())
    if count:
        checkpoint["optimizer_states"] = [checkpoint.pop(f"optimizer_{index}") for index in range(count)]
    return checkpoint


#: Default bound on what a checkpoint's zip members may declare, as a multiple of the file's size (``torch.save``
#: stores them uncompressed, so a real checkpoint declares about its own size) ...
CHECKPOINT_EXPANSION = 2
#: ... and at least this much, whatever the file's size.
CHECKPOINT_MIN_BUDGET_BYTES = 64 << 20
_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


def check_checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` if it is a checkpoint file or a distributed checkpoint folder; otherwise an error saying what it is
    (missing, a directory, a Hugging Face model folder, a FIFO or device, which reading would block on or never
    finish), without reading from it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except OSError as error:
        raise ValueError(f"checkpoint {path} cannot be read: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        if (path / ".metadata").is_file():
            return path
        if (path / "config.json").is_file():
            raise ValueError(f"{path} is a Hugging Face model folder (it holds config.json), not a checkpoint: load it "
                             f"with transformers' from_pretrained and pass the model, or give its Lightning .ckpt")  # fmt: skip
        raise ValueError(f"{path} is a directory, not a checkpoint file (nor a distributed checkpoint folder: it has "
                         f"no .metadata)")  # fmt: skip
    for test, kind in _FILE_KINDS:
        if test(mode):
            raise ValueError(f"{path} is {kind}, not a checkpoint file")
    return path


def load_checkpoint(
    path: str | os.PathLike, *, trusted: bool = False, map_location: Any = "cpu", max_bytes: int | None = None
) -> Any:
    """What a Lightning checkpoint (or a ``torch.save``'d state dict) at ``path`` holds, without running its code.

    Read with ``torch.load(weights_only=True)``: tensors, plain containers and numbers, and any global added with
    ``torch.serialization.add_safe_globals``, which is all a Lightning checkpoint of this library needs. A file that
    needs anything else is refused with a ``ValueError`` naming the global. ``trusted=True`` unpickles it in full,
    with a warning: a pickle can run any code, so only for files you made or trust.

    Before anything is read, the file must be what it claims: a ``torch.save`` zip archive whose members declare at
    most ``max_bytes`` in all (default: the larger of ``CHECKPOINT_MIN_BUDGET_BYTES`` and ``CHECKPOINT_EXPANSION``
    × the file size; a small archive of deflated zeros cannot make the reader allocate gigabytes). Anything else is
    refused naming what it is: a directory, a FIFO or device, a compressed export, text, a bare pickle (torch's
    pre-1.6 format, whose sizes cannot be checked before reading: with ``trusted`` only).
    """
    if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 0):
        raise ValueError(f"`max_bytes` must be an int >= 0, got {max_bytes!r}")
    path = check_checkpoint_path(path)
    if path.is_dir():  # a sharded (FSDP2) checkpoint folder
        return load_distributed_checkpoint(path, trusted=trusted)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        start = f.read(64)
    if start.startswith(MAGIC):
        raise ValueError(f"{path} is a lightning_sparse compressed file, not a checkpoint: read it with load_compressed")
    if zipfile.is_zipfile(path):
        _check_zip_sizes(path, size, max_bytes)
    elif not (trusted and start.startswith(b"\x80")):
        raise ValueError(_not_a_checkpoint(path, start, size))
    if trusted:
        warnings.warn(f"unpickling {path} in full (trusted=True): this runs any code the file holds", stacklevel=2)
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as error:
            raise ValueError(f"{path} is not a PyTorch checkpoint: {_first_line(error)}") from error
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(str(error))
        if "global" in reason:
            raise ValueError(
                f"{path} needs more than tensors and plain data to load ({reason}); a pickle can run code, so it is "
                f"refused: pass `--trust` (`trusted=True`) only if you trust where the file came from"
            ) from None
        raise ValueError(f"{path} is a torch.save archive whose pickle a weights-only load cannot read ({reason})") from None
    except Exception as error:  # a damaged archive
        raise ValueError(f"{path} is a damaged torch.save archive: {_first_line(error)}") from None


def _check_zip_sizes(path: Path, size: int, max_bytes: int | None) -> None:
    """Refuse an archive whose members declare more than the budget, before any member is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path} is a damaged zip archive: {error}") from None
    budget = max(CHECKPOINT_MIN_BUDGET_BYTES, CHECKPOINT_EXPANSION * size) if max_bytes is None else max_bytes
    if declared > budget:
        raise ValueError(
            f"{path}: its zip members declare {declared:,} bytes, more than the {budget:,} allowed for a file of "
            f"{size:,} bytes (torch.save stores members uncompressed); if you trust this file, pass `max_bytes` (at "
            f"least {declared})"
        )


def _not_a_checkpoint(path: Path, start: bytes, size: int) -> str:
    """Why a file that is neither a zip archive nor (untrusted) a pickle is refused, naming what it looks like."""
    if start.startswith(b"\x80"):
        return (f"{path} is a bare pickle (torch's pre-1.6 format, or pickle.dump), not a torch.save archive: its "
                f"sizes cannot be checked before reading and it can run code, so it is refused; re-save it with a "
                f"current torch.save, or pass `--trust` (`trusted=True`) only if you trust where it came from")  # fmt: skip
    if size == 0:
        what = "an empty file"
    elif all(32 <= b < 127 or b in b"\t\r\n" for b in start):
        what = f"a text file (it starts {start[:24].decode()!r})"
    else:
        what = "binary data"
    return f"{path} is not a checkpoint a weights-only load can read: it is {what}, not a torch.save archive"


def checkpoint_state_dict(checkpoint: Any, path: str | os.PathLike) -> Mapping[str, Any]:
    """The ``state_dict`` of a loaded Lightning checkpoint, or the checkpoint itself when it is a state dict."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        held = type(checkpoint if state is None else state).__name__
        raise ValueError(f"{path} holds neither a Lightning checkpoint nor a state dict (it holds a {held})")
    return state


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


def _unpickler_reason(text: str) -> str:
    """What torch's weights-only unpickler refused: the first line after ``WeightsUnpickler error:``."""
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if marker else text).splitlines() if line.strip()]
    reason = lines[0] if lines else "refused by the weights-only unpickler"
    return reason.replace("Unsupported operand", "unsupported pickle opcode")
