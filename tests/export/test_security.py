"""Untrusted files and hostile inputs: no code execution, no bombs, every bad input a clear error (issue 19).

The crafted files are built here: a pickle payload that would create a marker file, compressed exports whose
header claims gigabytes, a header nested 200,000 deep, fields of the wrong type, and a fixed-seed fuzz of the
format.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn

from support import digits_model, make_trainer
from lightning_sparse import report
from lightning_sparse.cli import main
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.deployment import load_deployed, save_deployed
from lightning_sparse.export import MAGIC, load_checkpoint, load_compressed, save_compressed
from lightning_sparse.sweep import load_sweep, run_sweep
from lightning_sparse.sweep.config import Constraint, is_plain_name
from lightning_sparse.sweep.overrides import split_arguments
from lightning_sparse.sweep.wandb_sweep import export_wandb_sweep
from lightning_sparse.wandb_mode import sync_command

TESTS = Path(__file__).resolve().parents[1]  # tests/: its helper modules and data
_PREAMBLE = struct.Struct("<8sHQI")


class Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do instead (any code at all)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def crafted_checkpoints(folder: Path, marker: Path) -> dict[str, Path]:
    """A Lightning-looking checkpoint with a payload inside (torch.save's zip), and a bare pickle (legacy format)."""
    state = {"net.1.weight": torch.zeros(4, 4), "net.1.bias": torch.zeros(4)}
    paths = {"zip": folder / "crafted.ckpt", "pickle": folder / "crafted.pkl"}
    torch.save({"state_dict": state, "hyper_parameters": {"lr": Payload(marker)}}, paths["zip"])
    paths["pickle"].write_bytes(pickle.dumps(Payload(marker)))
    return paths


# ---------------------------------------------------------------------- 1. no code from a checkpoint
def test_the_payload_is_live_when_trusted(tmp_path):
    """The crafted file does run its code under a full unpickle: so its absence below means something."""
    marker = tmp_path / "pwned"
    path = crafted_checkpoints(tmp_path, marker)["zip"]
    with pytest.warns(UserWarning, match="runs any code the file holds"):
        load_checkpoint(path, trusted=True)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["zip", "pickle"])
