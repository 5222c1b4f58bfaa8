"""Step-time and memory overhead of pruning callbacks against the same dense run.

One process trains the small CNN (``Classifier(arch="cnn")``, ``--arch`` to change) on real MNIST, or with
``--arch chargpt`` nanoGPT's CPU "baby GPT" (``CharGPT``: 4 layers, 4 heads, 128 dims, block 64, batch 12) on
Shakespeare, under the configurations named by ``--configs`` (default: the first three):

* ``dense``: no callback;
* ``ours``: ``GradualMagnitudePruning(sparsity=0.9, start=0, end=steps // 2, frequency=50)``;
* ``qat``: ``QuantizationAwareTraining(bits=4)`` (target ≤ 1.25×; it keeps a full-precision copy of the weights,
  so memory is about 2× by design); ``gmp+qat``: ``ours`` and ``qat`` together;
* ``rigl``: ``RigL(sparsity=0.9, frequency=100, end=0.75)``: connections move at steps 100, 200, ... so
  run it with ``--steps`` of a few hundred; its cost sits in the update steps, so its target is on the
  ``mean ×`` column (mean step time, updates amortised) rather than the median;
* ``ModelPruning``: Lightning's ``ModelPruning("l1_unstructured", amount=0.9)`` with its defaults (global
  unstructured, weights and biases, lottery-ticket reset, made permanent at ``on_train_end``), except
  ``apply_pruning`` which is true only at the end of epoch 0. Every run's epoch is ``--warmup`` batches long
  (``limit_train_batches``), so ModelPruning prunes once, right after the warm-up steps, and all timed steps
  run with its masks in force.

Step time: per optimizer step, ``perf_counter`` from ``on_train_batch_start`` to ``on_train_batch_end`` (forward,
backward, optimizer step and every callback's batch hooks), warm-up steps dropped. The configurations are
interleaved over ``--rounds`` short rounds (order rotated each round). ``×dense`` = median over all timed steps
of all rounds / the same for dense (the number held against the target), with a 95% bootstrap interval over
rounds (machine noise here slows whole runs by up to ~10%); ``paired ×`` = median of the per-round ratios;
``mean ×`` = the same with means (what periodic work such as RigL's updates costs over a run); ``in-callback ms`` =
median per step of the time spent inside the callback's own batch hooks, a low-noise measure of what ours adds (ModelPruning's cost sits in its forward pre-hooks, which this does not see).

Memory: bytes of all live tensor storages (``gc.get_objects()``, deduplicated by storage pointer, data set tensors
left out), measured (a) at the end of the last training step, while a callback's training-time state is live,
and (b) after ``fit`` returns with trainer, model, optimizer and callbacks still referenced; median of the first
``--memory-rounds`` rounds (it is deterministic). Ratio = (dense parameter bytes + bytes beyond the dense run) /
dense parameter bytes, so dense is 1.00.

Run from the repository root (defaults take about 2.5 minutes on 2 CPU cores)::

    .venv/bin/python -m benchmarks.overhead [--rounds 16] [--steps 40] [--warmup 10] [--batch-size 64] [--data mnist]
    .venv/bin/python -m benchmarks.overhead --configs dense rigl --steps 310 --rounds 8   # RigL, about 5.5 minutes
    .venv/bin/python -m benchmarks.overhead --configs dense qat gmp+qat --rounds 8        # QAT, about 1.5 minutes
    .venv/bin/python -m benchmarks.overhead --arch chargpt --configs dense ours qat --rounds 8 --threads 1  # CharGPT
"""

from __future__ import annotations

import argparse
import functools
import gc
import random
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelPruning
from rich.table import Table

from benchmarks.common import datamodule, emit, quiet, trainer
from lightning_sparse import GradualMagnitudePruning, QuantizationAwareTraining, RigL
from lightning_sparse.core.targets import prunable_names
from lightning_sparse.core.counting import global_sparsity
from lightning_sparse.data import ShakespeareDataModule
from lightning_sparse.models import CharGPT, Classifier

