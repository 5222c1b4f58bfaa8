"""Whole-model compressed save/load: one file, bit-exact, readable a layer at a time.

Each state-dict entry is stored by :mod:`lightning_sparse.core.codec` in whichever encoding is smallest
(raw, or sparsity pattern plus codebook codes or plain values), so the round trip is exact bit for bit.
Reading seeks to one layer's bytes at a time (Smart-DNN+'s partial decompression, Wu et al. 2023), so
:func:`iter_compressed` keeps peak memory near one layer.

File format, version 1 (integers little-endian, tensor bytes in C order and native byte order)::

    magic       8 bytes  b"LSPARSE\\0"
    version     uint16   FORMAT_VERSION
    header_len  uint64   length of the header as stored
    header_crc  uint32   zlib.crc32 of the header as stored
    header      zlib-compressed UTF-8 JSON {"layers": [layer, ...]}, in state-dict order (compressed because
                on a small, heavily pruned model the JSON would otherwise be a fifth of the file)
    payloads    the layers' bytes, back to back, in header order

    layer  = {"name", "dtype" (e.g. "float32"), "shape", "encoding", "params", "offset" (from the first
              payload byte), "length", "crc32" (of the layer's bytes), "streams": [stream, ...]}
    stream = {"name", "codec", "offset" (from the layer's first byte), "length" (stored), "size" (decoded)}

The encodings, their ``params`` and streams, and the stream codecs are described in
:mod:`lightning_sparse.core.codec`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from lightning_sparse.core.codec import MAX_DISTINCT, Encoded, decode, encode

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_DISTINCT",
    "ExportReport",
    "LayerExport",
    "Source",
    "export_table",
    "iter_compressed",
    "load_compressed",
    "print_report",
    "save_compressed",
]

MAGIC = b"LSPARSE\0"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sHQI")  # magic, version, header length, header CRC32
_LAYER_KEYS = frozenset(("name", "dtype", "shape", "encoding", "params", "offset", "length", "crc32", "streams"))

Source = nn.Module | Mapping[str, Tensor] | str | os.PathLike


@dataclass(frozen=True)
class LayerExport:
    """How one state-dict entry was stored; ``fp32_bytes`` is 0 for non-floating tensors."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    detail: str
    sparsity: float | None
    distinct: int | None
    stored_bytes: int
    fp32_bytes: int


@dataclass(frozen=True)
class ExportReport:
    """What :func:`save_compressed` wrote: per-layer rows and the whole file's size."""

    path: Path
    layers: list[LayerExport]
    file_bytes: int

    @property
    def fp32_bytes(self) -> int:
        """Size of every floating tensor as dense fp32."""
        return sum(layer.fp32_bytes for layer in self.layers)

    @property
    def ratio(self) -> float:
        """fp32 dense bytes of the floating tensors / file size (the header included)."""
        return self.fp32_bytes / self.file_bytes

    @property
    def compressed_layers(self) -> list[LayerExport]:
        return [layer for layer in self.layers if layer.encoding != "raw"]


# --- public API ---------------------------------------------------------------------------------------


def save_compressed(source: Source, path: str | os.PathLike, *, verbose: bool = True) -> ExportReport:
    """Write ``source`` (a module, a state dict, or a Lightning checkpoint path) to ``path`` compressed.

    The file is written to a temporary file beside ``path`` and moved over it only once complete, so a
    failed save leaves any previous file untouched. With ``verbose``, prints the per-layer size table.
    """
    state = _state_dict_of(source)
    if not state:
        raise ValueError("`source` holds no tensors to export")
    path = Path(path)
    rows: list[LayerExport] = []
    with atomic_writer(path) as f:
        layers, payloads, offset = [], [], 0
        for name, value in state.items():
            tensor = _checked_tensor(name, value)
            encoded, row = _encode(name, tensor)
            payload = encoded.payload
            layers.append({
                "name": name, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
                **encoded.entry(), "offset": offset, "length": len(payload), "crc32": zlib.crc32(payload),
            })  # fmt: skip
            payloads.append(payload)
            rows.append(row)
            offset += len(payload)
        header = zlib.compress(json.dumps({"layers": layers}, separators=(",", ":")).encode(), 9)
        f.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header)))
        f.write(header)
        for payload in payloads:
            f.write(payload)
        file_bytes = f.tell()
    report = ExportReport(path, rows, file_bytes)
    if verbose:
        print_report(report)
    return report


