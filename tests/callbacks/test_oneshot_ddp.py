"""OneShotPruning under real multi-process DDP and FSDP2 (2 CPU processes, gloo; one launch, ``oneshot_ddp_worker.py``):
every rank holds the same masks and weights, FSDP2 gives bit for bit what DDP gives, and the masks are those of
calibrating in one process on both ranks' batches together (the statistics are summed over the ranks); with
Distillation under DDP (Lightning redirects ``training_step`` through DDP's forward) the ranks stay identical, and under
FSDP2 (the teacher a whole copy of the sharded model at fit start) it trains bit for bit as under DDP."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_sparse.core import MaskSet, select_targets
from lightning_sparse.core.calibration import evaluation_mode
from lightning_sparse.core.oneshot import prune_one_shot
from oneshot_ddp_worker import MLP

pytestmark = pytest.mark.slow  # several processes (as tests/conftest.py asks): `make test` runs it, `make test-fast` does not

WORKER = Path(__file__).with_name("oneshot_ddp_worker.py")
JOBS = ["ddp:sparsegpt", "ddp:wanda", "fsdp2:sparsegpt", "ddp:sparsegpt+kd", "fsdp2:sparsegpt+kd", "fsdp2:sparsegpt+kd0",
        "fsdp2:sparsegpt+steps", "fsdp2:sparsegpt+kdgiven"]  # fmt: skip


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("oneshot_ddp")
    result = subprocess.run([sys.executable, str(WORKER), str(out), ",".join(JOBS)], capture_output=True, text=True,
                            timeout=600, cwd=out)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def ranks(job: Path, run: str) -> list[dict]:
    return [json.loads((job / f"{run.replace(':', '-')}-rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("run", JOBS)
def test_every_rank_holds_the_same_masks_and_weights(job, run):
    first, second = ranks(job, run)
    for rank in (first, second):
        rank.pop("kl", None), rank.pop("hidden", None)  # the losses of each rank's own batch
    assert first == second
    assert set(first["sparsity"].values()) == {0.5}


def test_fsdp2_prunes_exactly_as_ddp(job):
    assert ranks(job, "fsdp2:sparsegpt")[0] == ranks(job, "ddp:sparsegpt")[0]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_masks_are_those_of_calibrating_on_every_ranks_batches(job, method):
    model = MLP()
    model.load_state_dict(torch.load(job / f"initial-{method}.pt"))
    batches = torch.load(job / f"batches-{method}-0.pt") + torch.load(job / f"batches-{method}-1.pt")
    masks = MaskSet(select_targets(model))
    with evaluation_mode(model):
        prune_one_shot(model, masks, batches, lambda batch: model(batch[0]), method, 0.5)
    final = torch.load(job / f"ddp-{method}-final.pt")
    rank0_only = MaskSet(select_targets(model2 := MLP()))
    model2.load_state_dict(torch.load(job / f"initial-{method}.pt"))
    with evaluation_mode(model2):
        prune_one_shot(model2, rank0_only, batches[:3], lambda batch: model2(batch[0]), method, 0.5)
    for name in masks:
        assert torch.equal(final["masks"][name], masks.mask(name)), name
    # and not those of rank 0's batches alone
    assert any(not torch.equal(final["masks"][n], rank0_only.mask(n)) for n in masks)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_distillation_teacher_is_the_whole_dense_model_of_fit_start(job, strategy):
    for rank in ranks(job, f"{strategy}:sparsegpt+kd"):
        teacher = rank["teacher"]
        assert teacher["crc"] == teacher["initial"]  # the dense weights before the one-shot pruning, after 3 steps
        assert teacher["plain"] and not teacher["trainable"]  # under FSDP2 too: a whole, frozen copy
        assert 0 < rank["kl"] < float("inf") and 0 < rank["hidden"] < float("inf")  # the pruned student differs from its teacher


def test_distillation_under_fsdp2_trains_exactly_as_under_ddp(job):
    for fsdp2, ddp in zip(ranks(job, "fsdp2:sparsegpt+kd"), ranks(job, "ddp:sparsegpt+kd")):
        assert fsdp2 == ddp  # masks, weights, teacher and the last step's KL and SquareHead loss of this rank's batch


def test_distillation_with_alpha_0_under_fsdp2_is_training_without_it(job):
    kd0, plain = ranks(job, "fsdp2:sparsegpt+kd0")[0], ranks(job, "fsdp2:sparsegpt+steps")[0]
    assert kd0["weights"] == plain["weights"] and kd0["masks"] == plain["masks"]
    assert kd0["weights"] != ranks(job, "fsdp2:sparsegpt+kd")[0]["weights"]  # and alpha=0.5 does change training


def test_distillation_from_a_given_sharded_teacher_under_fsdp2(job):
    """A teacher the user gives, ``fully_shard``-ed like the model (it runs with all-gathers on every rank): the same
    training as from the default whole copy, which holds the same weights; with ``save_teacher=True`` a resumed run
    distils from it again."""
    for given, copied in zip(ranks(job, "fsdp2:sparsegpt+kdgiven"), ranks(job, "fsdp2:sparsegpt+kd")):
        assert not given["teacher"].pop("plain") and copied["teacher"].pop("plain")  # sharded, and whole
        # saved whole in the (sharded) checkpoint and cut again into another sharded teacher's shards on resume
        assert given["teacher"].pop("resumed") == given["teacher"]["initial"]
        assert given == copied
