"""Received files, round two (issue 30): every reader bounded in working memory, not only in its output.

Each crafted file is well formed but for its bomb (real CRC32 and SHA-256), built here, and read in a child
process under an address-space limit with its peak resident memory measured, as the bombs of test_security.py.
"""

from __future__ import annotations

import json
import os
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
    from lightning_sparse.export.format import load_compressed, _read_header, _working_bytes

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


@pytest.mark.slow  # a child Python under a memory limit
@pytest.mark.skipif(sys.platform != "linux", reason="measures /proc/self/status")
def test_lsz_decoders_work_in_bounded_memory_and_count_it_against_the_budget(tmp_path):
    outcome = run_child(LSZ_BOMBS, str(tmp_path))
    decoded = 4 << 20
    for name in ("positions", "codebook"):
        kind, message, peak_kib, size, working, scratch = outcome[name]
        # a valid file: it loads, whole and right (main needed 985 MiB and 269 MiB of memory for these 4 MiB)
        assert kind == "loaded" and message.startswith("[[2097152], 'torch.float16', "), (name, kind, message)
        assert size < 100_000 and working > decoded  # the decoder's own needs are the larger part here
        bound = decoded + working + scratch + (32 << 20)  # output + counted working memory + fixed scratch + margin
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


@pytest.mark.slow  # a child Python under a memory limit
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
    import lightning_sparse.cli.deploy, lightning_sparse.models  # the CLI imports these lazily: not what is measured

    def deploy():
        try:
            main(["deploy", sys.argv[1], sys.argv[2], "--input_shape", "1,8,8"])
        except SystemExit as exit_:
            return f"exit {exit_.code}"
    print(json.dumps(measured(deploy, limit_mib=2048)))  # room for what main built: its peak is measured
""")


@pytest.mark.slow  # a child Python under a memory limit
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


# ---------------------------------------------------------------------- sweep files: aliases and numbers bounded
LAUGHS = "\n".join(
    ["lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
)  # 9^9 = 387,420,489 strings once the aliases are expanded, in 761 bytes


def sweep_file(tmp_path: Path, text: str = "", fit: str = "trainer: {max_epochs: 1}\n") -> Path:
    (tmp_path / "fit.yaml").write_text(fit)
    path = tmp_path / "sweep.yaml"
    path.write_text("name: s\nfit_config: fit.yaml\n"
                    "parameters: {sparsity: {key: trainer.max_epochs, bounds: [1, 3]}}\n" + text)  # fmt: skip
    return path


YAML_BOMB = MEASURE + textwrap.dedent("""
    from lightning_sparse.sweep import load_sweep
    from lightning_sparse.sweep.config import SweepConfig
    print(json.dumps({"sweep": measured(lambda: load_sweep(sys.argv[1], instantiate=False)),
                      "fit": measured(lambda: load_sweep(sys.argv[2], instantiate=False).base())}))
