"""Run by ``test_fsdp.py``: every compression callback on 2 CPU processes (gloo), once unsharded (``strategy="ddp"``)
and once FSDP2-sharded (``ModelParallelStrategy`` with ``fully_shard`` applied in ``configure_model``), on the same
digits and seed; then checkpoints of both kinds resumed across the two.

Every rank writes ``rank<N>.json``: for each run the whole (gathered) final weights' CRC, the whole masks' CRC, the
per-layer zero counts, the CRC of the masks after every update, and whether the parameters were really sharded.
"""

import json
import sys
import zlib
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from lightning_sparse import export
from lightning_sparse import SET, Distillation, GradualMagnitudePruning, LearningCompression, MovementPruning, QuantizationAwareTraining, RigL
from lightning_sparse.core.shards import full_tensor, is_sharded
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import Classifier

EXPORTED = "gmp-global"  # the method whose final models are also exported (compressed files compared by the test)
BATCHES = 8  # optimizer steps per epoch (per rank: 8 batches of 16)


def crc(tensors) -> int:
    value = 0
    for tensor in tensors:
        value = zlib.crc32(tensor.detach().cpu().contiguous().numpy().tobytes(), value)
    return value


class MLP(Classifier):
    """Digits MLP 64 → 33 → 21 → 10: odd row counts, so FSDP2's shards are uneven (17/16 and 11/10 rows)."""

    def __init__(self) -> None:
        super().__init__(arch="lenet300", input_shape=(1, 8, 8), lr=0.05)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 33), nn.ReLU(), nn.Linear(33, 21), nn.ReLU(), nn.Linear(21, 10))


class Rows(nn.Module):
    """An 8x8 digit as 8 tokens (its rows) of 8 pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 8, 8)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (4 heads of 4) used as self-attention, the way users call it."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class AttentionNet(MLP):
    """Digits rows → Linear 8 → 16 → self-attention (4 heads) → flatten → Linear 128 → 10: for head pruning."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(Rows(), nn.Linear(8, 16), SelfAttention(), nn.Flatten(), nn.Linear(128, 10))


def shard(model: nn.Module, mesh) -> None:
    """``fully_shard`` every Linear and attention module, then the whole net, over the data-parallel mesh."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.net:
        if isinstance(layer, (nn.Linear, SelfAttention)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model.net, mesh=mesh)


class ShardedMLP(MLP):
    """The same model, FSDP2-sharded: each Linear and the whole net are ``fully_shard``-ed over the data-parallel mesh."""

    def configure_model(self) -> None:
        shard(self, self.device_mesh["data_parallel"])


class ShardedAttentionNet(AttentionNet):
    def configure_model(self) -> None:
        shard(self, self.device_mesh["data_parallel"])


CALLBACKS = {
    "gmp": lambda: GradualMagnitudePruning(sparsity=0.8, start=2, end=12, frequency=2, verbose=False),
    "gmp-global": lambda: GradualMagnitudePruning(sparsity=0.8, start=2, end=12, frequency=2, distribution="global", verbose=False),
    "movement": lambda: MovementPruning(sparsity=0.8, start=2, end=12, frequency=2, verbose=False),
    "rigl": lambda: RigL(sparsity=0.8, frequency=2, end=14, verbose=False),
    "set": lambda: SET(sparsity=0.8, frequency=2, end=14, seed=5, verbose=False),
    "qat": lambda: QuantizationAwareTraining(bits=4, verbose=False),
    "qat-kmeans": lambda: QuantizationAwareTraining(bits=3, method="kmeans", frequency=4, sparsity=0.5, verbose=False),
    "lc": lambda: LearningCompression(sparsity=0.8, lc_steps=4, steps_per_l=3, first_l_steps=2, verbose=False),
    "gmp-erk": lambda: GradualMagnitudePruning(sparsity=0.8, start=2, end=12, frequency=2, distribution="erk", verbose=False),
    "gmp-nm": lambda: GradualMagnitudePruning(sparsity=0.6, start=2, end=12, frequency=2, granularity={"net.1.weight": "2:4"}, verbose=False),
    "gmp-channel": lambda: GradualMagnitudePruning(sparsity=0.5, start=2, end=12, frequency=2, granularity="channel", verbose=False),
    "gmp-neuron": lambda: GradualMagnitudePruning(sparsity=0.5, start=2, end=12, frequency=2, granularity="neuron", verbose=False),
    "gmp-head": lambda: GradualMagnitudePruning(sparsity=0.5, start=2, end=12, frequency=2, granularity={"net.2.*": "head"}, verbose=False),
    "movement-head": lambda: MovementPruning(sparsity=0.5, start=2, end=12, frequency=2, granularity={"net.2.*": "head"}, verbose=False),
}
CALLBACKS["gmp-distill"] = CALLBACKS["gmp"]
ATTENTION = ("gmp-head", "movement-head")  # methods run on :class:`AttentionNet`
#: methods run with :class:`Distillation` beside (its teacher saved, so that a resumed run distils from the same model)
DISTILLED = ("gmp-distill",)


def callbacks_for(method: str) -> list:
    """The compression callback of ``method`` (first), and Distillation where ``method`` has it."""
    return [CALLBACKS[method]()] + ([Distillation(alpha=0.5, save_teacher=True)] if method in DISTILLED else [])


def masks_of(callback) -> dict:
    """Whole masks (gathered) of a pruning callback, or the zero pattern of the compressed weights otherwise."""
    masks = getattr(callback, "masks", None)
    if masks is not None:
        return {name: masks.mask(name) for name in masks}
    return {name: full_tensor(param.detach()) == 0 for name, param in callback.params.items()}


class Record(pl.Callback):
    """The whole masks' CRC after every optimizer step at which they changed (gathered: every rank calls it)."""

    def __init__(self, callback) -> None:
        self.callback, self.rows = callback, []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        value = crc(masks_of(self.callback).values())
        if not self.rows or self.rows[-1][1] != value:
            self.rows.append([trainer.global_step, value])


