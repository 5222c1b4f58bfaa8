"""Removing coupled channel groups physically: residual streams, concats, BatchNorm and depthwise convs included.

:mod:`.thinning` follows one producer's channels and stops where they meet another tensor (a residual add, a concat).
Here the channels are handled as the groups of :mod:`lightning_sparse.core.groups` (found from one real forward,
so models that ``torch.fx`` cannot trace, Hugging Face convnets among them, are cut too): a slot is removed when every
member holds exact zeros there (the producing weights' channels, their biases, BatchNorm affine entries, depthwise
and grouped filters, layer-scale parameters: what ``GradualMagnitudePruning(granularity="channel")`` prunes
together), so the channel is exactly zero in every tensor it reaches; then every member loses that channel (outputs
of Linear/Conv, BatchNorm features, depthwise channels, whole groups of a grouped conv, entries of a scale parameter)
and every consumer the input columns reading it. All groups are cut at once (a layer may lose outputs to one group
and inputs to another), and the result is checked against the model's outputs and undone if they differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_sparse.core.groups import BATCH_NORMS, CONVS, PARAMETER_ROLES, ChannelGroup, find_groups
from lightning_sparse.deployment.thinning import set_module, slice_norm


@dataclass
class GroupCut:
    """One group's outcome: its channels before/after and its description (members, consumers, or why not cut)."""

    group: ChannelGroup
    removed: int
    detail: str

    def describe(self) -> str:
        return f"{self.group.describe()}: {self.detail}"


def zero_slots(gm: nn.Module, group: ChannelGroup) -> Tensor:
    """Per slot: True where every member of ``group`` holds only exact zeros."""
    zero = torch.ones(group.channels, dtype=torch.bool)
    params = dict(gm.named_parameters())
    for name, (member, slots) in group.members.items():
        value = params[name].detach()
        rows = (value.movedim(member.axis, 0).reshape(value.shape[member.axis], -1) != 0).any(1).cpu()
        nonzero = torch.zeros(group.channels, dtype=torch.bool)
        nonzero[slots[rows]] = True
        zero &= ~nonzero
    return zero


