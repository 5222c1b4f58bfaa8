"""End-to-end inference speed and memory of deployed sparse models against the same model run dense, on CPU.

Trains on real MNIST, in one process:

* LeNet-300-100, dense, and pruned to 95% unstructured sparsity by ``GradualMagnitudePruning`` (``--mlp-epochs``
  epochs, SGD momentum 0.9, lr 0.1 cosine, batch 128; ramp 10%..60% of training, one global threshold
  ``lenet300-95-global`` or the same 95% in every layer ``lenet300-95-uniform``);
* LeNet-5 (conv20-conv50-fc500, ``Classifier(arch="lenet5")``), dense, and with 70% of the output channels of
  both convolutions and of fc500 pruned by ``GradualMagnitudePruning(granularity="channel")`` (L1 norm; the output
  layer left dense) (``--conv-epochs`` epochs, lr 0.05 cosine).

Each pruned model is deployed with ``lightning_sparse.deploy`` once per batch size (the example input is that many
test images, so the kernels are chosen for that batch size), then timed against the undeployed model (the same
weights as dense tensors, i.e. the speed of the dense network): ``--rounds`` rounds, each running the two models once
in alternating order, medians over rounds. Test accuracy is measured on the 10k MNIST test set for the dense
baseline, the pruned model and the deployed model (the latter two must agree). Memory: parameter bytes and the peak
of one forward pass (parameters + input + live intermediate tensors) from the deploy report.

Run from the repository root (defaults take about 5 minutes on 2 quiet CPU cores)::

    .venv/bin/python -m benchmarks.deploy [--threads 1] [--mlp-epochs 8] [--conv-epochs 1] [--rounds 400]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from rich.table import Table
from torch import nn

from benchmarks.common import datamodule, emit, quiet, trainer
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.deployment import deploy_model
from lightning_sparse.models import Classifier

CONFIGS = ("lenet300-95-global", "lenet300-95-uniform", "lenet5-channel-70")
TARGETS = {  # config: (batch size the target is held at, minimum speedup, max accuracy loss in points or None)
    "lenet300-95-global": (64, 3.0, None),
    "lenet300-95-uniform": (64, 3.0, None),
    "lenet5-channel-70": (64, 2.0, 1.0),
}


def train(arch: str, callbacks: list[pl.Callback], dm: pl.LightningDataModule, epochs: int, lr: float, seed: int) -> Classifier:
    pl.seed_everything(seed, verbose=False)
    model = Classifier(arch=arch, input_shape=dm.input_shape, optimizer="sgd", lr=lr, momentum=0.9, lr_schedule="cosine")
    trainer(callbacks, max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0).fit(model, datamodule=dm)
    return model.eval()


def pruning(config: str) -> GradualMagnitudePruning:
    if config == "lenet5-channel-70":
        return GradualMagnitudePruning(sparsity=0.7, granularity="channel", exclude=["net.3.weight"], start=0.1, end=0.6,
                                       frequency=50, verbose=False)  # fmt: skip
    distribution = config.rsplit("-", 1)[1]
    return GradualMagnitudePruning(sparsity=0.95, distribution=distribution, start=0.1, end=0.6, frequency=50, verbose=False)


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Test accuracy in % and the predictions (batches of 1,000)."""
    predictions = torch.cat([model(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)])
    return 100.0 * float((predictions == labels).float().mean()), predictions


@torch.inference_mode()
def interleaved(dense: nn.Module, deployed: nn.Module, x: torch.Tensor, rounds: int) -> tuple[float, float]:
    """Median ms of one forward of each model, alternating which runs first, over ``rounds`` rounds."""
    for _ in range(10):
        dense(x), deployed(x)
    times: dict[str, list[float]] = {"dense": [], "deployed": []}
    pair = [("dense", dense), ("deployed", deployed)]
    for round_ in range(rounds):
        for name, model in pair if round_ % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            model(x)
            times[name].append(time.perf_counter() - start)
    return 1e3 * statistics.median(times["dense"]), 1e3 * statistics.median(times["deployed"])


