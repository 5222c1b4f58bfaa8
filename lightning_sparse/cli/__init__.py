"""The ``lightning-sparse`` command: LightningCLI's ``fit``/``validate``/``test``/``predict`` (:class:`SparseCLI`,
in :mod:`lightning_sparse.cli.fit`) plus ``report``, ``export``, ``sweep`` and ``deploy``, one module each.

:data:`COMMANDS` is the one dispatch table; a subcommand's module is imported only when that subcommand runs.
Nothing else in the package imports from here (import arrows point down: core ← callbacks ← cli).
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Any

from lightning_sparse import wandb_mode

#: Our own subcommands → the module whose ``main(args)`` runs it; every other first argument goes to LightningCLI.
COMMANDS: dict[str, str] = {
    "report": "lightning_sparse.cli.report",
    "export": "lightning_sparse.cli.export",
    "sweep": "lightning_sparse.cli.sweep",
    "deploy": "lightning_sparse.cli.deploy",
}

#: Names importable from ``lightning_sparse.cli`` (as when it was one module), loaded on first use.
_LAZY = {
    "SparseCLI": ("lightning_sparse.cli.fit", "SparseCLI"),
    "DESCRIPTION": ("lightning_sparse.cli.fit", "DESCRIPTION"),
    "report_main": ("lightning_sparse.cli.report", "main"),
    "export_main": ("lightning_sparse.cli.export", "main"),
    "sweep_main": ("lightning_sparse.cli.sweep", "main"),
    "deploy_main": ("lightning_sparse.cli.deploy", "main"),
}

__all__ = ["COMMANDS", "SparseCLI", "main"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(import_module(module), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-sparse`` command."""
    command_line = args is None
    args = sys.argv[1:] if command_line else list(args)
    wandb_mode.default_to_offline()
    if args and args[0] in COMMANDS:
        import_module(COMMANDS[args[0]]).main(args[1:])
        return
    from lightning_sparse.cli.fit import SparseCLI

    cli_args = None if command_line else args  # LightningCLI warns when given both sys.argv and args
    SparseCLI(model_class=None, datamodule_class=None, args=cli_args, save_config_kwargs={"overwrite": True})
