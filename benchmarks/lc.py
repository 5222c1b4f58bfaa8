"""Learning-Compression against gradual magnitude pruning: LeNet-300-100 on real MNIST, equal optimizer steps.

Every run uses the same data order, epochs (so the same optimizer steps), batch 128 and SGD with momentum 0.9;
dense, GMP and the short-L-step runs use weight decay 5e-4 (``--weight-decay``) and lr 0.1 annealed to 0 by one cosine schedule:

* ``GMP 95%``: ``GradualMagnitudePruning(0.95, start=0.1, end=0.6, frequency=100, distribution="global")``;
* L-C rows train the reference model for the first 20% of the run, then alternate L and C steps under one of
  two schedules:

  - ``short L steps``: a C step every 43 optimizer steps to the end of the run, μ from 0.01 to 1.5, the run's one
    cosine learning rate throughout (many short L steps, so that the L steps still move w when μ is large);
  - ``fresh L steps``: the published code's recipe. The reference is trained to convergence first (its cosine
    ends at 0 at C step 0: ``Classifier(lr_schedule_steps=...)``); then one-epoch L steps, each started like a
    fresh optimizer with ``l_step_lr=0.09`` · 0.95^k and annealed to 0 within the step, μ from 1e-3 to 0.3, the
    last C step three epochs before the end (those steps train only the biases), and no weight decay: with K
    values per layer ``||Δ(Θ)||²`` is N·c² per codebook entry, so decay shrinks the codebook of every layer.

* ``L-C prune 95%``: ``LearningCompression("prune", sparsity=0.95, distribution="global")``, short L steps;
* ``L-C 1-bit``: ``LearningCompression("quantize", bits=1)``, a k-means codebook of K = 2 values per layer;
* ``L-C prune 95% + 2-bit``: 95% pruning and a 2-bit codebook on the kept weights (short L steps, which did
  better than fresh ones here), exported with ``save_compressed`` for its size ratio to fp32 dense.

Targets (issue 5): L-C pruning error ≤ dense + 0.2 points and not worse than GMP; L-C 1-bit ≤ dense + 0.5, both
on the mean over the seeds. Runs go ``--jobs`` at a time in worker processes of one torch thread each.

Run from the repository root (defaults: 18 runs of 40 epochs, about 15 minutes on 2 quiet CPU cores)::

    .venv/bin/python -m benchmarks.lc [--epochs 40] [--seeds 0 1 2] [--jobs 2]
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from rich.table import Table

from benchmarks.common import datamodule, emit, lenet300_parser, lenet300_test_error, quiet
from lightning_sparse import GradualMagnitudePruning, LearningCompression

STEPS_PER_EPOCH = 430  # 55,000 training images in batches of 128
ROWS = {  # name: (compression settings, L-C schedule or None)
    "dense": ({}, None),
    "GMP 95%": ({}, None),
    "L-C prune 95%": ({"compression": "prune", "sparsity": 0.95, "distribution": "global"}, "short"),
    "L-C 1-bit, short L steps": ({"compression": "quantize", "bits": 1}, "short"),
    "L-C 1-bit, fresh L steps": ({"compression": "quantize", "bits": 1}, "fresh"),
    "L-C prune 95% + 2-bit": ({"compression": "prune+quantize", "sparsity": 0.95, "bits": 2}, "short"),
}
TARGETS = {"L-C prune 95%": ("GMP 95%", 0.2), "L-C 1-bit, fresh L steps": (None, 0.5)}  # (not worse than, points)


def schedule(kind: str, epochs: int) -> dict[str, Any]:
    """``LearningCompression`` timing arguments for a run of ``epochs``: ``short`` or ``fresh`` L steps."""
    total = epochs * STEPS_PER_EPOCH
    first = total // 5
    if kind == "short":
        every, tail, mu, mu_final, extra = 43, 0, 1e-2, 1.5, {}
    else:
        every, tail, mu, mu_final = STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH, 1e-3, 0.3
        extra = {"l_step_lr": 0.09, "l_step_lr_decay": 0.95}
    lc_steps = (total - first - tail) // every + 1
    multiplier = (mu_final / mu) ** (1 / max(lc_steps - 1, 1))
    return {"mu_init": mu, "mu_multiplier": multiplier, "lc_steps": lc_steps, "steps_per_l": every,
            "first_l_steps": first, **extra}  # fmt: skip


def run(name: str, seed: int, epochs: int, lr: float, batch_size: int, weight_decay: float) -> dict[str, Any]:
    """Train and test one row for one seed (in a worker process, one torch thread)."""
    torch.set_num_threads(1)
    quiet()
    settings, kind = ROWS[name]
    callbacks: list[Any] = []
    timing = schedule(kind, epochs) if kind is not None else {}
    if name.startswith("GMP"):
        callbacks = [GradualMagnitudePruning(0.95, start=0.1, end=0.6, frequency=100, distribution="global", verbose=False)]
    elif kind is not None:
        callbacks = [LearningCompression(**settings, **timing, verbose=False)]
    fresh = kind == "fresh"
    weight_decay, reference_steps = (0.0, timing["first_l_steps"]) if fresh else (weight_decay, None)
    dm = datamodule("mnist", batch_size, seed)
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "model.lsz" if "2-bit" in name else None
        return lenet300_test_error(callbacks, dm, epochs, seed, lr, weight_decay, export, reference_steps)


def main() -> None:
    parser = lenet300_parser(__doc__, weight_decay=5e-4, seed=False)
    parser.set_defaults(epochs=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per row and seed")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (worker processes, one thread each)")
    args = parser.parse_args()
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {(name, seed): pool.submit(run, name, seed, args.epochs, args.lr, args.batch_size, args.weight_decay)
                   for seed in args.seeds for name in ROWS}  # fmt: skip
        runs = {key: future.result() for key, future in futures.items()}
    wall = time.perf_counter() - started

    results: dict[str, dict[str, Any]] = {}
    for name in ROWS:
        per_seed = [runs[name, seed] for seed in args.seeds]
        results[name] = {"test_error_pct": mean(r["test_error_pct"] for r in per_seed), "runs": per_seed,
                         "measured_sparsity": per_seed[0]["measured_sparsity"]}  # fmt: skip
        if "export_ratio" in per_seed[0]:
            results[name]["export_ratio"] = mean(r["export_ratio"] for r in per_seed)
    dense = results["dense"]["test_error_pct"]
    seeds = " / ".join(map(str, args.seeds))
    table = Table(title=f"LeNet-300-100 on MNIST: Learning-Compression vs GMP, {args.epochs} epochs, seeds {seeds}")
    for column in ("config", "weight zeros", f"test error % (seeds {seeds})", "mean", "Δ vs dense", "export ×", "target", "met"):
        table.add_column(column, justify="left" if column in ("config", "target") else "right")
    for name, r in results.items():
        r["delta_points"] = r["test_error_pct"] - dense
        target = met = ""
        if name in TARGETS:
            rival, points = TARGETS[name]
            ok = r["delta_points"] <= points and (rival is None or r["test_error_pct"] <= results[rival]["test_error_pct"])
            target = f"≤ +{points}" + (f", ≤ {rival}" if rival else "")
            met = "[green]yes" if ok else "[red]no"
        ratio = f"{r['export_ratio']:.1f}" if "export_ratio" in r else ""
        errors = " / ".join(f"{run['test_error_pct']:.2f}" for run in r["runs"])
        table.add_row(name, f"{r['measured_sparsity']:.2%}", errors, f"{r['test_error_pct']:.2f}", f"{r['delta_points']:+.2f}",
                      ratio, target, met)  # fmt: skip
    short, fresh = schedule("short", args.epochs), schedule("fresh", args.epochs)
    table.caption = (
        f"{args.epochs * STEPS_PER_EPOCH} optimizer steps per run. Short L steps: {short['lc_steps']} C steps every 43 "
        f"steps from step {short['first_l_steps']}, μ 0.01 × {short['mu_multiplier']:.4f}^k, cosine lr, weight decay "
        f"{args.weight_decay}. Fresh L steps: {fresh['lc_steps']} C steps every {STEPS_PER_EPOCH} steps, μ 0.001 × "
        f"{fresh['mu_multiplier']:.4f}^k, l_step_lr 0.09 × 0.95^k, reference lr annealed by step {fresh['first_l_steps']}, "
        f"no weight decay. GMP cubic 0.1..0.6, global. "
        f"Wall time {wall:.0f} s with {args.jobs} jobs."
    )
    emit("lc", table, {"args": vars(args), "wall_s": wall, "results": results})


if __name__ == "__main__":
    main()
