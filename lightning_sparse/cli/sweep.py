"""``lightning-sparse sweep --config SWEEP.yaml [--max_trials N] [--parallel N] [--output DIR] [--resume]
[--launcher local|ray] [--export_wandb FILE]``: an Ax search over compression settings."""

from __future__ import annotations

import argparse
import sys

from lightning_sparse.cli.args import add_flag, at_least_one, fail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-sparse sweep",
        description="Search compression settings with Ax (Sobol, then BoTorch): every trial is a `lightning-sparse fit` "
        "run; finds the best objective (default: smallest compressed export) that meets the constraints "
        "(default: val_acc >= baseline - 0.005, the baseline from a dense run).",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="the sweep file (see examples/sweep_digits.yaml)")
    add_flag(parser, "max_trials", type=int, metavar="N", help="trials in all, resumed ones included (default: the file's, else 10)")
    parser.add_argument("--parallel", type=int, metavar="N", help="trials at once (default: the file's, else 1)")
    add_flag(parser, "force_parallel", action="store_true",
             help="allow --parallel above this machine's cores (a launcher with more, such as a Ray cluster)")
    parser.add_argument("--output", metavar="DIR", help="results folder (default: sweeps/<name>)")
    parser.add_argument("--resume", action="store_true", help="continue the sweep saved in the output folder")
    parser.add_argument("--launcher", choices=("local", "ray"), default="local", help="where trials run (default: local)")
    add_flag(parser, "export_wandb", metavar="FILE", help="only write a W&B sweep config for agents, run nothing")
    return parser


def main(args: list[str]) -> None:
    parser = build_parser()
    parsed = parser.parse_args(args)
    at_least_one(parser, parsed, "max_trials", "parallel")
    import yaml

    from lightning_sparse.sweep.config import load_sweep

    try:
        sweep = load_sweep(parsed.config, instantiate=not parsed.export_wandb)  # the export builds nothing
        if parsed.export_wandb:
            from lightning_sparse.sweep.wandb_sweep import export_wandb_sweep

            print(f"W&B sweep config written to {export_wandb_sweep(sweep, parsed.export_wandb)}")
            return
        from lightning_sparse.sweep.runner import run_sweep

        result = run_sweep(sweep, max_trials=parsed.max_trials, parallel=parsed.parallel, output=parsed.output,
                           resume=parsed.resume, launcher=parsed.launcher, force_parallel=parsed.force_parallel)  # fmt: skip
    except (ValueError, OSError, yaml.YAMLError) as error:
        fail(parser, error, parsed.config)
    if result.best is None:
        sys.exit(1)