def test_no_load_path_runs_a_pickle_payload(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = crafted_checkpoints(tmp_path, marker)[kind]
    torch.save(Payload(marker), tmp_path / "deployed.pt")
    loads = {
        "load_checkpoint": lambda: load_checkpoint(path),
        "save_compressed": lambda: save_compressed(path, tmp_path / "out.lsz", verbose=False),
        "checkpoint_stats": lambda: report.checkpoint_stats(path),
        "load_deployed": lambda: load_deployed(tmp_path / "deployed.pt"),
    }
    for name, load in loads.items():
        with pytest.raises(ValueError, match=r"pickle|weights-only|trusted=True") as error:
            load()
        assert str(path) in str(error.value) or name == "load_deployed", name
        assert not marker.exists(), f"{name} ran the payload"
    assert not (tmp_path / "out.lsz").exists()


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    """A Classifier checkpoint after one training step on real digits (deploy rebuilds it from hyper_parameters)."""
    folder = tmp_path_factory.mktemp("ckpt")
    pl.seed_everything(0)
    trainer = make_trainer(folder, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(digits_model(), datamodule=DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(folder / "model.ckpt")
    return folder / "model.ckpt"


def run_main(capsys, *args: str) -> tuple[int, str]:
    """``lightning-sparse ARGS`` in this process: its exit code and what it printed to stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["export", "report", "deploy"])
def test_no_cli_command_runs_a_pickle_payload(tmp_path, capsys, command):
    marker = tmp_path / "pwned"
    for path in crafted_checkpoints(tmp_path, marker).values():
        args = [command, str(path)] + ([] if command == "report" else [str(tmp_path / "out")])
        code, err = run_main(capsys, *args)
        assert code == 2 and "--trust" in err and "Traceback" not in err, err
        assert not marker.exists(), f"`lightning-sparse {command}` ran the payload"


def test_a_real_checkpoint_loads_weights_only_through_every_command(real_checkpoint, tmp_path, capsys):
    save_compressed(real_checkpoint, tmp_path / "model.lsz", verbose=False)
    assert set(load_compressed(tmp_path / "model.lsz")) == set(torch.load(real_checkpoint, weights_only=True)["state_dict"])
    main(["report", str(real_checkpoint)])
    main(["deploy", str(real_checkpoint), str(tmp_path / "deployed.pt"), "--input-shape", "1,8,8", "--batch-size", "8"])
    assert "Sparsity per layer" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="runs any code"):
        assert isinstance(load_deployed(tmp_path / "deployed.pt", trusted=True), nn.Module)


# ---------------------------------------------------------------------- 2. a sweep file runs no callable at load
def write_sweep(tmp_path: Path, callbacks: list, parameters: dict, **spec) -> Path:
    fit = {
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "callbacks": callbacks},
        "model": {"class_path": "lightning_sparse.models.Classifier", "init_args": {"arch": "lenet300", "input_shape": [1, 8, 8]}},
        "data": {"class_path": "lightning_sparse.data.DigitsDataModule", "init_args": {"batch_size": 32}},
    }  # fmt: skip
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(fit))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "fit_config": "fit.yaml", "parameters": parameters, **spec}))
    return path


def test_a_sweep_file_cannot_call_what_is_not_a_callback(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = {"class_path": "subprocess.run", "init_args": {"args": ["touch", str(marker)], "check": False}}
    path = write_sweep(tmp_path, [evil], {"c": {"key": "trainer.callbacks.0.init_args.check", "values": [False, True]}})
    with pytest.raises(ValueError, match="`subprocess.run` is not a Lightning Callback class"):
        load_sweep(path)
    assert not marker.exists()
    main(["sweep", "--config", str(path), "--export-wandb", str(tmp_path / "wandb.yaml")])  # documented: runs nothing
    assert not marker.exists() and (tmp_path / "wandb.yaml").is_file()
    code, err = run_main(capsys, "sweep", "--config", str(path))
    assert code == 2 and "is not a Lightning Callback class" in err and not marker.exists()


# ---------------------------------------------------------------------- 3. bombs, under a memory limit
BOMBS = textwrap.dedent("""
    import hashlib, json, os, resource, struct, sys, zlib
    import torch
    from lightning_sparse.export import load_compressed

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    PRE = struct.Struct("<8sHQI")
    def lsz(header, header_len=None, version=2, tail=b""):  # header: as stored (zlib-compressed)
        n = len(header) if header_len is None else header_len
        digest = hashlib.sha256(header + tail).digest() if version >= 2 else b""  # valid but for the bomb itself
        return PRE.pack(b"LSPARSE\\0", version, n, zlib.crc32(header)) + header + digest + tail

    folder = sys.argv[1]
    zeros = {"name": "huge", "dtype": "float32", "shape": [500_000_000], "encoding": "sparse",
             "params": {"pattern": "positions", "nonzeros": 0}, "offset": 0, "length": 0, "crc32": 0,
             "streams": [{"name": "pattern", "codec": "raw", "offset": 0, "length": 0, "size": 0},
                         {"name": "values", "codec": "raw", "offset": 0, "length": 0, "size": 0}]}
    # 2.3 GB of JSON whitespace as one zlib stream: 1 MiB deflated once after a full flush (an independent
    # block), repeated 2,300 times, then the end of the stream with the checksum of the whole
    deflate, spaces, start = zlib.compressobj(9), b" " * (1 << 20), b'{"layers": ['
    head = deflate.compress(start) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(spaces) + deflate.flush(zlib.Z_FULL_FLUSH)
    checksum = zlib.adler32(start)
    for _ in range(2300):
        checksum = zlib.adler32(spaces, checksum)
    inflating = head + block * 2300 + deflate.flush()[:-4] + struct.pack(">I", checksum)
    control = dict(zeros, name="control", shape=[1000])  # the same all-zero layer at a sane size: it must load
    bombs = {
        "control: the same layer with 1,000 elements": lsz(zlib.compress(json.dumps({"layers": [control]}).encode())),
        "all-zero layer claiming 5e8 elements": lsz(zlib.compress(json.dumps({"layers": [zeros]}).encode(), 9)),
        "header inflating to 2.3 GB": lsz(inflating),
        "header_len of 1 TiB": lsz(zlib.compress(b"{}"), header_len=1 << 40),
        "header_len of 2**64-1": lsz(zlib.compress(b"{}"), header_len=(1 << 64) - 1),
        "header nested 200,000 deep": lsz(zlib.compress(b"[" * 200_000, 9)),
    }
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])  # KiB

    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (512 << 20),) * 2)  # 512 MiB more than now, at most
    results = {}
    for name, data in bombs.items():
        path = f"{folder}/bomb.lsz"
        open(path, "wb").write(data)
        del data
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak resident size (VmHWM) to the current one
        before = status("VmRSS")
        try:
            loaded = load_compressed(path)
            results[name] = ["loaded", str({key: list(value.shape) for key, value in loaded.items()})]
        except BaseException as error:
            results[name] = [type(error).__name__, str(error)[:300]]
        results[name] += [os.path.getsize(path), status("VmHWM") - before]
    print(json.dumps(results))
