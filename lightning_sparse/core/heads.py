"""Attention heads and MLP neurons as pruning groups: found from the module structure, scored and masked whole.

A **head** of a multi-head attention module is ``head_dim`` rows of each of the query, key and value projections
(their weights and biases) and the same ``head_dim`` input columns of the output projection. An MLP **neuron** is one
row of the up-projection (and its bias entry) and the matching input column of the down-projection. Torch-Pruning's
DepGraph (Fang et al., CVPR 2023) and Hugging Face's nn_pruning remove these units as groups: when every member of a
group is zero the unit contributes exactly nothing (its value vector, or its activation's outgoing weights, is
zero), so deploy can drop it from the tensors and the model gets really smaller and faster.

Where they are is the structure registry's business (:mod:`lightning_sparse.structure.patterns`: a pattern per module
layout, keyed by what a module holds; users register their own). With grouped-query attention a unit is one key/value
head with its query heads (:attr:`GroupLayer.query_heads`), so the members have their own widths
(:attr:`Member.width`).

Scores (magnitude): a group's score is the sum of its members' norms, ``score_g = Σ_members ||W_member[g]||``
(``l1`` or ``l2``, the ``channel_norm`` of channel pruning; Li et al. 2017 for a single layer, DepGraph's group
norm for coupled ones). Movement pruning sums the movement scores ``S`` over every entry of the group.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from lightning_sparse.core.allocation import round_half_up
from lightning_sparse.core.criteria import exact_mask
from lightning_sparse.core.masks import MaskSet
from lightning_sparse.core.shards import full_tensor
from lightning_sparse.core.targets import Targets, parameter_roles

GROUP_KINDS = ("head", "neuron")
#: structure patterns whose ``neuron`` units ``granularity="channel"`` also prunes: recurrent hidden units and the
#: channels of transposed convolutions (:mod:`lightning_sparse.structure.recurrent`)
CHANNEL_PATTERNS = ("recurrent:rnn", "transposed:sequential")


@dataclass(frozen=True)
class Member:
    """One tensor of a group layer: group ``g`` holds entries ``[o + g·w, o + (g+1)·w)`` along ``axis`` for each
    offset ``o`` (three offsets for a fused q/k/v projection, one otherwise), with ``w`` the member's own
    :attr:`width` or, where that is 0, the layer's. A member's own width is what makes a key/value group one unit:
    with ``G`` query heads per KV head of ``head_dim`` d, the unit holds ``G·d`` query rows and ``d`` key rows."""

    param: str
    axis: int
    offsets: tuple[int, ...] = (0,)
    role: str = ""  # "q/k/v", "out", "up", "up bias", "down" (for reports)
    width: int = 0  # entries per group and offset; 0: the layer's width

    def span(self, layer_width: int) -> int:
        """Entries per group and offset."""
        return self.width or layer_width

    def index(self, group: int, width: int, device: torch.device | None = None) -> Tensor:
        """The indices along :attr:`axis` that group ``group`` occupies in this tensor."""
        w = self.span(width)
        return torch.cat([torch.arange(o + group * w, o + (group + 1) * w, device=device) for o in self.offsets])


@dataclass(frozen=True)
class GroupLayer:
    """The heads of one attention module or the neurons of one MLP: ``count`` groups of ``width`` entries per offset."""

    kind: str  # "head" or "neuron"
    module: str  # the module's name in the model
    module_type: str  # its class name
    count: int
    width: int  # head_dim for heads, 1 for neurons
    members: tuple[Member, ...]
    pattern: str = ""  # the structure registry's pattern that found it (deploy's surgery is keyed by it)
    query_heads: int = 1  # query heads per unit (a KV group: num_attention_heads / num_key_value_heads)
    kv_heads: int = 0  # query-slot units (multi-query attention): unit j is query head j of each of these KV heads
    shared: tuple[str, ...] = ()  # the module's projections no unit holds (the one K/V head of multi-query attention)

    @property
    def params(self) -> list[str]:
        return [m.param for m in self.members]

    def describe(self) -> str:
        if self.kind == "head" and self.query_heads > 1:
            unit = f"{self.count} KV groups of {self.query_heads} query heads of {self.width}"
        elif self.kind == "head" and self.kv_heads:
            unit = f"{self.count} query heads of {self.width} per KV head ({self.kv_heads} KV heads kept)"
        else:
            unit = f"{self.count} heads of {self.width}" if self.kind == "head" else f"{self.count} neurons"
        return f"{self.module} ({self.module_type}, {unit}): " + ", ".join(
            f"{m.param}[{'axis ' + str(m.axis)}]" for m in self.members
        )


@dataclass
class GroupSet:
    """The group layers chosen for pruning, and ``{parameter: group layers it belongs to}``."""

    layers: list[GroupLayer] = field(default_factory=list)
    kept_dense: list[str] = field(default_factory=list)  # head targets no unit holds (multi-query K/V): left dense

    @property
    def params(self) -> list[str]:
        seen: dict[str, None] = {}
        for layer in self.layers:
            for name in layer.params:
                seen.setdefault(name, None)
        return list(seen)

    def __bool__(self) -> bool:
        return bool(self.layers)


# ----------------------------------------------------------------------------- discovery
def find_group_layers(model: nn.Module) -> list[GroupLayer]:
    """Every attention module's heads and every MLP's neurons in ``model``, in module order (see the module doc).

    Parameter names are the model's first names (those ``named_parameters()`` gives, tied tensors once).
    Raises ``ValueError`` for a module whose members disagree in size (naming the module and the member).
    """
    return _find(model)[0]


def _find(model: nn.Module) -> tuple[list[GroupLayer], list[tuple[str, str]]]:
    """:func:`find_group_layers`, and ``(module, "kept dense because …")`` for the modules the structure registry
    recognised as attention or an MLP but could not split into units."""
    from lightning_sparse.structure.patterns import match_patterns  # the registry imports this module

    first = {alias: name for name, (_, aliases, _) in parameter_roles(model).items() for alias in aliases}
    params = dict(model.named_parameters(remove_duplicate=False))
    found, dense = [], []
    for name, module in model.named_modules():
        layers, reasons = match_patterns(name, module)
        dense += reasons
        for layer in layers:
            members = []
            for member in layer.members:
                tensor = params[member.param]
                span = member.span(layer.width)
                needed = (max(member.offsets) + layer.count * span)
                if tensor.dim() <= member.axis or tensor.shape[member.axis] < needed or (
                    len(member.offsets) == 1 and sum(m.param == member.param for m in layer.members) == 1
                    and tensor.shape[member.axis] != layer.count * span
                ):
                    raise ValueError(
                        f"The {layer.kind} groups of {layer.module!r} ({layer.module_type}: {layer.count} × {layer.width}) "
                        f"do not fit member {member.param!r} of shape {list(tensor.shape)} (axis {member.axis} should "
                        f"hold {needed} entries): its members disagree in size, so it cannot be pruned by {layer.kind}s"
                    )
                members.append(Member(first.get(member.param, member.param), member.axis, member.offsets, member.role, member.width))
            found.append(replace(layer, members=tuple(members), shared=tuple(first.get(p, p) for p in layer.shared)))
    return found, dense


def select_groups(model: nn.Module, targets: Targets, granularity: Mapping[str, object]) -> GroupSet:
    """The group layers that ``granularity`` (``{target name: Granularity}``) asks for, with refusals before training.

    A layer is chosen when a target given ``head`` (``neuron``) is a member of its heads (neurons). Refused, with the
    parameter and the group named: a ``head``/``neuron`` target in no attention module / MLP, and a group member that
    is a target with another granularity (two rules would write its mask).
    """
    wanted = {name: str(g) for name, g in granularity.items() if str(g) in GROUP_KINDS}
    channel = [name for name, g in granularity.items() if str(g) == "channel"]
    if not wanted and not channel:
        return GroupSet()
    layers, dense = _find(model)
    chosen: list[GroupLayer] = []
    for layer in layers:
        if any(wanted.get(p) == layer.kind for p in layer.params) or (
            layer.pattern in CHANNEL_PATTERNS and any(m.param in channel for m in layer.members if m.role != "reader")
        ):
            chosen.append(layer)
    _refuse_unproved_channels(model, channel, chosen, dense)
    if not chosen and not wanted:
        return GroupSet()
    covered = {(p, layer.kind) for layer in chosen for p in (*layer.params, *layer.shared)}
    for name, kind in wanted.items():
        if (name, kind) not in covered:
            found = [f"{layer.module} ({layer.module_type})" for layer in layers if layer.kind == kind]
            what = "an attention projection (q/k/v or output) of a module with heads" if kind == "head" else "an MLP's up- or down-projection"
            why = [reason for module, reason in dense if name.startswith(module + ".") or not module]
            raise ValueError(
                f"`granularity`={kind!r} on {name!r}, which is not {what}: it has no {kind}s to prune. "
                f"{'Attention modules' if kind == 'head' else 'MLPs'} found: {found or 'none'}. "
                + (f"Kept dense: {'; '.join(why[:3])}. " if why else "")
                + f"Give {name!r} another granularity with a {{glob: granularity}} mapping (e.g. {{'*.attn.*': 'head', "
                f"'*.mlp.*': 'neuron'}}) or leave it out (`exclude`); a module of your own is taught with "
                f"`lightning_sparse.structure.register_attention` / `register_mlp`"
            )
    for layer in chosen:
        allowed = (layer.kind, "channel") if layer.pattern in CHANNEL_PATTERNS else (layer.kind,)
        for param in layer.params:
            if param in granularity and str(granularity[param]) not in allowed:
                raise ValueError(
                    f"{param!r} is a member of the {layer.kind} groups of {layer.module!r} ({layer.module_type}) but is "
                    f"given granularity {str(granularity[param])!r}: a group's members are pruned together, so give every "
                    f"member {layer.kind!r} (one glob over the module, e.g. '{layer.module}.*') or exclude it"
                )
    shared = [p for layer in chosen for p in layer.shared if wanted.get(p) == layer.kind]
    return GroupSet(chosen, shared)


def _refuse_unproved_channels(model: nn.Module, channel: list[str], chosen: list[GroupLayer],
                              dense: list[tuple[str, str]]) -> None:  # fmt: skip
    """A recurrent weight given ``channel`` must be a member of a chosen unit layer: its rows are gates, so it has no
    channels of its own. Refused with the structure layer's reason (proj_size, a reader not proved) where it is not."""
    from lightning_sparse.core.layouts import RECURRENT_KINDS, matmul_layout

    members = {m.param for layer in chosen for m in layer.members}
    for name in [name for name in channel if name not in members]:  # model order
        owner, _, attribute = name.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        found = matmul_layout(module, attribute)
        if found is None or found[0] not in RECURRENT_KINDS:
            continue
        why = [reason for where, reason in dense if name.startswith(where + ".") or owner == where or not where]
        why = [reason for reason in why if repr(owner) in reason] or why
        raise ValueError(
            f"`granularity`='channel' on {name!r} ({found[0]}): its hidden units cannot be pruned as channels here"
            + (f": {'; '.join(why)}" if why else " (a recurrent cell or a module the structure layer does not know)")
            + f". Prune {owner!r} 'unstructured' or 'N:M' (a {{glob: granularity}} mapping) or leave it out (`exclude`)"
        )


