"""Compressed storage of one tensor: :func:`encode` it into named byte streams, :func:`decode` it back bit-exact.

A floating tensor is stored as whichever is smallest, by measurement: its raw bytes, or its sparsity pattern
plus its non-zero values as codes into a codebook of its distinct values (Deep Compression's prune + share +
entropy-code, Han et al. 2016, with zlib/LZMA in place of Huffman), or the pattern plus the non-zero values
themselves (pruned but not quantized). Values are kept as bit patterns, so the round trip is exact by
construction: NaN payloads and infinities come back bit for bit, and so does the sign of every zero.
``core.masks`` writes +0.0 for pruned entries, so the ``signs`` stream that records -0.0 is usually absent;
it exists so that any tensor (one masked by multiplying, say) still round-trips bit for bit.

Encodings and their streams:

- ``raw``: ``data``, the tensor's bytes, uncompressed (also every non-floating, 0-d or empty tensor).
- ``sparse-codebook``: ``pattern``; ``codebook``, the K distinct non-zero values sorted by bit pattern, in
  the tensor's dtype; ``codes``, one index per non-zero at ``params.bits`` = ceil(log2 K) bits, packed
  LSB first (no stream when K <= 1). K <= 2**16.
- ``sparse``: ``pattern``; ``values``, the non-zero values in the tensor's dtype.

Zeros are +0.0 and -0.0. The ``pattern`` stream marks the ``params.nonzeros`` non-zero entries, as
``params.pattern``: ``bitmap`` (1 bit per entry, LSB first, as ``core.masks.pack``) or ``positions`` (for
each marked entry in flat order, index - previous index - 1, previous = -1 at first, as LEB128 varints).
When some zeros are -0.0, a ``signs`` stream marks those ``params.negative_zeros`` entries among the
zeros (in flat order), the same way, as ``params.signs``. Stream codecs: ``raw``; ``zlib`` (level 9);
``lzma``: a raw LZMA2 stream, preset 9 | PRESET_EXTREME, dictionary size = decoded size rounded up to a
power of two within [4 KiB, 64 MiB]. Bytes are in C order and native byte order.

Pure torch and the standard library: the whole-model file format lives in ``lightning_sparse.export``.
"""

from __future__ import annotations

import functools
import itertools
import json
import lzma
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_sparse.core.masks import pack, unpack

MAX_DISTINCT = 1 << 16  # codes of at most 16 bits; beyond that a codebook costs more than it saves
_CHUNK = 1 << 16  # entries bit-packed or varint-coded at once (bounded scratch; a multiple of 8: byte-aligned)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # bit patterns by item size
_LZMA_MAX_DICT = 64 << 20


@dataclass(frozen=True)
class Stream:
    """One named byte stream of an encoded tensor, as stored with ``codec``."""

    name: str
    codec: str
    data: bytes  # as stored
    size: int  # decoded bytes


def _stream(name: str, decoded: bytes, compress: bool = True) -> Stream:
    """A stream stored with whichever codec makes it smallest (or as it is, without ``compress``)."""
    codec, data = _smallest_codec(decoded) if compress else ("raw", decoded)
    return Stream(name, codec, data, len(decoded))


@dataclass
class Encoded:
    """One tensor as stored: its encoding, params and streams, plus what :func:`encode` measured on the way.

    ``sparsity`` and ``distinct`` (the share of zeros, the number of distinct non-zero values) are None for
    tensors that are always stored raw (non-floating, 0-d or empty).
    """

    encoding: str
    streams: list[Stream]
    params: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    sparsity: float | None = None
    distinct: int | None = None

    @property
    def payload(self) -> bytes:
        """The streams' stored bytes, back to back, in order."""
        return b"".join(s.data for s in self.streams)

    def entry(self) -> dict[str, Any]:
        """What :func:`decode` needs besides dtype and shape (stream offsets relative to the payload)."""
        streams, offset = [], 0
        for s in self.streams:
            streams.append({"name": s.name, "codec": s.codec, "offset": offset, "length": len(s.data), "size": s.size})
            offset += len(s.data)
        return {"encoding": self.encoding, "params": self.params, "streams": streams}

    def cost(self) -> int:
        """Stored bytes, header entry included, so a tiny tensor is not split into streams for nothing."""
        return sum(len(s.data) for s in self.streams) + len(json.dumps(self.entry()))


# --- encoding -----------------------------------------------------------------------------------------


