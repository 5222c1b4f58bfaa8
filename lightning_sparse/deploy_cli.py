"""Deprecated: the ``deploy`` subcommand now lives in :mod:`lightning_sparse.cli.deploy` (same names)."""

from __future__ import annotations

import warnings

from lightning_sparse.cli.deploy import DEFAULT_MODEL, deploy_main, example_input, main

warnings.warn(
    "lightning_sparse.deploy_cli is deprecated and will be removed in the next release: "
    "use lightning_sparse.cli.deploy (deploy_main is now lightning_sparse.cli.deploy.main)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["DEFAULT_MODEL", "deploy_main", "example_input", "main"]
