"""CharGPT on Shakespeare: recovery from a large structured cut with little data, with and without distillation.

Where distillation is used (issue 29): a model cut hard, recovered on little text. Here:

1. The dense CharGPT of ``benchmarks.oneshot`` (the README's baby GPT, 2000 steps, seed 0; cached in
   ``~/.cache/lightning_sparse/``, trained there on first use).
2. The cut, once, before recovery: ``--cut`` (50%) of the attention heads and of the MLP neurons of every block,
   lowest L1 norm first (GMP's ``granularity={"*.attn.*": "head", "*.mlp.*": "neuron"}`` ranking,
   ``core.heads.prune_groups_by_magnitude``), their weights and biases zeroed.
3. Recovery: ``Trainer.fit`` for ``--steps`` on only ``--text-chars`` (20,000) characters of the train split
   (non-overlapping windows of 65, shuffled, batch 12; ``--steps 300`` is ~12 passes over them), AdamW ``--lr``
   (constant, weight decay 0.1 on the Linear weights, clip 1.0), with ``OneShotPruning(method="zeros")`` holding the
   cut. Every row has the same seed and data order; ``CE`` trains on the model's own cross-entropy, each ``KD`` row
   adds ``Distillation(teacher=<the dense model>, alpha, temperature, hidden_weight)``.
4. Val loss: mean cross-entropy (nats per character) over the first ``--val-batches`` held-out batches.

Target (issue 29): KD ends >= 0.01 nats below plain cross-entropy at the same steps.

Run from the repository root::

    .venv/bin/python -m benchmarks.distill [--steps 300] [--text-chars 20000] [--kd 0.5:2:0 0.9:2:0 ...]
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import pytorch_lightning as pl
import torch
from rich.table import Table

from benchmarks.common import emit, quiet, trainer
from benchmarks.oneshot import BABY_GPT, dense_model, val_loss
from lightning_sparse import Distillation, OneShotPruning
from lightning_sparse.core.counting import global_sparsity
from lightning_sparse.core.heads import extend_targets, prune_groups_by_magnitude, select_groups
from lightning_sparse.core.masks import MaskSet
from lightning_sparse.core.structured import expand_granularity
from lightning_sparse.core.targets import prunable_names, select_targets
from lightning_sparse.data import ShakespeareDataModule
from lightning_sparse.models import CharGPT

GROUPS = {"*.attn.*": "head", "*.mlp.*": "neuron"}


@torch.no_grad()
def cut(model: CharGPT, sparsity: float) -> dict[str, int]:
    """Zero ``sparsity`` of the heads and of the MLP neurons of every block (lowest L1 first, biases too)."""
    targets = select_targets(model)
    groups = select_groups(model, targets, expand_granularity(GROUPS, targets))
    masks = MaskSet(extend_targets(model, targets, groups))
    counts = prune_groups_by_magnitude(masks, groups, sparsity)
    masks.apply_()
    return counts


def kd_setting(text: str) -> tuple[float, float, float]:
    try:
        alpha, temperature, hidden = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kd takes alpha:temperature:hidden_weight, e.g. 0.5:2:0, got {text!r}") from None
    return alpha, temperature, hidden


def recover(state: dict[str, torch.Tensor], teacher: CharGPT, dm: ShakespeareDataModule, val: list[Any],
            args: argparse.Namespace, kd: tuple[float, float, float] | None) -> dict[str, Any]:  # fmt: skip
    pl.seed_everything(args.seed + 1, verbose=False)  # the same recovery data order for every row
    model = CharGPT(vocab_size=dm.vocab_size, lr=args.lr, lr_schedule="constant", warmup_steps=0, **BABY_GPT)
    model.load_state_dict(state)
    callbacks: list[pl.Callback] = [OneShotPruning(method="zeros", verbose=False)]
    if kd is not None:
        alpha, temperature, hidden = kd
        callbacks.append(Distillation(teacher=teacher, alpha=alpha, temperature=temperature, hidden_weight=hidden))
    started = time.perf_counter()
    trainer(callbacks, max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0).fit(
        model, datamodule=dm
    )
    params = dict(model.named_parameters())
    return {
        "val_loss": val_loss(model, val),
        "sparsity": global_sparsity([params[n].detach() for n in prunable_names(model)]),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense-steps", type=int, default=2000, help="steps of the cached dense model (README: 2000)")
    parser.add_argument("--cut", type=float, default=0.5, help="fraction of heads and of MLP neurons removed")
    parser.add_argument("--text-chars", type=int, default=20_000, help="characters of recovery text")
    parser.add_argument("--text-offset", type=int, default=0, help="where in the train split the recovery text starts")
    parser.add_argument("--steps", type=int, default=300, help="recovery optimizer steps")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (constant)")
    parser.add_argument("--kd", type=kd_setting, nargs="+", default=[(0.5, 2.0, 0.0)],
                        help="one KD row per alpha:temperature:hidden_weight")  # fmt: skip
    parser.add_argument("--no-ce", action="store_true", help="leave out the cross-entropy-only row")
    parser.add_argument("--val-batches", type=int, default=100, help="held-out batches of 12 windows for val loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="distill", help="results file benchmarks/results/<name>.json")
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(1)
    dm = ShakespeareDataModule(block_size=BABY_GPT["block_size"], batch_size=12, seed=args.seed)
    dm.prepare_data()
    dm.setup("fit")
    started = time.perf_counter()
    state = dense_model(dm, argparse.Namespace(dense_steps=args.dense_steps, seed=args.seed))
    val = [b for _, b in zip(range(args.val_batches), dm.val_dataloader())]
    dm.splits["train"] = dm.splits["train"][args.text_offset : args.text_offset + args.text_chars].clone()

    teacher = CharGPT(vocab_size=dm.vocab_size, **BABY_GPT)
    teacher.load_state_dict(state)
    dense_val = val_loss(teacher, val)
    student = copy.deepcopy(teacher)
    counts = cut(student, args.cut)
    cut_val = val_loss(student, val)
    cut_state = {k: v.clone() for k, v in student.state_dict().items()}

    results: dict[str, dict[str, Any]] = {}
    if not args.no_ce:
        results["CE only"] = recover(cut_state, teacher, dm, val, args, None)
    for kd in args.kd:
        results["KD α={:g} T={:g} β={:g}".format(*kd)] = recover(cut_state, teacher, dm, val, args, kd)
    wall = time.perf_counter() - started

    table = Table(title=f"CharGPT: {args.cut:.0%} of heads and neurons cut, {args.steps} recovery steps on "
                        f"{args.text_chars:,} characters (seed {args.seed})")  # fmt: skip
    for column in ("model", "zeros (prunable)", "val loss", "Δ vs dense", "Δ vs CE only", "recovery s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row("dense", "0.0%", f"{dense_val:.4f}", "", "", "")
    table.add_row("after cut", "", f"{cut_val:.4f}", f"{cut_val - dense_val:+.4f}", "", "")
    base = results.get("CE only", {}).get("val_loss")
    for name, r in results.items():
        table.add_row(f"recovered, {name}", f"{r['sparsity']:.1%}", f"{r['val_loss']:.4f}", f"{r['val_loss'] - dense_val:+.4f}",
                      "" if base is None else f"{r['val_loss'] - base:+.4f}", f"{r['seconds']:.0f}")  # fmt: skip
    checks = {f"{name} >= 0.01 below CE only": base - r["val_loss"] >= 0.01 for name, r in results.items()
              if base is not None and name != "CE only"}  # fmt: skip
    table.caption = (
        f"Cut: {dict(counts)} groups pruned per module. Recovery: AdamW lr {args.lr:g} constant, wd 0.1, batch 12, "
        f"clip 1.0, the cut held (OneShotPruning method='zeros'), train text [{args.text_offset}, "
        f"{args.text_offset + args.text_chars}) of the train split. Val: {args.val_batches} held-out batches. Target: "
        + ("; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items()) or "no KD row against CE")
        + f". Total {wall:.0f} s."
    )
    emit(args.name, table, {"args": vars(args), "dense_val_loss": dense_val, "cut_val_loss": cut_val, "wall_s": wall,
                            "groups_pruned": counts, "results": results, "targets_met": checks})  # fmt: skip


if __name__ == "__main__":
    main()
