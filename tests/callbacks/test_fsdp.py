"""FSDP2-sharded training (``ModelParallelStrategy`` + ``fully_shard``, 2 CPU processes, gloo) against the unsharded
run (``strategy="ddp"``, same processes, data and seed): masks, zero counts and final weights identical after the
gather, for every callback (GMP uniform, global, ERK, N:M, coupled channel groups, neurons and attention heads;
movement pruning by weight and by head; RigL; SET; QAT; L-C; GMP with ``Distillation`` from the dense model, whose
teacher is a whole copy of the sharded model and is saved in the sharded checkpoint when asked); checkpoints of both kinds resumed bit-exactly, across
the two layouts.

One spawned job runs everything (``fsdp_worker.py``, about 45 s on 2 cores); the tests read its per-rank JSON and
files. FSDP1 cannot be tested here: Lightning's ``FSDPStrategy`` refuses the CPU ("The strategy `fsdp` requires a GPU
accelerator") and so does torch's ``FullyShardedDataParallel`` ("FSDP needs a non-CPU accelerator device");
``benchmarks/gpu.py`` checks on a GPU that the callbacks refuse it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # subprocesses / several processes: `make test` runs it, `make test-fast` does not

WORKER = Path(__file__).with_name("fsdp_worker.py")
METHODS = [
    "gmp", "gmp-global", "gmp-erk", "gmp-nm", "gmp-channel", "gmp-neuron", "gmp-head", "movement", "movement-head",
    "rigl", "set", "qat", "qat-kmeans", "lc", "gmp-distill",
]  # fmt: skip
RESUMES = [
    "gmp-global:full", "gmp-global:into-sharded", "rigl:sharded", "rigl:into-unsharded",
    "movement:sharded", "qat-kmeans:sharded", "qat-kmeans:into-sharded", "lc:into-unsharded", "lc:full",
    "gmp-channel:into-unsharded", "gmp-head:sharded", "gmp-distill:sharded",
]  # fmt: skip
SPARSITY = {"gmp": 0.8}  # uniform: every layer at exactly round(0.8 · N) zeros


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """The folder of one 2-process job: per-rank JSON, checkpoints and exports."""
    out = tmp_path_factory.mktemp("fsdp")
    result = subprocess.run(
        [sys.executable, str(WORKER), str(out), ",".join(METHODS), ",".join(RESUMES)],
        capture_output=True, text=True, timeout=600, cwd=out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def ranks(job) -> list[dict]:
    return [json.loads((job / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_both_ranks_report_the_same_whole_model(ranks):
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["runs"] == ranks[1]["runs"]  # gathered tensors: every rank sees the same whole model


@pytest.mark.parametrize("method", METHODS)
def test_sharded_run_equals_unsharded_run(ranks, method):
    runs = ranks[0]["runs"]
    unsharded, sharded = runs[f"{method}/ddp"], runs[f"{method}/fsdp2"]
    assert sharded["sharded"] and not unsharded["sharded"]  # the parameters really were DTensor shards
    assert sharded["weights"] == unsharded["weights"]
    assert sharded["masks"] == unsharded["masks"]
    assert sharded["zeros"] == unsharded["zeros"]
    assert sharded["updates"] == unsharded["updates"]  # the same masks after every update, not only at the end
    assert len(sharded["updates"]) >= 2  # the masks (or quantized zeros) did change during training
    assert sum(sharded["zeros"].values()) > 0


def test_uniform_pruning_has_exact_zero_counts_on_uneven_shards(ranks):
    run = ranks[0]["runs"]["gmp/fsdp2"]
    expected = {name: int(SPARSITY["gmp"] * n + 0.5) for name, n in run["numel"].items()}
    assert run["zeros"] == expected  # 33 and 21 output rows: shards of 17/16 and 11/10 rows


@pytest.mark.parametrize("entry", RESUMES)
def test_resume_from_checkpoint_is_exact(ranks, entry):
    method, path = entry.split(":")
    runs = ranks[0]["runs"]
    resumed, straight = runs[f"{method}/{path}"], runs[f"{method}/ddp"]
    assert resumed["sharded_checkpoint"] == (path in ("sharded", "into-unsharded"))  # a folder, not one file
    assert resumed["sharded"] == (path != "into-unsharded")
    assert resumed["weights"] == straight["weights"]
    assert resumed["masks"] == straight["masks"]
    assert resumed["zeros"] == straight["zeros"]


def test_export_of_a_sharded_model_is_the_export_of_the_unsharded_one(job, ranks):
    files = {strategy: [(job / f"gmp-global-{strategy}-rank{r}.lsz").read_bytes() for r in (0, 1)] for strategy in ("ddp", "fsdp2")}
    assert files["fsdp2"][0] == files["fsdp2"][1] == files["ddp"][0]  # gathered: the whole model, byte for byte
    from lightning_sparse import export

    state = export.load_compressed(job / "gmp-global-fsdp2-rank0.lsz")
    zeros = {name: int((state[name] == 0).sum()) for name in ranks[0]["runs"]["gmp-global/fsdp2"]["zeros"]}
    assert zeros == ranks[0]["runs"]["gmp-global/fsdp2"]["zeros"]


def test_report_and_export_read_a_sharded_checkpoint_folder_whole(job):
    from lightning_sparse import export, report

    folder, file = job / "rigl-fsdp2-ddp-1.ckpt", job / "rigl-fsdp2-ddp-1.full.ckpt"
    assert (folder / ".metadata").is_file() and file.is_file()
    with pytest.raises(ValueError, match="distributed checkpoint folder.*pickle.*trusted=True"):
        report.checkpoint_stats(folder)
    stats = report.checkpoint_stats(folder, trusted=True)
    assert stats == report.checkpoint_stats(file)
    assert [s.name for s in stats] == ["net.1.weight", "net.3.weight", "net.5.weight"]  # the masked layers, from callback state
    assert all(0.5 < s.sparsity < 1 for s in stats)
    exported = export.save_compressed(folder, job / "from-folder.lsz", verbose=False, trusted=True)
    assert exported.compressed_layers
    whole = export.load_compressed(job / "from-folder.lsz")
    checkpoint = export.load_checkpoint(file)
    assert all(torch.equal(whole[name], tensor) for name, tensor in checkpoint["state_dict"].items())


def test_distillation_teacher_is_saved_whole_in_the_sharded_checkpoint(job):
    """``save_teacher=True`` under FSDP2: the distributed checkpoint folder holds the teacher as whole tensors, the
    dense model of fit start (``gmp-distill:sharded`` above resumes from it bit-exactly)."""
    from fsdp_worker import model_for

    from lightning_sparse import export

    folder = job / "gmp-distill-fsdp2-fsdp2-1.ckpt"
    assert (folder / ".metadata").is_file()
    state = export.load_distributed_checkpoint(folder, trusted=True)
    (teacher,) = [value["teacher"] for key, value in state["callbacks"].items() if key.startswith("Distillation")]
    initial = model_for("ddp", "gmp-distill").state_dict()
    assert teacher.keys() == initial.keys()
    assert all(torch.equal(teacher[name], initial[name]) for name in initial)  # whole, dense, untouched by training
    assert not torch.equal(state["state_dict"]["net.1.weight"], initial["net.1.weight"])  # while the student trained
