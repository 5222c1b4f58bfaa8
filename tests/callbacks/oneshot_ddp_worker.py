"""Run by ``test_oneshot_ddp.py``: OneShotPruning on 2 CPU processes (gloo), under DDP and FSDP2 (``fully_shard``), on
the same digits and seed. Runs ``strategy:method`` jobs in one launch. Every rank writes ``<strategy>-<method>-rank<N>.json`` with its whole (gathered) final
masks and weights' CRCs; under DDP rank 0 also saves the initial weights and every rank its calibration batches, so the
test can prune the same model in one process on both ranks' batches together."""

import json
import sys
import zlib
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from lightning_sparse import Distillation, OneShotPruning
from lightning_sparse.core.shards import any_sharded, full_tensor
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import Classifier

CALIBRATION = 3


def crc(tensors) -> int:
    value = 0
    for tensor in tensors:
        value = zlib.crc32(tensor.detach().cpu().contiguous().numpy().tobytes(), value)
    return value


class MLP(Classifier):
    """Digits MLP 64 → 32 → 24 → 10 (N:M-friendly inputs)."""

    def __init__(self) -> None:
        super().__init__(arch="lenet300", input_shape=(1, 8, 8), lr=0.05)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10))


def shard(model: MLP, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model.net, mesh=mesh)


class ShardedMLP(MLP):
    def configure_model(self) -> None:
        shard(self, self.device_mesh["data_parallel"])


class ShardedMLPWithTeacher(ShardedMLP):
    """A user's sharded teacher: a second model (not a submodule) ``fully_shard``-ed over the same mesh."""

    @classmethod
    def beside(cls, teacher: MLP) -> "ShardedMLPWithTeacher":
        model = cls()  # (not an __init__ argument: the hyperparameters saved in checkpoints would hold it)
        object.__setattr__(model, "teacher", teacher)  # not a submodule: not trained, not in the checkpoint
        return model

    def configure_model(self) -> None:
        super().configure_model()
        shard(self.teacher, self.device_mesh["data_parallel"])


class SaveBatches(pl.Callback):
    def __init__(self, out: Path, method: str) -> None:
        self.out, self.method = out, method

    def on_train_start(self, trainer, pl_module) -> None:
        batches = [b for _, b in zip(range(CALIBRATION), trainer.train_dataloader)]
        torch.save(batches, self.out / f"batches-{self.method}-{trainer.global_rank}.pt")


#: method suffixes: with Distillation from the dense model (the teacher copied on every rank) at alpha 0.5 (and SquareHead
#: on the two hidden Linear layers) or 0 (nothing else), or
#: none but as many steps (the baseline of ``+kd0``); ``+kdgiven``: as ``+kd`` with a given teacher, sharded like the
#: model under FSDP2, initialised as the model is (so the same teacher as ``+kd``'s copy)
SUFFIXES = {"+kd": 0.5, "+kdgiven": 0.5, "+kd0": 0.0, "+steps": None}


def run(out: Path, strategy: str, method: str) -> None:
    suffix = "+" + method.split("+")[1] if "+" in method else ""
    given = None
    if suffix == "+kdgiven":
        pl.seed_everything(3)
        given = MLP()
    pl.seed_everything(3)
    model = ShardedMLP() if strategy == "fsdp2" else MLP()
    if given is not None and strategy == "fsdp2":
        pl.seed_everything(3)
        model = ShardedMLPWithTeacher.beside(given)
    distill = bool(suffix)  # the longer runs: 3 steps
    method = method.split("+")[0]
    callback = OneShotPruning(0.5, method, calibration_batches=CALIBRATION, verbose=False)
    kd = None
    if SUFFIXES.get(suffix) is not None:  # with SquareHead on the hidden layers too, where distilling
        alpha = SUFFIXES[suffix]
        kd = Distillation(given, save_teacher=given is not None, alpha=alpha, hidden_weight=0.1 if alpha else 0.0, hidden_modules=["net.1", "net.3"])
    callbacks = [callback, kd] if kd is not None else [callback]
    if strategy == "ddp" and not distill:
        callbacks.append(SaveBatches(out, method))
    kwargs = {"strategy": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)} if strategy == "fsdp2" else {"strategy": "ddp"}
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=3 if distill else 1, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **kwargs)  # fmt: skip
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, DigitsDataModule(batch_size=16))
    rank = trainer.global_rank
    run_name = f"{strategy}-{method}{suffix}"
    if strategy == "ddp" and rank == 0 and not distill:
        torch.save(initial, out / f"initial-{method}.pt")
    masks = {name: callback.masks.mask(name) for name in callback.masks}
    weights = {name: full_tensor(p.detach()) for name, p in callback.masks.params.items()}
    result = {"masks": crc(masks.values()), "weights": crc(weights.values()),
              "sparsity": {name: float((~m).float().mean()) for name, m in masks.items()}}  # fmt: skip
    if kd is not None:  # the teacher: whole (plain tensors), the dense weights of fit start, untouched by training
        teacher = dict(kd.teacher.named_parameters())
        result["teacher"] = {"crc": crc(full_tensor(p) for p in teacher.values()), "initial": crc(full_tensor(initial[n]) for n in teacher),
                             "plain": not any_sharded(teacher.values()), "trainable": any(p.requires_grad for p in teacher.values())}  # fmt: skip
        if given is not None:  # saved whole, and resumed into another sharded teacher initialised otherwise
            result["teacher"]["resumed"] = resume_teacher(out, trainer, strategy, method)
        result["kl"] = float(trainer.callback_metrics["distill/kl"])  # this rank's batch: differs between the ranks
        result["hidden"] = float(trainer.callback_metrics.get("distill/hidden", -1.0))
    if rank == 0:
        torch.save({"masks": masks, "weights": weights}, out / f"{run_name}-final.pt")
    (out / f"{run_name}-rank{rank}.json").write_text(json.dumps(result))


def resume_teacher(out: Path, trainer: pl.Trainer, strategy: str, method: str) -> int:
    """Save a checkpoint of the run (its teacher saved), resume it for a step with a teacher initialised from another
    seed, and return the CRC of the teacher's whole weights after that step."""
    path = out / f"{strategy}-{method}-kdgiven.ckpt"
    trainer.save_checkpoint(path)
    pl.seed_everything(4)
    other = MLP()
    pl.seed_everything(3)
    model = ShardedMLPWithTeacher.beside(other) if strategy == "fsdp2" else MLP()
    kd = Distillation(other, save_teacher=True, alpha=0.5)
    kwargs = {"strategy": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)} if strategy == "fsdp2" else {"strategy": "ddp"}
    resumed = pl.Trainer(accelerator="cpu", devices=2, max_steps=4, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[OneShotPruning(0.5, method, calibration_batches=CALIBRATION, verbose=False), kd],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         **kwargs)  # fmt: skip
    resumed.fit(model, DigitsDataModule(batch_size=16), ckpt_path=path)
    assert resumed.global_step == 4
    return crc(full_tensor(p) for p in kd.teacher.parameters())


if __name__ == "__main__":
    torch.set_num_threads(1)
    for job in sys.argv[2].split(","):  # one launch for every run: the processes are started once
        run(Path(sys.argv[1]), *job.split(":"))