def encode(tensor: Tensor) -> Encoded:
    """The smallest encoding of ``tensor`` (contiguous, on the CPU), by measured size; ties keep ``raw``."""
    best = Encoded("raw", [_stream("data", _bytes_of(tensor), compress=False)])
    if tensor.is_floating_point() and tensor.dim() > 0 and tensor.numel() > 0:
        bits = tensor.reshape(-1).view(_INT_VIEW[tensor.element_size()])
        negative_zero = _negative_zero(tensor.dtype)
        nonzero = bits != 0 if negative_zero is None else (bits != 0) & (bits != negative_zero)
        values = bits[nonzero]
        codebook, codes = torch.unique(values, return_inverse=True)  # sorted, so codebook[codes] == values
        candidates = _sparse_candidates(bits, nonzero, values, codebook, codes, negative_zero)
        best = min([best, *candidates], key=Encoded.cost)  # ties keep raw
        best.sparsity, best.distinct = 1.0 - values.numel() / bits.numel(), codebook.numel()
    return best


def _sparse_candidates(
    bits: Tensor, nonzero: Tensor, values: Tensor, codebook: Tensor, codes: Tensor, negative_zero: int | None
) -> list[Encoded]:
    """``sparse-codebook`` (at most MAX_DISTINCT values) and ``sparse`` (some zeros), where they apply."""
    has_zeros, distinct = values.numel() < bits.numel(), codebook.numel()
    if not has_zeros and distinct > MAX_DISTINCT:
        return []
    pattern, pattern_kind = _smallest_pattern(nonzero)
    streams, params = [pattern], {"pattern": pattern_kind, "nonzeros": values.numel()}
    if negative_zero is not None and has_zeros:
        negative = bits[~nonzero] == negative_zero
        if negative.any():
            signs, params["signs"] = _smallest_pattern(negative, "signs")
            params["negative_zeros"] = int(negative.sum())
            streams.append(signs)
    candidates = []
    if distinct <= MAX_DISTINCT:
        code_bits = (distinct - 1).bit_length() if distinct > 1 else 0  # ceil(log2 K)
        coded = [*streams, _stream("codebook", _bytes_of(codebook))]
        if code_bits:
            coded.append(_stream("codes", _pack_codes(codes, code_bits)))
        params_coded = {**params, "distinct": distinct, "bits": code_bits}
        candidates.append(Encoded("sparse-codebook", coded, params_coded, f"{code_bits}-bit, {pattern_kind}"))
    if has_zeros:
        candidates.append(Encoded("sparse", [*streams, _stream("values", _bytes_of(values))], params, pattern_kind))
    return candidates


@functools.lru_cache(maxsize=None)
def _negative_zero(dtype: torch.dtype) -> int | None:
    """The bit pattern of -0.0 in ``dtype`` as its same-size integer, or None where it means something else
    (in the float8 ``fnuz`` formats it is NaN)."""
    int_dtype = _INT_VIEW[dtype.itemsize]
    pattern = 0x80 if int_dtype == torch.uint8 else -(1 << (8 * dtype.itemsize - 1))
    as_float = torch.tensor([pattern], dtype=int_dtype).view(dtype).float().item()
    return pattern if as_float == 0 else None


def _smallest_pattern(marked: Tensor, name: str = "pattern") -> tuple[Stream, str]:
    """The marked entries of a bool vector as a bitmap or as position gaps, whichever stores smaller."""
    bitmap = _stream(name, pack(marked).numpy().tobytes())
    gaps = torch.diff(marked.nonzero().squeeze(1), prepend=torch.tensor([-1])) - 1
    positions = _stream(name, _varints(gaps))
    return (positions, "positions") if len(positions.data) < len(bitmap.data) else (bitmap, "bitmap")


def _smallest_codec(data: bytes) -> tuple[str, bytes]:
    best = ("raw", data)
    if data:
        for codec, packed in (
            ("zlib", zlib.compress(data, 9)),
            ("lzma", lzma.compress(data, lzma.FORMAT_RAW, filters=_lzma_filters(len(data)))),
        ):
            if len(packed) < len(best[1]):
                best = (codec, packed)
    return best


def _lzma_filters(size: int) -> list[dict[str, int]]:
    """Fixed LZMA2 chain; the dictionary follows the decoded size so small streams decode in small memory."""
    dict_size = min(max(4096, 1 << (size - 1).bit_length()), _LZMA_MAX_DICT)
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}]


