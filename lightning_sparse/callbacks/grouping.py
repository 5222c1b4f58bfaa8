"""Coupled channel groups for the pruning callbacks: the example input the pruner traces at ``setup`` and what is
said about the groups it found. The algorithm is :mod:`lightning_sparse.core.groups`, used by
:class:`lightning_sparse.core.pruners.MagnitudePruner`; this file only finds the example input and reports."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn

from lightning_sparse.compat import train_dataloader
from lightning_sparse.core.groups import GroupedChannels


def example_input(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[torch.Tensor, ...] | None:
    """``pl_module.example_input_array``, else the input of the first training batch (``batch[0]`` of a tuple/list
    batch, or a tensor batch), read from a fresh iterator with the random state restored (the run is unchanged)."""
    given = getattr(pl_module, "example_input_array", None)
    if isinstance(given, torch.Tensor):
        return (given,)
    if isinstance(given, (tuple, list)) and given and all(isinstance(x, torch.Tensor) for x in given):
        return tuple(given)
    try:
        loader = train_dataloader(trainer, pl_module)
        if loader is None:
            return None
        with torch.random.fork_rng(devices=[]):
            batch = next(iter(loader))
    except Exception:  # noqa: BLE001 - no loader yet, an iterable without len, ...: no example input
        return None
    if isinstance(batch, torch.Tensor):
        return (batch[:2],)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0][:2],)
    return None


def report_channel_groups(callback: Any, grouped: GroupedChannels | None) -> None:
    """Say what the pruner's coupled channel groups are (when ``verbose``), and warn about a group reaching the
    model's output and about ``channel`` layers left dense because their coupling is not proved."""
    if grouped is None:
        return
    if callback.verbose:
        rank_zero_only(print)(f"{type(callback).__name__}: {grouped.summary()}")
    warn_if_output_is_pruned(callback, grouped)
    if grouped.unpruned:
        rank_zero_warn(
            f"{type(callback).__name__}: {len(grouped.unpruned)} layer(s) with granularity 'channel' stay dense because "
            f"their channel coupling is not proved: "
            + "; ".join(f"{name}: {reason}" for name, reason in grouped.unpruned.items())
        )


#: The reason :mod:`lightning_sparse.core.groups` gives a group whose channels are the model's output.
REACHES_OUTPUT = "reach the model's output"


def warn_if_output_is_pruned(callback: Any, grouped: GroupedChannels) -> None:
    """Warn when channel pruning scores a group whose channels are the model's output (a classifier's classes, a
    language model's vocabulary): pruning it zeroes whole outputs, which is almost never meant."""
    reached = [names for group, names in grouped.selected if REACHES_OUTPUT in group.reason]
    if reached:
        layers = sorted({name for names in reached for name in names})
        rank_zero_warn(
            f"{type(callback).__name__}: channel pruning reaches the model's output layer ({', '.join(layers)}): its "
            f"pruned channels are whole outputs (classes, logits) that will always be 0. Leave it dense with "
            f"`exclude={layers!r}`"
        )
