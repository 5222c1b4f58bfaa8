"""Coupled channel groups for the pruning callbacks: find them once at ``setup`` (on one example input) and mask
their companions (biases, BatchNorm affine entries) with the weights. The algorithm is
:mod:`lightning_sparse.core.groups`; this file only finds the example input and wires the result in."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn

from lightning_sparse.compat import train_dataloader
from lightning_sparse.core.groups import GroupedChannels, find_groups
from lightning_sparse.core.heads import GroupSet
from lightning_sparse.core.masks import MaskSet


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


def check_readers(trainer: pl.Trainer, pl_module: pl.LightningModule, heads: GroupSet) -> None:
    """Refuse recurrent units whose reader (found by module order) does not read the recurrent output, checked on the
    example input (:func:`lightning_sparse.structure.recurrent.check_readers`)."""
    if not any(layer.pattern == "recurrent:rnn" for layer in heads.layers):
        return
    from lightning_sparse.structure.recurrent import check_readers as check

    inputs = example_input(trainer, pl_module)
    device = next(iter(pl_module.parameters())).device
    check(pl_module, heads.layers, tuple(x.to(device) for x in inputs) if inputs else None)


def setup_channel_groups(callback: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> GroupedChannels | None:
    """The coupled groups of the callback's ``channel``-granularity targets (``None`` when it has none); their
    companions join its :class:`MaskSet` (so they are masked, checkpointed and restored like the weights)."""
    channel = [name for name, g in callback._granularity.items() if g.kind == "channel"]
    if not channel:
        return None
    inputs = example_input(trainer, pl_module)
    device = next(iter(callback.masks.params.values())).device
    plan = find_groups(pl_module, tuple(x.to(device) for x in inputs) if inputs else None)
    params = dict(pl_module.named_parameters())
    excluded = [name for name in params if callback.exclude and any(fnmatchcase(name, p) for p in callback.exclude)]
    grouped = GroupedChannels(plan, callback.targets, channel, params, excluded)
    if grouped.companions:
        callback.masks = MaskSet({**callback.masks.params, **grouped.companions})
        callback.compressed = {name: frozenset({"zeros"}) for name in callback.masks}
        callback._refuse_overlaps(trainer)
    if callback.verbose:
        rank_zero_only(print)(f"{type(callback).__name__}: {grouped.summary()}")
    warn_if_output_is_pruned(callback, grouped)
    if grouped.unpruned:
        rank_zero_warn(
            f"{type(callback).__name__}: {len(grouped.unpruned)} layer(s) with granularity 'channel' stay dense because "
            f"their channel coupling is not proved: "
            + "; ".join(f"{name}: {reason}" for name, reason in grouped.unpruned.items())
        )
    return grouped


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