def load_compressed(path: str | os.PathLike, map_location: str | torch.device | None = None) -> dict[str, Tensor]:
    """The whole state dict saved by :func:`save_compressed`, in the order it was saved."""
    return dict(iter_compressed(path, map_location))


def iter_compressed(
    path: str | os.PathLike, map_location: str | torch.device | None = None
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, tensor)`` one layer at a time, reading only that layer's bytes from the file.

    The header is read and checked now; each layer's length and CRC32 are checked as it is reached, and a
    missing or corrupt layer raises ``ValueError`` naming it instead of yielding wrong weights.
    """
    path = Path(path)
    with open(path, "rb") as f:
        layers, payload_start = _read_header(f, path)
    return _iter_layers(path, layers, payload_start, map_location)


def print_report(report: ExportReport) -> None:
    """Print the per-layer size table, and say so when no layer is compressed."""
    console = Console()
    if not console.is_terminal:  # logs and pipes: room for all eight columns rather than rich's default 80
        console.width = max(console.width, 132)
    console.print(export_table(report))
    if not report.compressed_layers:
        console.print("The model has no compressed layers: every tensor is stored as it is (raw).")
    console.print(f"Saved {report.path}: {report.file_bytes:,} bytes, {report.ratio:.1f}× smaller than fp32 dense.")


def export_table(report: ExportReport) -> Table:
    """A rich table: one row per state-dict entry, then the whole file against fp32 dense."""
    table = Table(title=f"Compressed export: {report.path}")
    table.add_column("layer", min_width=max(len(layer.name) for layer in report.layers))  # never cut a name
    for column in ("shape", "encoding"):
        table.add_column(column)
    for column in ("sparsity", "distinct", "bytes", "fp32 bytes", "ratio"):
        table.add_column(column, justify="right")
    for layer in report.layers:
        table.add_row(
            layer.name,
            "×".join(map(str, layer.shape)) or "scalar",
            f"{layer.encoding} ({layer.detail})" if layer.detail else layer.encoding,
            "-" if layer.sparsity is None else f"{layer.sparsity:.2%}",
            "-" if layer.distinct is None else f"{layer.distinct:,}",
            f"{layer.stored_bytes:,}",
            f"{layer.fp32_bytes:,}" if layer.fp32_bytes else "-",
            f"{layer.fp32_bytes / layer.stored_bytes:.1f}×" if layer.fp32_bytes and layer.stored_bytes else "-",
        )
    table.add_section()
    table.add_row(
        "whole file", "", "", "", "", f"{report.file_bytes:,}", f"{report.fp32_bytes:,}", f"{report.ratio:.1f}×",
        style="bold",
    )  # fmt: skip
    return table


# --- saving -------------------------------------------------------------------------------------------


def _state_dict_of(source: Source) -> Mapping[str, Any]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
        if not isinstance(state, Mapping):
            raise TypeError(f"{path} holds neither a Lightning checkpoint nor a state dict")
        return state
    if isinstance(source, Mapping):
        return source
    raise TypeError(f"`source` must be an nn.Module, a state dict or a checkpoint path, got {type(source).__name__}")


def _checked_tensor(name: Any, value: Any) -> Tensor:
    """``value`` as a contiguous CPU tensor, or a TypeError naming the entry that cannot be stored."""
    if not isinstance(name, str):
        raise TypeError(f"state-dict keys must be strings, got {name!r}")
    if not isinstance(value, Tensor):
        raise TypeError(f"layer {name!r}: expected a tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"layer {name!r}: {value.layout} tensors are not supported; convert it with .to_dense()")
    if value.is_quantized:
        raise TypeError(f"layer {name!r}: quantized tensors are not supported; convert it with .dequantize()")
    if value.is_meta:
        raise TypeError(f"layer {name!r}: a meta tensor has no data to store")
    return value.detach().cpu().resolve_conj().resolve_neg().contiguous()


def _encode(name: str, tensor: Tensor) -> tuple[Encoded, LayerExport]:
    """The smallest encoding of ``tensor`` and its report row."""
    encoded = encode(tensor)
    row = LayerExport(
        name=name,
        shape=tuple(tensor.shape),
        dtype=str(tensor.dtype).removeprefix("torch."),
        encoding=encoded.encoding,
        detail=encoded.detail,
        sparsity=encoded.sparsity,
        distinct=encoded.distinct,
        stored_bytes=sum(len(s.data) for s in encoded.streams),
        fp32_bytes=4 * tensor.numel() if tensor.is_floating_point() else 0,
    )
    return encoded, row


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A file beside ``path`` that replaces it only once fully written and fsynced, and is removed on error."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for torch.save
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


# --- loading ------------------------------------------------------------------------------------------


def _read_header(f: BinaryIO, path: Path) -> tuple[list[dict[str, Any]], int]:
    """The header's layer list and the file offset of the first payload byte, after checking both."""
    preamble = f.read(_PREAMBLE.size)
    if preamble[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{path} is not a lightning_sparse compressed file (wrong magic bytes)")
    if len(preamble) < _PREAMBLE.size:
        raise ValueError(f"{path}: the file is truncated inside its header")
    _, version, header_len, header_crc = _PREAMBLE.unpack(preamble)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version}, but this lightning_sparse reads versions up to "
            f"{FORMAT_VERSION}; upgrade lightning_sparse to load it"
        )
    if version < 1:
        raise ValueError(f"{path}: invalid format version {version}")
    header = f.read(header_len)
    if len(header) < header_len:
        raise ValueError(f"{path}: the file is truncated inside its header")
    if zlib.crc32(header) != header_crc:
        raise ValueError(f"{path}: the header is corrupt (CRC32 mismatch)")
    try:
        layers = json.loads(zlib.decompress(header))["layers"]
    except (ValueError, KeyError, TypeError, zlib.error) as error:
        raise ValueError(f"{path}: the header is malformed ({error!r})") from error
    if not isinstance(layers, list) or not all(isinstance(lay, dict) and _LAYER_KEYS <= lay.keys() for lay in layers):
        raise ValueError(f"{path}: the header is malformed (a layer lacks one of {sorted(_LAYER_KEYS)})")
    return layers, _PREAMBLE.size + header_len


