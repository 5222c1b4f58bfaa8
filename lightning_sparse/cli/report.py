"""``lightning-sparse report CKPT [--plot FILE.png] [--trust]``: per-layer sparsity of a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_sparse import report
from lightning_sparse.cli.args import INPUT_ERRORS, add_trust_flag, fail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-sparse report", description="Per-layer sparsity of a checkpoint.")
    parser.add_argument("checkpoint", help="a Lightning .ckpt (or a saved state dict, or a compressed export)")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw per-layer sparsity as a bar chart")
    add_trust_flag(parser)
    return parser


def main(args: list[str]) -> None:
    parser = build_parser()
    parsed = parser.parse_args(args)
    if not Path(parsed.checkpoint).is_file():
        parser.error(f"checkpoint {parsed.checkpoint} does not exist")
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
