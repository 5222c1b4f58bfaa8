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


#: Interleaved rounds timed before a comparison may stop early (:func:`settled`).
MIN_ROUNDS = 5


def timings(functions: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 3,
            settled: Callable[[dict[str, list[float]]], bool] | None = None, min_rounds: int = MIN_ROUNDS) -> dict[str, list[float]]:  # fmt: skip
    """Milliseconds of each run of each function, run in turns (interleaved) so machine noise hits all alike.

    ``repeats`` rounds at most; with ``settled``, the timing stops after any round from ``min_rounds`` on where
    ``settled(samples)`` holds (the comparison it serves is already clear: no need for more runs).
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for function in functions.values():
        for _ in range(warmup):
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_ in range(repeats):
        for name, function in functions.items():
            sync()
            start = time.perf_counter()
            function()
            sync()
            times[name].append(1e3 * (time.perf_counter() - start))
        if settled is not None and round_ + 1 >= min_rounds and settled(times):
            break
    return times


def median_ms(functions: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 3,
              settled: Callable[[dict[str, list[float]]], bool] | None = None) -> dict[str, float]:  # fmt: skip
    """Median milliseconds of each function over :func:`timings`' interleaved runs."""
    return {name: statistics.median(values) for name, values in timings(functions, repeats, device, warmup, settled).items()}


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (the ``inclusive`` method: defined from two values on)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def verdict(a: Sequence[float], b: Sequence[float], margin: float | None = None, min_runs: int = MIN_ROUNDS) -> bool | None:
    """Is ``a`` faster than ``b`` by the margin (median ``a`` < ``margin`` · median ``b``)? ``True`` / ``False``
    when the interquartile ranges agree (``a``'s third quartile below ``margin`` · ``b``'s first, or ``a``'s first
    at or above ``margin`` · ``b``'s third), ``None`` while the samples overlap too much to say or either has fewer
    than ``min_runs`` runs."""
    margin = MARGIN if margin is None else margin
    if min(len(a), len(b)) < min_runs:
        return None
    (a1, a3), (b1, b3) = quartiles(a), quartiles(b)
    if a3 < margin * b1:
        return True
    if a1 >= margin * b3:
        return False
    return None


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


@dataclass(frozen=True)
class Timed:
    """Times measured for one layer, which a later layer of the same shape, input and non-zeros may reuse."""

    name: str
    nnz: int
    times: dict[str, float]


#: Layers whose weights' non-zeros differ by at most this fraction share timings (same shape, input and forms).
SHARE_NNZ = 0.02


def _shared(shared: dict[tuple, list[Timed]], key: tuple, nnz: int) -> Timed | None:
    return next((entry for entry in shared.get(key, []) if abs(entry.nnz - nnz) <= SHARE_NNZ * max(entry.nnz, 1)), None)


@torch.inference_mode()
def choose(layer: nn.Linear, x: Tensor, kernel: str = "auto", repeats: int = 30, shared: dict[tuple, list[Timed]] | None = None,
           name: str = "") -> Choice:  # fmt: skip
    """Time ``layer`` dense and in each sparse form on its real input ``x``; return the fastest that is correct.

    ``kernel="sparse"`` takes the fastest sparse form even when dense is faster (e.g. to save memory). The forms run
    in interleaved rounds, ``repeats`` at most, stopping from :data:`MIN_ROUNDS` on once every sparse form is
    clearly faster or clearly not (:func:`verdict`). With ``shared`` (a dict kept across calls), a layer with the
    same weight shape, input shape and layout, bias and working forms as one timed before (``name``), and non-zeros
    within :data:`SHARE_NNZ`, takes that layer's times instead of being timed again (a transformer's blocks).
    """
    device = layer.weight.device
    want = layer(x)
    forms, notes = _candidates(layer, device)
    built: dict[str, nn.Module] = {}
    for form, make in forms.items():
        try:
            module = make()
            if outputs_match(module(x), want):
                built[form] = module
            else:
                notes.append(f"{form} output differs from dense: not used")
        except Exception as error:  # noqa: BLE001 - a kernel missing for this dtype/device/shape, whatever it raises
            notes.append(f"{form} unavailable: {str(error).splitlines()[0][:120]}")
    if not built:
        return Choice("dense", layer, None, None, "; ".join(notes) or "no sparse kernel applies")
    key = (tuple(layer.weight.shape), tuple(x.shape), x.stride(), x.dtype, str(device), layer.bias is not None, tuple(sorted(built)))
    nnz = int(layer.weight.count_nonzero())
    reused = _shared(shared, key, nnz) if shared is not None else None
    if reused is not None:
        times, source = reused.times, f"; times shared with {reused.name} (same shape and input, non-zeros within {SHARE_NNZ:.0%})"
    else:
        functions = {"dense": lambda: layer(x), **{form: (lambda m=m: m(x)) for form, m in built.items()}}
        samples = timings(functions, repeats, device, settled=lambda t: all(verdict(t[form], t["dense"]) is not None for form in built))
        times, source = {form: statistics.median(values) for form, values in samples.items()}, ""
        if shared is not None:
            shared.setdefault(key, []).append(Timed(name, nnz, times))
    best = min(built, key=lambda form: times[form])
    dense_ms, sparse_ms = times["dense"], times[best]
    measured = f"{best} {sparse_ms:.4f} ms vs dense {dense_ms:.4f} ms ({dense_ms / sparse_ms:.2f}×){source}"
    notes = [measured] + notes
    if kernel == "sparse" or sparse_ms < MARGIN * dense_ms:
        why = "faster" if sparse_ms < MARGIN * dense_ms else "kernel='sparse'"
        return Choice(best, built[best], dense_ms, sparse_ms, f"{why}: " + "; ".join(notes))
    return Choice("dense", layer, dense_ms, sparse_ms, "dense is faster: " + "; ".join(notes))