""")


BOMB_REASONS = {  # what each bomb must be refused for: its own claim, named, not some other flaw of the file
    "all-zero layer claiming 5e8 elements": "the layers claim 2,000,000,000 decoded bytes",
    "header inflating to 2.3 GB": "it decompresses to more than 16,777,216 bytes",
    "header_len of 1 TiB": "`header_len` 1,099,511,627,776 is more than the 64-byte file holds",
    "header_len of 2**64-1": "`header_len` 18,446,744,073,709,551,615 is more than the 64-byte file holds",
    "header nested 200,000 deep": "the header is malformed (maximum recursion depth exceeded",
}


def test_bombs_are_refused_within_a_memory_bound(tmp_path):
    run = subprocess.run([sys.executable, "-c", BOMBS, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    # the files are well formed but for the bomb (real CRC32 and SHA-256): the same layer at a sane size loads
    assert outcome.pop("control: the same layer with 1,000 elements")[:2] == ["loaded", "{'control': [1000]}"]
    assert set(outcome) == set(BOMB_REASONS)
    for name, (kind, message, size, peak_kib) in outcome.items():
        assert kind == "ValueError" and "bomb.lsz" in message and BOMB_REASONS[name] in message, (name, kind, message)
        assert peak_kib < 64 * 1024, (name, peak_kib)  # refused before allocating: the peak grew by < 64 MiB
        print(f"{name}: {size:,}-byte file refused, peak memory +{peak_kib / 1024:.1f} MiB: {message[:90]}")
    assert outcome["all-zero layer claiming 5e8 elements"][2] < 400  # a few hundred bytes


def test_a_large_all_zero_tensor_loads_with_an_explicit_budget(tmp_path):
    path = tmp_path / "zeros.lsz"
    save_compressed({"w": torch.zeros(80_000_000)}, path, verbose=False)  # 320 MB decoded from a few hundred bytes
    assert path.stat().st_size < 1000
    with pytest.raises(ValueError, match=r"claim 320,000,000 decoded bytes.*pass `max_bytes`"):
        load_compressed(path)
    assert torch.count_nonzero(load_compressed(path, max_bytes=320_000_000)["w"]) == 0


# ---------------------------------------------------------------------- 4. one schema for the header
def small_model() -> nn.Module:
    """The model of tests/data/format_v1.lsz: pruned, quantized, with -0.0 entries and batch-norm buffers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.BatchNorm1d(12), nn.Linear(12, 32), nn.Linear(32, 64))
    with torch.no_grad():
        w = model[0].weight
        w.masked_fill_(w.abs() < 0.2, 0.0)
        model[2].weight.copy_(torch.round(model[2].weight * 4) / 4)
        model[2].weight[0, :6] = 0.0
        model[2].weight[1, 0] = -0.0
        model[3].weight.masked_fill_(model[3].weight.abs() < 0.17, 0.0)
        model[3].weight.copy_(torch.round(model[3].weight * 40) / 40)
    return model


