"""``lightning-sparse export CKPT OUT [--trust]``: a checkpoint's weights as one compressed, bit-exact file."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_sparse import export
from lightning_sparse.cli.args import INPUT_ERRORS, add_trust_flag, fail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-sparse export",
        description="Save a checkpoint's weights as one compressed, bit-exact file "
        "(read it back with lightning_sparse.export.load_compressed).",
    )
    parser.add_argument("checkpoint", help="a Lightning .ckpt (or a saved state dict)")
    parser.add_argument("output", help="the compressed file to write")
    add_trust_flag(parser)
    return parser


def main(args: list[str]) -> None:
    parser = build_parser()
    parsed = parser.parse_args(args)
    if not Path(parsed.checkpoint).is_file():
        parser.error(f"checkpoint {parsed.checkpoint} does not exist")
    try:
        export.save_compressed(parsed.checkpoint, parsed.output, verbose=True, trusted=parsed.trust)
    except INPUT_ERRORS as error:
        fail(parser, error, parsed.checkpoint, parsed.output)
