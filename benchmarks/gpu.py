"""The GPU checks in one script: every callback's test configuration on CUDA, the step-time overhead table (GMP,
RigL, QAT against dense, on CharGPT and the small CNN, bf16) and 2:4 semi-structured Linear speed by shape.

Meant for a machine with an NVIDIA GPU, in a few minutes; it prints three tables and writes
``benchmarks/results/gpu.json``. Without CUDA it prints "no CUDA" and exits 0 (``--device cpu`` runs a shortened
version of every part on the CPU instead, to check the script itself; its numbers mean nothing).

1. **Callbacks on the device** (``callbacks`` table): each configuration the tests use (GMP uniform / global / 2:4,
   RigL, SET, movement, QAT uniform (PyTorch's fused ``fake_quantize_per_channel_affine`` kernel) and k-means +
   CLIP-Q, L-C) trains LeNet-300-100 on the real digits for ``--steps`` steps on the device, bf16-mixed. Checked:
   every masked layer has exactly its target zero count and its zeros are in the weights, the masks live on the
   device (bit-packed: their bytes are printed), QAT's weights hold at most 2**bits values per layer, L-C's final
   weights meet its sparsity. The 2:4 run is then deployed (``lightning_sparse.deploy``): on compute capability
   >= 8.0 its Linear layers may become ``SemiStructuredLinear`` (``torch.sparse.to_sparse_semi_structured``); the
   deployed outputs must match the model's.
2. **Overhead** (``overhead`` table): dense / GMP / RigL / QAT step time in one process, configurations interleaved
   over ``--rounds`` rounds, CUDA-synchronised timing per step (forward, backward, optimizer step, callback hooks),
   on CharGPT (nanoGPT's baby GPT, 4 layers × 128, block 64; batch 64 of random tokens: the step time does not
   depend on the text) and on the small CNN (batch 256 of 1×28×28 random images), ``precision="bf16-mixed"``.
   Targets (issue 18): GMP ≤ 1.02× median, RigL ≤ 1.05× mean (its updates amortised), QAT ≤ 1.15× median.
3. **2:4 Linear** (``semi-structured`` table): ``F.linear`` with a dense bf16 weight against the same 2:4-pruned
   weight after ``to_sparse_semi_structured`` at several (tokens, in, out) shapes; speed-up = dense / sparse
   median time (target ≥ 1.2× where cuSPARSELt pays; shapes where it does not are shown as they are).

The callbacks table also has a row checking that Lightning's ``FSDPStrategy`` (FSDP1, which does not run on a CPU)
is refused by the callbacks on one GPU with a message naming FSDP2.

Run from the repository root::

    python -m benchmarks.gpu                      # CUDA: about 3-5 minutes on one recent GPU
    python -m benchmarks.gpu --device cpu --quick # a smoke run of every part on the CPU (numbers meaningless)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
TARGETS = {"gmp": ("median", 1.02), "rigl": ("mean", 1.05), "qat": ("median", 1.15)}
SHAPES = [(64, 768, 3072), (512, 768, 3072), (2048, 768, 3072), (2048, 3072, 768), (4096, 4096, 4096), (8192, 4096, 11008), (16, 4096, 4096)]
QUICK_SHAPES = [(64, 256, 512)]


def pick_device(requested: str) -> torch.device | None:
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    return None


def describe(device: torch.device) -> str:
    if device.type != "cuda":
        return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}), torch {torch.__version__}, CUDA {torch.version.cuda}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quiet() -> None:
    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def fit_trainer(device: torch.device, callbacks: list, steps: int, precision: str, **kwargs: Any):
    import pytorch_lightning as pl

    return pl.Trainer(
        accelerator="cuda" if device.type == "cuda" else "cpu", devices=1, max_steps=steps, precision=precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


# ----------------------------------------------------------------------------- 1. callbacks on the device
def callback_configs(steps: int) -> dict[str, Any]:
    """The tests' configurations, scaled to ``steps`` optimizer steps."""
    from lightning_sparse import SET, GradualMagnitudePruning, LearningCompression, MovementPruning, QuantizationAwareTraining, RigL

    end, every = max(steps * 3 // 4, 4), max(steps // 10, 1)
    return {
        "gmp": lambda: GradualMagnitudePruning(sparsity=0.9, start=0, end=end, frequency=every, verbose=False),
        "gmp-global": lambda: GradualMagnitudePruning(sparsity=0.9, start=0, end=end, frequency=every, distribution="global", verbose=False),
        "gmp-2:4": lambda: GradualMagnitudePruning(sparsity=0.5, start=0, end=end, frequency=every, granularity="2:4", verbose=False),
        "rigl": lambda: RigL(sparsity=0.9, frequency=every, end=end, verbose=False),
        "set": lambda: SET(sparsity=0.9, frequency=every, end=end, verbose=False),
        "movement": lambda: MovementPruning(sparsity=0.9, start=0, end=end, frequency=every, verbose=False),
        "qat": lambda: QuantizationAwareTraining(bits=4, verbose=False),
        "qat-kmeans": lambda: QuantizationAwareTraining(bits=3, method="kmeans", frequency=every * 2, sparsity=0.5, verbose=False),
        "lc": lambda: LearningCompression(sparsity=0.9, lc_steps=4, steps_per_l=max(steps // 5, 1), first_l_steps=every, verbose=False),
    }


def check_callback(name: str, callback: Any, model: torch.nn.Module) -> tuple[bool, str, int]:
    """Whether the trained model shows what ``callback`` promises; a note; the mask bytes on the device."""
    from lightning_sparse.core.allocation import round_half_up

    masks = getattr(callback, "masks", None)
    if masks is not None:
        packed_on_device = all(p.device.type == next(model.parameters()).device.type for p in masks._packed.values())
        bad = []
        for layer in masks:
            weight, mask = masks.params[layer].detach(), masks.mask(layer)
            if bool((weight[~mask] != 0).any()):
                bad.append(f"{layer}: pruned weight not zero")
        if name in ("gmp", "movement"):
            bad += [f"{n}: {int((~masks.mask(n)).sum())} zeros" for n in masks if int((~masks.mask(n)).sum()) != round_half_up(0.9 * masks.numel(n))]
        ok = not bad and packed_on_device
        return ok, "; ".join(bad) or f"sparsity {masks.sparsity():.1%}, masks on {masks.params[next(iter(masks))].device.type}", masks.packed_bytes()
    params = callback.params
    if name.startswith("qat"):
        bits, quantizer = callback.quantizer.bits, callback.quantizer
        per_row = quantizer.method == "uniform" and quantizer.scale == "per_channel"  # one grid per output channel

        def distinct(weight: torch.Tensor) -> int:
            rows = weight.detach().reshape(weight.shape[0], -1) if per_row else weight.detach().reshape(1, -1)
            return max(int(torch.unique(row).numel()) for row in rows)

        counts = {n: distinct(p) for n, p in params.items()}
        bad = [f"{n}: {d} values > {2 ** bits[n]}" for n, d in counts.items() if d > 2 ** bits[n]]
        where = "per output channel" if per_row else "per layer"
        return not bad, "; ".join(bad) or f"distinct values {where} ≤ 2**bits ({max(counts.values())} max)", 0
    zeros = sum(int((p.detach() == 0).sum()) for p in params.values()) / sum(p.numel() for p in params.values())
    return zeros >= 0.9 - 1e-3, f"sparsity {zeros:.1%} (L-C's Δ(Θ) held)", 0


def run_callbacks(device: torch.device, steps: int, precision: str) -> list[dict[str, Any]]:
    import pytorch_lightning as pl

    from lightning_sparse.data import DigitsDataModule
    from lightning_sparse.models import Classifier

    rows = []
    for name, make in callback_configs(steps).items():
        pl.seed_everything(0, verbose=False)
        model, callback = Classifier(arch="lenet300", input_shape=(1, 8, 8), lr=0.05), make()
        dm = DigitsDataModule(batch_size=64)
        started = time.perf_counter()
        error = ""
        try:
            trainer = fit_trainer(device, [callback], steps, precision)
            trainer.fit(model, dm)
            accuracy = trainer.test(model, dm, verbose=False)[0]["test_acc"]
            ok, note, mask_bytes = check_callback(name, callback, model)
        except Exception as exc:  # a failure is a row of the table, not the end of the script
            ok, note, mask_bytes, accuracy, error = False, f"{type(exc).__name__}: {exc}"[:200], 0, float("nan"), "error"
        row = {"config": name, "ok": ok, "note": note, "test_acc": accuracy, "mask_bytes": mask_bytes,
               "wall_s": time.perf_counter() - started, "error": error}  # fmt: skip
        if name == "gmp-2:4" and ok:
            row["deploy"] = deploy_check(model.to(device), device)
        rows.append(row)
    if device.type == "cuda":
        rows.append(fsdp1_refusal(device, precision))
    return rows


def fsdp1_refusal(device: torch.device, precision: str) -> dict[str, Any]:
    """Lightning's ``FSDPStrategy`` (FSDP1) on one GPU: the callbacks must refuse it at ``fit`` start, naming FSDP2."""
    import pytorch_lightning as pl

    from lightning_sparse import GradualMagnitudePruning
    from lightning_sparse.data import DigitsDataModule
    from lightning_sparse.models import Classifier

    started = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cuda", devices=1, strategy="fsdp", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[GradualMagnitudePruning(sparsity=0.5, verbose=False)])  # fmt: skip
    try:
        trainer.fit(Classifier(arch="lenet300", input_shape=(1, 8, 8)), DigitsDataModule(batch_size=64))
        ok, note = False, "FSDP1 was not refused"
    except ValueError as exc:
        ok, note = "FSDP1" in str(exc) and "ModelParallelStrategy" in str(exc), f"refused: {str(exc)[:120]}"
    except Exception as exc:  # noqa: BLE001 - anything else is reported as it is
        ok, note = False, f"{type(exc).__name__}: {exc}"[:200]
    return {"config": "fsdp1 (refused)", "ok": ok, "note": note, "test_acc": float("nan"), "mask_bytes": 0,
            "wall_s": time.perf_counter() - started, "error": ""}  # fmt: skip


def deploy_check(model: torch.nn.Module, device: torch.device) -> str:
    """Deploy the 2:4-pruned model; say which kernels its Linear layers got and whether outputs match."""
    from lightning_sparse.deployment import deploy
    from lightning_sparse.deployment.modules import SemiStructuredLinear, semi_structured_supported

    model = model.eval()
    x = torch.randn(256, 1, 8, 8, device=device)
    with torch.no_grad():
        want = model(x)
        deployed = deploy(model, x, device, verbose=False)
        got = deployed(x)
    kinds = sorted({type(m).__name__ for m in deployed.modules() if list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))})
    semi = any(isinstance(m, SemiStructuredLinear) and m.compressed for m in deployed.modules())
    supported, why = semi_structured_supported(device)
    match = torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    return f"layers {kinds}; 2:4 kernel used: {semi} ({why}); outputs match: {match}"


# ----------------------------------------------------------------------------- 2. overhead
class CudaStepTimer:
    """Seconds per training batch, from ``on_train_batch_start`` to ``on_train_batch_end``, synchronised."""

    def __new__(cls, device: torch.device):  # a Callback subclass built lazily (Lightning imported in main only)
        import pytorch_lightning as pl

        class Timer(pl.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self._start = 0.0

            def on_train_batch_start(self, *args: Any) -> None:
                sync(device)
                self._start = time.perf_counter()

            def on_train_batch_end(self, *args: Any) -> None:
                sync(device)
                self.times.append(time.perf_counter() - self._start)

        return Timer()


def overhead_callbacks(config: str, steps: int) -> list:
    from lightning_sparse import GradualMagnitudePruning, QuantizationAwareTraining, RigL

    if config == "gmp":  # the overhead benchmark's settings (benchmarks/overhead.py); shorter runs update more often
        return [GradualMagnitudePruning(sparsity=0.9, start=0, end=steps // 2, frequency=min(50, steps // 4), verbose=False)]
    if config == "rigl":
        return [RigL(sparsity=0.9, frequency=min(100, steps // 4), end=0.75, verbose=False)]
    if config == "qat":
        return [QuantizationAwareTraining(bits=4, verbose=False)]
    return []


def overhead_data(model_name: str, batches: int, batch: int, seed: int = 0):
    """Random inputs of the right kind (step time does not depend on the values)."""
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(seed)
    if model_name == "chargpt":
        tokens = torch.randint(0, 84, (batches * batch, 65), generator=generator)
        data = TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    else:
        data = TensorDataset(torch.randn(batches * batch, 1, 28, 28, generator=generator), torch.randint(0, 10, (batches * batch,), generator=generator))
    return DataLoader(data, batch_size=batch, shuffle=False, drop_last=True)


def make_model(model_name: str):
    from lightning_sparse.models import CharGPT, Classifier

    if model_name == "chargpt":
        return CharGPT(vocab_size=84, block_size=64, n_layer=4, n_head=4, n_embd=128, warmup_steps=10)
    return Classifier(arch="cnn", input_shape=(1, 28, 28))


def run_overhead(device: torch.device, model_name: str, steps: int, warmup: int, rounds: int, precision: str) -> dict[str, Any]:
    import pytorch_lightning as pl

    configs = ["dense", "gmp", "rigl", "qat"]
    batch = 64 if model_name == "chargpt" else 256
    times: dict[str, list[list[float]]] = {config: [] for config in configs}
    for round_ in range(rounds):
        shift = round_ % len(configs)
        for config in configs[shift:] + configs[:shift]:  # rotated: no configuration always runs first
            pl.seed_everything(round_, verbose=False)
            callbacks = overhead_callbacks(config, steps)
            timer = CudaStepTimer(device)
            trainer = fit_trainer(device, [*callbacks, timer], steps, precision)
            trainer.fit(make_model(model_name), overhead_data(model_name, steps, batch, round_))
            times[config].append(timer.times[warmup:])
    median, mean = statistics.median, statistics.mean
    flat = {config: [t for run in runs for t in run] for config, runs in times.items()}
    result = {}
    for config in configs:
        result[config] = {
            "median_ms": 1e3 * median(flat[config]),
            "median_x": median(flat[config]) / median(flat["dense"]),
            "mean_x": mean(flat[config]) / mean(flat["dense"]),
            "paired_x": median(median(r) / median(d) for r, d in zip(times[config], times["dense"])),
            "timed_steps": len(flat[config]),
        }
    return result


# ----------------------------------------------------------------------------- 3. 2:4 Linear by shape
def run_semi_structured(device: torch.device, shapes: list[tuple[int, int, int]], repeats: int) -> list[dict[str, Any]]:
    import torch.nn.functional as F

    from lightning_sparse.core.structured import nm_mask
    from lightning_sparse.deployment.kernels import median_ms
    from lightning_sparse.deployment.modules import semi_structured_supported

    supported, why = semi_structured_supported(device)
    rows = []
    for tokens, n_in, n_out in shapes:
        row: dict[str, Any] = {"tokens": tokens, "in": n_in, "out": n_out}
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        weight = torch.randn(n_out, n_in, device=device)
        weight = weight.masked_fill(~nm_mask(weight, 2, 4, weight.numel() // 2), 0).to(dtype)
        x = torch.randn(tokens, n_in, device=device, dtype=dtype)
        functions = {"dense": lambda: F.linear(x, weight)}
        if supported:
            from torch.sparse import to_sparse_semi_structured

            try:
                sparse = to_sparse_semi_structured(weight)
                functions["2:4"] = lambda: F.linear(x, sparse)
                row["max_abs_diff"] = float((F.linear(x, sparse).float() - F.linear(x, weight).float()).abs().max())
            except (RuntimeError, NotImplementedError) as exc:
                row["note"] = f"{type(exc).__name__}: {exc}"[:120]
        else:
            row["note"] = why
        ms = median_ms(functions, repeats, device)
        row["dense_ms"] = ms["dense"]
        if "2:4" in ms:
            row["sparse_ms"], row["speedup"] = ms["2:4"], ms["dense"] / ms["2:4"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- tables
def print_tables(device_text: str, callbacks: list[dict], overhead: dict[str, dict], semi: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    table = Table(title=f"Callbacks' test configurations on {device_text}")
    for column in ("config", "ok", "test acc", "mask bytes", "s", "check"):
        table.add_column(column)
    for row in callbacks:
        note = row["note"] + (f" | deploy: {row['deploy']}" if "deploy" in row else "")
        table.add_row(row["config"], "[green]yes" if row["ok"] else "[red]no", f"{row['test_acc']:.3f}", f"{row['mask_bytes']:,}",
                      f"{row['wall_s']:.1f}", note)  # fmt: skip
    console.print(table)
    for model_name, result in overhead.items():
        table = Table(title=f"Step-time overhead, {model_name}, on {device_text}")
        for column in ("config", "median ms", "× dense (median)", "× dense (mean)", "paired ×", "steps", "target", "met"):
            table.add_column(column)
        for config, r in result.items():
            target = TARGETS.get(config)
            met = ""
            if target:
                value = r["mean_x"] if target[0] == "mean" else r["median_x"]
                met = "[green]yes" if value <= target[1] else "[red]no"
            table.add_row(config, f"{r['median_ms']:.3f}", f"{r['median_x']:.3f}", f"{r['mean_x']:.3f}", f"{r['paired_x']:.3f}",
                          str(r["timed_steps"]), f"{target[0]} ≤ {target[1]:.2f}×" if target else "baseline", met)  # fmt: skip
        console.print(table)
    table = Table(title=f"2:4 semi-structured Linear (bf16) vs dense, on {device_text}")
    for column in ("tokens × in → out", "dense ms", "2:4 ms", "speed-up", "≥ 1.2×", "note"):
        table.add_column(column)
    for row in semi:
        speedup = row.get("speedup")
        table.add_row(
            f"{row['tokens']} × {row['in']} → {row['out']}", f"{row['dense_ms']:.4f}", f"{row.get('sparse_ms', float('nan')):.4f}",
            f"{speedup:.2f}×" if speedup else "-", ("[green]yes" if speedup >= 1.2 else "[red]no") if speedup else "-", row.get("note", ""),
        )  # fmt: skip
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of the script itself")
    parser.add_argument("--quick", action="store_true", help="few steps, rounds and shapes (a smoke run)")
    parser.add_argument("--parts", nargs="+", choices=("callbacks", "overhead", "semi"), default=["callbacks", "overhead", "semi"])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 200; --quick: 12)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved overhead rounds (default 4; --quick: 1)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device is None:
        print("no CUDA: benchmarks/gpu.py measures the GPU paths and needs an NVIDIA GPU (torch.cuda.is_available() is "
              "False); nothing was measured. `--device cpu --quick` runs a smoke version of it on the CPU.")  # fmt: skip
        return 0
    quiet()
    if device.type == "cpu":
        torch.set_num_threads(1)
    steps = args.steps or (12 if args.quick else 200)
    rounds = args.rounds or (1 if args.quick else 4)
    warmup = min(10, steps // 3)
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    device_text = describe(device)
    print(f"benchmarks/gpu.py on {device_text}: {steps} steps per run, {rounds} overhead rounds, precision {precision}")
    started = time.perf_counter()
    callbacks = run_callbacks(device, max(steps, 12), precision) if "callbacks" in args.parts else []
    overhead = {}
    if "overhead" in args.parts:
        overhead_steps = max(steps, 3 * warmup + 1) if args.quick else max(steps, 310)  # RigL moves at 100, 200, 300
        for model_name in ("chargpt", "cnn"):
            overhead[model_name] = run_overhead(device, model_name, overhead_steps, warmup, rounds, precision)
    semi = run_semi_structured(device, QUICK_SHAPES if args.quick else SHAPES, 5 if args.quick else 50) if "semi" in args.parts else []
    print_tables(device_text, callbacks, overhead, semi)
    payload = {"device": device_text, "args": vars(args), "callbacks": callbacks, "overhead": overhead, "semi_structured": semi,
               "wall_s": time.perf_counter() - started}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("gpu.json" if device.type == "cuda" and not args.quick else "gpu_smoke.json")
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wall time {payload['wall_s']:.0f} s; results written to {path}")
    return 0 if all(row["ok"] for row in callbacks) else 1


if __name__ == "__main__":
    sys.exit(main())
