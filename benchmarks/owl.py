"""CharGPT on Shakespeare: OWL's outlier threshold M and spread λ against uniform sparsity, one-shot (no recovery).

The dense CharGPT of ``benchmarks.oneshot`` (the README's baby GPT, 2000 steps, seed 0, cached in
``~/.cache/lightning_sparse/``) pruned in one shot by ``core.oneshot.prune_one_shot`` (what ``OneShotPruning`` runs)
at ``--sparsity`` (70%) with ``--method`` (Wanda) from ``--calibration`` (32) train batches of 12 windows of 64
characters (the first batches of the seed-1 shuffle, as the one-shot benchmark's callback sees them), uniformly and
with ``distribution="owl"`` for each ``--thresholds`` M and ``--spreads`` λ (the paper sweeps M in 3..10 and λ in
0.02..0.2; its LLaMA setting is M = 5, λ = 0.08). Prints the per-block outlier ratios ``D`` (the share of each block's
Wanda scores above M × their mean, from the dense model), the per-block sparsities and the val loss (mean cross-entropy
over the first ``--val-batches`` held-out batches) against uniform.

Run from the repository root::

    .venv/bin/python -m benchmarks.owl [--method wanda] [--sparsity 0.7] [--thresholds 3 5 7 10] [--spreads 0.02 0.08]
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import pytorch_lightning as pl
import torch
from rich.table import Table

from benchmarks.common import emit, quiet
from benchmarks.oneshot import BABY_GPT, dense_model, val_loss
from lightning_sparse.core.calibration import collect, evaluation_mode, find_layers, ordered_blocks
from lightning_sparse.core.masks import MaskSet
from lightning_sparse.core.oneshot import outlier_ratio, prune_one_shot, wanda_scores
from lightning_sparse.core.targets import select_targets
from lightning_sparse.data import ShakespeareDataModule
from lightning_sparse.models import CharGPT


def fresh(state: dict[str, torch.Tensor], vocab: int) -> CharGPT:
    model = CharGPT(vocab_size=vocab, **BABY_GPT)
    model.load_state_dict(state)
    return model


def one_shot(state: dict[str, torch.Tensor], vocab: int, batches: list[Any], val: list[Any], args: argparse.Namespace,
             **owl: Any) -> tuple[float, dict[str, float]]:  # fmt: skip
    model = fresh(state, vocab)
    masks = MaskSet(select_targets(model))
    with evaluation_mode(model), torch.no_grad():
        per_layer = prune_one_shot(model, masks, batches, lambda b: model(b[0]), args.method, args.sparsity, **owl)
    return val_loss(model, val), per_layer


def block_ratios(state: dict[str, torch.Tensor], vocab: int, batches: list[Any], threshold: float) -> list[float]:
    """OWL's ``D`` per block of the dense model (as ``owl_layer_sparsities`` computes it)."""
    model = fresh(state, vocab)
    targets = select_targets(model)
    run = lambda b: model(b[0])  # noqa: E731
    with evaluation_mode(model), torch.no_grad():
        layers = find_layers(model, targets, targets.aliases)
        order = ordered_blocks(model, layers, run, batches[0])
        stats = collect(layers, "norms", batches, run)
        return [
            outlier_ratio([wanda_scores(layers[n].as_rows(model.get_parameter(n)), stats[n].squared_norms) for n in names], threshold)
            for names in order.blocks.values()
        ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense-steps", type=int, default=2000)
    parser.add_argument("--method", default="wanda", choices=("wanda", "sparsegpt", "magnitude"))
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[3.0, 5.0, 7.0, 10.0], help="OWL's M")
    parser.add_argument("--spreads", type=float, nargs="+", default=[0.02, 0.04, 0.08, 0.15], help="OWL's λ")
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--val-batches", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="owl")
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(1)
    started = time.perf_counter()
    dm = ShakespeareDataModule(block_size=BABY_GPT["block_size"], batch_size=12, seed=args.seed)
    dm.prepare_data()
    dm.setup("fit")
    state = dense_model(dm, argparse.Namespace(dense_steps=args.dense_steps, seed=args.seed))
    val = [b for _, b in zip(range(args.val_batches), dm.val_dataloader())]
    pl.seed_everything(args.seed + 1, verbose=False)  # the recovery runs' data order: their first batches calibrate
    batches = list(itertools.islice(iter(dm.train_dataloader()), args.calibration))
    vocab = dm.vocab_size
    dense = val_loss(fresh(state, vocab), val)
    uniform, _ = one_shot(state, vocab, batches, val, args)
    rows: list[dict[str, Any]] = []
    for threshold in args.thresholds:
        ratios = block_ratios(state, vocab, batches, threshold)
        for spread in args.spreads:
            loss, per_layer = one_shot(state, vocab, batches, val, args, distribution="owl", owl_threshold=threshold, owl_spread=spread)
            blocks = sorted({n.split(".attn.")[0].split(".mlp.")[0]: s for n, s in per_layer.items()}.items())
            rows.append({"M": threshold, "lambda": spread, "ratios": ratios, "block_sparsity": [s for _, s in blocks], "val_loss": loss})
    table = Table(title=f"CharGPT {args.method} {args.sparsity:.0%} one-shot: OWL (M, λ) against uniform "
                        f"(dense val {dense:.4f}, uniform {uniform:.4f}, {uniform - dense:+.4f})")  # fmt: skip
    for column in ("M", "λ", "outlier ratio D per block", "sparsity per block", "val loss", "Δ vs uniform"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['M']:g}", f"{r['lambda']:g}", " ".join(f"{d:.2%}" for d in r["ratios"]),
                      " ".join(f"{s:.1%}" for s in r["block_sparsity"]), f"{r['val_loss']:.4f}",
                      f"{r['val_loss'] - uniform:+.4f}")  # fmt: skip
    best = min(rows, key=lambda r: r["val_loss"])
    table.caption = (f"{args.calibration} calibration batches, {args.val_batches} val batches. Best OWL: M={best['M']:g}, "
                     f"λ={best['lambda']:g}, {best['val_loss'] - uniform:+.4f} vs uniform. {time.perf_counter() - started:.0f} s.")  # fmt: skip
    emit(args.name, table, {"args": vars(args), "dense_val_loss": dense, "uniform_val_loss": uniform, "rows": rows})


if __name__ == "__main__":
    main()