def extend_targets(model: nn.Module, targets: Targets, groups: GroupSet) -> Targets:
    """``targets`` with every member of ``groups`` added (biases, output projections), in model order, less the
    projections no unit holds (the key/value head of multi-query attention stays dense)."""
    roles = parameter_roles(model)
    names = [name for name in roles if (name in targets and name not in groups.kept_dense) or name in set(groups.params)]
    params = {name: roles[name][0] for name in names}
    aliases = {name: roles[name][1] for name in names}
    axes = {name: targets.output_axis.get(name, roles[name][2].output_axis) for name in names}
    kinds = {name: targets.kinds.get(name, roles[name][2].kind) for name in names}
    return Targets(params, aliases, axes, kinds)


def groups_to_prune(layer: GroupLayer, sparsity: float) -> int:
    """``round(sparsity × count)`` whole heads/neurons; an error naming the layer and the group if that is all of them."""
    count = round_half_up(sparsity * layer.count)
    if count >= layer.count and layer.kind == "head" and layer.query_heads > 1:
        raise ValueError(
            f"head pruning at sparsity {sparsity:.4g} would remove every one of the {layer.count} key/value groups of "
            f"{layer.module!r} ({layer.module_type}: grouped-query attention, {layer.query_heads} query heads per KV head): "
            f"a unit is a KV head with its query heads, so the pruned model keeps the group size its config states; "
            f"the sparsity is the fraction of KV groups removed, so lower it (below "
            f"{(layer.count - 0.5) / layer.count:.4g}) or leave the module out"
        )
    if count >= layer.count:
        raise ValueError(
            f"{layer.kind} pruning at sparsity {sparsity:.4g} would remove every one of the {layer.count} {layer.kind}s "
            f"of {layer.module!r} ({layer.module_type}); lower its `sparsity` (below "
            f"{(layer.count - 0.5) / layer.count:.4g}) or leave it out"
        )
    return count


