"""Whole-model compressed save/load: one file, bit-exact, readable a layer at a time.

Each state-dict entry is stored by :mod:`lightning_sparse.core.codec` in whichever encoding is smallest
(raw, or sparsity pattern plus codebook codes or plain values), so the round trip is exact bit for bit.
Reading seeks to one layer's bytes at a time (Smart-DNN+'s partial decompression, Wu et al. 2023), so
:func:`iter_compressed` keeps peak memory near one layer.

File format, version 2 (integers little-endian, tensor bytes in C order and native byte order)::

    magic       8 bytes  b"LSPARSE\\0"
    version     uint16   FORMAT_VERSION
    header_len  uint64   length of the header as stored
    header_crc  uint32   zlib.crc32 of the header as stored
    header      zlib-compressed UTF-8 JSON {"layers": [layer, ...]}, in state-dict order (compressed because
                on a small, heavily pruned model the JSON would otherwise be a fifth of the file)
    sha256      32 bytes SHA-256 of the header as stored followed by every payload byte (version 2 only)
    payloads    the layers' bytes, back to back, in header order, up to the end of the file

    layer  = {"name", "dtype" (e.g. "float32"), "shape", "encoding", "params", "offset" (from the first
              payload byte), "length", "crc32" (of the layer's bytes), "streams": [stream, ...]}
           | {"name", "alias"} (version 2): the same tensor as the earlier layer named ``alias`` (tied weights:
              one tensor reached by two state-dict keys is stored once)
    stream = {"name", "codec", "offset" (from the layer's first byte), "length" (stored), "size" (decoded)}

Version 1 is the same without ``sha256`` and aliases; it is still read.

The encodings, their ``params`` and streams, and the stream codecs are described in
:mod:`lightning_sparse.core.codec`.

Reading treats the file as untrusted: the header is decompressed to at most :data:`MAX_HEADER_BYTES`, checked
against one schema (the type and range of every field, unique names, streams that fill their layer, layers that
fill the file) before anything is allocated, and the tensors it claims may decode to at most ``max_bytes`` in all
(default: the larger of :data:`MIN_BUDGET_BYTES` and :data:`MAX_EXPANSION` × the file size), together with the
working memory of each layer's decoding (``core.codec.working_bytes``: its bytes, the streams held, the pattern,
the LZMA dictionary) must fit the same budget, so the reader's peak stays below twice ``max_bytes`` plus a fixed
few MiB: a small crafted file cannot make it allocate gigabytes, neither in its output nor on the way. Every refusal is a ``ValueError`` naming the file and the layer
and field. A checkpoint path given to :func:`save_compressed` is read by
:func:`lightning_sparse.export.checkpoints.load_checkpoint` (weights only unless ``trusted``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from lightning_sparse.core.codec import MAX_DISTINCT, Encoded, check_entry, decode, decoded_bytes, encode, working_bytes
from lightning_sparse.export.tables import ExportReport, LayerExport, print_report
from lightning_sparse.files import atomic_writer

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_DISTINCT",
    "MAX_EXPANSION",
    "MAX_HEADER_BYTES",
    "MIN_BUDGET_BYTES",
    "Source",
    "iter_compressed",
    "load_compressed",
    "save_compressed",
]

MAGIC = b"LSPARSE\0"
FORMAT_VERSION = 2
_PREAMBLE = struct.Struct("<8sHQI")  # magic, version, header length, header CRC32
_DIGEST_SIZE = 32  # SHA-256, after the header (version 2)
_LAYER_KEYS = frozenset(("name", "dtype", "shape", "encoding", "params", "offset", "length", "crc32", "streams"))
_ALIAS_KEYS = frozenset(("name", "alias"))
_MAX_DIMS = 64
#: Largest decompressed header read (about 50,000 layers); a header claiming more is refused.
MAX_HEADER_BYTES = 16 << 20
#: Default bound on the decoded bytes a file may claim, as a multiple of its size (a 99.9%-sparse 4-bit model
#: decodes to about 2,000× its file) ...
MAX_EXPANSION = 4096
#: ... and at least this much, whatever the file's size (small files of all-zero layers).
MIN_BUDGET_BYTES = 256 << 20
_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}

Source = nn.Module | Mapping[str, Tensor] | str | os.PathLike


# --- public API ---------------------------------------------------------------------------------------


def save_compressed(
    source: Source, path: str | os.PathLike, *, verbose: bool = True, trusted: bool = False
) -> ExportReport:
    """Write ``source`` (a module, a state dict, or a Lightning checkpoint path) to ``path`` compressed.

    The file is written to a temporary file beside ``path`` and moved over it only once complete, so a
    failed save leaves any previous file untouched. With ``verbose``, prints the per-layer size table.
    A checkpoint path is read by :func:`~lightning_sparse.export.checkpoints.load_checkpoint` (weights only, unless ``trusted``). State-dict
    entries that are the same tensor (tied weights: same storage, offset, shape and strides) are stored once;
    the later names are aliases of the first.
    """
    state = _state_dict_of(source, trusted)
    if not state:
        raise ValueError("`source` holds no tensors to export")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory: give the file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    rows: list[LayerExport] = []
    with atomic_writer(path) as f:
        layers, payloads, offset, first_name = [], [], 0, {}
        for name, value in state.items():
            tensor = _checked_tensor(name, value)
            same = first_name.setdefault(_identity(value), name)
            if same != name:  # tied: the same tensor under a second name
                layers.append({"name": name, "alias": same})
                rows.append(_alias_row(name, same, tensor))
                continue
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
        digest = hashlib.sha256(header)
        for payload in payloads:
            digest.update(payload)
        f.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header)))
        f.write(header)
        f.write(digest.digest())
        for payload in payloads:
            f.write(payload)
        file_bytes = f.tell()
    report = ExportReport(path, rows, file_bytes)
    if verbose:
        print_report(report)
    return report


def load_compressed(
    path: str | os.PathLike, map_location: str | torch.device | None = None, *, max_bytes: int | None = None
) -> dict[str, Tensor]:
    """The whole state dict saved by :func:`save_compressed`, in the order it was saved.

    Tied entries (aliases) come back as the same tensor object under each name. ``max_bytes`` bounds what the
    file may decode to (see :func:`iter_compressed`). Nothing is returned unless every layer's CRC32 and the
    file's SHA-256 match.
    """
    return dict(iter_compressed(path, map_location, max_bytes=max_bytes))


def iter_compressed(
    path: str | os.PathLike, map_location: str | torch.device | None = None, *, max_bytes: int | None = None
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, tensor)`` one layer at a time, reading only that layer's bytes from the file.

    The header is read and checked now, against one schema, and the tensors it claims must decode to at most
    ``max_bytes`` in all (default: the larger of ``MIN_BUDGET_BYTES`` and ``MAX_EXPANSION`` × the file size;
    pass a larger value for a file you trust that holds large all-zero tensors). Each layer's length and
    CRC32 are checked as it is reached, and the file's SHA-256 (version 2) before the last layer is yielded;
    a missing or corrupt layer raises ``ValueError`` naming it instead of yielding wrong weights.
    """
    path = Path(path)
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0):
        raise ValueError(f"`max_bytes` must be an int >= 0, got {max_bytes!r}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = _read_header(f, path, size)
    budget = max(MIN_BUDGET_BYTES, MAX_EXPANSION * size) if max_bytes is None else max_bytes
    stored = [lay for lay in header.layers if "alias" not in lay]
    claimed = sum(decoded_bytes(_DTYPES[lay["dtype"]], lay["shape"]) for lay in stored)
    if claimed > budget:
        raise ValueError(
            f"{path}: the layers claim {claimed:,} decoded bytes, more than the {budget:,} allowed for a file of "
            f"{size:,} bytes; if you trust this file, pass `max_bytes` (at least {claimed})"
        )
    working = {lay["name"]: (_working_bytes(lay), decoded_bytes(_DTYPES[lay["dtype"]], lay["shape"])) for lay in stored}
    widest = max(working, key=lambda name: working[name][0], default=None)
    if widest is not None and working[widest][0] > budget:  # its output may be small: the decoder itself is bounded
        need, out = working[widest]
        raise ValueError(
            f"{path}: decoding layer {widest!r} needs {need:,} bytes of working memory (for {out:,} decoded bytes), "
            f"more than the {budget:,} allowed for a file of {size:,} bytes; if you trust this file, pass "
            f"`max_bytes` (at least {need})"
        )
    return _iter_layers(path, header, map_location)


# --- saving -------------------------------------------------------------------------------------------


def _state_dict_of(source: Source, trusted: bool = False) -> Mapping[str, Any]:
    if isinstance(source, nn.Module):
        return _whole(source.state_dict())
    if isinstance(source, (str, os.PathLike)):
        # here, not at the top: the checkpoint reader refuses this format's files by their MAGIC
        from lightning_sparse.export.checkpoints import checkpoint_state_dict, load_checkpoint

        return checkpoint_state_dict(load_checkpoint(source, trusted=trusted), source)
    if isinstance(source, Mapping):
        return _whole(source)
    raise TypeError(f"`source` must be an nn.Module, a state dict or a checkpoint path, got {type(source).__name__}")


def _whole(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A state dict with FSDP2's ``DTensor`` shards gathered into whole tensors (a collective: every rank of a sharded
    model must save), so the export holds the full model whatever the sharding; a plain state dict as it is."""
    from lightning_sparse.core.shards import full_tensor, is_sharded

    if not any(is_sharded(value) for value in state.values()):
        return state
    return {name: full_tensor(value) if is_sharded(value) else value for name, value in state.items()}


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


def _identity(value: Tensor) -> tuple[Any, ...]:
    """What makes two state-dict entries one tensor: same storage, offset, shape, strides and dtype."""
    if value.numel() == 0 or value.device.type == "meta":
        return (id(value),)  # nothing to share
    storage = value.untyped_storage()
    return (value.device, storage.data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)


def _alias_row(name: str, target: str, tensor: Tensor) -> LayerExport:
    return LayerExport(name=name, shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."),
                       encoding="alias", detail=f"= {target}", sparsity=None, distinct=None, stored_bytes=0,
                       fp32_bytes=0)  # fmt: skip


# --- loading ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    version: int
    layers: list[dict[str, Any]]
    raw: bytes  # as stored: the start of what the SHA-256 covers
    digest: bytes | None
    payload_start: int


def _read_header(f: BinaryIO, path: Path, size: int) -> _Header:
    """The checked header: every size it claims bounded by the file's ``size`` and every field by the schema."""
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
    digest_size = _DIGEST_SIZE if version >= 2 else 0
    if header_len > size - _PREAMBLE.size - digest_size:
        raise ValueError(f"{path}: the file is truncated inside its header (`header_len` {header_len:,} is more than "
                         f"the {size:,}-byte file holds)")  # fmt: skip
    header = f.read(header_len)
    digest = f.read(digest_size) if digest_size else None
    if len(header) < header_len or (digest is not None and len(digest) < digest_size):
        raise ValueError(f"{path}: the file is truncated inside its header")
    if zlib.crc32(header) != header_crc:
        raise ValueError(f"{path}: the header is corrupt (CRC32 mismatch)")
    layers = _check_header(_parse_header(header, path), path, version)
    payload_start = _PREAMBLE.size + header_len + digest_size
    stored = sum(lay["length"] for lay in layers if "alias" not in lay)
    if size > payload_start + stored:
        raise ValueError(f"{path}: {size - payload_start - stored:,} bytes of trailing data after the last layer")
    return _Header(version, layers, header, digest, payload_start)


def _parse_header(header: bytes, path: Path) -> Any:
    """The header's JSON, decompressed to at most MAX_HEADER_BYTES; duplicate keys and NaN/Infinity refused."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(header, MAX_HEADER_BYTES)
        if inflater.unconsumed_tail:
            raise ValueError(f"it decompresses to more than {MAX_HEADER_BYTES:,} bytes")
        if not inflater.eof:
            raise ValueError("the compressed stream is incomplete")
        if inflater.unused_data:
            raise ValueError(f"{len(inflater.unused_data)} bytes of trailing data after the compressed stream")
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, zlib.error, RecursionError) as error:
        raise ValueError(f"{path}: the header is malformed ({error})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a key appears twice in one object: {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a valid value")


def _check_header(header: Any, path: Path, version: int) -> list[dict[str, Any]]:
    """The layer list after checking every field of every layer (types, ranges, names, offsets, streams)."""
    if not isinstance(header, dict) or header.keys() != {"layers"} or not isinstance(header["layers"], list):
        raise ValueError(f'{path}: the header is malformed (it must be {{"layers": [layer, ...]}})')
    layers: list[dict[str, Any]] = header["layers"]
    seen: dict[str, dict[str, Any]] = {}
    offset = 0
    for index, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise ValueError(f"{path}: the header is malformed (layer {index} is a {type(layer).__name__}, not a mapping)")
        name = layer.get("name")
        if not isinstance(name, str):
            raise ValueError(f"{path}: layer {index}: `name` must be a string, got {name!r:.80}")
        label = f"{path}: layer {name!r}"
        if name in seen:
            raise ValueError(f"{label}: the name appears twice in the header")
        seen[name] = layer
        if version >= 2 and "alias" in layer:
            if layer.keys() != _ALIAS_KEYS:
                raise ValueError(f"{label}: an alias has exactly the fields {sorted(_ALIAS_KEYS)}, got {sorted(layer)}")
            target = seen.get(layer["alias"]) if isinstance(layer["alias"], str) else None
            if target is None or "alias" in target or target is layer:
                raise ValueError(f"{label}: `alias` must name an earlier stored layer, got {layer['alias']!r:.80}")
            continue
        if layer.keys() != _LAYER_KEYS:
            missing, unknown = sorted(_LAYER_KEYS - layer.keys()), sorted(layer.keys() - _LAYER_KEYS)
            raise ValueError(f"{label}: the header is malformed (missing fields {missing}, unknown fields {unknown})")
        dtype = _DTYPES.get(layer["dtype"]) if isinstance(layer["dtype"], str) else None
        if dtype is None:
            raise ValueError(f"{label}: `dtype` must be a torch dtype name such as 'float32', got {layer['dtype']!r:.80}")
        shape = layer["shape"]
        if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{label}: `shape` must be a list of at most {_MAX_DIMS} ints >= 0, got {shape!r:.80}")
        if math.prod(shape) > 1 << 48:
            raise ValueError(f"{label}: `shape` {shape} has more elements than any tensor can")
        for key in ("offset", "length", "crc32"):
            if type(layer[key]) is not int or layer[key] < 0:
                raise ValueError(f"{label}: `{key}` must be an int >= 0, got {layer[key]!r:.80}")
        if layer["crc32"] > 0xFFFFFFFF:
            raise ValueError(f"{label}: `crc32` must be a 32-bit value, got {layer['crc32']}")
        if layer["offset"] != offset:
            raise ValueError(f"{label}: `offset` must be {offset} (layers are stored back to back), got {layer['offset']}")
        offset += layer["length"]
        try:
            check_entry(dtype, shape, layer["encoding"], layer["params"], layer["streams"], layer["length"])
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
    return layers


def _iter_layers(
    path: Path, header: _Header, map_location: str | torch.device | None
) -> Iterator[tuple[str, Tensor]]:
    digest = hashlib.sha256(header.raw) if header.digest is not None else None
    last = max((i for i, lay in enumerate(header.layers) if "alias" not in lay), default=-1)
    tied = {lay["alias"] for lay in header.layers if "alias" in lay}
    loaded: dict[str, Tensor] = {}  # the tensors aliases point at
    if digest is not None and last < 0 and digest.digest() != header.digest:  # no layer bytes: check it now
        raise ValueError(f"{path}: the file is corrupt (SHA-256 mismatch): the header was edited")
    with open(path, "rb") as f:
        for index, layer in enumerate(header.layers):
            name = layer["name"]
            if "alias" in layer:
                yield name, loaded[layer["alias"]]
                continue
            f.seek(header.payload_start + layer["offset"])
            data = f.read(layer["length"])
            if len(data) < layer["length"]:
                raise ValueError(
                    f"{path}: layer {name!r} is missing bytes: the file is truncated "
                    f"({len(data)} of {layer['length']} bytes present)"
                )
            if zlib.crc32(data) != layer["crc32"]:
                raise ValueError(f"{path}: layer {name!r} is corrupt (CRC32 mismatch)")
            if digest is not None:
                digest.update(data)
                if index == last and digest.digest() != header.digest:
                    raise ValueError(f"{path}: the file is corrupt (SHA-256 mismatch): a layer or the header was edited")
            try:
                tensor = _decode(layer, data)
            except Exception as error:  # a header that passed its checks but does not describe its layer
                raise ValueError(f"{path}: layer {name!r} cannot be decoded: {error}") from error
            tensor = tensor if map_location is None else tensor.to(map_location)
            if name in tied:
                loaded[name] = tensor
            yield name, tensor


def _working_bytes(layer: dict[str, Any]) -> int:
    """What decoding the (checked) layer holds besides its tensor (``core.codec.working_bytes``)."""
    return working_bytes(_DTYPES[layer["dtype"]], layer["shape"], layer["encoding"], layer["params"], layer["streams"])


def _decode(layer: dict[str, Any], data: bytes) -> Tensor:
    """One layer's tensor from its (checked) header entry and its bytes."""
    dtype = _DTYPES[layer["dtype"]]
    return decode(data, dtype, layer["shape"], layer["encoding"], layer["params"], layer["streams"])
