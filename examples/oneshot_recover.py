"""Prune a trained language model in one shot (SparseGPT, 2:4 by default), then recover with the masks held and
distillation from the dense model: two callbacks in an ordinary ``Trainer.fit``.

The model is CharGPT (the README's baby GPT) on Shakespeare's works. Give it your trained dense weights with
``--dense`` (a ``state_dict`` saved with ``torch.save``, e.g. the one ``python -m benchmarks.oneshot`` caches in
``~/.cache/lightning_sparse/``); without it the script first trains the dense model for ``--dense-steps``. Then
``OneShotPruning`` calibrates on 32 training batches and prunes at the first step, and ``Distillation`` trains on
``0.5 · cross-entropy + 0.5 · T² · KL(dense ‖ pruned)`` for ``--steps`` recovery steps (AdamW 1e-4). The same two
callbacks work on a Hugging Face model inside a LightningModule (``Distillation(module="model")`` when
``training_step`` calls ``self.model(...)``, whose ``.logits`` are used).

Run from the repository root::

    .venv/bin/python examples/oneshot_recover.py --dense ~/.cache/lightning_sparse/chargpt-baby-dense-2000steps-seed0.pt
    .venv/bin/python examples/oneshot_recover.py --dense-steps 300 --pattern 0.5 --method wanda --steps 100
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch

from lightning_sparse import Distillation, OneShotPruning
from lightning_sparse.data import ShakespeareDataModule
from lightning_sparse.models import CharGPT

SIZES = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)


def quiet_trainer(steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, callbacks=callbacks, limit_val_batches=50, val_check_interval=None,
                      num_sanity_val_steps=0, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", help="a trained CharGPT state_dict (torch.save); default: train one first")
    parser.add_argument("--dense-steps", type=int, default=2000, help="steps of the dense model trained without --dense")
    parser.add_argument("--method", choices=("sparsegpt", "wanda", "magnitude"), default="sparsegpt")
    parser.add_argument("--pattern", default="2:4", help="'N:M' or an unstructured sparsity such as 0.5")
    parser.add_argument("--steps", type=int, default=200, help="recovery steps")
    parser.add_argument("--alpha", type=float, default=0.5, help="distillation weight (0: plain recovery)")
    args = parser.parse_args()

    pl.seed_everything(0)
    data = ShakespeareDataModule(block_size=SIZES["block_size"], batch_size=12)
    data.prepare_data()
    data.setup("fit")
    model = CharGPT(vocab_size=data.vocab_size, lr=1e-4, lr_schedule="constant", warmup_steps=0, **SIZES)
    if args.dense:
        model.load_state_dict(torch.load(args.dense, weights_only=True))
    else:
        dense = CharGPT(vocab_size=data.vocab_size, **SIZES)
        quiet_trainer(args.dense_steps, []).fit(dense, datamodule=data)
        model.load_state_dict(dense.state_dict())
    dense_loss = quiet_trainer(1, []).validate(model, datamodule=data, verbose=False)[0]["val_loss"]

    if ":" in args.pattern:
        oneshot = OneShotPruning(method=args.method, granularity=args.pattern, calibration_batches=32)
    else:
        oneshot = OneShotPruning(float(args.pattern), method=args.method, calibration_batches=32)
    trainer = quiet_trainer(args.steps, [oneshot, Distillation(alpha=args.alpha, temperature=2.0)])
    trainer.fit(model, datamodule=data)
    recovered = trainer.validate(model, datamodule=data, verbose=False)[0]["val_loss"]
    print(f"dense val loss {dense_loss:.4f}; {args.method} {args.pattern} after {args.steps} recovery steps "
          f"{recovered:.4f} ({recovered - dense_loss:+.4f}); one-shot took {oneshot.seconds:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
