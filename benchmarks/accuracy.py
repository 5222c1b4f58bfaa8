"""Test error of LeNet-300-100 on real MNIST: dense against gradual magnitude pruning at several sparsities.

Every run uses the same seed, data order, epochs and optimizer (SGD, momentum 0.9, lr 0.1 annealed to 0 by a
cosine schedule, batch 128); the pruned runs add ``GradualMagnitudePruning(sparsity=s, start=0.1, end=0.6,
frequency=100, distribution="global")``: one magnitude threshold across layers (``--distribution uniform`` gives
every layer the same sparsity, which at 98% leaves the 100x10 output layer 20 weights). No validation or model
selection: the model at the end of training is tested once on the 10k MNIST test images. Reported: test error
(%), its difference to dense in points, the global sparsity counted from the Linear weights (exact zeros), and
the wall time of training plus testing. Target: the 90% model within 0.3 points of dense error.

Run from the repository root (defaults take about 2 minutes on 2 CPU cores)::

    .venv/bin/python -m benchmarks.accuracy [--epochs 20] [--seed 0] [--sparsities 0.9 0.98]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import pytorch_lightning as pl
from rich.table import Table

from benchmarks.common import datamodule, emit, lenet300_parser, lenet300_test_error, quiet
from lightning_sparse import GradualMagnitudePruning

TARGET_POINTS = 0.3  # the 90% model's test error may exceed dense by at most this many points


def run(sparsity: float | None, dm: pl.LightningDataModule, args: argparse.Namespace) -> dict[str, Any]:
    """Train from the same seed (dense when ``sparsity`` is None) and test the final model."""
    callbacks = []
    if sparsity is not None:
        callbacks.append(GradualMagnitudePruning(sparsity=sparsity, start=args.start, end=args.end, frequency=args.frequency,
                                                 distribution=args.distribution, verbose=False))  # fmt: skip
    return {"target_sparsity": sparsity or 0.0, **lenet300_test_error(callbacks, dm, args.epochs, args.seed, args.lr, args.weight_decay)}


def main() -> None:
    parser = lenet300_parser(__doc__)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.98])
    parser.add_argument("--start", type=float, default=0.1, help="GMP start, fraction of training")
    parser.add_argument("--end", type=float, default=0.6, help="GMP end, fraction of training")
    parser.add_argument("--frequency", type=int, default=100, help="GMP mask updates every this many steps")
    parser.add_argument("--distribution", choices=("uniform", "global", "erk"), default="global")
    args = parser.parse_args()
    quiet()
    started = time.perf_counter()
    dm = datamodule("mnist", args.batch_size, args.seed)
    results = {"dense": run(None, dm, args)}
    for sparsity in args.sparsities:
        results[f"GMP {sparsity:.0%}"] = run(sparsity, dm, args)
    wall = time.perf_counter() - started

    dense_error = results["dense"]["test_error_pct"]
    table = Table(title=f"LeNet-300-100 on MNIST: {args.epochs} epochs, seed {args.seed}")
    for column in ("config", "sparsity (weights)", "test error %", "Δ vs dense (points)", "wall s", "target", "met"):
        table.add_column(column, justify="left" if column in ("config", "target") else "right")
    for name, r in results.items():
        r["delta_points"] = r["test_error_pct"] - dense_error
        target, met = "", ""
        if r["target_sparsity"] == 0.9:
            target = f"≤ +{TARGET_POINTS} points"
            met = "[green]yes" if r["delta_points"] <= TARGET_POINTS else "[red]no"
        table.add_row(name, f"{r['measured_sparsity']:.2%}", f"{r['test_error_pct']:.2f}", f"{r['delta_points']:+.2f}",
                      f"{r['wall_s']:.0f}", target, met)  # fmt: skip
    table.caption = (
        f"SGD momentum 0.9, lr {args.lr} cosine to 0, batch {args.batch_size}; GMP cubic, start {args.start}, end "
        f"{args.end}, frequency {args.frequency}, distribution {args.distribution}. Wall time {wall:.0f} s."
    )
    emit("accuracy", table, {"args": vars(args), "wall_s": wall, "results": results})


if __name__ == "__main__":
    main()