def same_bits(a: dict, b: dict) -> bool:
    """Same names, dtypes, shapes and bytes (so -0.0 differs from 0.0)."""
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).contiguous().view(torch.uint8)

    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and raw(a[k]).equal(raw(b[k])) for k in a
    )


def split(data: bytes) -> tuple[int, dict, bytes]:
    """A version 2 file as (version, header JSON, payloads)."""
    _, version, n, _ = _PREAMBLE.unpack(data[: _PREAMBLE.size])
    header = json.loads(zlib.decompress(data[_PREAMBLE.size : _PREAMBLE.size + n]))
    return version, header, data[_PREAMBLE.size + n + 32 :]


def assemble(header: dict | bytes, payloads: bytes, version: int = 2, digest: bool = True) -> bytes:
    """A file whose header CRC32 and SHA-256 match its contents: a consistent crafted edit."""
    raw = zlib.compress(header if isinstance(header, bytes) else json.dumps(header).encode(), 9)
    sha = __import__("hashlib").sha256(raw + payloads).digest() if digest else b"\0" * 32
    return _PREAMBLE.pack(MAGIC, version, len(raw), zlib.crc32(raw)) + raw + (sha if version >= 2 else b"") + payloads


def test_files_of_format_version_1_still_load():
    assert same_bits(load_compressed(TESTS / "data" / "format_v1.lsz"), small_model().state_dict())


