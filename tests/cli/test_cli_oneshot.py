"""The one-shot preset with distillation from the command line, as a user runs it."""

import pytest
import torch

from support import DIGITS, ROOT, run_cli
from lightning_sparse.core.structured import nm_counts

pytestmark = pytest.mark.slow  # `lightning-sparse fit` in a subprocess: `make test` runs it, `make test-fast` does not


def test_2of4_distillation_preset_holds_the_pattern(tmp_path):
    run_cli(
        "fit", *DIGITS, "--trainer.max_epochs=1", "--data.batch_size=32", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks={ROOT / 'callbacks' / 'oneshot_2of4_distill.yaml'}", cwd=tmp_path,
    )  # fmt: skip
    (path,) = tmp_path.glob("**/checkpoints/*.ckpt")
    state = torch.load(path, weights_only=False)["state_dict"]
    for name in ("net.1.weight", "net.3.weight", "net.5.weight"):
        assert (nm_counts(state[name], 4) == 2).all(), name
    assert not any("teacher" in key for key in state)
