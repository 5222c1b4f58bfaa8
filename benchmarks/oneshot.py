"""CharGPT on Shakespeare: one-shot pruning (magnitude, Wanda, SparseGPT; OWL) of a trained dense model, then recovery
with the masks held, against the dense model trained the same recovery steps.

1. A dense CharGPT (the README's baby GPT: 4 layers, 4 heads, 128 dims, block 64; AdamW 1e-3 with 100 warm-up steps
   and a cosine to 1e-4, clip 1.0, batch 12) is trained for ``--dense-steps`` (2000 in the README) with ``--seed`` and
   cached in ``~/.cache/lightning_sparse/`` (a later run reuses it).
2. Every row starts from that model and runs ``Trainer.fit`` for ``--recovery-steps`` (200) with AdamW lr 1e-4
   (constant, weight decay 0.1 on the Linear weights), batch 12, in the same data order: ``dense`` without a callback,
   the others with ``OneShotPruning(step=0, calibration_batches=--calibration)`` (and, for the ``+ KD`` rows,
   ``Distillation(alpha=0.5, temperature=2)`` from the dense model). The one-shot val loss is measured right after
   pruning, before the first recovery step; the one-shot wall time is the callback's (calibration and pruning).
3. Val loss: the mean cross-entropy (nats per character) over the first ``--val-batches`` held-out batches.

Targets (issue 29): SparseGPT 50% one-shot ≤ dense + 0.02 and after recovery ≤ dense + 200 steps + 0.003; SparseGPT
2:4 after recovery ≤ + 0.008; SparseGPT beats magnitude one-shot at 50% and 2:4; OWL 70% beats uniform Wanda 70%.

Run from the repository root (``--dense-steps 2000`` takes CPU tens of minutes on a loaded 2-core machine)::

    .venv/bin/python -m benchmarks.oneshot [--dense-steps 2000] [--recovery-steps 200] [--rows ...]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from rich.table import Table

from benchmarks.common import emit, quiet, trainer
from lightning_sparse import Distillation, OneShotPruning
from lightning_sparse.core.counting import global_sparsity
from lightning_sparse.core.targets import prunable_names
from lightning_sparse.data import ShakespeareDataModule
from lightning_sparse.models import CharGPT

BABY_GPT = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)
CACHE = Path.home() / ".cache" / "lightning_sparse"


def rows(calibration: int) -> dict[str, Callable[[], list[pl.Callback]]]:
    def oneshot(method: str, sparsity: float = 0.5, **kwargs: Any) -> Callable[[], list[pl.Callback]]:
        return lambda: [OneShotPruning(sparsity, method, calibration_batches=calibration, verbose=False, **kwargs)]

    table: dict[str, Callable[[], list[pl.Callback]]] = {"dense": lambda: []}
    for method in ("magnitude", "wanda", "sparsegpt"):
        table[f"{method} 50%"] = oneshot(method)
        table[f"{method} 2:4"] = oneshot(method, granularity="2:4")
    table["sparsegpt 2:4 + KD"] = lambda: [*oneshot("sparsegpt", granularity="2:4")(), Distillation(alpha=0.5, temperature=2.0)]
    table["wanda 70%"] = oneshot("wanda", 0.7)
    table["wanda 70% OWL"] = oneshot("wanda", 0.7, distribution="owl")
    table["sparsegpt 70%"] = oneshot("sparsegpt", 0.7)
    table["sparsegpt 70% OWL"] = oneshot("sparsegpt", 0.7, distribution="owl")
    return table


@torch.no_grad()
def val_loss(model: CharGPT, batches: list[Any]) -> float:
    was = model.training
    model.eval()
    losses = [float(model._loss((x.to(model.device), y.to(model.device)))) for x, y in batches]
    model.train(was)
    return sum(losses) / len(losses)


class AfterPruning(pl.Callback):
    """The val loss as the first recovery batch starts (placed after OneShotPruning, which prunes in the same hook)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches, self.loss = batches, None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.loss is None:
            self.loss = val_loss(pl_module, self.batches)


