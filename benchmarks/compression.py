"""Exported size against test error: LeNet-300-100 on real MNIST, dense vs pruning + quantization in one run.

Every run uses the same seed, data order, epochs and optimizer (SGD, momentum 0.9, weight decay 5e-4, lr 0.1
annealed to 0 by a cosine schedule, batch 128). The compressed runs put two callbacks in one Trainer:

* ``GradualMagnitudePruning`` with a per-layer target (``{glob: sparsity}``), cubic from 10% to 60% of training;
* ``QuantizationAwareTraining`` with a k-means codebook per layer (``bits`` for weights, 8 bits for biases),
  switched on at 60% of training, once the masks are final.

Each trained model is written with ``lightning_sparse.export.save_compressed``; the ratio is fp32 dense bytes
of all parameters / file size (header included). The file is loaded back into a fresh model and tested: its
accuracy must equal the trained model's exactly (checked; the run fails otherwise). Target (issue 4): at least
100× smaller than fp32 dense with test error at most dense + 0.3 points.

Run from the repository root (defaults take about 3 minutes on 2 CPU cores)::

    .venv/bin/python -m benchmarks.compression [--epochs 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from rich.table import Table

from benchmarks.common import datamodule, emit, lenet300_parser, quiet, trainer
from lightning_sparse import GradualMagnitudePruning, QuantizationAwareTraining
from lightning_sparse.export import load_compressed, save_compressed
from lightning_sparse.models import Classifier
from lightning_sparse.core.counting import global_sparsity

TARGET_RATIO, TARGET_POINTS = 100.0, 0.3
CONFIGS: dict[str, dict[str, Any]] = {  # per-layer GMP targets for LeNet-300-100's three Linear weights
    "dense": {},
    "prune 97.6% + 4-bit": {"sparsity": {"net.1.*": 0.985, "net.3.*": 0.92, "net.5.*": 0.5}, "bits": 4},
    "prune 98.4% + 4-bit": {"sparsity": {"net.1.*": 0.99, "net.3.*": 0.95, "net.5.*": 0.7}, "bits": 4},
    "prune 98.4% + 3-bit": {"sparsity": {"net.1.*": 0.99, "net.3.*": 0.95, "net.5.*": 0.7}, "bits": 3},
}


def callbacks_for(config: dict[str, Any]) -> list[pl.Callback]:
    if not config:
        return []
    return [
        GradualMagnitudePruning(sparsity=config["sparsity"], start=0.1, end=0.6, frequency=100, verbose=False),
        QuantizationAwareTraining(bits={"*.weight": config["bits"], "*.bias": 8}, include=["*.weight", "*.bias"],
                                  method="kmeans", start=0.6, verbose=False),  # fmt: skip
    ]


def run(config: dict[str, Any], dm: pl.LightningDataModule, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    model = Classifier(arch="lenet300", input_shape=dm.input_shape, optimizer="sgd", lr=args.lr, momentum=0.9,
                       lr_schedule="cosine", weight_decay=args.weight_decay)  # fmt: skip
    fitter = trainer(callbacks_for(config), max_epochs=args.epochs, limit_val_batches=0, num_sanity_val_steps=0,
                     deterministic=True)  # fmt: skip
    started = time.perf_counter()
    fitter.fit(model, datamodule=dm)
    accuracy = fitter.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    exported = save_compressed(model, out, verbose=False)
    reloaded = Classifier(arch="lenet300", input_shape=dm.input_shape)
    reloaded.load_state_dict(load_compressed(out))
    reloaded_accuracy = fitter.test(reloaded, datamodule=dm, verbose=False)[0]["test_acc"]
    if reloaded_accuracy != accuracy:
        raise AssertionError(f"reloaded accuracy {reloaded_accuracy} differs from the trained model's {accuracy}")
    weights = [p.detach() for n, p in model.named_parameters() if n.endswith("weight")]
    return {
        "weight_sparsity": global_sparsity(weights),
        "file_bytes": exported.file_bytes,
        "fp32_bytes": exported.fp32_bytes,
        "ratio": exported.ratio,
        "test_error_pct": 100.0 * (1.0 - accuracy),
        "reloaded_equal": True,
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = lenet300_parser(__doc__, weight_decay=5e-4)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    quiet()
    started = time.perf_counter()
    dm = datamodule("mnist", args.batch_size, args.seed)
    names = ["dense"] + [name for name in args.configs if name != "dense"]
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(CONFIGS[name], dm, args, Path(tmp) / f"{i}.lsz") for i, name in enumerate(names)}
    wall = time.perf_counter() - started

    dense_error = results["dense"]["test_error_pct"]
    table = Table(title=f"LeNet-300-100 on MNIST: exported size vs test error, {args.epochs} epochs, seed {args.seed}")
    for column in ("config", "net.1 / net.3 / net.5 sparsity", "weight zeros", "file bytes", "× smaller than fp32",
                   "test error %", "Δ vs dense", "target", "met"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("config", "target") else "right")
    for name, r in results.items():
        r["delta_points"] = r["test_error_pct"] - dense_error
        target = met = ""
        if name != "dense":
            target = f"≥ {TARGET_RATIO:.0f}× and ≤ +{TARGET_POINTS}"
            met = "[green]yes" if r["ratio"] >= TARGET_RATIO and r["delta_points"] <= TARGET_POINTS else "[red]no"
        layers = " / ".join(f"{v:.1%}" for v in CONFIGS[name]["sparsity"].values()) if name != "dense" else "-"
        table.add_row(name, layers, f"{r['weight_sparsity']:.2%}", f"{r['file_bytes']:,}", f"{r['ratio']:.1f}",
                      f"{r['test_error_pct']:.2f}", f"{r['delta_points']:+.2f}", target, met)  # fmt: skip
    table.caption = (
        f"SGD momentum 0.9, weight decay {args.weight_decay}, lr {args.lr} cosine to 0, batch {args.batch_size}. "
        "GMP cubic 0.1..0.6 with per-layer targets, QAT k-means codebooks from 0.6 (weights at the config's bits, "
        "biases 8-bit). Every exported file reloads to the same test accuracy. "
        f"Wall time {wall:.0f} s."
    )
    emit("compression", table, {"args": vars(args), "configs": CONFIGS, "wall_s": wall, "results": results})


if __name__ == "__main__":
    main()
