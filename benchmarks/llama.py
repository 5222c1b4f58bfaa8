"""A Llama on Shakespeare: key/value groups and MLP neurons pruned during training, deployed to a smaller Llama that
the stock ``from_pretrained`` loads.

``LlamaForCausalLM`` built from a config (``--layers`` 6, hidden 128, grouped-query attention with 8 query and 2
key/value heads of 16, SwiGLU MLP of 384, RMSNorm, rotary; character vocabulary; about 1.2M parameters), trained
``--steps`` optimizer steps on the 42 Shakespeare works as CharGPT is (``benchmarks/heads.py``: block 64, batch 12,
AdamW lr 1e-3 with 100 warm-up steps and a cosine to 1e-4, clip 1.0), dense and again from the same seed and data order
with ``GradualMagnitudePruning(0.5, granularity={"*.self_attn.*": "head", "*.mlp.*": "neuron"})`` (cubic from 10% to
75% of the steps, uniform): 1 of the 2 KV groups (4 of the 8 query heads with their key/value head) and 192 of the
384 hidden units of every layer removed whole. The pruned model is deployed (``deploy_model``: projections sliced,
``config`` rewritten to 4 heads / 1 KV head / 192), saved with ``save_pretrained`` and reloaded with the stock
``AutoModelForCausalLM.from_pretrained``. Val loss (nats per character) on the first ``--val-batches`` held-out
batches; speed is the forward of the whole model on one held-out batch of 12 × 64 characters, medians of interleaved
runs, one thread. Targets (issue 27): ≥ 1.6× tokens/s, val loss within +0.10 of dense, reloaded logits max |Δ| ≤ 1e-4.

Run from the repository root (``--steps 8 --val-batches 2 --repeats 3`` checks that it runs)::

    .venv/bin/python -m benchmarks.llama [--steps 2000] [--layers 6]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from typing import Any

import pytorch_lightning as pl
import torch
from rich.table import Table
from torch import nn

from benchmarks.common import emit, quiet, trainer
from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.data import ShakespeareDataModule
from lightning_sparse.deployment import deploy_model
from lightning_sparse.deployment.kernels import median_ms

GROUPS = {"*.self_attn.*": "head", "*.mlp.*": "neuron"}
TOKENS_SPEEDUP, LOSS_DELTA, RELOAD_DELTA = 1.6, 0.10, 1e-4


class LlamaLM(pl.LightningModule):
    """``LlamaForCausalLM`` predicting the next character, with CharGPT's optimiser and schedule."""

    def __init__(self, vocab_size: int, layers: int, steps: int) -> None:
        super().__init__()
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=layers, num_attention_heads=8,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, use_cache=False, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        self.model = transformers.LlamaForCausalLM(config)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        logits = self(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def configure_optimizers(self):  # noqa: ANN201
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
        warmup = min(100, max(1, self.steps // 10))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, self.steps - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.inference_mode()
def val_loss(forward: Any, dm: ShakespeareDataModule, batches: int) -> float:
    losses = []
    for i, (x, y) in enumerate(dm.val_dataloader()):
        if i == batches:
            break
        logits = forward(x)
        losses.append(float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))))
    return sum(losses) / len(losses)


