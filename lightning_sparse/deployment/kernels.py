"""Per-layer kernel choice: time a Linear layer's dense form against its sparse forms on the input it really gets.

Candidates are PyTorch's own kernels: CSR (and BSR where whole blocks are zero) through
:class:`~lightning_sparse.deployment.modules.SparseLinear`, and on a capable GPU the 2:4 semi-structured kernels
through :class:`~lightning_sparse.deployment.modules.SemiStructuredLinear`. Each candidate must reproduce the dense
output first; the times are medians of interleaved runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_sparse.core.structured import nm_counts
from lightning_sparse.deployment.modules import SemiStructuredLinear, SparseLinear, semi_structured_supported

KERNELS = ("auto", "sparse", "dense")
#: A sparse form replaces the dense layer only when its median time is below this fraction of the dense one,
#: so timing noise does not swap a layer for nothing.
MARGIN = 0.95
BLOCKSIZES = (4, 8, 16, 32)


@dataclass(frozen=True)
class Choice:
    """What a Linear layer became: ``form`` (dense, csr, bsr4.., semi-structured), the module, times, why."""

    form: str
    module: nn.Module
    dense_ms: float | None
    sparse_ms: float | None
    reason: str


def outputs_match(got: Tensor, want: Tensor) -> bool:
    """Equal within float tolerance: rtol 1e-4, atol 1e-5 of the output's scale (summation order differs)."""
    if got.shape != want.shape:
        return False
    scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
    return torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-5 * scale)


def median_ms(functions: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each function, run in turns (interleaved) so machine noise hits all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for function in functions.values():
        for _ in range(warmup):
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            sync()
            start = time.perf_counter()
            function()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def nm_pattern(weight: Tensor, ms: Sequence[int] = (4, 8)) -> tuple[int, int] | None:
    """``(N, M)`` when every group of M consecutive weights (rows of ``weight.reshape(out, -1)``) holds exactly N
    non-zeros, N < M; the smallest such M; ``None`` otherwise."""
    fan_in = weight[0].numel() if weight.dim() else 0
    for m in ms:
        if not fan_in or fan_in % m:
            continue
        counts = nm_counts(weight, m)
        n = int(counts.max())
        if n < m and bool((counts == n).all()):
            return n, m
    return None


def _candidates(layer: nn.Linear, device: torch.device) -> tuple[dict[str, Callable[[], nn.Module]], list[str]]:
    """Sparse forms worth timing for ``layer``, and notes on the forms left out."""
    weight, notes = layer.weight.detach(), []
    forms: dict[str, Callable[[], nn.Module]] = {"csr": lambda: SparseLinear.from_linear(layer, "csr")}
    nonzero = weight != 0
    for size in BLOCKSIZES:
        rows, cols = weight.shape
        if rows % size or cols % size:
            continue
        blocks = nonzero.reshape(rows // size, size, cols // size, size).any(dim=(1, 3))
        if blocks.float().mean() <= 0.5:  # BSR stores whole blocks: only worth it where most blocks are empty
            forms[f"bsr{size}"] = lambda size=size: SparseLinear.from_linear(layer, "bsr", size)
    pattern = nm_pattern(weight)
    if pattern is not None and pattern[0] * 2 <= pattern[1] and pattern[1] == 4:
        supported, why = semi_structured_supported(device)
        if supported:
            forms["semi-structured"] = lambda: SemiStructuredLinear(layer)
        else:
            notes.append(f"{pattern[0]}:{pattern[1]} pattern, {why}: kept dense")
    return forms, notes


@torch.inference_mode()
def choose(layer: nn.Linear, x: Tensor, kernel: str = "auto", repeats: int = 30) -> Choice:
    """Time ``layer`` dense and in each sparse form on its real input ``x``; return the fastest that is correct.

    ``kernel="sparse"`` takes the fastest sparse form even when dense is faster (e.g. to save memory).
    """
    device = layer.weight.device
    want = layer(x)
    forms, notes = _candidates(layer, device)
    built: dict[str, nn.Module] = {}
    for name, make in forms.items():
        try:
            module = make()
            if outputs_match(module(x), want):
                built[name] = module
            else:
                notes.append(f"{name} output differs from dense: not used")
        except Exception as error:  # noqa: BLE001 - a kernel missing for this dtype/device/shape, whatever it raises
            notes.append(f"{name} unavailable: {str(error).splitlines()[0][:120]}")
    if not built:
        return Choice("dense", layer, None, None, "; ".join(notes) or "no sparse kernel applies")
    times = median_ms({"dense": lambda: layer(x), **{name: (lambda m=m: m(x)) for name, m in built.items()}}, repeats, device)
    best = min(built, key=lambda name: times[name])
    dense_ms, sparse_ms = times["dense"], times[best]
    measured = f"{best} {sparse_ms:.4f} ms vs dense {dense_ms:.4f} ms ({dense_ms / sparse_ms:.2f}×)"
    notes = [measured] + notes
    if kernel == "sparse" or sparse_ms < MARGIN * dense_ms:
        why = "faster" if sparse_ms < MARGIN * dense_ms else "kernel='sparse'"
        return Choice(best, built[best], dense_ms, sparse_ms, f"{why}: " + "; ".join(notes))
    return Choice("dense", layer, dense_ms, sparse_ms, "dense is faster: " + "; ".join(notes))
