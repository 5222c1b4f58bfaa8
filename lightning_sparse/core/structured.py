"""Structured pruning granularities: whole output channels (filters / neurons) and N:M groups.

``channel``: a layer's output channels (rows of a Linear weight, filters of a Conv weight) ranked by the L1 or L2
norm of their weights and pruned whole (Condensa's FilterPrune / NeuronPrune; Li et al. 2017, arXiv 1608.08710).
``N:M``: every group of M consecutive weights along the input dimension (the weight viewed as
``(out_channels, -1)``) keeps at most N, the largest magnitudes (Mishra et al. 2021, arXiv 2104.08378), the
pattern NVIDIA's sparse tensor cores run as 2:4.

Both follow the layer's real output axis (its :class:`~lightning_sparse.core.layouts.Layout`): 0 for Linear, Conv,
attention, LSTM/GRU/RNN and Bilinear weights, 1 for Hugging Face's GPT-2 ``Conv1D`` (weight stored ``(in, out)``) and
for a ``ConvTranspose`` (weight stored ``(in, out/groups, k…)``) and a mixture of experts' 3-D weight ``(experts, out,
in)`` (its expert axis is no input: M must divide one expert's ``in``), so a "channel" is always an output unit and N:M
groups always run along the inputs of one output unit.

Masks are plain boolean tensors shaped like the weight, so they live in :class:`~lightning_sparse.core.masks.MaskSet`
like any other mask.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from lightning_sparse.core.allocation import round_half_up
from lightning_sparse.core.criteria import exact_mask
from lightning_sparse.core.layouts import Layout
from lightning_sparse.core.targets import Targets, per_layer

NORMS = ("l1", "l2")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Granularity:
    """What one mask entry decides: a weight (``unstructured``), a whole output ``channel``, or a place in an N:M group."""

    kind: str  # "unstructured", "channel", "nm", or "head"/"neuron" (groups across layers: core/heads.py)
    n: int = 0
    m: int = 0
    axis: int | None = 0  # the weight's output axis (1 for GPT-2's Conv1D, a ConvTranspose); None: no such axes
    layout: Layout | None = field(default=None, compare=False)  # the whole layout, where the targets know it

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    @property
    def final_sparsity(self) -> float | None:
        """The sparsity an N:M pattern fixes (1 - N/M); ``None`` where the pattern leaves it free."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None


UNSTRUCTURED = Granularity("unstructured")


def parse_granularity(argument: str, value: object) -> Granularity:
    """``"unstructured"``, ``"channel"``, ``"head"``, ``"neuron"`` or an ``"N:M"`` string with 1 <= N < M; errors
    name ``argument``."""
    if value in ("unstructured", "channel", "head", "neuron"):
        return Granularity(str(value))
    match = _NM.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f"`{argument}` must be 'unstructured', 'channel', 'head', 'neuron' or an 'N:M' string such as '2:4', "
            f"got {value!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(f"`{argument}`={value!r}: N:M needs 1 <= N < M (N kept out of every M weights), got N={n}, M={m}")
    return Granularity("nm", n, m)


def check_shape(name: str, shape: Sequence[int], granularity: Granularity) -> None:
    """Refuse a granularity the parameter's shape cannot hold: channels and N:M need a weight of >= 2 dims with an
    output axis (not an embedding table), channels a layer whose output units can be pruned whole (not a recurrent
    layer's gate rows: its hidden units are pruned whole by :mod:`lightning_sparse.structure.recurrent`), and M must divide the inputs of one output unit (the product of the other dims; a grouped
    ``ConvTranspose``: of one group's)."""
    if granularity.kind in ("unstructured", "head", "neuron"):  # heads/neurons: checked as groups (core/heads.py)
        return
    if len(shape) < 2:
        raise ValueError(
            f"`granularity`={str(granularity)!r} needs a weight with output and input dimensions, but {name!r} has "
            f"shape {list(shape)}; prune it 'unstructured' or leave it out"
        )
    if granularity.axis is None:
        raise ValueError(
            f"`granularity`={str(granularity)!r} needs a weight with output and input dimensions, but {name!r} "
            f"(shape {list(shape)}) is an embedding table, whose rows are looked up, not multiplied: prune it "
            f"'unstructured' (a `{{glob: granularity}}` mapping) or leave it out of `include`"
        )
    layout = granularity.layout
    if granularity.kind == "channel" and layout is not None and layout.no_channels:
        raise ValueError(
            f"`granularity`='channel' cannot prune {name!r} (shape {list(shape)}): {layout.no_channels}. Prune it "
            f"'unstructured' or 'N:M' (a `{{glob: granularity}}` mapping) or leave it out (`exclude`)"
        )
    if layout is not None and layout.output == granularity.axis:
        fan_in = layout.fan_in(shape)
    else:
        fan_in = 1
        for axis, size in enumerate(shape):
            fan_in *= 1 if axis == granularity.axis else size
    if granularity.kind == "nm" and fan_in % granularity.m:
        raise ValueError(
            f"`granularity`={str(granularity)!r}: M={granularity.m} does not divide the input dimension {fan_in} of "
            f"{name!r} (shape {list(shape)}); choose an M that divides {fan_in} or leave the layer out"
        )


