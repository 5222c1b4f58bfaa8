"""What every ``lightning-sparse`` subcommand shares: one flag style, one error line, the ``--trust`` option.

Flags are spelled with underscores, as LightningCLI spells its own (``--print_config``, ``--seed_everything``);
the hyphen spelling of a multi-word flag (``--max-trials``) is accepted as the same option.
"""

from __future__ import annotations

import argparse
from typing import Any

#: What a bad file or argument raises in the library: the subcommands print it as one line and exit with 2.
INPUT_ERRORS = (ValueError, TypeError, OSError)


def spellings(name: str) -> list[str]:
    """``"max_trials"`` → ``["--max_trials", "--max-trials"]``: the flag, then its hyphen spelling if it differs."""
    flag = "--" + name.lstrip("-").replace("-", "_")
    hyphen = flag[:2] + flag[2:].replace("_", "-")
    return [flag] if hyphen == flag else [flag, hyphen]


def add_flag(parser: Any, name: str, **kwargs: Any) -> Any:
    """``parser.add_argument`` for the flag ``name`` under both spellings (argparse or jsonargparse parsers);
    the value lands under the underscore name (``parsed.max_trials``)."""
    return parser.add_argument(*spellings(name), **kwargs)


def fail(parser: argparse.ArgumentParser, error: BaseException | str, *paths: str) -> None:
    """Exit with code 2 and one line naming the file and what is wrong with it (no traceback)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    if paths and not any(str(path) in text for path in paths):
        text = f"{paths[0]}: {text}"
    parser.exit(2, f"{parser.prog}: error: {text}\n")


def check_checkpoint(parser: argparse.ArgumentParser, path: str) -> None:
    """Exit with one line saying what ``path`` is when it is not a checkpoint file or folder (without reading it)."""
    from lightning_sparse.export import check_checkpoint_path

    try:
        check_checkpoint_path(path)
    except INPUT_ERRORS as error:
        fail(parser, error, path)


def checkpoint_parser(command: str, description: str, checkpoint_help: str) -> argparse.ArgumentParser:
    """The parser of a subcommand that reads a checkpoint: ``lightning-sparse COMMAND CHECKPOINT ... [--trust]``."""
    parser = argparse.ArgumentParser(prog=f"lightning-sparse {command}", description=description)
    parser.add_argument("checkpoint", help=checkpoint_help)
    add_trust_flag(parser)
    return parser


def parse_checkpoint_args(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """``parser.parse_args(args)``, refusing a ``checkpoint`` that is not a file."""
    parsed = parser.parse_args(args)
    check_checkpoint(parser, parsed.checkpoint)
    return parsed


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust", action="store_true",
        help="unpickle the checkpoint in full, which runs any code it holds: only for files you made or trust "
        "(default: weights only, which is all a Lightning checkpoint needs)",
    )  # fmt: skip


def at_least_one(parser: argparse.ArgumentParser, parsed: argparse.Namespace, *names: str) -> None:
    """Refuse ``--NAME`` values below 1, naming the flag."""
    for name in names:
        value = getattr(parsed, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
