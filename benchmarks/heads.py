"""Attention heads and MLP neurons pruned during training, then removed by deploy: real speed beside dense.

**CharGPT on Shakespeare** (``--part chargpt``): nanoGPT's CPU baby GPT (4 layers, 4 heads, 128 dims, block 64,
batch 12, no dropout, AdamW lr 1e-3 with 100 warm-up steps and a cosine to 1e-4, clip 1.0; the protocol and pieces
of ``benchmarks/transformer.py``), trained ``--steps`` optimizer steps dense, and again from the same seed and data
order with ``GradualMagnitudePruning(0.5, granularity={"*.attn.*": "head", "*.mlp.*": "neuron"})`` (cubic from 10% to
75% of the steps): 2 of the 4 heads and 256 of the 512 hidden units of every block removed whole, ranked by the sum of
their members' L1 norms. The pruned model is deployed (``lightning_sparse.deployment.deploy_model``: attention rebuilt
with 2 heads, MLPs with 256 units). Val loss (nats per character) on the first ``--val-batches`` held-out batches; speed
is the forward of the whole model on one held-out batch of 12 × 64 characters, medians of interleaved runs, one thread.
Targets (issue 17): deployed ≥ 1.6× the dense tokens/s, val loss within +0.10 of dense.

**MiniLM** (``--part minilm``): the pretrained all-MiniLM-L6-v2 fine-tuned on the Shakespeare play-attribution task
(``benchmarks/finetune.py``'s protocol: 10 plays, AdamW lr 1e-4, warm-up 10%, batch 32), dense and with heads + neurons
at 50% of every encoder layer (6 of 12 heads, 768 of 1,536 intermediate units: 50% of the encoder's Linear weights),
magnitude (GMP) and movement pruning, cubic from 10% to 70% of the steps, masks every 10 steps. Accuracy on the test
lines; speed is the encoder + head forward on one test batch of 32 lines, deployed against dense.

Run from the repository root (one thread; on a shared 2-core machine at load ~7 the CharGPT part took 10 minutes at
the default 2,000 steps (351 s dense, 240 s pruned, then deploy and timing), the MiniLM part about 3 × 5 minutes at
300 steps; ``--steps 8 --minilm-steps 3 --val-batches 2 --per-play 50 --repeats 3`` checks that it runs)::

    .venv/bin/python -m benchmarks.heads [--part chargpt minilm] [--steps 2000] [--minilm-steps 300]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import pytorch_lightning as pl
import torch
from rich.table import Table
from torch import nn

from benchmarks.common import emit, quiet, trainer
from benchmarks.transformer import BABY_GPT
from lightning_sparse import GradualMagnitudePruning, MovementPruning
from lightning_sparse.data import ShakespeareDataModule
from lightning_sparse.deployment import deploy_model
from lightning_sparse.deployment.kernels import median_ms
from lightning_sparse.models import CharGPT

GROUPS = {"*.attn.*": "head", "*.mlp.*": "neuron"}
BERT_GROUPS = {"*.attention.*": "head", "*.intermediate.*": "neuron", "*.layer.?.output.*": "neuron"}
TOKENS_SPEEDUP, LOSS_DELTA = 1.6, 0.10


def linear_weights(model: nn.Module, prefix: str = "") -> tuple[int, int]:
    """(non-zero, total) weights of the Linear layers under ``prefix`` (the token embedding / tied head excluded)."""
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix) and "lm_head" not in n]
    return sum(int((w != 0).sum()) for w in weights), sum(w.numel() for w in weights)


@torch.inference_mode()
def char_val_loss(model: nn.Module, dm: ShakespeareDataModule, batches: int) -> float:
    losses = []
    for i, (x, y) in enumerate(dm.val_dataloader()):
        if i == batches:
            break
        logits = model(x)
        losses.append(float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))))
    return sum(losses) / len(losses)


def train_chargpt(dm: ShakespeareDataModule, callbacks: list[pl.Callback], args: argparse.Namespace) -> tuple[CharGPT, float]:
    pl.seed_everything(args.seed, verbose=False)
    model = CharGPT(vocab_size=dm.vocab_size, **BABY_GPT)
    fitter = trainer(callbacks, max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0)
    started = time.perf_counter()
    fitter.fit(model, datamodule=dm)
    return model.eval(), time.perf_counter() - started


def chargpt(args: argparse.Namespace) -> dict[str, Any]:
    dm = ShakespeareDataModule(block_size=BABY_GPT["block_size"], batch_size=12, seed=args.seed)
    dm.prepare_data()
    dm.setup("fit")
    every = max(1, min(50, args.steps // 40))
    dense, dense_s = train_chargpt(dm, [], args)
    pruning = GradualMagnitudePruning(0.5, start=0.1, end=0.75, frequency=every, granularity=GROUPS, verbose=False)
    pruned, pruned_s = train_chargpt(dm, [pruning], args)
    x = next(iter(dm.val_dataloader()))[0]  # 12 × 64 held-out characters
    deployment = deploy_model(pruned, x, repeats=args.repeats)
    deployed = deployment.model.eval()
    with torch.inference_mode():
        exact = bool(torch.allclose(deployed(x), pruned(x), atol=1e-5))
        ms = median_ms({"dense": lambda: dense(x), "pruned": lambda: pruned(x), "deployed": lambda: deployed(x)}, args.repeats, x.device)
    tokens = x.numel()
    rows = {}
    for name, model, wall in (("dense", dense, dense_s), ("heads + neurons 50%, masked", pruned, pruned_s), ("deployed", deployed, None)):
        key = {"dense": "dense", "deployed": "deployed"}.get(name, "pruned")
        nonzero, total = linear_weights(model, "model.transformer.h")
        rows[name] = {
            "val_loss": char_val_loss(model, dm, args.val_batches),
            "block_linear_weights": total, "block_linear_nonzeros": nonzero,
            "params": sum(p.numel() for p in model.parameters()),
            "forward_ms": ms[key], "tokens_per_s": tokens / (ms[key] / 1000), "train_s": wall,
        }  # fmt: skip
    speedup = rows["deployed"]["tokens_per_s"] / rows["dense"]["tokens_per_s"]
    delta = rows["deployed"]["val_loss"] - rows["dense"]["val_loss"]
    heads = [row.after for row in deployment.report.removed_groups if row.kind == "head"]
    neurons = [row.after for row in deployment.report.removed_groups if row.kind == "neuron"]
    return {"rows": rows, "speedup": speedup, "val_loss_delta": delta, "outputs_equal": exact, "heads_left": heads,
            "neurons_left": neurons, "frequency": every, "tokens": tokens,
            "met": {"speedup": speedup >= TOKENS_SPEEDUP, "val_loss": delta <= LOSS_DELTA}}  # fmt: skip


def chargpt_table(result: dict[str, Any], args: argparse.Namespace) -> Table:
    table = Table(title=f"CharGPT (baby GPT) on Shakespeare, heads + neurons: {args.steps} steps, seed {args.seed}, 1 thread")
    for column in ("model", "block Linear weights", "params", "val loss", "Δ vs dense", "forward ms (12×64)", "tokens/s", "× dense", "train s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    dense = result["rows"]["dense"]
    for name, r in result["rows"].items():
        table.add_row(name, f"{r['block_linear_nonzeros']:,} / {r['block_linear_weights']:,}", f"{r['params']:,}", f"{r['val_loss']:.4f}",
                      f"{r['val_loss'] - dense['val_loss']:+.4f}", f"{r['forward_ms']:.3f}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}", "" if r["train_s"] is None else f"{r['train_s']:.0f}")  # fmt: skip
    met = result["met"]
    table.caption = (
        f"GMP granularity {GROUPS}, sparsity 0.5, cubic 0.1..0.75 every {result['frequency']} steps. Deployed: heads left per "
        f"layer {result['heads_left']}, hidden units {result['neurons_left']}; outputs equal to the masked model: "
        f"{result['outputs_equal']}. Targets: ≥ {TOKENS_SPEEDUP}× tokens/s ({'met' if met['speedup'] else 'NOT met'}: "
        f"{result['speedup']:.2f}×), val loss ≤ dense + {LOSS_DELTA} ({'met' if met['val_loss'] else 'NOT met'}: "
        f"{result['val_loss_delta']:+.4f})."
    )
    return table


def minilm(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from lightning_sparse.models import TextClassifier
    from lightning_sparse.data import ShakespearePlaysDataModule

    hf_logging.set_verbosity_error()
    dm = ShakespearePlaysDataModule(per_play=args.per_play, batch_size=32, seed=args.seed)
    dm.setup("fit")
    batch = next(iter(dm.test_dataloader()))
    ids, mask = batch[0], batch[1]
    results: dict[str, Any] = {}
    models: dict[str, nn.Module] = {}
    for row in args.minilm_rows:
        pl.seed_everything(args.seed, verbose=False)
        model = TextClassifier(pretrained="minilm", num_classes=dm.num_classes, lr=1e-4)
        callbacks: list[pl.Callback] = []
        if row != "dense":
            method = GradualMagnitudePruning if row == "gmp" else MovementPruning
            callbacks.append(method(0.5, start=0.1, end=0.7, frequency=10, granularity=BERT_GROUPS, exclude=["head.*"], verbose=False))
        fitter = trainer(callbacks, max_steps=args.minilm_steps, limit_val_batches=0, num_sanity_val_steps=0)
        started = time.perf_counter()
        fitter.fit(model, datamodule=dm)
        train_s = time.perf_counter() - started
        accuracy = 100.0 * fitter.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
        model.eval()
        nonzero, total = linear_weights(model, "backbone.encoder")
        entry = {"test_acc_pct": accuracy, "encoder_linear_sparsity": 1 - nonzero / total, "train_s": train_s}
        if row != "dense":
            deployment = deploy_model(model, (ids, mask), repeats=args.repeats)
            deployed = deployment.model.eval()
            with torch.inference_mode():
                entry["outputs_equal"] = bool(torch.allclose(deployed(ids, mask), model(ids, mask), atol=1e-4))
            deployed_nonzero, deployed_total = linear_weights(deployed, "backbone.encoder")
            entry["deployed_encoder_linear_weights"] = deployed_total
            entry["heads_left"] = [r.after for r in deployment.report.removed_groups if r.kind == "head"]
            entry["neurons_left"] = [r.after for r in deployment.report.removed_groups if r.kind == "neuron"]
            models[row] = deployed
        else:
            models[row] = model
        results[row] = entry
    with torch.inference_mode():
        ms = median_ms({row: (lambda m=m: m(ids, mask)) for row, m in models.items()}, args.repeats, ids.device)
    for row, entry in results.items():
        entry["forward_ms"] = ms[row]
        entry["speedup"] = ms["dense"] / ms[row] if "dense" in ms else math.nan
    return {"rows": results, "batch": list(ids.shape), "encoder_linear_weights": total}


def minilm_table(result: dict[str, Any], args: argparse.Namespace) -> Table:
    table = Table(title=f"MiniLM-L6 on Shakespeare play attribution, heads + neurons 50%: {args.minilm_steps} steps, 1 thread")
    for column in ("model", "encoder Linear zeros", "deployed encoder Linear weights", "test acc %", "Δ vs dense", f"forward ms ({'×'.join(map(str, result['batch']))})", "× dense", "train s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = result["rows"]
    dense = rows.get("dense", {}).get("test_acc_pct")
    for row, r in rows.items():
        table.add_row(row if row == "dense" else f"{row} heads+neurons 50%, deployed", f"{r['encoder_linear_sparsity']:.1%}",
                      f"{r.get('deployed_encoder_linear_weights', result['encoder_linear_weights']):,}", f"{r['test_acc_pct']:.2f}",
                      "" if dense is None else f"{r['test_acc_pct'] - dense:+.2f}", f"{r['forward_ms']:.3f}", f"{r['speedup']:.2f}",
                      f"{r['train_s']:.0f}")  # fmt: skip
    left = {row: (r.get("heads_left"), r.get("neurons_left"), r.get("outputs_equal")) for row, r in rows.items() if row != "dense"}
    table.caption = (
        f"granularity {BERT_GROUPS}, sparsity 0.5, cubic 0.1..0.7 every 10 steps, head excluded; per pruned row (heads left per "
        f"layer, intermediate units left, deployed outputs equal to the masked model's): {left}."
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", nargs="+", choices=("chargpt", "minilm"), default=["chargpt", "minilm"])
    parser.add_argument("--steps", type=int, default=2000, help="CharGPT optimizer steps (nanoGPT's baby GPT: 2000)")
    parser.add_argument("--val-batches", type=int, default=200, help="CharGPT held-out batches of 12 windows for val loss")
    parser.add_argument("--minilm-steps", type=int, default=300, help="MiniLM fine-tuning steps per row")
    parser.add_argument("--minilm-rows", nargs="+", choices=("dense", "gmp", "movement"), default=["dense", "gmp", "movement"])
    parser.add_argument("--per-play", type=int, default=1200, help="MiniLM task: lines per play, split 80/10/10")
    parser.add_argument("--repeats", type=int, default=50, help="interleaved timing runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(1)
    started = time.perf_counter()
    record: dict[str, Any] = {"args": vars(args)}
    if "chargpt" in args.part:
        record["chargpt"] = chargpt(args)
        emit("heads-chargpt", chargpt_table(record["chargpt"], args), {**record, "wall_s": time.perf_counter() - started})
    if "minilm" in args.part:
        record["minilm"] = minilm(args)
        emit("heads-minilm", minilm_table(record["minilm"], args), {**record, "wall_s": time.perf_counter() - started})


if __name__ == "__main__":
    main()
