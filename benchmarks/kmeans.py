"""k-means codebooks: distortion of Lloyd's iteration from linear seeds (the code before 0.x) and of
:func:`~lightning_sparse.core.quantize.kmeans_1d` against the exact optimum, and the time ``kmeans_1d`` takes.

Inputs (``--n`` values each, seed 0): Gaussian weights at k = 16, Laplace weights at k = 16, the non-zeros of a
Gaussian layer pruned to 90% by magnitude at k = 8, and Gaussian weights with one outlier at 50σ at k = 16. The
exact optimum is the dynamic program over all distinct values whatever its cost. Then timings of ``kmeans_1d`` on
``--n`` Gaussian values at k = 16 and k = 256 (median of ``--repeats``).

Run from the repository root::

    .venv/bin/python -m benchmarks.kmeans [--n 266000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.table import Table

from benchmarks.common import emit
from lightning_sparse.core.quantize import _centroids, _optimal_bounds, distortion, kmeans_1d, lloyd_1d


def exact_optimum(values: torch.Tensor, k: int) -> float:
    distinct, counts = torch.unique(values.double(), return_counts=True)
    offset = distinct.mean()
    x, w = distinct - offset, counts.double()
    return distortion(values, _centroids(x, w, _optimal_bounds(x, w, k)) + offset)


def inputs(n: int) -> dict[str, tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(n, generator=g) * 0.05
    laplace = torch.distributions.Laplace(0.0, 0.05).sample((n,))
    dense = torch.randn(n * 10 // 9, generator=g) * 0.05
    pruned = dense[dense.abs() > dense.abs().kthvalue(int(0.9 * dense.numel())).values]
    outlier = gaussian.clone()
    outlier[0] = 2.5  # 50 sigma
    return {"gaussian k=16": (gaussian, 16), "laplace k=16": (laplace, 16), "pruned non-zeros k=8": (pruned, 8),
            "one outlier k=16": (outlier, 16)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=266_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    table = Table("input", "n", "k", "Lloyd (linear seeds) / optimum", "empty clusters (Lloyd)", "kmeans_1d / optimum")
    rows = []
    for label, (values, k) in inputs(args.n).items():
        optimum = exact_optimum(values, k)
        seeds = torch.linspace(0, 1, k) * (values.max() - values.min()) + values.min()
        lloyd = lloyd_1d(values, seeds)
        codes = torch.bucketize(values, (lloyd[1:] + lloyd[:-1]) / 2)
        empty = k - int(torch.unique(codes).numel())
        ours = kmeans_1d(values, k)
        row = {"input": label, "n": values.numel(), "k": k, "lloyd_ratio": distortion(values, lloyd) / optimum,
               "lloyd_empty": empty, "kmeans_1d_ratio": distortion(values, ours) / optimum}  # fmt: skip
        rows.append(row)
        table.add_row(label, str(row["n"]), str(k), f"{row['lloyd_ratio']:.3f}", str(empty), f"{row['kmeans_1d_ratio']:.6f}")
    timings = []
    values = torch.randn(args.n, generator=torch.Generator().manual_seed(1)) * 0.05
    for k in (16, 256):
        times = []
        for _ in range(args.repeats):
            begin = time.perf_counter()
            codebook = kmeans_1d(values, k)
            times.append(time.perf_counter() - begin)
        ratio = distortion(values, codebook) / exact_optimum(values, k)
        timings.append({"n": args.n, "k": k, "seconds": statistics.median(times), "ratio": ratio})
        table.add_row(f"time: gaussian k={k}", str(args.n), str(k), "", "", f"{ratio:.6f} in {statistics.median(times):.2f} s")
    emit("kmeans", table, {"distortion": rows, "timings": timings})


if __name__ == "__main__":
    main()