def _bytes_of(tensor: Tensor) -> bytes:
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def _pack_codes(codes: Tensor, bits: int) -> bytes:
    """Each code as ``bits`` bits, LSB first, code after code."""
    shifts = torch.arange(bits)
    return b"".join(
        pack(((chunk.unsqueeze(1) >> shifts) & 1).bool()).numpy().tobytes() for chunk in codes.split(_CHUNK)
    )


def _varints(values: Tensor) -> bytes:
    """Non-negative int64 values as LEB128 varints (7 bits per byte, high bit = more bytes follow)."""
    out = []
    for chunk in values.split(_CHUNK) if values.numel() else ():
        groups = max(1, (int(chunk.max()).bit_length() + 6) // 7)
        shifts = 7 * torch.arange(groups)
        septets = (chunk.unsqueeze(1) >> shifts) & 0x7F
        used = 1 + ((chunk.unsqueeze(1) >> shifts[1:]) != 0).sum(dim=1, keepdim=True)
        more = (torch.arange(groups) < used - 1).long() << 7
        out.append((septets | more)[torch.arange(groups) < used].to(torch.uint8).numpy().tobytes())
    return b"".join(out)


# --- checking a description -----------------------------------------------------------------------------

ENCODINGS = ("raw", "sparse-codebook", "sparse")
CODECS = ("raw", "zlib", "lzma")
PATTERNS = ("bitmap", "positions")
_STREAM_KEYS = frozenset(("name", "codec", "offset", "length", "size"))
_PARAM_KEYS = {
    "raw": (frozenset(), frozenset()),
    "sparse": (frozenset(("pattern", "nonzeros")), frozenset(("signs", "negative_zeros"))),
    "sparse-codebook": (frozenset(("pattern", "nonzeros", "distinct", "bits")), frozenset(("signs", "negative_zeros"))),
}
_MAX_VARINT = 9  # bytes of one LEB128 position (63 bits)


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not float


def _count(params: Mapping[str, Any], key: str, high: int) -> int:
    value = params[key]
    if not _is_int(value) or not 0 <= value <= high:
        raise ValueError(f"`params.{key}` must be an int in [0, {high}], got {value!r}")
    return value


def _marks_size(kind: str, numel: int, count: int, field_name: str) -> tuple[int, int]:
    """The decoded size range of a pattern stream (bitmap: exact; positions: 1 to 9 bytes per mark)."""
    if kind not in PATTERNS:
        raise ValueError(f"`params.{field_name}` must be one of {PATTERNS}, got {kind!r}")
    if kind == "bitmap":
        return (numel + 7) // 8, (numel + 7) // 8
    return count, _MAX_VARINT * count


def check_entry(
    dtype: torch.dtype,
    shape: Sequence[int],
    encoding: Any,
    params: Any,
    streams: Any,
    length: int,
) -> None:
    """Check that ``encoding``, ``params`` and ``streams`` (as :meth:`Encoded.entry` writes them) describe a tensor
    of ``dtype`` and ``shape`` stored in ``length`` bytes, before anything is decoded or allocated.

    Every field must have its type and lie in its range; the streams must be exactly those the encoding needs,
    back to back, filling ``length``; every decoded size must be the one the shape and params imply (raw streams:
    their stored length). Raises ``ValueError`` naming the field.
    """
    numel = math.prod(shape)
    if encoding not in ENCODINGS:
        raise ValueError(f"`encoding` must be one of {ENCODINGS}, got {encoding!r}")
    if not isinstance(params, dict):
        raise ValueError(f"`params` must be a mapping, got {type(params).__name__}")
    required, optional = _PARAM_KEYS[encoding]
    missing, unknown = required - params.keys(), params.keys() - required - optional
    if missing or unknown:
        raise ValueError(f"`params` of a {encoding} layer must have {sorted(required)} (and optionally "
                         f"{sorted(optional)}), got {sorted(map(str, params))}")  # fmt: skip
    expected: dict[str, tuple[int, int]] = {}  # stream name -> decoded size range, in stream order
    if encoding == "raw":
        expected["data"] = (numel * dtype.itemsize,) * 2
    else:
        if not dtype.is_floating_point or dtype.itemsize not in _INT_VIEW or numel == 0 or len(shape) == 0:
            raise ValueError(f"`encoding` {encoding} is for non-empty floating tensors, not {dtype} of shape {list(shape)}")
        nonzeros = _count(params, "nonzeros", numel)
        expected["pattern"] = _marks_size(params["pattern"], numel, nonzeros, "pattern")
        if ("signs" in params) != ("negative_zeros" in params):
            raise ValueError("`params.signs` and `params.negative_zeros` come together")
        if "signs" in params:
            if _negative_zero(dtype) is None:
                raise ValueError(f"`params.signs`: {dtype} has no negative zero")
            negative = _count(params, "negative_zeros", numel - nonzeros)
            expected["signs"] = _marks_size(params["signs"], numel - nonzeros, negative, "signs")
        if encoding == "sparse":
            expected["values"] = (nonzeros * dtype.itemsize,) * 2
        else:
            distinct = _count(params, "distinct", min(MAX_DISTINCT, nonzeros))
            if nonzeros and not distinct:
                raise ValueError(f"`params.distinct` is 0 for {nonzeros} non-zeros")
            bits = (distinct - 1).bit_length() if distinct > 1 else 0
            if params["bits"] != bits or not _is_int(params["bits"]):
                raise ValueError(f"`params.bits` must be {bits} for {distinct} distinct values, got {params['bits']!r}")
            expected["codebook"] = (distinct * dtype.itemsize,) * 2
            if bits:
                expected["codes"] = ((nonzeros * bits + 7) // 8,) * 2
    if not isinstance(streams, list) or not all(isinstance(s, dict) for s in streams):
        raise ValueError(f"`streams` must be a list of mappings, got {streams!r:.80}")
    names = [s.get("name") for s in streams]
    if names != list(expected):
        raise ValueError(f"`streams` of this {encoding} layer must be {list(expected)}, got {names!r:.200}")
    offset = 0
    for i, s in enumerate(streams):
        if s.keys() != _STREAM_KEYS:
            raise ValueError(f"`streams[{i}]` must have exactly the fields {sorted(_STREAM_KEYS)}, got {sorted(map(str, s))}")
        if s["codec"] not in CODECS:
            raise ValueError(f"`streams[{i}].codec` must be one of {CODECS}, got {s['codec']!r}")
        for key in ("offset", "length", "size"):
            if not _is_int(s[key]) or s[key] < 0:
                raise ValueError(f"`streams[{i}].{key}` must be an int >= 0, got {s[key]!r}")
        if s["offset"] != offset:
            raise ValueError(f"`streams[{i}].offset` must be {offset} (streams are back to back), got {s['offset']}")
        offset += s["length"]
        low, high = expected[s["name"]]
        if not low <= s["size"] <= high:
            wanted = low if low == high else f"in [{low}, {high}]"
            raise ValueError(f"`streams[{i}].size` of {s['name']!r} must be {wanted} for this layer, got {s['size']}")
        if s["codec"] == "raw" and s["length"] != s["size"]:
            raise ValueError(f"`streams[{i}]`: a raw stream's length {s['length']} must equal its size {s['size']}")
        if s["codec"] != "raw" and s["size"] and not s["length"]:
            raise ValueError(f"`streams[{i}]`: an empty {s['codec']} stream cannot decode to {s['size']} bytes")
    if offset != length:
        raise ValueError(f"`streams` hold {offset} bytes, but the layer's `length` is {length}")


def decoded_bytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    """Bytes of the decoded tensor (what loading it returns)."""
    return math.prod(shape) * dtype.itemsize


def working_bytes(
    dtype: torch.dtype, shape: Sequence[int], encoding: str, params: Mapping[str, Any], streams: Sequence[Mapping[str, Any]]
) -> int:
    """An upper bound on the memory :func:`decode` holds besides the tensor it returns, from a checked entry alone.

    Counted: the layer's stored bytes; every stream held decoded (``positions`` pattern and ``codes`` streams are
    decoded a chunk at a time and never held whole); one bool per entry for the pattern (and per zero for the
    signs); the non-zero values of a codebook layer; the LZMA dictionary. Not counted: a fixed
    :data:`SCRATCH_BYTES` for the chunked loops, whatever the file. A reader checks this against its memory budget.
    """
    numel = math.prod(shape)
    stored = sum(s["length"] for s in streams)
    streamed = {"codes"} | {name for name in ("pattern", "signs") if params.get(name) == "positions"}
    held = sum(s["size"] for s in streams if s["name"] not in streamed)
    dictionary = max((_lzma_filters(s["size"])[0]["dict_size"] for s in streams if s["codec"] == "lzma"), default=0)
    total = stored + held + dictionary
    if encoding != "raw":
        total += numel + (numel - params["nonzeros"] if "signs" in params else 0)
        if encoding == "sparse-codebook":
            total += params["nonzeros"] * dtype.itemsize
    return total


#: Fixed working memory of the chunked decoding loops (a chunk of varints, codes or flat indices as int64 and
#: their temporaries, plus one decompressed piece), the same for every file.
SCRATCH_BYTES = 32 * _CHUNK * 8
_PIECE = 1 << 20  # decompressed bytes handed on at once by a streamed stream


# --- decoding -----------------------------------------------------------------------------------------


def decode(
    data: bytes,
    dtype: torch.dtype,
    shape: Sequence[int],
    encoding: str,
    params: Mapping[str, Any],
    streams: Sequence[Mapping[str, Any]],
) -> Tensor:
    """Inverse of :func:`encode`: the tensor from its payload ``data`` and the fields of :meth:`Encoded.entry`.

    Works in bounded memory beside the result (:func:`working_bytes`): position and code streams are decompressed
    and decoded a chunk at a time, values are written into the result a chunk at a time. Raises (mostly
    ``ValueError``) when the description does not fit the bytes, rather than guessing.
    """
    shape = tuple(shape)
    view = memoryview(data)
    stored = {s["name"]: (s["codec"], view[s["offset"] : s["offset"] + s["length"]], s["size"]) for s in streams}

    def whole(name: str) -> bytes:
        return b"".join(_pieces(*stored[name]))

    if encoding == "raw":
        return _tensor_from(whole("data"), dtype, shape)
    if encoding not in ("sparse-codebook", "sparse"):
        raise ValueError(f"unknown encoding {encoding!r}")
    numel, nonzeros = math.prod(shape), params["nonzeros"]
    int_dtype = _INT_VIEW[dtype.itemsize]
    nonzero = _decode_marks(params["pattern"], stored["pattern"], numel, nonzeros)
    if encoding == "sparse":
        values = _tensor_from(whole("values"), int_dtype, (nonzeros,))
    else:
        distinct, bits = params["distinct"], params["bits"]
        codebook = _tensor_from(whole("codebook"), int_dtype, (distinct,))
        values = torch.zeros(nonzeros, dtype=int_dtype) if bits else codebook[:1].expand(nonzeros)
        if bits:
            _decode_codes(stored["codes"], bits, codebook, values)
    flat = torch.zeros(numel, dtype=int_dtype)
    _scatter(flat, nonzero, values)
    if "signs" in params:
        negative_zero = _negative_zero(dtype)
        if negative_zero is None:
            raise ValueError(f"{dtype} has no negative zero")
        negative = _decode_marks(params["signs"], stored["signs"], numel - nonzeros, params["negative_zeros"])
        fill = torch.full((1,), negative_zero, dtype=int_dtype).expand(numel - nonzeros)
        _scatter(flat, nonzero, fill, only=negative, invert=True)
    return flat.view(dtype).reshape(shape)


def _pieces(codec: str, data: memoryview, size: int) -> Iterator[bytes]:
    """The decompressed stream, at most ``_PIECE`` bytes at a time; ``ValueError`` unless it holds ``size`` bytes."""
    produced = 0
    if codec == "raw":
        for start in range(0, len(data), _PIECE):
            yield bytes(data[start : start + _PIECE])
        produced = len(data)
    elif codec in ("zlib", "lzma"):
        if codec == "zlib":
            inflater: Any = zlib.decompressobj()
            step = lambda pending, n: (inflater.decompress(pending, n), inflater.unconsumed_tail)  # noqa: E731
        else:
            inflater = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=_lzma_filters(size))
            step = lambda pending, n: (inflater.decompress(pending, max_length=n), b"")  # noqa: E731
        pending = bytes(data)
        while produced < size and not inflater.eof:
            piece, pending = step(pending, min(_PIECE, size - produced))
            if not piece:
                break
            produced += len(piece)
            yield piece
    else:
        raise ValueError(f"unknown codec {codec!r}")
    if produced != size:
        raise ValueError(f"a {codec} stream decodes to {produced} bytes, not {size}")


def _tensor_from(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{len(data)} bytes do not hold a {dtype} tensor of shape {list(shape)}")
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _scatter(flat: Tensor, where: Tensor, values: Tensor, only: Tensor | None = None, invert: bool = False) -> None:
    """``flat[where] = values`` (``where`` negated with ``invert``) a chunk of ``flat`` at a time, so no index of
    every entry is built; with ``only``, the k-th marked entry gets its value only where ``only[k]``."""
    taken = 0
    for start in range(0, flat.numel(), _CHUNK):
        marks = where[start : start + _CHUNK]
        index = (~marks if invert else marks).nonzero().squeeze(1) + start
        count = index.numel()
        chunk = values[taken : taken + count]
        if only is not None:
            keep = only[taken : taken + count]
            index, chunk = index[keep], chunk[keep]
        flat[index] = chunk
        taken += count


def _decode_marks(kind: str, stream: tuple[str, memoryview, int], numel: int, count: int) -> Tensor:
    """Inverse of :func:`_smallest_pattern`: a bool vector of ``numel`` entries, ``count`` of them marked."""
    marked = torch.zeros(numel, dtype=torch.bool)
    if kind == "bitmap":
        if stream[2] != (numel + 7) // 8:
            raise ValueError(f"a bitmap of {stream[2]} bytes does not cover {numel} entries")
        done = 0
        for piece in _pieces(*stream):
            bits = unpack(torch.frombuffer(bytearray(piece), dtype=torch.uint8), (8 * len(piece),))
            n = min(bits.numel(), numel - done)
            marked[done : done + n] = bits[:n]
            done += n
    elif kind == "positions":
        last, seen = -1, 0
        for gaps in _read_varints(_pieces(*stream)):
            if int(gaps.min()) < 0 or int(gaps.max()) >= numel:
                raise ValueError("a position gap is out of range")
            where = torch.cumsum(gaps + 1, dim=0) + last
            if int(where[-1]) >= numel:
                raise ValueError(f"a position is beyond the {numel} entries")
            marked[where] = True
            last, seen = int(where[-1]), seen + gaps.numel()
            if seen > count:
                break
        if seen != count:
            raise ValueError(f"the positions hold {seen} complete varints, not {count}")
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    if int(marked.sum()) != count:
        raise ValueError(f"the pattern marks {int(marked.sum())} entries, the header says {count}")
    return marked


def _decode_codes(stream: tuple[str, memoryview, int], bits: int, codebook: Tensor, values: Tensor) -> None:
    """``values[k] = codebook[code k]`` for the ``bits``-bit codes of the stream, ``_CHUNK`` codes at a time."""
    count = values.numel()
    if stream[2] != (count * bits + 7) // 8:
        raise ValueError(f"{stream[2]} bytes do not hold {count} codes of {bits} bits")
    shifts, chunk_bytes = torch.arange(bits), _CHUNK * bits // 8  # _CHUNK codes end on a byte boundary
    carry, done = b"", 0
    for piece in itertools.chain(_pieces(*stream), [b""]):
        data = torch.frombuffer(bytearray(carry + piece), dtype=torch.uint8) if carry or piece else None
        start = 0
        while data is not None and done < count and (data.numel() - start >= chunk_bytes or not piece):
            n = min(_CHUNK, count - done)
            packed = data[start : start + (n * bits + 7) // 8]
            codes = (unpack(packed, (n * bits,)).view(n, bits).long() << shifts).sum(dim=1)
            if int(codes.max()) >= codebook.numel():
                raise ValueError(f"a code is outside the codebook of {codebook.numel()} values")
            values[done : done + n] = codebook[codes]
            done, start = done + n, start + (n * bits + 7) // 8
        carry = bytes(data[start:].numpy()) if data is not None and start < data.numel() else b""


def _read_varints(pieces: Iterator[bytes]) -> Iterator[Tensor]:
    """Inverse of :func:`_varints`, ``_CHUNK`` bytes at a time: the values of the complete varints in each block (a
    varint split between blocks is carried over); ``ValueError`` for a varint longer than 9 bytes or unfinished."""
    carry = b""
    for piece in pieces:
        for start in range(0, len(piece), _CHUNK):
            data = carry + piece[start : start + _CHUNK]
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            ends = ((raw & 0x80) == 0).nonzero().squeeze(1)
            used = int(ends[-1]) + 1 if ends.numel() else 0
            carry = data[used:]
            if len(carry) > 9:  # 9 septets = 63 bits, the most an int64 position needs
                raise ValueError("a position varint is longer than 9 bytes")
            if not used:
                continue
            starts = torch.cat([ends.new_zeros(1), ends[:-1] + 1])
            lengths = ends - starts + 1
            if int(lengths.max()) > 9:
                raise ValueError("a position varint is longer than 9 bytes")
            owner = torch.repeat_interleave(torch.arange(ends.numel()), lengths)
            septet = torch.arange(used) - starts[owner]
            block = raw[:used].long()
            yield torch.zeros(ends.numel(), dtype=torch.long).index_add_(0, owner, (block & 0x7F) << (7 * septet))
    if carry:
        raise ValueError("the positions end inside a varint")
