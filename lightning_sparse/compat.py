"""The private Lightning/W&B attributes the library reads, in one place, each with a public fallback.

Lightning has no public name for them: the step its own logger connector logs at, the training data source before
the loop opens it, and whether a ``WandbLogger`` has started its run (``logger.experiment`` would start one).
``tests/test_compat.py`` checks on the installed versions that each private path still exists, so a release that
renames one fails there and not silently here. Importing this module imports nothing.
"""

from __future__ import annotations

from typing import Any


def logged_step(trainer: Any) -> int:
    """The step Lightning's own ``self.log`` metrics go to (optimizer steps taken, counted once per
    ``accumulate_grad_batches``): ``fit_loop.epoch_loop._batches_that_stepped``, else ``trainer.global_step``."""
    step = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "_batches_that_stepped", None)
    return int(step) if isinstance(step, int) else int(trainer.global_step)


def train_dataloader(trainer: Any, pl_module: Any) -> Any:
    """The training loader as ``Trainer.fit`` will open it, available from ``setup`` on (``trainer.train_dataloader``
    is only set later): the fit loop's ``_data_source``, else the datamodule's or the module's ``train_dataloader()``;
    ``None`` when none is defined."""
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    if source is not None and hasattr(source, "is_defined") and hasattr(source, "dataloader"):
        return source.dataloader() if source.is_defined() else None
    for owner in (getattr(trainer, "datamodule", None), pl_module):
        method = getattr(owner, "train_dataloader", None)
        if callable(method):
            return method()
    return None


def wandb_run_started(logger: Any) -> bool:
    """Whether a ``WandbLogger`` has created its run already (reading ``logger.experiment`` would create one):
    its ``_experiment`` attribute, else ``False``."""
    return getattr(logger, "_experiment", None) is not None


def drop_unset_wandb_anonymous(logger: Any) -> None:
    """Leave W&B's deprecated ``anonymous`` setting out of a ``WandbLogger``'s ``wandb.init`` arguments when it is
    unset: the logger passes ``anonymous=None`` and W&B then warns "The anonymous setting has no effect" on every
    run. Reads the logger's ``_wandb_init``; does nothing when it has none."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous", "given") is None:
        del init["anonymous"]