def _entries(tensor: Tensor, member: Member, layer: GroupLayer) -> Tensor:
    """``(count, entries per group)``: the tensor's values regrouped so row g holds all of group g's entries."""
    moved = tensor.movedim(member.axis, 0)
    w = member.span(layer.width)
    blocks = [moved[o : o + layer.count * w].reshape(layer.count, w, -1) for o in member.offsets]
    return torch.cat(blocks, dim=1).reshape(layer.count, -1)


def group_scores(layer: GroupLayer, tensors: Mapping[str, Tensor], norm: str = "l1", how: str = "norm") -> Tensor:
    """One score per group: ``Σ_members ||member[g]||`` (``how="norm"``, ``norm`` l1 or l2) or the plain sum of the
    entries (``how="sum"``, for movement scores)."""
    total = None
    for member in layer.members:
        values = _entries(full_tensor(tensors[member.param].detach()).float(), member, layer)  # whole under FSDP2
        if how == "sum":
            score = values.sum(1)
        elif norm == "l1":
            score = values.abs().sum(1)
        elif norm == "l2":
            score = values.pow(2).sum(1).sqrt()
        else:
            raise ValueError(f"`channel_norm` must be one of ('l1', 'l2'), got {norm!r}")
        total = score if total is None else total + score
    return total


