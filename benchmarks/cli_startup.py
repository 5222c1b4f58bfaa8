"""How long the ``lightning-sparse`` command takes to answer, against ``python -c "import torch"`` (the floor: every
subcommand needs torch).

Commands, each a fresh interpreter, run in interleaved rounds (one of each per round, so load on a shared machine
hits them alike), median wall time over ``--rounds``:

* ``python -c "import torch"``
* ``lightning-sparse --help``
* ``lightning-sparse report CKPT`` on a small checkpoint (a LeNet-300-100 state dict, 90% of it zeros)
* ``lightning-sparse deploy --help`` and ``lightning-sparse fit --help`` (the one that loads Lightning)

The target is ``report`` within 1.5× of ``import torch``: it loads neither Lightning nor W&B.

Run from the repository root::

    .venv/bin/python -m benchmarks.cli_startup [--rounds 7] [--skip_fit]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import emit


def _checkpoint(folder: Path) -> Path:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    with torch.no_grad():
        for layer in (model[1], model[3], model[5]):
            threshold = layer.weight.abs().flatten().kthvalue(int(0.9 * layer.weight.numel())).values
            layer.weight[layer.weight.abs() <= threshold] = 0
    path = folder / "lenet300.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 0}, path)
    return path


def _time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip_fit", action="store_true", help="leave out `fit --help` (the slow one)")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "lightning_sparse.cli"]
    with tempfile.TemporaryDirectory() as folder:
        ckpt = _checkpoint(Path(folder))
        commands = {
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
            "lightning-sparse --help": [*cli, "--help"],
            "lightning-sparse report CKPT": [*cli, "report", str(ckpt)],
            "lightning-sparse deploy --help": [*cli, "deploy", "--help"],
        }
        if not args.skip_fit:
            commands["lightning-sparse fit --help"] = [*cli, "fit", "--help"]
        for command in commands.values():  # warm the file cache once
            _time(command)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, command in commands.items():
                times[name].append(_time(command))

    from rich.table import Table

    base = statistics.median(times['python -c "import torch"'])
    table = Table(title=f"CLI start-up: median wall time of {args.rounds} interleaved rounds")
    for column in ("command", "median s", "min s", "× import torch"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for name, values in times.items():
        median = statistics.median(values)
        table.add_row(name, f"{median:.2f}", f"{min(values):.2f}", f"{median / base:.2f}")
    payload = {name: {"median_s": statistics.median(v), "times_s": v, "ratio_to_import_torch": statistics.median(v) / base}
               for name, v in times.items()}  # fmt: skip
    emit("cli_startup", table, payload)


if __name__ == "__main__":
    main()
