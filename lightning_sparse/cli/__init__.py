"""The ``lightning-sparse`` command: LightningCLI's ``fit``/``validate``/``test``/``predict`` (``SparseCLI``, in
``lightning_sparse.cli.fit``) plus ``report``, ``export``, ``sweep`` and ``deploy``, one module each.

[COMMANDS][lightning_sparse.cli.COMMANDS] is the one dispatch table. This module imports only the standard library
and a subcommand's module is imported only when that subcommand runs, so ``lightning-sparse --help``, ``report``,
``export`` and ``deploy --help`` start without Lightning, W&B or transformers. Nothing else in the package imports
from here (import arrows point down: core ← callbacks ← cli).
"""

from __future__ import annotations

import sys
from importlib import import_module

#: Our own subcommands → the module whose ``main(args)`` runs it; every other first argument goes to LightningCLI.
COMMANDS: dict[str, str] = {
    "report": "lightning_sparse.cli.report",
    "export": "lightning_sparse.cli.export",
    "sweep": "lightning_sparse.cli.sweep",
    "deploy": "lightning_sparse.cli.deploy",
}

#: Every subcommand with its one-line summary, in the order ``--help`` lists them.
SUMMARIES: dict[str, str] = {
    "fit": "train with compression callbacks (LightningCLI; --compare_dense trains a dense baseline too)",
    "validate": "validate a model (LightningCLI)",
    "test": "test a model (LightningCLI)",
    "predict": "predict with a model (LightningCLI)",
    "report": "per-layer sparsity of a checkpoint or a compressed export",
    "export": "a checkpoint's weights as one compressed, bit-exact file",
    "sweep": "an Ax search for the most compressed model that meets an accuracy constraint",
    "deploy": "a model rebuilt to run faster: pruned channels removed, sparse kernels where measured faster",
}

__all__ = ["COMMANDS", "SUMMARIES", "main", "usage"]


def usage() -> str:
    """The top-level help: every subcommand and how to get its own help."""
    width = max(map(len, SUMMARIES))
    lines = [f"    {name:<{width}}  {summary}" for name, summary in SUMMARIES.items()]
    return (
        "usage: lightning-sparse {" + ",".join(SUMMARIES) + "} ...\n\n"
        "Sparsify and compress models inside an ordinary PyTorch Lightning Trainer.fit.\n\n"
        "subcommands:\n" + "\n".join(lines) + "\n\n"
        "`lightning-sparse SUBCOMMAND --help` describes one. Our flags are spelled with underscores\n"
        "(--compare_dense, --max_trials); the hyphen spelling is accepted too.\n"
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-sparse`` command."""
    command_line = args is None
    args = sys.argv[1:] if command_line else list(args)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        if not args:
            sys.exit(2)  # a subcommand is required
        return
    from lightning_sparse import wandb_mode

    wandb_mode.default_to_offline()
    if args[0] in COMMANDS:
        import_module(COMMANDS[args[0]]).main(args[1:])
        return
    from lightning_sparse.cli.quiet import quiet_third_party

    quiet_third_party()
    from lightning_sparse.cli.fit import SparseCLI

    cli_args = None if command_line else args  # LightningCLI warns when given both sys.argv and args
    SparseCLI(model_class=None, datamodule_class=None, args=cli_args, save_config_kwargs={"overwrite": True})
