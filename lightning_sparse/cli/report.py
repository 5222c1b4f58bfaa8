"""``lightning-sparse report CKPT [--plot FILE.png] [--trust]``: per-layer sparsity of a checkpoint."""

from __future__ import annotations

import argparse

from lightning_sparse import report
from lightning_sparse.cli.args import INPUT_ERRORS, checkpoint_parser, fail, parse_checkpoint_args


def build_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser("report", "Per-layer sparsity of a checkpoint.",
                               "a Lightning .ckpt (or a saved state dict, or a compressed export)")  # fmt: skip
    parser.add_argument("--plot", metavar="FILE.png", help="also draw per-layer sparsity as a bar chart")
    return parser


def main(args: list[str]) -> None:
    parser = build_parser()
    parsed = parse_checkpoint_args(parser, args)
    try:
        stats = report.checkpoint_stats(parsed.checkpoint, trusted=parsed.trust)
    except INPUT_ERRORS as error:
        fail(parser, error, parsed.checkpoint)
    report.print_table(report.sparsity_table(stats, title=f"Sparsity per layer: {parsed.checkpoint}"))
    if parsed.plot:
        try:
            print(f"Plot saved to {report.plot_sparsity(stats, parsed.plot, title=str(parsed.checkpoint))}")
        except INPUT_ERRORS as error:
            fail(parser, error, parsed.plot)