def _iter_layers(
    path: Path, layers: list[dict[str, Any]], payload_start: int, map_location: str | torch.device | None
) -> Iterator[tuple[str, Tensor]]:
    with open(path, "rb") as f:
        for layer in layers:
            name = layer["name"]
            f.seek(payload_start + layer["offset"])
            data = f.read(layer["length"])
            if len(data) < layer["length"]:
                raise ValueError(
                    f"{path}: layer {name!r} is missing bytes: the file is truncated "
                    f"({len(data)} of {layer['length']} bytes present)"
                )
            if zlib.crc32(data) != layer["crc32"]:
                raise ValueError(f"{path}: layer {name!r} is corrupt (CRC32 mismatch)")
            try:
                tensor = _decode(layer, data)
            except Exception as error:  # a header that passed its CRC but does not describe its layer
                raise ValueError(f"{path}: layer {name!r} cannot be decoded: {error}") from error
            yield name, tensor if map_location is None else tensor.to(map_location)


def _decode(layer: dict[str, Any], data: bytes) -> Tensor:
    """One layer's tensor from its header entry and its bytes."""
    dtype = getattr(torch, layer["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {layer['dtype']!r}")
    return decode(data, dtype, layer["shape"], layer["encoding"], layer["params"], layer["streams"])


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_writer`: a reader (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        f.write(text.encode())
    return path
