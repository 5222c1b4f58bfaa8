"""The command answers at once: ``--help`` lists every subcommand, and ``report``, ``export`` and ``deploy --help``
run without importing Lightning, W&B, Ax or transformers (checked in a fresh interpreter, as a user runs it)."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_sparse.cli import COMMANDS, SUMMARIES, main, usage

HEAVY = {"pytorch_lightning", "lightning", "lightning_fabric", "wandb", "ax", "transformers", "jsonargparse"}


def _run(*args: str, cwd=None) -> tuple[int, set[str], str]:
    """Run ``lightning-sparse ARGS`` in a fresh interpreter; its exit code, the heavy packages it imported, its output."""
    code = (
        "import json, sys\n"
        "from lightning_sparse.cli import main\n"
        f"sys.argv = ['lightning-sparse', *{list(args)!r}]\n"
        "try:\n    main()\n    rc = 0\nexcept SystemExit as e:\n    rc = e.code or 0\n"
        "sys.stdout.flush()\n"
        "print('\\nMODULES ' + json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd)
    text, _, modules = result.stdout.rpartition("\nMODULES ")
    return result.returncode, set(json.loads(modules)) & HEAVY, text + result.stderr


def test_top_level_help_lists_every_subcommand(capsys):
    main(["--help"])
    text = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", *COMMANDS):
        assert f"\n    {name} " in text, name
    assert set(SUMMARIES) == {"fit", "validate", "test", "predict", *COMMANDS}


def test_no_subcommand_prints_the_usage_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().out == usage()


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["report", "--help"], ["export", "--help"], ["deploy", "--help"],
                                  ["sweep", "--help"]])  # fmt: skip
def test_help_loads_no_lightning_wandb_or_transformers(args):
    code, heavy, output = _run(*args)
    assert code == 0, output
    assert "usage: lightning-sparse" in output
    assert not heavy, f"`lightning-sparse {' '.join(args)}` imported {sorted(heavy)}"


@pytest.mark.slow
def test_report_and_export_of_a_checkpoint_load_no_lightning(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[:, :4] = 0  # half of the first layer pruned
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 0, "global_step": 1}, ckpt)

    code, heavy, output = _run("report", str(ckpt), cwd=tmp_path)
    assert code == 0, output
    assert "0.weight" in output and "50.00%" in output
    assert not heavy, f"`lightning-sparse report` imported {sorted(heavy)}"

    code, heavy, output = _run("export", str(ckpt), str(tmp_path / "model.lsz"), cwd=tmp_path)
    assert code == 0, output
    assert (tmp_path / "model.lsz").is_file()
    assert not heavy, f"`lightning-sparse export` imported {sorted(heavy)}"