BABY_GPT = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)  # as benchmarks/transformer.py
CONFIGS = ("dense", "ours", "ModelPruning", "rigl", "qat", "gmp+qat")
TARGETS = {  # which step-time ratio, its bound, memory bound (None: no memory target)
    "ours": ("median", 1.02, 1.10),
    "rigl": ("mean", 1.05, 1.10),
    "qat": ("median", 1.25, None),
}
CHARGPT_TARGETS = {"ours": ("median", 1.03, 1.10), "qat": ("median", 1.25, None)}  # issue 14, on CharGPT
NOTES = {"dense": "baseline", "ModelPruning": "issue: 1.04-1.10× / 4.0×"}
BATCH_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
               "on_before_zero_grad", "on_train_batch_end")  # fmt: skip


def live_tensor_bytes(exclude: set[int]) -> int:
    """Bytes of every distinct tensor storage reachable by the garbage collector, minus ``exclude`` pointers."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):  # type(): no __class__ lookup on deprecated module proxies
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse / meta tensors have no plain storage
                continue
            ptr = storage.data_ptr()
            if ptr and ptr not in exclude:
                storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
    return sum(storages.values())


class StepTimer(Callback):
    """Wall time of every training batch (start hook to end hook), and of the batch hooks of ``watched``.

    List it after the callbacks it watches, so that its end hook runs after theirs.
    """

    def __init__(self, watched: list[Callback]) -> None:
        self.times: list[float] = []
        self.in_callbacks: list[float] = []
        self._start = self._hooks = 0.0
        for callback in watched:
            for name in BATCH_HOOKS:
                setattr(callback, name, self._clocked(getattr(callback, name)))

    def _clocked(self, hook: Any) -> Any:
        @functools.wraps(hook)
        def clocked(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self._hooks += time.perf_counter() - start

        return clocked

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.in_callbacks.append(self._hooks)
        self._hooks = 0.0


class LastStepMemory(Callback):
    """Live tensor bytes at the end of the last training step (listed after the timer, so it is not timed)."""

    def __init__(self, exclude: set[int] | None) -> None:
        self.exclude, self.bytes = exclude, None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.exclude is not None and trainer.global_step >= trainer.max_steps:
            self.bytes = live_tensor_bytes(self.exclude)


def _first_epoch_only(epoch: int) -> bool:
    return epoch == 0


def sparsity_callbacks(config: str, steps: int) -> list[Callback]:
    if config == "ours":
        return [GradualMagnitudePruning(sparsity=0.9, start=0, end=steps // 2, frequency=50, verbose=False)]
    if config == "ModelPruning":
        return [ModelPruning("l1_unstructured", amount=0.9, apply_pruning=_first_epoch_only)]
    if config == "rigl":
        return [RigL(sparsity=0.9, frequency=100, end=0.75, verbose=False)]
    if config in ("qat", "gmp+qat"):
        qat = QuantizationAwareTraining(bits=4, verbose=False)
        return [qat] if config == "qat" else [sparsity_callbacks("ours", steps)[0], qat]
    return []


def weight_sparsity(model: torch.nn.Module) -> float:
    """Fraction of exact zeros over the Linear/Conv weights."""
    params = dict(model.named_parameters())
    weights = [params[name].detach() for name in prunable_names(model)]
    return global_sparsity(weights)


def run(config: str, dm: pl.LightningDataModule, args: argparse.Namespace, exclude: set[int] | None) -> dict[str, Any]:
    """One short training run; live tensor bytes are measured only when ``exclude`` is given."""
    pl.seed_everything(args.seed, verbose=False)
    if args.arch == "chargpt":
        model = CharGPT(vocab_size=dm.vocab_size, **BABY_GPT)
    else:
        model = Classifier(arch=args.arch, input_shape=dm.input_shape)
    callbacks = sparsity_callbacks(config, args.steps)
    timer, memory = StepTimer(callbacks), LastStepMemory(exclude)
    fitter = trainer(
        [*callbacks, timer, memory],
        max_steps=args.steps,
        limit_train_batches=args.warmup,  # one epoch = the warm-up: ModelPruning prunes right after it
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    fitter.fit(model, datamodule=dm)
    # fitter, model, its optimizer and the callbacks are still referenced here
    after_fit = live_tensor_bytes(exclude) if exclude is not None else None
    return {
        "step_times": timer.times[args.warmup :],
        "in_callbacks": timer.in_callbacks[args.warmup :],
        "bytes_last_step": memory.bytes,
        "bytes_after_fit": after_fit,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "sparsity": weight_sparsity(model),
    }


def pooled_ratio(runs: list[dict[str, Any]], dense: list[dict[str, Any]], rounds: list[int], stat: Any = statistics.median) -> float:
    """stat(step times of ``runs``) / stat(step times of ``dense``), over the given rounds (``stat``: median or mean)."""
    return stat([t for i in rounds for t in runs[i]["step_times"]]) / stat([t for i in rounds for t in dense[i]["step_times"]])


def bootstrap_interval(runs: list[dict[str, Any]], dense: list[dict[str, Any]], samples: int = 500) -> tuple[float, float]:
    """95% interval of :func:`pooled_ratio` when whole rounds are resampled (noise here moves whole runs)."""
    rng = random.Random(0)
    n = len(runs)
    ratios = sorted(pooled_ratio(runs, dense, [rng.randrange(n) for _ in range(n)]) for _ in range(samples))
    return ratios[int(0.025 * samples)], ratios[int(0.975 * samples) - 1]


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    median = statistics.median
    step = {config: median(t for r in rs for t in r["step_times"]) for config, rs in runs.items()}
    param_bytes = runs["dense"][0]["param_bytes"]
    live = {
        config: {key: median(r[key] for r in rs if r[key] is not None) for key in ("bytes_last_step", "bytes_after_fit")}
        for config, rs in runs.items()
    }
    results = {}
    for config, rs in runs.items():
        paired = [median(r["step_times"]) / median(d["step_times"]) for r, d in zip(rs, runs["dense"])]
        results[config] = {
            "median_step_ms": 1e3 * step[config],
            "step_ratio": step[config] / step["dense"],
            "mean_step_ratio": pooled_ratio(rs, runs["dense"], list(range(len(rs))), statistics.mean),
            "step_ratio_95ci": bootstrap_interval(rs, runs["dense"]),
            "paired_step_ratio": median(paired),
            "step_ratio_per_round": paired,
            "in_callback_ms": 1e3 * median(t for r in rs for t in r["in_callbacks"]),
            **{
                f"memory_ratio_{key[6:]}": (param_bytes + live[config][key] - live["dense"][key]) / param_bytes
                for key in ("bytes_last_step", "bytes_after_fit")
            },
            "live_bytes": live[config],
            "weight_sparsity": rs[-1]["sparsity"],
            "timed_steps": sum(len(r["step_times"]) for r in rs),
        }
    return results


def _target_text(target: tuple[str, float, float | None]) -> str:
    memory = f" / ≤ {target[2]:.2f}×" if target[2] is not None else " (memory: latent fp32 copy)"
    return f"{target[0]} ≤ {target[1]:.2f}×{memory}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("mnist", "digits"), default="mnist")
    parser.add_argument("--arch", choices=("cnn", "lenet5", "lenet300", "chargpt"), default="cnn",
                        help="chargpt: nanoGPT's baby GPT on Shakespeare (batch 12 x 64 characters; --data unused)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS[:3]), help="dense is always run")
    parser.add_argument("--rounds", type=int, default=16, help="interleaved rounds of dense / ours / ModelPruning")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of each run (= epoch length)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--memory-rounds", type=int, default=3, help="rounds in which live tensor bytes are measured")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be in (0, --steps)")
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.arch == "chargpt":
        dm = ShakespeareDataModule(block_size=BABY_GPT["block_size"], batch_size=12, seed=args.seed)
        dm.prepare_data()
        dm.setup("fit")
        data_ptrs = {t.untyped_storage().data_ptr() for t in dm.splits.values()}
    else:
        dm = datamodule(args.data, args.batch_size, args.seed)
        data_ptrs = {t.untyped_storage().data_ptr() for split in dm.splits.values() for t in split.tensors}

    configs = ["dense"] + [config for config in args.configs if config != "dense"]
    runs: dict[str, list[dict[str, Any]]] = {config: [] for config in configs}
    for round_ in range(args.rounds):
        exclude = data_ptrs if round_ < max(args.memory_rounds, 1) else None
        shift = round_ % len(configs)
        for config in configs[shift:] + configs[:shift]:  # rotate so no config always runs first
            runs[config].append(run(config, dm, args, exclude))
            gc.collect()
    results = summarize(runs)
    wall = time.perf_counter() - started

    data = "shakespeare, batch 12 × 64 characters" if args.arch == "chargpt" else f"{args.data}, batch {args.batch_size}"
    table = Table(title=f"Pruning overhead: {args.arch} on {data}, {args.rounds} rounds × {args.steps} "
                        f"steps ({args.warmup} warm-up), {torch.get_num_threads()} threads")  # fmt: skip
    for column in ("config", "step ms", "×dense", "95% CI", "paired ×", "mean ×", "in-callback ms", "mem × (last step)",
                   "mem × (after fit)", "weight sparsity", "target step / mem", "met"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("config", "target step / mem") else "right")
    targets = CHARGPT_TARGETS if args.arch == "chargpt" else TARGETS
    for config, r in results.items():
        target, met = targets.get(config), ""
        if target:
            memory = max(r["memory_ratio_last_step"], r["memory_ratio_after_fit"])
            ratio = r["mean_step_ratio"] if target[0] == "mean" else r["step_ratio"]
            met = "[green]yes" if ratio <= target[1] and (target[2] is None or memory <= target[2]) else "[red]no"
        table.add_row(
            config, f"{r['median_step_ms']:.2f}", f"{r['step_ratio']:.3f}", "{:.2f}-{:.2f}".format(*r["step_ratio_95ci"]),
            f"{r['paired_step_ratio']:.3f}", f"{r['mean_step_ratio']:.3f}",
            f"{r['in_callback_ms']:.2f}", f"{r['memory_ratio_last_step']:.2f}", f"{r['memory_ratio_after_fit']:.2f}",
            f"{r['weight_sparsity']:.1%}", _target_text(target) if target else NOTES.get(config, ""), met,
        )  # fmt: skip
    param_bytes = runs["dense"][0]["param_bytes"]
    dense_ms = results["dense"]["median_step_ms"]
    described = {
        "ours": f"ours: GMP sparsity 0.9, start 0, end {args.steps // 2}, frequency 50",
        "ModelPruning": f"ModelPruning: l1_unstructured, amount 0.9, pruned once at the end of epoch 0 (step {args.warmup}), "
                        "other arguments default",
        "rigl": "rigl: RigL sparsity 0.9 (ERK), frequency 100, end 0.75",
        "qat": "qat: QuantizationAwareTraining bits 4, per channel, symmetric",
        "gmp+qat": "gmp+qat: ours and qat in one Trainer",
    }  # fmt: skip
    table.caption = (
        f"parameter bytes {param_bytes:,}. "
        + "; ".join(
            f"{described[c]} (in-callback median {results[c]['in_callback_ms'] / dense_ms:.1%} of a dense step)" for c in configs[1:]
        )
        + f". Wall time {wall:.0f} s."
    )
    name = "overhead" if configs == ["dense", "ours", "ModelPruning"] else "overhead_" + "_".join(configs[1:])
    name = f"{name}_chargpt" if args.arch == "chargpt" else name
    emit(name, table, {"args": vars(args), "param_bytes": param_bytes, "wall_s": wall, "results": results})


if __name__ == "__main__":
    main()
