"""Read the metrics an offline W&B run wrote to its ``run-*.wandb`` file (test helper).

The file is a LevelDB-style log (7-byte ``:W&B`` header, then 32 KiB blocks of records with a 7-byte
header each: crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last)) holding protobuf
``Record`` messages. Recent wandb releases no longer ship a Python reader, so the tests carry this one.
W&B's service may still be writing the file while a test reads it, so reading stops at the first chunk that is
cut short or fails its checksum (zlib crc32 of the type byte, then the data).
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32 * 1024
_FILE_HEADER = 7


def _payloads(data: bytes):
    pos, pending = _FILE_HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return  # the writer has not finished this chunk yet
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def _records(run_dir: str | Path, timeout: float = 60.0) -> list:
    """Every record of a finished offline run. W&B's service writes the file after ``finish()`` returns, so read
    it again (for up to ``timeout`` seconds) until the run's closing ``exit`` record is there."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for payload in _payloads(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_history(run_dir: str | Path) -> list[dict]:
    """All rows passed to ``wandb.log`` in an offline run, with their ``_step``."""
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in _records(run_dir)
        if record.WhichOneof("record_type") == "history"
    ]


def wandb_run(run_dir: str | Path) -> dict:
    """The run record of an offline run: its name, group, job type and config."""
    for record in _records(run_dir):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in run.config.update}
            return {"name": run.display_name, "group": run.run_group, "job_type": run.job_type, "config": config}
    raise ValueError(f"no run record in {run_dir}")
