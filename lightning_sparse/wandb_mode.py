"""W&B without an account: offline unless a key is configured, and say where the run went.

Imports neither Lightning nor W&B at module level: every ``lightning-sparse`` subcommand calls
:func:`default_to_offline`, and ``report``/``export``/``deploy`` must start without them.
"""

from __future__ import annotations

import netrc
import os
import shlex
from pathlib import Path

from lightning_sparse.compat import wandb_run_started


def has_wandb_key() -> bool:
    """True when ``WANDB_API_KEY`` is set or ``~/.netrc`` holds a login for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def default_to_offline() -> str:
    """Set ``WANDB_MODE=offline`` unless the user chose a mode or has a key; return the mode in force."""
    if "WANDB_MODE" not in os.environ and not has_wandb_key():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


def sync_command(run_dir: str | os.PathLike) -> str:
    """The shell command that uploads an offline run, its folder quoted (a folder name may hold spaces or ``;``)."""
    return f"wandb sync {shlex.quote(str(run_dir))}"


def announce_runs(loggers: list) -> None:
    """Print the local folder of every W&B run and how to upload an offline one."""
    from pytorch_lightning.loggers import WandbLogger
    from pytorch_lightning.utilities import rank_zero_info

    for logger in loggers:
        if isinstance(logger, WandbLogger) and wandb_run_started(logger):
            run_dir = Path(logger.experiment.dir).parent
            if os.environ.get("WANDB_MODE") == "offline":
                rank_zero_info(f"W&B run saved offline in {run_dir} (upload later with `{sync_command(run_dir)}`)")
            else:
                rank_zero_info(f"W&B run: {logger.experiment.url} (local files in {run_dir})")
