"""Run by ``test_ddp.py``: a sparsity callback (``gmp``, ``rigl`` or ``set``) under ``strategy="ddp"`` on 2 CPU
processes (gloo).

Every rank writes ``rank<N>.json`` with, after each mask update, a CRC of its packed masks and of the zero
pattern of its weights, plus a CRC of its final weights.
"""

import json
import sys
import zlib
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_sparse import SET, GradualMagnitudePruning, RigL
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import Classifier


def crc(tensors) -> int:
    value = 0
    for tensor in tensors:
        value = zlib.crc32(tensor.detach().cpu().contiguous().numpy().tobytes(), value)
    return value


METHODS = {
    "gmp": lambda: GradualMagnitudePruning(sparsity=0.9, start=0.1, end=0.6, frequency=5, distribution="global"),
    "rigl": lambda: RigL(sparsity=0.9, frequency=5, end=0.75),
    "set": lambda: SET(sparsity=0.9, frequency=5, end=0.75, seed=5),
}


class RecordMasks(pl.Callback):
    def __init__(self, callback: pl.Callback) -> None:
        self.callback, self.rows = callback, []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        masks = self.callback.masks
        packed = [masks._packed[name] for name in masks if masks.is_masked(name)]
        row = {
            "step": trainer.global_step,
            "masks": crc(packed),
            "zeros": crc([masks.params[name] == 0 for name in masks]),
            "sparsity": masks.sparsity(),
        }
        if not self.rows or self.rows[-1]["masks"] != row["masks"]:
            self.rows.append(row)


def main(out_dir: Path, method: str) -> None:
    pl.seed_everything(3)
    callback = METHODS[method]()
    recorder = RecordMasks(callback)
    model = Classifier(arch="cnn", input_shape=(1, 8, 8), lr=0.05)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        callbacks=[callback, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    result = {"world_size": trainer.world_size, "rows": recorder.rows, "weights": crc(model.state_dict().values())}
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), sys.argv[2])
