"""Received files, round two (issue 30): every reader bounded in working memory, not only in its output.

Each crafted file is well formed but for its bomb (real CRC32 and SHA-256), built here, and read in a child
process under an address-space limit with its peak resident memory measured, as the bombs of test_security.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MEASURE = textwrap.dedent("""
    import json, os, resource, sys, traceback

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])  # KiB

    def measured(read, limit_mib=512):
        '''(outcome kind, message, peak KiB above the start) of ``read()`` with at most ``limit_mib`` more memory.'''
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]  # only the soft limit: it is lifted again afterwards
        resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") * 1024 + (limit_mib << 20), hard))
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak resident size (VmHWM) to the current one
        before = status("VmRSS")
        try:
            result = read()
            kind, message = "loaded", str(result)[:300]
        except BaseException as error:
            kind, message = type(error).__name__, str(error)[:400]
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        return [kind, message, status("VmHWM") - before]
""")

LSZ_BOMBS = MEASURE + textwrap.dedent("""
    import hashlib, lzma, struct, zlib
    import torch
    from lightning_sparse.core.codec import SCRATCH_BYTES, _lzma_filters
    from lightning_sparse.export import load_compressed, _read_header, _working_bytes

    def lsz(name, dtype, shape, encoding, params, streams):
        '''A version-2 file of one layer whose streams are (name, decoded bytes), each LZMA-compressed.'''
        entries, payload = [], b""
        for stream, data in streams:
            packed = lzma.compress(data, lzma.FORMAT_RAW, filters=_lzma_filters(len(data)))
            entries.append({"name": stream, "codec": "lzma", "offset": len(payload), "length": len(packed), "size": len(data)})
            payload += packed
        layer = {"name": name, "dtype": dtype, "shape": shape, "encoding": encoding, "params": params, "offset": 0,
                 "length": len(payload), "crc32": zlib.crc32(payload), "streams": entries}
        header = zlib.compress(json.dumps({"layers": [layer]}).encode(), 9)
        digest = hashlib.sha256(header + payload).digest()
        return struct.pack("<8sHQI", b"LSPARSE\\0", 2, len(header), zlib.crc32(header)) + header + digest + payload

    n = 2 << 20  # float16: 4 MiB decoded
    files = {
        # every position a 9-byte varint of 0 (valid LEB128, not minimal): 18 MiB of positions in a few kB
        "positions": lsz("w", "float16", [n], "sparse", {"pattern": "positions", "nonzeros": n},
                         [("pattern", (b"\\x80" * 8 + b"\\x00") * n), ("values", b"\\x00\\x3c" * n)]),
        # 16-bit codes for every entry, all code 0
        "codebook": lsz("w", "float16", [n], "sparse-codebook",
                        {"pattern": "bitmap", "nonzeros": n, "distinct": 65536, "bits": 16},
                        [("pattern", b"\\xff" * (n // 8)),
                         ("codebook", torch.arange(15360, 15360 + 65536, dtype=torch.int32).to(torch.int16).numpy().tobytes()),
                         ("codes", b"\\x00\\x00" * n)]),
    }
    folder, results = sys.argv[1], {}
    for name, data in files.items():
        path = f"{folder}/{name}.lsz"
        open(path, "wb").write(data)
        with open(path, "rb") as f:
            working = _working_bytes(_read_header(f, path, len(data)).layers[0])
        def read():
            w = load_compressed(path)["w"]
            return [list(w.shape), str(w.dtype), int((w == 1).sum())]
        results[name] = measured(read) + [len(data), working, SCRATCH_BYTES]
        results[name + " with max_bytes=8 MiB"] = measured(lambda: load_compressed(path, max_bytes=8 << 20))
    print(json.dumps(results))
""")


def run_child(script: str, *args: str) -> dict:
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="measures /proc/self/status")
def test_lsz_decoders_work_in_bounded_memory_and_count_it_against_the_budget(tmp_path):
    outcome = run_child(LSZ_BOMBS, str(tmp_path))
    decoded = 4 << 20
    for name in ("positions", "codebook"):
        kind, message, peak_kib, size, working, scratch = outcome[name]
        # a valid file: it loads, whole and right (main needed 985 MiB and 269 MiB of memory for these 4 MiB)
        assert kind == "loaded" and message.startswith("[[2097152], 'torch.float16', "), (name, kind, message)
        assert size < 100_000 and working > decoded  # the decoder's own needs are the larger part here
        bound = decoded + working + scratch + (16 << 20)  # output + counted working memory + fixed scratch + margin
        assert peak_kib * 1024 < bound, (name, peak_kib, bound)
        print(f"{name}: {size:,}-byte file, {decoded >> 20} MiB decoded, peak +{peak_kib / 1024:.0f} MiB "
              f"(counted working memory {working / 2**20:.1f} MiB)")
        kind, message, peak_kib = outcome[name + " with max_bytes=8 MiB"]
        # the output fits 8 MiB, the decoding does not: refused for that, naming the layer, before decoding
        assert kind == "ValueError" and f"decoding layer 'w' needs {working:,} bytes of working memory" in message
        assert "more than the 8,388,608 allowed" in message and peak_kib < 8 * 1024, (name, message, peak_kib)
    assert outcome["positions"][0] == "loaded" and outcome["positions"][1].endswith(", 2097152]")  # every value 1.0


# ---------------------------------------------------------------------- checkpoints: zip members bounded
ZIP_BOMB = MEASURE + textwrap.dedent("""
    import io, struct, zipfile
    import torch
    from lightning_sparse.export import load_checkpoint, save_compressed
    from lightning_sparse import report

    def zip_bomb(path, numel):
        '''A torch.save archive of {"state_dict": {"net.1.weight": zeros(numel)}} whose tensor bytes are deflated.'''
        small = io.BytesIO()
        torch.save({"state_dict": {"net.1.weight": torch.zeros(1, 65537)}}, small)
        old, new = b"J" + struct.pack("<i", 65537), b"J" + struct.pack("<i", numel)  # the pickled sizes
        with zipfile.ZipFile(small) as src, zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename.endswith("/data/0"):
                    member = zipfile.ZipInfo(info.filename)
                    member.compress_type = zipfile.ZIP_DEFLATED
                    with dst.open(member, "w", force_zip64=True) as out:
                        for _ in range(numel * 4 >> 20):
                            out.write(bytes(1 << 20))
                else:
                    dst.writestr(info.filename, data.replace(old, new) if info.filename.endswith("data.pkl") else data)

    path = sys.argv[1] + "/bomb.ckpt"
    zip_bomb(path, 32 << 20)  # 128 MiB of zeros
    results = {"size": os.path.getsize(path),
               "load_checkpoint": measured(lambda: load_checkpoint(path)),
               "report": measured(lambda: report.checkpoint_stats(path)),
               "export": measured(lambda: save_compressed(path, sys.argv[1] + "/out.lsz", verbose=False))}
    results["trusted budget"] = measured(lambda: list(load_checkpoint(path, max_bytes=200 << 20)["state_dict"]["net.1.weight"].shape))
    print(json.dumps(results))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="measures /proc/self/status")
def test_a_checkpoint_zip_of_deflated_zeros_is_refused_by_its_declared_sizes(tmp_path):
    outcome = run_child(ZIP_BOMB, str(tmp_path))
    assert outcome["size"] < 300_000  # 128 MiB declared
    for reader in ("load_checkpoint", "report", "export"):
        kind, message, peak_kib = outcome[reader]
        # main read it: 2.1 GB (report) and 3.25 GB (export) for a 523 kB file of 512 MiB
        assert kind == "ValueError" and "bomb.ckpt: its zip members declare 134,21" in message, (reader, message)
        assert "more than the 67,108,864 allowed for a file of" in message and "pass `max_bytes`" in message
        assert peak_kib < 16 * 1024, (reader, peak_kib)
    assert outcome["trusted budget"][:2] == ["loaded", "[1, 33554432]"]  # the same file with an explicit budget


# ---------------------------------------------------------------------- deploy: the model bounded before it is built
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A real Classifier checkpoint after one step on digits, and what a careless or hostile sender makes of it."""
    import pytorch_lightning as pl
    import torch

    from support import digits_model, make_trainer
    from lightning_sparse.data import DigitsDataModule

    folder = tmp_path_factory.mktemp("received")
    pl.seed_everything(0)
    trainer = make_trainer(folder, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(digits_model(), datamodule=DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(folder / "model.ckpt")
    checkpoint = torch.load(folder / "model.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["input_shape"] = [1, 1000, 1000]  # Linear(1e6, 300): 1.2 GB
    torch.save(checkpoint, folder / "wide.ckpt")
    torch.save(checkpoint["state_dict"], folder / "state_dict.pt")
    return {"model": folder / "model.ckpt", "wide": folder / "wide.ckpt", "state_dict": folder / "state_dict.pt"}


DEPLOY_WIDE = MEASURE + textwrap.dedent("""
    from lightning_sparse.cli import main

    def deploy():
        try:
            main(["deploy", sys.argv[1], sys.argv[2], "--input_shape", "1,8,8"])
        except SystemExit as exit_:
            return f"exit {exit_.code}"
    print(json.dumps(measured(deploy, limit_mib=2048)))  # room for what main built: its peak is measured
""")


@pytest.mark.skipif(sys.platform != "linux", reason="measures /proc/self/status")
def test_deploy_refuses_hyper_parameters_that_build_other_weights_before_building_them(checkpoints, tmp_path):
    kind, message, peak_kib = run_child(DEPLOY_WIDE, str(checkpoints["wide"]), str(tmp_path / "out.pt"))
    assert (kind, message) == ("loaded", "exit 2")  # main built the 1.2 GB layer first (1.58 GB peak)
    assert peak_kib < 64 * 1024, peak_kib
    assert not (tmp_path / "out.pt").exists()


def test_deploy_names_the_weight_whose_shape_the_hyper_parameters_change(checkpoints, tmp_path, capsys):
    code, lines = run_cli(capsys, "deploy", str(checkpoints["wide"]), str(tmp_path / "out.pt"), "--input_shape", "1,8,8")
    assert code == 2 and len(lines) == 1, lines
    assert "build --model lightning_sparse.models.Classifier with `net.1.weight` of shape [300, 1000000], but the " \
           "checkpoint's weight has shape [300, 64]" in lines[0]


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    """``lightning-sparse ARGS`` in this process: its exit code and the lines it printed to stderr."""
    from lightning_sparse.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return exit_.value.code, err.strip().splitlines()
