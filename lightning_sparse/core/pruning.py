"""Magnitude pruning step shared by the pruning callbacks: rank, allocate, write exact masks.

Unstructured layers rank single weights by |w|; ``channel`` layers rank whole output channels by their L1/L2 norm;
``N:M`` layers prune within groups of M (see :mod:`lightning_sparse.core.structured`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from lightning_sparse.core.allocation import round_half_up, zero_counts
from lightning_sparse.core.criteria import exact_mask, magnitude
from lightning_sparse.core.masks import MaskSet
from lightning_sparse.core.structured import Granularity, channel_mask, channels_to_prune, nm_mask


def prune_by_magnitude(
    masks: MaskSet,
    sparsity: float | Mapping[str, float],
    distribution: str = "uniform",
    granularity: Mapping[str, Granularity] | None = None,
    channel_norm: str = "l1",
    power_scale: float = 1.0,
    skip: Collection[str] = (),
    channel_multiple: int = 1,
) -> dict[str, int]:
    """Prune the masked parameters to ``sparsity`` (or ``{name: sparsity}``); return the zeros written per parameter.

    Already-pruned weights (or channels) rank lowest, so raising the sparsity never revives one (Zhu & Gupta).
    ``granularity`` maps parameter names to their :class:`Granularity` (missing names: unstructured). A channel
    layer prunes ``round(sparsity × out_channels)`` whole channels; an N:M layer prunes ``round(sparsity × numel)``
    weights, never more than M - N per group. ``distribution`` (``uniform``, ``global``, ``erk``) allocates a single
    ``sparsity`` over the unstructured layers (also ``er``, with ERK's ``power_scale``); structured layers take
    ``sparsity`` as it is. Parameters in ``skip`` are left as they are (coupled channel groups prune those).
    ``channel_multiple``: channel layers keep a multiple of it (:func:`~lightning_sparse.core.structured.channels_to_prune`).
    """
    granularity = granularity or {}
    names = [name for name in masks if name not in skip]
    structured = {name: granularity[name] for name in names if name in granularity and granularity[name].kind != "unstructured"}
    plain = [name for name in names if name not in structured]
    structured = {name: g for name, g in structured.items() if g.kind not in ("head", "neuron")}  # core/heads.py prunes those
    scores = {name: magnitude(masks.weight(name), masks.mask(name)) for name in plain}  # whole tensors, even sharded
    counts = zero_counts(distribution, scores, sparsity, power_scale=power_scale) if scores else {}
    for name, score in scores.items():
        masks.set(name, exact_mask(score, counts[name]))
    for name, kind in structured.items():
        weight = masks.weight(name)
        target = sparsity[name] if isinstance(sparsity, Mapping) else sparsity
        if kind.kind == "channel":
            outputs = weight.shape[kind.axis or 0]
            mask = channel_mask(weight, channels_to_prune(name, target, outputs, channel_multiple), channel_norm, masks.mask(name), kind.axis or 0)
        else:
            limit = weight.numel() // kind.m * (kind.m - kind.n)
            mask = nm_mask(weight, kind.n, kind.m, min(round_half_up(target * weight.numel()), limit), masks.mask(name), kind.axis or 0)
        masks.set(name, mask)
        counts[name] = int((~mask).sum())
    return counts