def pruned_groups(layer: GroupLayer, masks: MaskSet) -> Tensor:
    """Bool per group: True where the first member's entries are all pruned already."""
    member = layer.members[0]
    return ~_entries(masks.mask(member.param), member, layer).any(1)


def group_masks(groups: GroupSet, keep: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Masks of every member tensor: ``False`` at the entries of the groups ``keep[module]`` drops (a tensor in two
    group layers, e.g. the middle Linear of a Sequential MLP, loses the entries of both)."""
    masks = {name: torch.ones(like[name].shape, dtype=torch.bool, device=like[name].device) for name in groups.params}  # whole
    for layer in groups.layers:
        dropped = (~keep[layer.module]).nonzero().flatten()
        if not dropped.numel():
            continue
        for member in layer.members:
            mask = masks[member.param]
            w = member.span(layer.width)
            within = torch.arange(w, device=mask.device)
            starts = dropped.to(mask.device) * w
            index = torch.cat([(o + starts).unsqueeze(1) + within for o in member.offsets]).flatten()
            mask.index_fill_(member.axis, index, False)  # every dropped group's entries at once
    return masks


def _sparsity_of(layer: GroupLayer, sparsity: float | Mapping[str, float]) -> float:
    if not isinstance(sparsity, Mapping):
        return float(sparsity)
    return float(next(sparsity[p] for p in layer.params if p in sparsity))


def prune_groups_by_magnitude(
    masks: MaskSet, groups: GroupSet, sparsity: float | Mapping[str, float], norm: str = "l1"
) -> dict[str, int]:
    """Prune ``round(s × count)`` heads/neurons of each group layer, lowest :func:`group_scores` first; groups already
    pruned score -1 and stay pruned (ties: lower index first). Returns ``{module: groups pruned}``."""
    keep, counts = {}, {}
    for layer in groups.layers:
        scores = group_scores(layer, masks.params, norm).masked_fill(pruned_groups(layer, masks), -1.0)
        counts[layer.module] = groups_to_prune(layer, _sparsity_of(layer, sparsity))
        keep[layer.module] = exact_mask(scores, counts[layer.module])
    for name, mask in group_masks(groups, keep, masks.params).items():
        masks.set(name, mask)
    return counts


def prune_groups_by_scores(
    groups: GroupSet, scores: Mapping[str, Tensor], sparsity: float | Mapping[str, float], like: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Masks keeping the heads/neurons of highest summed ``scores`` (movement pruning: pruned groups may come back)."""
    keep, counts = {}, {}
    for layer in groups.layers:
        counts[layer.module] = groups_to_prune(layer, _sparsity_of(layer, sparsity))
        keep[layer.module] = exact_mask(group_scores(layer, scores, how="sum"), counts[layer.module])
    return group_masks(groups, keep, like), counts


def zero_groups(layer: GroupLayer, tensors: Mapping[str, Tensor]) -> Tensor:
    """Bool per group: True where every entry of every member is exactly zero (the group can be removed)."""
    zero = None
    for member in layer.members:
        each = (_entries(full_tensor(tensors[member.param].detach()), member, layer) == 0).all(1)
        zero = each if zero is None else zero & each
    return zero


def check_group_sparsity(groups: GroupSet, sparsity: float | Mapping[str, float]) -> None:
    """Before training: each group layer's members share one sparsity, and it leaves at least one group."""
    for layer in groups.layers:
        if isinstance(sparsity, Mapping):
            values = {p: sparsity[p] for p in layer.params if p in sparsity}
            if len(set(values.values())) > 1:
                raise ValueError(
                    f"The {layer.kind} groups of {layer.module!r} are pruned together, but their members are given "
                    f"different sparsities: {values}; give them one value"
                )
        asked = _sparsity_of(layer, sparsity)
        removed = groups_to_prune(layer, asked)
        if layer.kind == "head" and layer.query_heads > 1 and abs(removed / layer.count - asked) > 1e-9:
            warnings.warn(
                f"head pruning at sparsity {asked:.4g} removes {removed} of the {layer.count} key/value groups of "
                f"{layer.module!r} ({removed * layer.query_heads} of its {layer.count * layer.query_heads} query heads, "
                f"{removed / layer.count:.4g}): with grouped-query attention a unit is a KV head with its "
                f"{layer.query_heads} query heads, so no other count keeps the group size the config states",
                stacklevel=2,
            )