def plan_cuts(gm: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[list[GroupCut], dict[str, Tensor], dict[str, Tensor], dict[str, tuple[int, Tensor]]]:
    """Which channels to cut: per group its outcome, per layer the output channels / input columns kept, and per
    scale/shift parameter (sliced in place) its axis and the entries kept."""
    plan = find_groups(gm, inputs)
    cuts: list[GroupCut] = []
    out_keep: dict[str, Tensor] = {}
    in_keep: dict[str, Tensor] = {}
    param_keep: dict[str, tuple[int, Tensor]] = {}
    if not plan.traced:
        return cuts, out_keep, in_keep, param_keep
    for group in plan.groups:
        zero = zero_slots(gm, group)
        count = int(zero.sum())
        if not count:
            continue
        if not group.prunable or not group.removable:
            cuts.append(GroupCut(group, 0, f"{count} zero channels kept ({group.reason})"))
            continue
        if count == group.channels:
            cuts.append(GroupCut(group, 0, "every channel is zero (nothing would be left): kept"))
            continue
        for name, (member, slots) in group.members.items():
            if member.role in PARAMETER_ROLES:
                param_keep[name] = (member.axis, ~zero[slots])
                continue
            keep = out_keep.setdefault(member.layer, torch.ones(slots.numel(), dtype=torch.bool))
            keep &= ~zero[slots]
        for layer, slots in group.consumers.items():
            keep = in_keep.setdefault(layer, torch.ones(slots.numel(), dtype=torch.bool))
            keep &= ~((slots >= 0) & zero[slots.clamp(min=0)])
        cuts.append(GroupCut(group, count, f"{count} of {group.channels} channels removed"))
    return cuts, out_keep, in_keep, param_keep


def conv_class(module: nn.Module) -> type[nn.Module] | None:
    """The torch conv class ``module`` computes as (itself, or a subclass that only changes ``__init__``, such as
    Hugging Face EfficientNet's depthwise conv), or None."""
    for base in CONVS:
        if isinstance(module, base) and type(module).forward is base.forward and type(module)._conv_forward is base._conv_forward:
            return base
    return None


def rebuildable(module: nn.Module) -> bool:
    """Whether :func:`rebuild` can remove channels of ``module``."""
    return type(module) is nn.Linear or conv_class(module) is not None or type(module) in BATCH_NORMS or type(module) is nn.GroupNorm


@torch.no_grad()
def rebuild(module: nn.Module, out_keep: Tensor | None, in_keep: Tensor | None) -> nn.Module:
    """``module`` without the removed output channels / input columns (Linear, Conv, depthwise Conv, BatchNorm,
    per-channel GroupNorm); its parameters and statistics copied, frozen, in eval mode."""
    if type(module) in BATCH_NORMS or type(module) is nn.GroupNorm:
        return slice_norm(module, out_keep)
    weight = module.weight
    out_keep = out_keep if out_keep is not None else torch.ones(weight.shape[0], dtype=torch.bool)
    out_keep = out_keep.to(weight.device)
    bias = None if module.bias is None else module.bias[out_keep]
    if type(module) is nn.Linear:
        w = weight[out_keep]
        if in_keep is not None:
            w = w[:, in_keep.to(weight.device)]
        new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    else:
        conv = conv_class(module)
        assert conv is not None, f"{type(module).__name__} is not a conv that can be rebuilt"
        if module.groups > 1:  # depthwise or grouped: whole conv groups go, their input channels with them
            per_out = module.out_channels // module.groups
            kept = out_keep.view(module.groups, per_out)
            if not bool((kept.all(1) | ~kept.any(1)).all()):
                raise ValueError(f"a {type(module).__name__} with groups={module.groups} can only lose whole groups")
            groups = int(kept[:, 0].sum())
            w = weight[out_keep]
            in_channels = groups * (module.in_channels // module.groups)
        else:
            w = weight[out_keep]
            if in_keep is not None:
                w = w[:, in_keep.to(weight.device)]
            in_channels, groups = w.shape[1], 1
        new = conv(
            in_channels, w.shape[0], module.kernel_size, stride=module.stride, padding=module.padding,
            dilation=module.dilation, groups=groups, bias=bias is not None, padding_mode=module.padding_mode,
            device=w.device, dtype=w.dtype,
        )  # fmt: skip
    new.weight = nn.Parameter(w.clone(), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return new.eval()


def cut_groups(gm: nn.Module, inputs: tuple[Tensor, ...], matches: Callable[[], bool]) -> tuple[list[GroupCut], list[str]]:
    """Cut every removable group with zero channels out of ``gm`` (a model, traced or not) in place; ``matches()``
    says whether the model's outputs are still the original's (else every module is put back). Returns the groups'
    outcomes and the layers rebuilt."""
    cuts, out_keep, in_keep, param_keep = plan_cuts(gm, inputs)
    layers = sorted(set(out_keep) | set(in_keep))
    layers = [name for name in layers if not bool(out_keep.get(name, torch.ones(1, dtype=torch.bool)).all())
              or not bool(in_keep.get(name, torch.ones(1, dtype=torch.bool)).all())]  # fmt: skip
    params = {name: keep for name, keep in param_keep.items() if not bool(keep[1].all())}
    if not layers and not params:
        return cuts, []
    old = {name: gm.get_submodule(name) for name in layers}
    for name, module in old.items():
        if not rebuildable(module):
            for cut in cuts:
                cut.detail += f"; not cut: {name} ({type(module).__name__}) cannot be rebuilt"
            return cuts, []
    old_params = {name: gm.get_parameter(name) for name in params}
    new = {name: rebuild(module, out_keep.get(name), in_keep.get(name)) for name, module in old.items()}  # all, then swap
    for name, module in new.items():
        set_module(gm, name, module)
    for name, (axis, keep) in params.items():
        parent, _, attribute = name.rpartition(".")
        value = old_params[name].detach().index_select(axis, keep.nonzero().flatten().to(old_params[name].device))
        setattr(gm.get_submodule(parent), attribute, nn.Parameter(value.clone(), requires_grad=False))
    if not matches():
        for name, module in old.items():
            set_module(gm, name, module)
        for name, param in old_params.items():
            parent, _, attribute = name.rpartition(".")
            setattr(gm.get_submodule(parent), attribute, param)
        for cut in cuts:
            if cut.removed:
                cut.detail = f"{cut.removed} zero channels kept: the cut model's outputs differed from the original (undone)"
        return cuts, []
    return cuts, layers + [name.rpartition(".")[0] for name in params]