def edit(layer_index: int, **fields):
    def apply(header: dict) -> None:
        header["layers"][layer_index].update(fields)

    return apply


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (edit(0, offset="12"), r"layer '0.weight': `offset` must be an int >= 0, got '12'"),
        (edit(1, length=1.5), r"layer '0.bias': `length` must be an int >= 0, got 1.5"),
        (edit(1, length=True), r"layer '0.bias': `length` must be an int >= 0, got True"),
        (edit(2, name=7), r"layer 2: `name` must be a string, got 7"),
        (edit(2, name="0.weight"), r"layer '0.weight': the name appears twice"),
        (edit(0, shape=[12, -16]), r"layer '0.weight': `shape` must be a list of at most 64 ints >= 0"),
        (edit(0, dtype="Tensor"), r"layer '0.weight': `dtype` must be a torch dtype name"),
        (edit(0, encoding="pickle"), r"layer '0.weight': `encoding` must be one of"),
        (edit(0, crc32=1 << 40), r"layer '0.weight': `crc32` must be a 32-bit value"),
        (edit(0, params={"pattern": "bitmap", "nonzeros": 10**30}), r"layer '0.weight': `params.nonzeros` must be an int in \[0, 192\]"),
        (edit(0, params={"pattern": "bitmap"}), r"layer '0.weight': `params` of a sparse layer must have"),
        (edit(0, extra=1), r"layer '0.weight': the header is malformed \(missing fields \[\], unknown fields \['extra'\]\)"),
        (lambda h: h["layers"][0]["streams"][0].update(size=10**12), r"layer '0.weight': `streams\[0\].size` of 'pattern' must be 24"),
        (lambda h: h["layers"][0]["streams"][0].update(codec="exec"), r"layer '0.weight': `streams\[0\].codec` must be one of"),
        (lambda h: h["layers"][0]["streams"].reverse(), r"layer '0.weight': `streams` of this sparse layer must be \['pattern', 'values'\]"),
        (lambda h: h["layers"].append({"name": "tied", "alias": "nowhere"}), r"layer 'tied': `alias` must name an earlier stored layer"),
        (lambda h: h.update(version=3), r'the header is malformed \(it must be \{"layers": \[layer, ...\]\}\)'),
    ],
)
def test_header_fields_of_the_wrong_type_name_the_layer_and_field(tmp_path, change, message):
    path = tmp_path / "model.lsz"
    save_compressed(small_model(), path, verbose=False)
    version, header, payloads = split(path.read_bytes())
    change(header)
    path.write_bytes(assemble(header, payloads))
    with pytest.raises(ValueError, match=message) as error:
        load_compressed(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda data: data + b"\0" * 5, "5 bytes of trailing data after the last layer"),
        (lambda data: _with_raw_header(data, lambda raw: raw + b"junk"), "4 bytes of trailing data after the compressed stream"),
        (lambda data: _with_raw_header(data, lambda raw: zlib.compress(b'{"layers": [], "layers": []}')), "a key appears twice"),
        (lambda data: _with_raw_header(data, lambda raw: zlib.compress(b'{"layers": NaN}')), "NaN is not a valid value"),
    ],
)
def test_trailing_garbage_duplicate_keys_and_constants_are_refused(tmp_path, tamper, message):
    path = tmp_path / "model.lsz"
    save_compressed(small_model(), path, verbose=False)
    path.write_bytes(tamper(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        load_compressed(path)


def _with_raw_header(data: bytes, change) -> bytes:
    """``data`` with its stored header bytes replaced by ``change(header)``, CRC32 and SHA-256 recomputed."""
    _, version, n, _ = _PREAMBLE.unpack(data[:22])
    raw = change(data[22 : 22 + n])
    payloads = data[22 + n + 32 :]
    sha = __import__("hashlib").sha256(raw + payloads).digest()
    return _PREAMBLE.pack(MAGIC, version, len(raw), zlib.crc32(raw)) + raw + sha + payloads


def test_sha256_catches_an_edit_with_consistent_crc32s(tmp_path):
    path = tmp_path / "model.lsz"
    save_compressed(small_model(), path, verbose=False)
    version, header, payloads = split(path.read_bytes())
    first = header["layers"][1]  # 0.bias, raw float32: any 4 bytes are a valid value
    data = bytearray(payloads)
    data[first["offset"]] ^= 0x01
    first["crc32"] = zlib.crc32(bytes(data[first["offset"] : first["offset"] + first["length"]]))
    edited = bytearray(assemble(header, bytes(data)))
    edited[_PREAMBLE.size + _PREAMBLE.unpack(edited[:22])[2]] ^= 0xFF  # the old digest no longer matches
    path.write_bytes(bytes(edited))
    with pytest.raises(ValueError, match=r"SHA-256 mismatch"):
        load_compressed(path)


def test_tied_tensor_is_stored_once_and_loads_as_one_tensor(tmp_path):
    model = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 100, bias=False))
    model[1].weight = model[0].weight  # tied input and output embeddings
    path = tmp_path / "tied.lsz"
    written = save_compressed(model, path, verbose=False)
    untied = save_compressed({"0.weight": model[0].weight.detach().clone()}, tmp_path / "one.lsz", verbose=False)
    assert written.fp32_bytes == untied.fp32_bytes == 100 * 32 * 4  # counted once: the ratio is honest
    assert written.file_bytes < untied.file_bytes + 60  # one alias entry, not a second copy
    assert [(layer.name, layer.encoding, layer.detail) for layer in written.layers] == [
        ("0.weight", "raw", ""), ("1.weight", "alias", "= 0.weight")]  # fmt: skip
    loaded = load_compressed(path)
    assert list(loaded) == ["0.weight", "1.weight"] and loaded["1.weight"] is loaded["0.weight"]
    assert torch.equal(loaded["0.weight"], model[0].weight.detach())
    fresh = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 100, bias=False))
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh[1].weight, model[0].weight.detach())