""")


@pytest.mark.slow  # a child Python under a memory limit
@pytest.mark.skipif(sys.platform != "linux", reason="measures /proc/self/status")
def test_yaml_aliases_that_expand_a_sweep_or_fit_file_beyond_a_bound_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    bomb = sweep_file(tmp_path / "a")  # the anchors first, then the sweep, whose overrides use the last one
    bomb.write_text(LAUGHS + "\n" + bomb.read_text() + "overrides:\n  trainer.limit_train_batches: *l8\n")
    fit_bomb = sweep_file(tmp_path / "b", fit=LAUGHS + "\ntrainer:\n  plugins: *l8\n")
    assert bomb.stat().st_size < 1000
    outcome = run_child(YAML_BOMB, str(bomb), str(fit_bomb))
    for which, name in (("sweep", "sweep file"), ("fit", "fit_config")):
        kind, message, peak_kib = outcome[which]
        # main: the --print_config check expanded it (4.1 GB and growing)
        assert kind == "ValueError" and message.startswith(name), (which, kind, message)
        assert "its aliases (*name) expand it to more than 100,000 YAML nodes" in message
        assert peak_kib < 16 * 1024, (which, peak_kib)


def test_yaml_anchors_of_ordinary_size_still_work(tmp_path):
    from lightning_sparse.sweep import load_sweep

    fit = "defaults: &d {max_epochs: 2, accelerator: cpu}\ntrainer: *d\n"
    sweep = load_sweep(sweep_file(tmp_path, "seed: &s 3\nmax_trials: *s\n", fit=fit), instantiate=False)
    assert sweep.max_trials == 3 and sweep.base()["trainer"] == {"max_epochs": 2, "accelerator": "cpu"}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_trials", 1_000_000_000, "`max_trials` must be an int in [1, 10000], got 1000000000"),
        ("trial_timeout", "1.0e+300", "`trial_timeout` must be a number in [1, 604800], got 1e+300"),
        ("trial_timeout", ".nan", "`trial_timeout` must be a number in [1, 604800], got nan"),
        ("initial_trials", 10**12, "`initial_trials` must be an int in [1, 10000]"),
        ("seed", 2**40, "`seed` must be an int in [0, 4.29497e+09]"),
        ("baseline", ".inf", "`baseline` must be a number in"),
        ("parallel", 1_000_000, "`parallel` is 1000000 but this machine has"),
        ("force_parallel", "yes please", "`force_parallel` must be true or false"),
    ],
)
def test_sweep_numbers_beyond_their_bounds_are_refused_naming_the_bound(tmp_path, field, value, message):
    from lightning_sparse.sweep import load_sweep

    with pytest.raises(ValueError) as error:
        load_sweep(sweep_file(tmp_path, f"{field}: {value}\n"), instantiate=False)
    assert message in str(error.value)


def test_parallel_above_the_cores_needs_force(tmp_path, capsys):
    from lightning_sparse.sweep import load_sweep

    cores = os.cpu_count() or 1
    with pytest.raises(ValueError, match=f"`parallel` is {cores + 1} but this machine has {cores} cores"):
        load_sweep(sweep_file(tmp_path, f"parallel: {cores + 1}\n"), instantiate=False)
    assert load_sweep(sweep_file(tmp_path, f"parallel: {cores + 1}\nforce_parallel: true\n"), instantiate=False).parallel == cores + 1
    # the command line's numbers are bounded the same way, one line and exit 2
    code, lines = run_cli(capsys, "sweep", "--config", str(sweep_file(tmp_path)), "--parallel", str(cores + 1),
                          "--output", str(tmp_path / "out"))  # fmt: skip
    assert code == 2 and len(lines) == 1 and f"`parallel` is {cores + 1}" in lines[0] and "--force_parallel" in lines[0]
    code, lines = run_cli(capsys, "sweep", "--config", str(sweep_file(tmp_path)), "--max_trials", "1000000000",
                          "--output", str(tmp_path / "out"))  # fmt: skip
    assert code == 2 and len(lines) == 1 and "`max_trials` must be an int in [1, 10000]" in lines[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- true messages: each file named for what it is
@pytest.fixture
def received(tmp_path, checkpoints) -> dict[str, str]:
    import torch

    from lightning_sparse.export import save_compressed

    save_compressed({"w": torch.ones(3, 3)}, tmp_path / "model.lsz", verbose=False)
    (tmp_path / "folder").mkdir()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    os.mkfifo(tmp_path / "fifo")  # reading it would block forever
    (tmp_path / "notes.ckpt").write_text("epoch=3 val_acc=0.97\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    return {"lsz": str(tmp_path / "model.lsz"), "folder": str(tmp_path / "folder"), "hf": str(tmp_path / "hf"),
            "fifo": str(tmp_path / "fifo"), "zero": "/dev/zero", "text": str(tmp_path / "notes.ckpt"),
            "empty": str(tmp_path / "empty.ckpt"), "state_dict": str(checkpoints["state_dict"]),
            "out": str(tmp_path / "out")}  # fmt: skip


KINDS = [
    ("lsz", "is a lightning_sparse compressed file, not a checkpoint"),  # main, deploy: "... pass --trust"
    ("folder", "is a directory, not a checkpoint file"),  # main: "does not exist"
    ("hf", "is a Hugging Face model folder (it holds config.json), not a checkpoint"),
    ("fifo", "is a FIFO (named pipe), not a checkpoint file"),  # main: "does not exist"
    ("zero", "is a character device, not a checkpoint file"),  # main: "does not exist"
    ("text", "is not a checkpoint a weights-only load can read: it is a text file (it starts 'epoch=3"),  # main: "101"
    ("empty", "it is an empty file, not a torch.save archive"),
]


@pytest.mark.parametrize(
    ("command", "kind", "message"),
    [(command, *case) for command in ("deploy", "report", "export") for case in KINDS
     if (command, case[0]) != ("report", "lsz")],  # report reads compressed exports  # fmt: skip
)
def test_each_kind_of_file_is_named_for_what_it_is_in_one_line(received, capsys, command, kind, message):
    args = [command, received[kind]] + ([] if command == "report" else [received["out"]])
    code, lines = run_cli(capsys, *args)
    assert code == 2 and len(lines) == 1, lines
    assert message in lines[0] and received[kind] in lines[0], lines[0]
    assert "--trust" not in lines[0]  # not a pickle: trusting it would not help (and would unpickle its bytes)


def test_deploy_of_a_plain_state_dict_says_it_lacks_lightning_metadata(received, capsys):
    code, lines = run_cli(capsys, "deploy", received["state_dict"], received["out"], "--input_shape", "1,8,8")
    # main: KeyError 'pytorch-lightning_version'
    assert code == 2 and len(lines) == 1 and "is a plain state dict without Lightning metadata" in lines[0], lines
    assert "lightning_sparse.deployment.deploy_model" in lines[0] and "--trust" not in lines[0]


def test_deploy_reads_a_distributed_checkpoint_folder_as_report_and_export_do(checkpoints, tmp_path, capsys):
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    checkpoint = torch.load(checkpoints["model"], weights_only=True)
    folder = tmp_path / "sharded"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
        dcp.save({"state_dict": checkpoint.pop("state_dict")}, checkpoint_id=folder, no_dist=True)
    torch.save({k: v for k, v in checkpoint.items() if k != "optimizer_states"}, folder / "meta.pt")
    # its .metadata index is a pickle: refused without --trust, which is the advice given (main: [Errno 21])
    code, lines = run_cli(capsys, "deploy", str(folder), str(tmp_path / "out.pt"), "--input_shape", "1,8,8")
    assert code == 2 and len(lines) == 1 and "is a distributed checkpoint folder" in lines[0] and "--trust" in lines[0]
    with pytest.warns(UserWarning, match="runs any code"):
        from lightning_sparse.cli import main

        main(["deploy", str(folder), str(tmp_path / "out.pt"), "--input_shape", "1,8,8", "--trust", "--batch_size", "8"])
    assert (tmp_path / "out.pt").is_file()


@pytest.mark.slow  # `lightning-sparse fit` in a subprocess
def test_the_lc_preset_refusing_a_short_run_is_one_line_in_fit(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "lightning_sparse.cli", "fit", "--config", str(repo / "examples" / "digits_gmp.yaml"),
               f"--trainer.callbacks={repo / 'callbacks' / 'lc.yaml'}", "--trainer.max_epochs=1", "--trainer.logger=false",
               f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=false"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"})  # fmt: skip
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    # main: a 40-line traceback ending in this ValueError
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert len(errors) == 1 and "needs 7880 optimizer steps, but the run has 20" in errors[0], run.stderr[-2000:]


def test_fuzz_of_a_checkpoint_gives_only_value_errors_naming_the_file(checkpoints, tmp_path):
    """Fixed-seed byte mutations of a real checkpoint through the checked reader: a result or a ValueError naming
    the file, never another exception (the bounds above run before torch.load, on every mutation)."""
    import random

    from lightning_sparse.export import load_checkpoint

    data = bytearray(checkpoints["model"].read_bytes())
    rng = random.Random(30)
    path = tmp_path / "fuzzed.ckpt"
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(150):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(len(mutated))
            mutated[position] = rng.randrange(256)
        if rng.random() < 0.2:
            mutated = mutated[: rng.randrange(len(mutated))]  # truncated
        path.write_bytes(bytes(mutated))
        try:
            load_checkpoint(path)
            outcomes["loaded"] += 1
        except ValueError as error:
            assert str(path) in str(error), error
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 150, outcomes
