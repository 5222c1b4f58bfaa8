"""How long ``deploy`` takes to choose kernels for a sparse CharGPT, and what it returns.

nanoGPT's baby GPT (``CharGPT()``: 4 layers, 4 heads, 128 dims, block 64) with every block Linear pruned to
``--sparsity`` by magnitude (one threshold per layer; the tied head/embedding stays dense). The weights are the
initial ones: which kernel is fastest depends on shapes and sparsity, not on training. For each batch size
(``--batches``, windows of 64 characters), ``deploy_model`` runs ``--rounds`` times; the table gives the median
wall time of a deploy, the variant returned (``input``, ``dense layers``, ``deployed``: see
``lightning_sparse.deployment.fallback.decide``), the whole-model medians behind that choice, the whole-model runs
it took, the layers made sparse and the layers that reused another layer's timings.

Run from the repository root (about a minute at the defaults on a quiet CPU core)::

    .venv/bin/python -m benchmarks.deploy_time [--batches 1 12 64] [--sparsity 0.9] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.table import Table
from torch import nn

from benchmarks.common import emit, quiet
from lightning_sparse.deployment import deploy_model
from lightning_sparse.models import CharGPT


def sparse_chargpt(sparsity: float, seed: int = 0) -> CharGPT:
    """A baby-GPT CharGPT whose block Linear weights keep their largest ``1 - sparsity`` magnitudes."""
    torch.manual_seed(seed)
    model = CharGPT().eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) is nn.Linear and "lm_head" not in name:
                weight = module.weight
                weight[weight.abs() <= weight.abs().flatten().kthvalue(int(sparsity * weight.numel())).values] = 0
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 12, 64])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30, help="deploy's `repeats` (the most interleaved runs per comparison)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    model = sparse_chargpt(args.sparsity)
    rows = []
    for batch in args.batches:
        x = torch.randint(0, model.hparams.vocab_size, (batch, model.hparams.block_size), generator=torch.Generator().manual_seed(batch))
        seconds, report = [], None
        for _ in range(args.rounds):
            started = time.perf_counter()
            report = deploy_model(model, x, repeats=args.repeats).report
            seconds.append(time.perf_counter() - started)
        rows.append({
            "batch": batch, "deploy_s": statistics.median(seconds), "deploy_s_all": seconds, "returned": report.returned,
            "decision": report.decision, "variant_ms": report.variant_ms,
            "whole_model_runs": len(next(iter(report.variant_runs.values()))),
            "sparse_layers": sum(row.deployed_as not in ("dense", "thinned", "unused") for row in report.layers),
            "shared_layers": sum("times shared" in row.reason for row in report.layers),
            "layers": len(report.layers),
        })  # fmt: skip
    table = Table(title=f"deploy of a {args.sparsity:.0%}-sparse CharGPT (baby GPT), {args.threads} thread(s), repeats {args.repeats}")
    for column in ("batch", "deploy s (median)", "returned", "input ms", "dense layers ms", "deployed ms", "whole-model runs",
                   "sparse layers", "layers sharing times"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in rows:
        ms = r["variant_ms"]
        table.add_row(str(r["batch"]), f"{r['deploy_s']:.1f}", r["returned"], f"{ms['input']:.2f}",
                      f"{ms['dense layers']:.2f}" if "dense layers" in ms else "-", f"{ms['deployed']:.2f}",
                      str(r["whole_model_runs"]), f"{r['sparse_layers']}/{r['layers']}", str(r["shared_layers"]))  # fmt: skip
    emit("deploy_time", table, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