# ---------------------------------------------------------------------- the fuzz
def test_fuzz_of_the_format_gives_no_wrong_weights_and_only_value_errors(tmp_path):
    """2,000 mutations (fixed seed): bit flips, byte changes, truncations, insertions, and header edits with
    recomputed CRC32 and SHA-256 (a consistent crafted file: only the schema stands between it and the decoder)."""
    model = small_model()
    state = {**model.state_dict(), "tied": model.state_dict()["3.weight"]}
    path = tmp_path / "model.lsz"
    save_compressed(state, path, verbose=False)
    original, expected = path.read_bytes(), load_compressed(path)
    version, header, payloads = split(original)
    rng = random.Random(19)
    counts = {"refused": 0, "identical": 0, "consistent edit loaded": 0}
    started = time.perf_counter()
    for i in range(2000):
        kind = i % 5
        if kind == 4:  # consistent header edit: one field to a random value of a random type
            edited = json.loads(json.dumps(header))
            layer = rng.choice(edited["layers"])
            inner = [layer.get("params"), *layer.get("streams", [])]
            target = rng.choice([layer, *[part for part in inner if isinstance(part, dict) and part]])
            key = rng.choice(sorted(target))
            target[key] = rng.choice([-1, 0, 1, 7, 2**31, 2**64, 1.5, "12", None, True, [], {}, [3, 4], "float64", "raw"])
            data = assemble(edited, payloads)
        else:
            data = bytearray(original)
            position = rng.randrange(len(data))
            if kind == 0:
                data[position] ^= 1 << rng.randrange(8)
            elif kind == 1:
                data[position] = rng.randrange(256)
            elif kind == 2:
                del data[position:]
            else:
                data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
            data = bytes(data)
        path.write_bytes(data)
        try:
            loaded = load_compressed(path)
        except ValueError as error:
            assert str(path) in str(error), error
            counts["refused"] += 1
            continue
        if same_bits(loaded, expected):
            counts["identical"] += 1
        else:
            assert kind == 4, f"mutation {i} (kind {kind}) loaded wrong weights silently"
            counts["consistent edit loaded"] += 1
    seconds = time.perf_counter() - started
    print(f"fuzz: {counts} in {seconds:.1f} s")
    assert sum(counts.values()) == 2000 and counts["refused"] > 1500


# ---------------------------------------------------------------------- 5. path traversal
@pytest.mark.parametrize("name", ["../../../x", "/tmp/x", "a/b", "..", ".hidden", "a\\b"])
def test_a_sweep_name_that_is_not_a_plain_file_name_is_refused_without_output(tmp_path, name, monkeypatch):
    path = write_sweep(tmp_path, [{"class_path": "lightning_sparse.GradualMagnitudePruning", "init_args": {"sparsity": 0.5}}],
                       {"s": {"key": "trainer.callbacks.0.init_args.sparsity", "bounds": [0.5, 0.9]}}, name=name)  # fmt: skip
    monkeypatch.chdir(tmp_path / "..")
    before = sorted(p.name for p in (tmp_path / "..").iterdir())
    with pytest.raises(ValueError, match="is not a plain file name.*`--output`"):
        run_sweep(path)
    assert sorted(p.name for p in (tmp_path / "..").iterdir()) == before and not is_plain_name(name)
    assert is_plain_name("digits-gmp_1.2")


# ---------------------------------------------------------------------- 6. constraint bounds
@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        ("val_acc >= 9**9**9**9", r"only \+ - \* / are allowed"),
        ("val_acc >= baseline - (0.005", "not an arithmetic expression"),
        ("val_acc >= baseline.__class__", "is not a number"),
        ("val_acc >= 1/0", "divides by zero"),
        ("val_acc >= 1e400", "not finite"),
        ("val_acc >= " + "9" * 300, "longer than 200 characters"),
        ("val_acc >= 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15 * 1e15", "not finite"),
    ],
)
def test_constraint_bounds_are_checked_by_a_grammar_before_any_trial(tmp_path, constraint, message):
    started = time.thread_time()  # CPU time of this thread: a grammar that evaluated 9**9**9**9 would spin for hours
    with pytest.raises(ValueError, match=message):
        Constraint.parse(constraint)
    assert time.thread_time() - started < 1  # not wall time, which a busy machine stretches
    path = write_sweep(tmp_path, [{"class_path": "lightning_sparse.GradualMagnitudePruning", "init_args": {"sparsity": 0.5}}],
                       {"s": {"key": "trainer.callbacks.0.init_args.sparsity", "bounds": [0.5, 0.9]}}, constraints=[constraint])  # fmt: skip
    with pytest.raises(ValueError, match=message):
        load_sweep(path)
    assert Constraint.parse("val_acc >= -(baseline * 2 - 1) / 4 + 0.5").threshold(0.9) == pytest.approx(0.3)