def channels_to_prune(name: str, sparsity: float, out_channels: int, multiple: int = 1) -> int:
    """``round(sparsity × out_channels)`` whole channels; an error naming the layer if that is all of them.

    ``multiple`` > 1 rounds the channels *kept* to the nearest multiple of it (halves up, at least ``multiple``, at
    most all of them), so a deployed layer has a width its kernels vectorise: oneDNN's AVX-512 convolutions work in
    blocks of 16 channels, GPU tensor cores in 8s (Torch-Pruning's ``round_to``). The sparsity then moves in steps of
    ``multiple`` channels and can differ from ``sparsity`` by up to half a step.
    """
    count = round_half_up(sparsity * out_channels)
    if count >= out_channels:
        raise ValueError(
            f"channel pruning at sparsity {sparsity:.4g} would remove every one of the {out_channels} output channels "
            f"of {name!r}; lower its `sparsity` (below {(out_channels - 0.5) / out_channels:.4g}) or leave it out "
            f"(`exclude`, or a per-layer `sparsity` mapping)"
        )
    if multiple > 1 and count:
        kept = round_half_up((out_channels - count) / multiple) * multiple
        count = out_channels - min(max(kept, multiple), out_channels)
    return count


def _outputs_first(tensor: Tensor, axis: int | None) -> Tensor:
    """``tensor`` with its output axis first (a view; a contiguous copy only for a Conv1D-style ``axis=1``)."""
    return tensor if not axis else tensor.movedim(axis, 0).contiguous()


def _back(tensor: Tensor, axis: int | None) -> Tensor:
    return tensor if not axis else tensor.movedim(0, axis).contiguous()


def channel_scores(weight: Tensor, norm: str = "l1", mask: Tensor | None = None, axis: int = 0) -> Tensor:
    """L1 or L2 norm of each output channel's weights (channels along ``axis``); channels already fully pruned by
    ``mask`` score -1."""
    weight = _outputs_first(weight.detach(), axis)
    mask = _outputs_first(mask, axis) if mask is not None else None
    rows = weight.reshape(weight.shape[0], -1)
    if norm == "l1":
        scores = rows.abs().sum(1)
    elif norm == "l2":
        scores = rows.pow(2).sum(1).sqrt()
    else:
        raise ValueError(f"`channel_norm` must be one of {NORMS}, got {norm!r}")
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(mask.shape[0], -1).any(1), -1.0)
    return scores


def channel_mask(weight: Tensor, n_channels: int, norm: str = "l1", mask: Tensor | None = None, axis: int = 0) -> Tensor:
    """Mask pruning the ``n_channels`` output channels (along ``axis``) of lowest norm (ties: lower index first), whole."""
    keep = exact_mask(channel_scores(weight, norm, mask, axis), n_channels)
    shape = [1] * weight.dim()
    shape[axis] = -1
    return keep.view(shape).expand_as(weight).clone()


def nm_mask(weight: Tensor, n: int, m: int, n_zeros: int, mask: Tensor | None = None, axis: int = 0) -> Tensor:
    """Mask pruning ``n_zeros`` weights, only ever among the ``M - N`` smallest of each group of M.

    Groups are M consecutive weights of a row of ``weight.reshape(out, -1)``. With ``n_zeros`` at its maximum,
    ``numel × (M - N) / M``, every group keeps exactly N; below it (a schedule still ramping) the smallest
    candidates across the layer go first. Already-pruned weights rank lowest, so they stay pruned. ``axis`` is the
    output axis (1 for a Conv1D weight stored ``(in, out)``: groups then run down its columns).
    """
    if axis:
        moved = nm_mask(_outputs_first(weight.detach(), axis), n, m, n_zeros, _outputs_first(mask, axis) if mask is not None else None)
        return _back(moved, axis)
    limit = weight.numel() // m * (m - n)
    if not 0 <= n_zeros <= limit:
        raise ValueError(f"`n_zeros` for {n}:{m} must be in [0, {limit}], got {n_zeros}")
    scores = weight.detach().abs().reshape(-1, m)
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(-1, m), -1.0)
    # The M - N smallest of each group are the only candidates; the rest score +inf so they are never pruned.
    order = torch.sort(scores, dim=1, stable=True).indices
    candidate = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order[:, : m - n], True)
    ranked = scores.masked_fill(~candidate, float("inf"))
    return exact_mask(ranked, n_zeros).view(weight.shape)


def nm_counts(weight: Tensor, m: int, axis: int = 0) -> Tensor:
    """Non-zeros in each group of M consecutive inputs of each output (``axis``) of the weight (M must divide them)."""
    weight = _outputs_first(weight.detach(), axis)
    rows = weight.reshape(weight.shape[0], -1)
    return (rows != 0).reshape(rows.shape[0], -1, m).sum(-1)


def expand_granularity(value: str | Mapping[str, str], names: Sequence[str] | Targets) -> dict[str, Granularity]:
    """``{name: Granularity}`` for every name: one value for all, or ``{glob: value}`` (first match wins) with the
    names no glob matches pruned ``unstructured``. A glob matching no name is an error. With
    :class:`~lightning_sparse.core.targets.Targets`, globs match every alias and each layer gets its output axis and
    layout."""
    chosen = per_layer("granularity", value, names)
    axes = getattr(names, "output_axis", {})
    layouts = getattr(names, "layouts", {})
    result = {}
    for name in names:
        granularity = parse_granularity("granularity", chosen[name]) if name in chosen else UNSTRUCTURED
        if name in axes and granularity.kind != "unstructured":
            granularity = replace(granularity, axis=axes[name], layout=layouts.get(name))
        result[name] = granularity
    return result