def train(dm: ShakespeareDataModule, callbacks: list[pl.Callback], args: argparse.Namespace) -> tuple[LlamaLM, float]:
    pl.seed_everything(args.seed, verbose=False)
    module = LlamaLM(dm.vocab_size, args.layers, args.steps)
    fitter = trainer(callbacks, max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0)
    started = time.perf_counter()
    fitter.fit(module, datamodule=dm)
    return module.eval(), time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    dm = ShakespeareDataModule(block_size=64, batch_size=12, seed=args.seed)
    dm.prepare_data()
    dm.setup("fit")
    every = max(1, min(50, args.steps // 40))
    dense, dense_s = train(dm, [], args)
    pruning = GradualMagnitudePruning(0.5, start=0.1, end=0.75, frequency=every, granularity=GROUPS, exclude=["*lm_head*"],
                                      verbose=False)  # fmt: skip
    pruned, pruned_s = train(dm, [pruning], args)
    x = next(iter(dm.val_dataloader()))[0]  # 12 × 64 held-out characters
    deployment = deploy_model(pruned.model, x, repeats=args.repeats)
    deployed = deployment.model.eval()
    with tempfile.TemporaryDirectory() as folder:
        deployed.save_pretrained(folder)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    forwards = {
        "dense": lambda t: dense.model(input_ids=t).logits,
        "pruned": lambda t: pruned.model(input_ids=t).logits,
        "deployed": lambda t: deployed(input_ids=t).logits,
        "reloaded": lambda t: reloaded(input_ids=t).logits,
    }
    with torch.inference_mode():
        exact = float((forwards["deployed"](x) - forwards["pruned"](x)).abs().max())
        reload_delta = float((forwards["reloaded"](x) - forwards["deployed"](x)).abs().max())
        ms = median_ms({name: (lambda f=f: f(x)) for name, f in forwards.items()}, args.repeats, x.device)
    tokens = x.numel()
    rows = {}
    for name, model, wall in (("dense", dense.model, dense_s), ("KV groups + neurons 50%, masked", pruned.model, pruned_s),
                              ("deployed", deployed, None), ("reloaded (stock from_pretrained)", reloaded, None)):  # fmt: skip
        key = name.split(" ")[0] if name.split(" ")[0] in forwards else "pruned"
        rows[name] = {
            "val_loss": val_loss(forwards[key], dm, args.val_batches),
            "params": sum(p.numel() for p in model.parameters()),
            "forward_ms": ms[key], "tokens_per_s": tokens / (ms[key] / 1000), "train_s": wall,
        }  # fmt: skip
    config = deployed.config
    speedup = rows["deployed"]["tokens_per_s"] / rows["dense"]["tokens_per_s"]
    delta = rows["deployed"]["val_loss"] - rows["dense"]["val_loss"]
    return {
        "rows": rows, "speedup": speedup, "val_loss_delta": delta, "deployed_vs_masked_max_abs": exact,
        "reload_max_abs": reload_delta, "frequency": every, "tokens": tokens, "notes": deployment.report.notes,
        "config": {k: getattr(config, k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")},
        "met": {"speedup": speedup >= TOKENS_SPEEDUP, "val_loss": delta <= LOSS_DELTA, "reload": reload_delta <= RELOAD_DELTA},
    }  # fmt: skip


def table(result: dict[str, Any], args: argparse.Namespace) -> Table:
    out = Table(title=f"Llama (GQA 8/2, SwiGLU) on Shakespeare, KV groups + neurons: {args.steps} steps, seed {args.seed}, 1 thread")
    for column in ("model", "params", "val loss", "Δ vs dense", "forward ms (12×64)", "tokens/s", "× dense", "train s"):
        out.add_column(column, justify="left" if column == "model" else "right")
    dense = result["rows"]["dense"]
    for name, r in result["rows"].items():
        out.add_row(name, f"{r['params']:,}", f"{r['val_loss']:.4f}", f"{r['val_loss'] - dense['val_loss']:+.4f}",
                    f"{r['forward_ms']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}",
                    "" if r["train_s"] is None else f"{r['train_s']:.0f}")  # fmt: skip
    met = result["met"]
    out.caption = (
        f"GMP granularity {GROUPS}, sparsity 0.5 uniform, cubic 0.1..0.75 every {result['frequency']} steps. Deployed config "
        f"{result['config']}; deployed vs masked max |Δ| {result['deployed_vs_masked_max_abs']:.2e}. Targets: ≥ "
        f"{TOKENS_SPEEDUP}× tokens/s ({'met' if met['speedup'] else 'NOT met'}: {result['speedup']:.2f}×), val loss ≤ dense + "
        f"{LOSS_DELTA} ({'met' if met['val_loss'] else 'NOT met'}: {result['val_loss_delta']:+.4f}), reload max |Δ| ≤ "
        f"{RELOAD_DELTA} ({'met' if met['reload'] else 'NOT met'}: {result['reload_max_abs']:.2e})."
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per run")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (6: about 1.2M parameters)")
    parser.add_argument("--val-batches", type=int, default=200, help="held-out batches of 12 windows for val loss")
    parser.add_argument("--repeats", type=int, default=50, help="interleaved timing runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = run(args)
    emit("llama", table(result, args), {"args": vars(args), "llama": result, "wall_s": time.perf_counter() - started})


if __name__ == "__main__":
    main()