def dense_model(dm: ShakespeareDataModule, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    path = CACHE / f"chargpt-baby-dense-{args.dense_steps}steps-seed{args.seed}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    pl.seed_everything(args.seed, verbose=False)
    model = CharGPT(vocab_size=dm.vocab_size, lr=1e-3, min_lr=1e-4, warmup_steps=100, **BABY_GPT)
    trainer([], max_steps=args.dense_steps, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0).fit(model, datamodule=dm)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.state_dict()


def run(callbacks: list[pl.Callback], state: dict[str, torch.Tensor], dm: ShakespeareDataModule, val: list[Any],
        args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    pl.seed_everything(args.seed + 1, verbose=False)  # the same recovery data order for every row
    model = CharGPT(vocab_size=dm.vocab_size, lr=1e-4, lr_schedule="constant", warmup_steps=0, **BABY_GPT)
    model.load_state_dict(state)
    after = AfterPruning(val)
    oneshot = next((c for c in callbacks if isinstance(c, OneShotPruning)), None)
    fitter = trainer([*callbacks, after], max_steps=args.recovery_steps, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0)
    fitter.fit(model, datamodule=dm)
    params = dict(model.named_parameters())
    return {
        "oneshot_val_loss": after.loss,
        "val_loss": val_loss(model, val),
        "sparsity": global_sparsity([params[n].detach() for n in prunable_names(model)]),
        "oneshot_s": oneshot.seconds if oneshot is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense-steps", type=int, default=2000, help="optimizer steps of the dense model (README: 2000)")
    parser.add_argument("--recovery-steps", type=int, default=200)
    parser.add_argument("--calibration", type=int, default=32, help="calibration batches of 12 windows of 64 characters")
    parser.add_argument("--val-batches", type=int, default=100, help="held-out batches of 12 windows for val loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="+", help="only these rows (names as in the table)")
    parser.add_argument("--name", default="oneshot", help="results file benchmarks/results/<name>.json")
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(1)
    table_rows = rows(args.calibration)
    chosen = args.rows or list(table_rows)
    unknown = [r for r in chosen if r not in table_rows]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(table_rows)}")
    dm = ShakespeareDataModule(block_size=BABY_GPT["block_size"], batch_size=12, seed=args.seed)
    dm.prepare_data()
    dm.setup("fit")
    started = time.perf_counter()
    state = dense_model(dm, args)
    dense_wall = time.perf_counter() - started
    val = [b for _, b in zip(range(args.val_batches), dm.val_dataloader())]
    probe = CharGPT(vocab_size=dm.vocab_size, **BABY_GPT)
    probe.load_state_dict(state)
    dense_before = val_loss(probe, val)
    results = {name: run(table_rows[name](), state, dm, val, args) for name in chosen}
    wall = time.perf_counter() - started

    base = results.get("dense", {}).get("val_loss")
    table = Table(title=f"CharGPT one-shot pruning and {args.recovery_steps}-step recovery (dense {args.dense_steps} steps, "
                        f"val loss {dense_before:.4f}; seed {args.seed})")  # fmt: skip
    for column in ("config", "zeros", "one-shot val", "Δ one-shot", "recovered val", "Δ vs dense+rec", "one-shot s"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for name, r in results.items():
        one = r["oneshot_val_loss"]
        table.add_row(name, f"{r['sparsity']:.1%}", "" if name == "dense" else f"{one:.4f}",
                      "" if name == "dense" else f"{one - dense_before:+.4f}", f"{r['val_loss']:.4f}",
                      "" if base is None else f"{r['val_loss'] - base:+.4f}",
                      "" if r["oneshot_s"] is None else f"{r['oneshot_s']:.1f}")  # fmt: skip
    checks: dict[str, bool] = {}

    def delta(name: str, key: str) -> float | None:
        if name not in results:
            return None
        return results[name][key] - (dense_before if key == "oneshot_val_loss" else base)

    if delta("sparsegpt 50%", "oneshot_val_loss") is not None:
        checks["sparsegpt 50% one-shot <= +0.02"] = delta("sparsegpt 50%", "oneshot_val_loss") <= 0.02
    if base is not None and "sparsegpt 50%" in results:
        checks["sparsegpt 50% recovered <= +0.003"] = delta("sparsegpt 50%", "val_loss") <= 0.003
    if base is not None and "sparsegpt 2:4" in results:
        checks["sparsegpt 2:4 recovered <= +0.008"] = delta("sparsegpt 2:4", "val_loss") <= 0.008
    for pattern in ("50%", "2:4"):
        if f"sparsegpt {pattern}" in results and f"magnitude {pattern}" in results:
            checks[f"sparsegpt beats magnitude one-shot at {pattern}"] = (
                results[f"sparsegpt {pattern}"]["oneshot_val_loss"] < results[f"magnitude {pattern}"]["oneshot_val_loss"]
            )
    if "wanda 70%" in results and "wanda 70% OWL" in results:
        checks["OWL 70% beats uniform Wanda 70% (one-shot)"] = (
            results["wanda 70% OWL"]["oneshot_val_loss"] < results["wanda 70%"]["oneshot_val_loss"]
        )
    table.caption = (
        f"Recovery: AdamW lr 1e-4 constant, wd 0.1, batch 12, clip 1.0, masks held. Calibration: {args.calibration} "
        f"train batches. Val: {args.val_batches} held-out batches. Targets: "
        + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items())
        + f". Dense model {dense_wall:.0f} s (0 if cached); total {wall:.0f} s."
    )
    emit(args.name, table, {"args": vars(args), "dense_val_loss": dense_before, "wall_s": wall, "results": results,
                            "targets_met": checks})  # fmt: skip


if __name__ == "__main__":
    main()
