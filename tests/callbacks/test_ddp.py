"""Masks under real multi-process DDP (2 CPU processes, gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses / several processes: `make test` runs it, `make test-fast` does not

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("method", ["gmp", "rigl", "set"])
def test_every_rank_holds_identical_masks_at_every_update(tmp_path, method):
    result = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), method], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    rows0, rows1 = ranks[0]["rows"], ranks[1]["rows"]
    assert len(rows0) >= 5  # several mask updates were compared, not just the final state
    assert rows0 == rows1  # same steps, same mask CRCs, same zero patterns of the weights
    assert rows0[-1]["sparsity"] > 0.899
    if method != "gmp":  # constant sparsity from the first step; connections moved at every update
        assert all(abs(row["sparsity"] - 0.9) < 1e-3 for row in rows0)
        assert [row["step"] for row in rows0[1:]] == [6, 11, 16, 21, 26]  # after the updates at steps 5, 10, ..., 25
    assert ranks[0]["weights"] == ranks[1]["weights"]