# ---------------------------------------------------------------------- 7. override values
def test_override_values_are_read_as_a_command_line_means_them():
    _, overrides = split_arguments(["--trainer.callbacks.0.init_args.granularity=2:4", "--trainer.callbacks.0.init_args.sparsity[net.[!=]*]=0.9",
                                    "--trainer.callbacks.0.init_args.x=1_000", "--trainer.callbacks.0.init_args.y=yes",
                                    "--trainer.callbacks.0.init_args.z=1e-3"])  # fmt: skip
    assert [(str(k), v) for k, v in overrides] == [
        ("trainer.callbacks.0.init_args.granularity", "2:4"), ("trainer.callbacks.0.init_args.sparsity[net.[!=]*]", 0.9),
        ("trainer.callbacks.0.init_args.x", "1_000"), ("trainer.callbacks.0.init_args.y", "yes"),
        ("trainer.callbacks.0.init_args.z", 0.001)]  # fmt: skip


def test_exported_granularity_and_glob_sweep_runs_through_the_agent_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    gmp = {"class_path": "lightning_sparse.GradualMagnitudePruning",
           "init_args": {"sparsity": 0.5, "start": 0.0, "end": 0.5, "frequency": 5, "verbose": False}}  # fmt: skip
    parameters = {
        "granularity": {"key": "trainer.callbacks.0.init_args.granularity", "values": ["2:4", "unstructured"]},
        "sparsity": {"key": "trainer.callbacks.0.init_args.sparsity", "bounds": {"net.[!=]*": [0.3, 0.6]}},
    }
    sweep = load_sweep(write_sweep(tmp_path, [gmp], parameters))
    spec = yaml.safe_load(export_wandb_sweep(sweep, tmp_path / "wandb_sweep.yaml").read_text())
    assert set(spec["parameters"]) == {"trainer.callbacks.0.init_args.granularity", "trainer.callbacks.0.init_args.sparsity[net.[!=]*]"}
    values = {"trainer.callbacks.0.init_args.granularity": "2:4", "trainer.callbacks.0.init_args.sparsity[net.[!=]*]": 0.5}
    args = [f"--{name}={value}" for name, value in values.items()]  # what a W&B agent passes for ${args}
    command = [part for item in spec["command"] for part in (args if item == "${args}" else [] if item == "${env}" else [item])]
    command[0:1] = [sys.executable, "-m", "lightning_sparse.cli"]
    command += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2", "--trainer.logger=false"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])})  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


# ---------------------------------------------------------------------- 9. one line per bad CLI input, exit 2
@pytest.fixture
def bad_inputs(tmp_path, real_checkpoint) -> dict[str, Path]:
    (tmp_path / "junk.ckpt").write_bytes(b"\x00garbage" * 8)
    save_compressed({"w": torch.ones(3, 3)}, tmp_path / "model.lsz", verbose=False)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "sweep.yaml").write_text("name: [unclosed\nparameters: {")
    return {"junk": tmp_path / "junk.ckpt", "lsz": tmp_path / "model.lsz", "list": tmp_path / "list.pt",
            "ckpt": real_checkpoint, "folder": tmp_path / "folder", "sweepfile": tmp_path / "sweep.yaml", "tmp": tmp_path}  # fmt: skip


@pytest.mark.parametrize(
    ("args", "named", "message"),
    [
        (["export", "junk", "OUT"], "junk", "is not a checkpoint a weights-only load can read"),
        (["report", "junk"], "junk", "is not a checkpoint a weights-only load can read"),
        (["export", "lsz", "OUT"], "lsz", "is a lightning_sparse compressed file, not a checkpoint"),
        (["report", "lsz"], "lsz", "holds no Linear/Conv weights"),
        (["export", "list", "OUT"], "list", "holds neither a Lightning checkpoint nor a state dict (it holds a list)"),
        (["report", "list"], "list", "holds neither a Lightning checkpoint nor a state dict (it holds a list)"),
        (["export", "ckpt", "MISSING/out.lsz"], "MISSING", "does not exist"),
        (["export", "ckpt", "folder"], "folder", "is a directory"),
        (["deploy", "ckpt", "OUT", "--input-shape", "1,9,9"], "ckpt", "is rejected by layer 'net.1'"),
        (["sweep", "--config", "sweepfile"], "sweepfile", "is not valid YAML"),
    ],
)
def test_bad_cli_inputs_give_one_line_naming_the_file_and_exit_2(bad_inputs, capsys, args, named, message):
    tmp = bad_inputs["tmp"]
    resolve = {**{k: str(v) for k, v in bad_inputs.items()}, "OUT": str(tmp / "out"), "MISSING/out.lsz": str(tmp / "nope" / "out.lsz")}
    code, err = run_main(capsys, *[resolve.get(a, a) for a in args])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert message in lines[0] and resolve.get(named, str(tmp / "nope")) in lines[0], lines[0]