class StopAfterFirstEpoch(pl.Callback):
    """Save a checkpoint at the end of the first epoch of a 2-epoch run (where ``ModelCheckpoint`` would, so its
    schedules are planned for the whole run) and stop there."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)
        trainer.should_stop = True


def trainer(strategy: str, epochs: int, callbacks: list, distributed_checkpoint: bool = True, **kwargs) -> pl.Trainer:
    if strategy == "fsdp2":
        kwargs["strategy"] = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=distributed_checkpoint
        )
    else:
        kwargs["strategy"] = "ddp"
    return pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=epochs, limit_train_batches=BATCHES, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


def model_for(strategy: str, method: str) -> MLP:
    pl.seed_everything(3)
    if method in ATTENTION:
        return ShardedAttentionNet() if strategy == "fsdp2" else AttentionNet()
    return ShardedMLP() if strategy == "fsdp2" else MLP()


def summary(model: MLP, callback, record: Record | None = None) -> dict:
    """What the test compares, from whole (gathered) tensors."""
    weights = {name: full_tensor(param.detach()) for name, param in model.named_parameters()}
    masks = masks_of(callback)
    return {
        "weights": crc(weights.values()),
        "masks": crc(masks.values()),
        "zeros": {name: int((weights[name] == 0).sum()) for name in masks},
        "numel": {name: weights[name].numel() for name in masks},
        "sharded": all(is_sharded(param) for param in model.parameters()),
        "updates": record.rows if record is not None else [],
    }


def straight(method: str, strategy: str, epochs: int = 2) -> dict:
    model, callbacks = model_for(strategy, method), callbacks_for(method)
    callback, record = callbacks[0], Record(callbacks[0])
    run = trainer(strategy, epochs, [*callbacks, record])
    run.fit(model, DigitsDataModule(batch_size=16))
    if method == EXPORTED:  # every rank saves (the shards are gathered), each to its own file
        export.save_compressed(model, run.default_root_dir + f"/{method}-{strategy}-rank{run.global_rank}.lsz", verbose=False)
    return summary(model, callback, record)


def resumed(method: str, first: str, second: str, out_dir: Path, distributed_checkpoint: bool = True) -> dict:
    """One epoch under ``first``, a checkpoint, then the second epoch under ``second`` resumed from it."""
    model, callbacks = model_for(first, method), callbacks_for(method)
    path = out_dir / f"{method}-{first}-{second}-{int(distributed_checkpoint)}.ckpt"
    run = trainer(first, 2, [*callbacks, StopAfterFirstEpoch(path)], distributed_checkpoint)
    run.fit(model, DigitsDataModule(batch_size=16))
    written_sharded = path.is_dir()
    if written_sharded and second != "fsdp2":  # a sharded checkpoint for an unsharded run: consolidate it first
        path = consolidate(run, path)
    model, callbacks = model_for(second, method), callbacks_for(method)
    if method in DISTILLED:  # the weights the resumed run starts from are not the teacher's: it must load the saved one
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1.0)
    trainer(second, 2, callbacks).fit(model, DigitsDataModule(batch_size=16), ckpt_path=path)
    return {**summary(model, callbacks[0]), "sharded_checkpoint": written_sharded}


def consolidate(run: pl.Trainer, path: Path) -> Path:
    """A distributed checkpoint folder read whole (``load_distributed_checkpoint``) and saved as one file on rank 0."""
    target = path.with_suffix(".full.ckpt")
    if run.global_rank == 0:
        torch.save(export.load_distributed_checkpoint(path, trusted=True), target)
    run.strategy.barrier()
    return target


#: resume paths: (first strategy, second strategy, sharded checkpoint when the first is fsdp2)
PATHS = {
    "sharded": ("fsdp2", "fsdp2", True),  # a distributed (sharded) checkpoint folder, resumed sharded
    "full": ("fsdp2", "fsdp2", False),  # a full checkpoint file written by the sharded run, resumed sharded
    "into-sharded": ("ddp", "fsdp2", True),  # an unsharded run's checkpoint resumed sharded
    "into-unsharded": ("fsdp2", "ddp", True),  # a sharded checkpoint folder, consolidated, resumed unsharded
}


def main(out_dir: Path, methods: list[str], resume: list[str]) -> None:
    """``methods``: callbacks run straight under both strategies; ``resume``: ``method:path`` entries (:data:`PATHS`)."""
    torch.set_num_threads(1)
    result: dict = {"runs": {}}
    for method in methods:
        for strategy in ("ddp", "fsdp2"):
            result["runs"][f"{method}/{strategy}"] = straight(method, strategy)
    for entry in resume:
        method, path = entry.split(":")
        first, second, distributed = PATHS[path]
        result["runs"][f"{method}/{path}"] = resumed(method, first, second, out_dir, distributed)
    rank = torch.distributed.get_rank()
    result["world_size"] = torch.distributed.get_world_size()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), [m for m in sys.argv[2].split(",") if m], [m for m in sys.argv[3].split(",") if m] if len(sys.argv) > 3 else [])
