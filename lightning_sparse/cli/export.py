"""``lightning-sparse export CKPT OUT [--trust]``: a checkpoint's weights as one compressed, bit-exact file."""

from __future__ import annotations

import argparse

from lightning_sparse import export
from lightning_sparse.cli.args import INPUT_ERRORS, checkpoint_parser, fail, parse_checkpoint_args


def build_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(
        "export",
        "Save a checkpoint's weights as one compressed, bit-exact file "
        "(read it back with lightning_sparse.export.load_compressed).",
        "a Lightning .ckpt (or a saved state dict)",
    )
    parser.add_argument("output", help="the compressed file to write")
    return parser


def main(args: list[str]) -> None:
    parser = build_parser()
    parsed = parse_checkpoint_args(parser, args)
    try:
        export.save_compressed(parsed.checkpoint, parsed.output, verbose=True, trusted=parsed.trust)
    except INPUT_ERRORS as error:
        fail(parser, error, parsed.checkpoint, parsed.output)