def test_report_reads_a_compressed_export(digits_model, tmp_path, capsys):
    save_compressed(digits_model(), tmp_path / "model.lsz", verbose=False)
    main(["report", str(tmp_path / "model.lsz")])
    assert "net.1.weight" in capsys.readouterr().out


# ---------------------------------------------------------------------- 10. leftovers
def test_the_next_write_removes_stale_temporary_files_of_the_same_target(tmp_path):
    stale = [tmp_path / ".model.lsz.0123abcd.tmp", tmp_path / ".model.lsz.deadbeef.tmp"]
    kept = [tmp_path / ".other.lsz.0123abcd.tmp", tmp_path / ".model.lsz.tmp", tmp_path / "model.lsz.0123abcd.tmp"]
    for path in stale + kept:
        path.write_bytes(b"left by a killed save")
    save_compressed(small_model(), tmp_path / "model.lsz", verbose=False)
    save_deployed(small_model(), tmp_path / "model.pt")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.lsz", "model.pt", *(p.name for p in kept)])


def test_sigterm_during_a_write_removes_its_temporary_file(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from lightning_sparse.files import atomic_writer
        with atomic_writer({str(tmp_path / 'model.lsz')!r}) as f:
            f.write(b"x" * 1_000_000)
            print("writing", flush=True)
            time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    assert len(list(tmp_path.glob(".model.lsz.*.tmp"))) == 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == -signal.SIGTERM  # it still ends by the signal
    assert list(tmp_path.iterdir()) == []


def test_save_deployed_fsyncs_before_the_rename(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    save_deployed(small_model(), tmp_path / "model.pt")
    assert len(synced) >= 2  # the file, then its folder
    with pytest.warns(UserWarning):
        assert isinstance(load_deployed(tmp_path / "model.pt", trusted=True), nn.Sequential)


def test_resume_with_changed_parameters_is_refused_naming_the_difference(tmp_path):
    callbacks = [{"class_path": "lightning_sparse.GradualMagnitudePruning", "init_args": {"sparsity": 0.5}}]
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "ax_state.json").write_text("{}")
    saved = {"s": {"key": "trainer.callbacks.0.init_args.sparsity", "bounds": [0.5, 0.9], "values": None, "type": "float", "log_scale": False}}
    (folder / "sweep_state.json").write_text(json.dumps({"baseline": 0.9, "space": saved, "records": []}))
    path = write_sweep(tmp_path, callbacks, {"s": {"key": "trainer.callbacks.0.init_args.sparsity", "bounds": [0.5, 0.95]},
                                             "e": {"key": "trainer.callbacks.0.init_args.end", "bounds": [0.3, 0.8]}})  # fmt: skip
    with pytest.raises(ValueError, match=r"other parameters than the sweep file: `e` is new; `s` changed from .*0\.9\].* to .*0\.95\]"):
        run_sweep(path, output=folder, resume=True)
    legacy = {"index": 0, "parameters": {"old": 0.7}, "status": "completed", "metrics": {}, "error": None, "seconds": 1.0, "log": "x"}
    (folder / "sweep_state.json").write_text(json.dumps({"baseline": 0.9, "records": [legacy]}))  # saved before `space`
    with pytest.raises(ValueError, match=r"`e` is new; `s` is new; `old` is gone"):
        run_sweep(path, output=folder, resume=True)


def test_wandb_sync_command_is_quoted_for_the_shell():
    assert sync_command("/runs/a b;rm -rf ~") == "wandb sync '/runs/a b;rm -rf ~'"