def layers_text(report: Any) -> str:
    """What each layer became: output channels before→after where thinned, the kernel where not dense (or where it
    runs in a transposed chain), and the chain."""
    parts, chained = [], []
    for row in report.layers:
        shape = row.deployed_shape or row.shape
        in_chain = "run on transposed activations" in row.reason
        how = [f"{row.shape[0]}→{shape[0]}"] if shape[0] != row.shape[0] else []
        how += [row.deployed_as] if row.deployed_as not in ("dense", "thinned") else ["dense"] if in_chain else []
        if how:
            parts.append(f"{row.name} {' '.join(how)}")
        if in_chain:
            chained.append(row.name)
    text = ", ".join(parts) or "all dense"
    return text + (f"; {' → '.join(chained)} one transposed chain" if chained else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--mlp-epochs", type=int, default=8)
    parser.add_argument("--conv-epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=400, help="interleaved timing rounds per model and batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for training and timing (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dm = datamodule("mnist", 128, args.seed)
    images, labels = dm.splits["test"].tensors

    baselines: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for config in args.configs:
        arch, lr, epochs = ("lenet5", 0.05, args.conv_epochs) if config.startswith("lenet5") else ("lenet300", 0.1, args.mlp_epochs)
        if arch not in baselines:
            baselines[arch] = accuracy(train(arch, [], dm, epochs, lr, args.seed), images, labels)[0]
        callback = pruning(config)
        sparse = train(arch, [callback], dm, epochs, lr, args.seed)
        sparse_acc, sparse_pred = accuracy(sparse, images, labels)
        for batch in args.batch_sizes:
            result = deploy_model(sparse, images[:batch])
            deployed_acc, deployed_pred = accuracy(result.model, images, labels)
            dense_ms, deployed_ms = interleaved(sparse, result.model, images[:batch], args.rounds)
            report = result.report
            rows.append({
                "config": config, "batch": batch, "sparsity": callback.masks.sparsity(), "layers": layers_text(report),
                "dense_ms": dense_ms, "deployed_ms": deployed_ms, "speedup": dense_ms / deployed_ms,
                "dense_acc": baselines[arch], "sparse_acc": sparse_acc, "deployed_acc": deployed_acc,
                "changed_predictions": int((sparse_pred != deployed_pred).sum()),
                "param_bytes": report.param_bytes, "peak_forward_bytes": report.peak_forward_bytes,
                "notes": report.notes,
            })  # fmt: skip
            del result
            gc.collect()
    wall = time.perf_counter() - started

    table = Table(title=f"Deployed vs dense inference on CPU (MNIST), {torch.get_num_threads()} thread(s), "
                        f"median of {args.rounds} interleaved runs")  # fmt: skip
    for column in ("config", "batch", "deployed layers", "dense ms", "deployed ms", "× faster",
                   "test acc % (dense / pruned / deployed)", "param bytes", "peak forward bytes", "target", "met"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("config", "deployed layers", "target") else "right",
                         overflow="fold")  # fmt: skip
    for row in rows:
        target_batch, minimum, max_loss = TARGETS[row["config"]]
        target, met = "", ""
        if row["batch"] == target_batch:
            target = f"≥ {minimum:.0f}×" + (f", loss ≤ {max_loss:g}" if max_loss is not None else "")
            ok = row["speedup"] >= minimum and (max_loss is None or row["dense_acc"] - row["deployed_acc"] <= max_loss)
            met = "[green]yes" if ok else "[red]no"
        (p0, p1), (m0, m1) = row["param_bytes"], row["peak_forward_bytes"]
        table.add_row(
            row["config"], str(row["batch"]), row["layers"], f"{row['dense_ms']:.4f}", f"{row['deployed_ms']:.4f}",
            f"{row['speedup']:.2f}", f"{row['dense_acc']:.2f} / {row['sparse_acc']:.2f} / {row['deployed_acc']:.2f}",
            f"{p0:,} → {p1:,}", f"{m0:,} → {m1:,}", target, met,
        )  # fmt: skip
    table.caption = (
        "dense ms: the pruned model before deploy (same weights, dense tensors); acc dense: the dense-trained baseline. "
        + ", ".join(f"{r['config']}: {r['sparsity']:.1%} of the Linear/Conv weights zero" for r in rows if r["batch"] == rows[0]["batch"])
        + f". lenet300: {args.mlp_epochs} epochs; "
        f"lenet5: {args.conv_epochs} epoch(s). Predictions changed by deploy: "
        + ", ".join(f"{r['config']}@{r['batch']}: {r['changed_predictions']}" for r in rows)
        + f". Wall time {wall:.0f} s."
    )
    emit("deploy", table, {"args": vars(args), "wall_s": wall, "rows": rows})


if __name__ == "__main__":
    main()
