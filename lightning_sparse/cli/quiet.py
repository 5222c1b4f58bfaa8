"""The ``fit``/``validate``/``test``/``predict`` commands print their own lines only: no Lightning "💡 Tip"
advertisements, no third-party deprecation warnings the user cannot act on, no W&B banner (the command says itself
where the run went, see :func:`lightning_sparse.wandb_mode.announce_runs`)."""

from __future__ import annotations

import logging
import os
import warnings

#: Loggers Lightning's ``rank_zero_info`` writes to (both packages).
RANK_ZERO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                     "lightning_fabric.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")  # fmt: skip


class DropTips(logging.Filter):
    """Drop Lightning's "💡 Tip: ... try installing ..." lines (advertisements for other packages)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_third_party() -> None:
    """Silence what the command's user cannot act on. ``WANDB_SILENT`` is only set when the user has not set it."""
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropTips) for f in logger.filters):
            logger.addFilter(DropTips())
    # Lightning 2.6 calls torch's deprecated `isinstance(treespec, LeafSpec)` on every fit (fixed upstream)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # W&B's banner, its "anonymous setting has no effect" warning and its colour-coded sync hint
    os.environ.setdefault("WANDB_SILENT", "true")


def quiet_loggers(loggers: list) -> None:
    """Per logger: a ``WandbLogger`` no longer passes W&B the ``anonymous=None`` it warns about."""
    from lightning_sparse.compat import drop_unset_wandb_anonymous

    for logger in loggers:
        drop_unset_wandb_anonymous(logger)
