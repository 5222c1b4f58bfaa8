"""The surgery registry: remove a group layer's units from the tensors that hold them, whatever module holds them.

One rule for every member of a unit (:class:`~lightning_sparse.core.heads.Member`): along its ``axis`` the entries
``[o + g·w, o + (g+1)·w)`` of each removed unit ``g`` and offset ``o`` are deleted; every other entry keeps its place
and order. The parameter is replaced by the smaller one on the module that owns it, and the module's shape
attributes are re-read from its weight by a **slicer** keyed by module class (:func:`register_slicer`:
``nn.Linear`` ``in_features``/``out_features``, Hugging Face ``Conv1D`` ``nf``, ``nn.Embedding``). Then the module
that owns the units states its new head counts through a **resizer** (:func:`register_resize`; the default updates
the attributes of :data:`~lightning_sparse.structure.patterns.HEAD_ATTRS`,
:data:`~lightning_sparse.structure.patterns.KV_ATTRS`, ``all_head_size`` and ``inner_dim`` that held the old count).

Works with the grain of Hugging Face transformers 5: the module classes stay, attention reshapes with ``-1`` heads and
the ``head_dim`` it holds, so a layer that lost whole KV groups runs as it is (``num_key_value_groups`` is unchanged).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_sparse.core.heads import GroupLayer

Slicer = Callable[[nn.Module], None]
Resizer = Callable[[nn.Module, GroupLayer, int], None]
Rebuild = Callable[[nn.Module, GroupLayer, "list[int]"], str]
_SLICERS: dict[type, Slicer] = {}
_RESIZERS: dict[type, Resizer] = {}
_REBUILDS: dict[str, Rebuild] = {}


class KeptDense(Exception):
    """Raised by a rebuild (before it changes anything) to keep a module's units: the message says why."""


def register_rebuild(pattern: str, rebuild: Rebuild) -> None:
    """Units found by ``pattern`` are removed by ``rebuild(model, layer, keep) -> description`` instead of the generic
    slicing: for modules whose class cannot hold fewer heads (``nn.MultiheadAttention``'s query width is its
    ``embed_dim``) and must be replaced. It may call :func:`slice_units` and raise :class:`KeptDense`."""
    _REBUILDS[pattern] = rebuild


def register_slicer(cls: type, slicer: Slicer) -> None:
    """After a parameter of a ``cls`` module has been replaced by a smaller one, ``slicer(module)`` makes its shape
    attributes agree with its tensors (as ``nn.Linear``'s ``in_features``/``out_features``)."""
    _SLICERS[cls] = slicer


def register_resize(cls: type, resizer: Resizer) -> None:
    """``resizer(module, layer, kept)``: a ``cls`` module whose ``layer`` kept ``kept`` units states its new size
    (replaces the default, which rewrites the head-count attributes that held the old count)."""
    _RESIZERS[cls] = resizer


def _linear(module: nn.Linear) -> None:
    module.out_features, module.in_features = module.weight.shape


def _embedding(module: nn.Embedding) -> None:
    module.num_embeddings, module.embedding_dim = module.weight.shape


def _conv(module: nn.Module) -> None:
    assert isinstance(module, nn.modules.conv._ConvNd)
    rows, cols = module.weight.shape[:2]
    if module.transposed:  # (in, out/groups, k…)
        module.in_channels, module.out_channels = rows, cols * module.groups
    else:  # (out, in/groups, k…)
        module.out_channels, module.in_channels = rows, cols * module.groups


def _recurrent(module: nn.Module) -> None:
    assert isinstance(module, nn.RNNBase)
    module.input_size = module.weight_ih_l0.shape[1]  # the first layer's inputs (a producer's units removed)


register_slicer(nn.Linear, _linear)
register_slicer(nn.Embedding, _embedding)
register_slicer(nn.modules.conv._ConvNd, _conv)
register_slicer(nn.RNNBase, _recurrent)


def _slice_shapes(module: nn.Module) -> None:
    for cls in type(module).__mro__:
        if cls in _SLICERS:
            _SLICERS[cls](module)
            return
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # Hugging Face GPT-2: weight (in, out)
        module.nf = module.weight.shape[1]


def removed_index(layer: GroupLayer, size: int, axis_members: list, dropped: list[int], device: torch.device) -> Tensor:
    """The entries along one axis of one tensor that survive removing units ``dropped`` (every member of ``layer``
    that lives on that tensor and axis is applied)."""
    keep = torch.ones(size, dtype=torch.bool, device=device)
    for member in axis_members:
        w = member.span(layer.width)
        for o in member.offsets:
            for g in dropped:
                keep[o + g * w : o + (g + 1) * w] = False
    return keep.nonzero().flatten()


def default_resize(module: nn.Module, layer: GroupLayer, kept: int) -> None:
    """Rewrite the head counts ``module`` (and its ``self``/``attention`` child) hold: query heads, KV heads (the
    attribute names of :data:`HEAD_ATTRS`/:data:`KV_ATTRS`, and those a :func:`register_attention` named) and the
    inner width, each only where it held the old value."""
    from lightning_sparse.structure.patterns import HEAD_ATTRS, KV_ATTRS, STATED_ATTRS

    if layer.kind != "head":
        for attr in ("intermediate_size", "intermediate_dim", "moe_intermediate_size"):  # an MLP that states its width
            if module.__dict__.get(attr) == layer.count:
                setattr(module, attr, kept)
        return
    stated = STATED_ATTRS.get(layer.pattern, {})
    g, d, kv = layer.query_heads, layer.width, layer.kv_heads
    if kv:  # query-slot units: KV heads stay, the group size shrinks
        old = {"heads": layer.count * kv, "groups": layer.count, "inner": layer.count * kv * d}
        new = {"heads": kept * kv, "groups": kept, "inner": kept * kv * d}
    else:
        old = {"heads": layer.count * g, "kv": layer.count, "inner": layer.count * g * d}
        new = {"heads": kept * g, "kv": kept, "inner": kept * g * d}
    for holder in [module, *(getattr(module, c) for c in ("self", "attention") if isinstance(getattr(module, c, None), nn.Module))]:
        for attrs, key in ((HEAD_ATTRS + stated.get("heads", ()), "heads"), (KV_ATTRS + stated.get("kv", ()), "kv"),
                           (("num_key_value_groups",), "groups"), (("all_head_size", "inner_dim", "split_size"), "inner")):
            if key not in old:
                continue
            for attr in attrs:
                value = holder.__dict__.get(attr)
                if isinstance(value, int) and not isinstance(value, bool) and value == old[key]:
                    setattr(holder, attr, new[key])


@torch.no_grad()
def remove_units(model: nn.Module, layer: GroupLayer, keep: list[int]) -> str:
    """Remove from ``model``, in place, every unit of ``layer`` not in ``keep`` (by the rebuild registered for its
    pattern, else :func:`slice_units`); return what the module became. Raises :class:`KeptDense` to keep them."""
    rebuild = _REBUILDS.get(layer.pattern)
    return rebuild(model, layer, keep) if rebuild is not None else slice_units(model, layer, keep)


@torch.no_grad()
def slice_units(model: nn.Module, layer: GroupLayer, keep: list[int]) -> str:
    """The generic surgery (module doc): delete the dropped units' entries of every member, re-read the owners'
    shape attributes, and resize the module that holds the units."""
    slice_members(model, layer, keep)
    module = model.get_submodule(layer.module) if layer.module else model
    for cls in type(module).__mro__:
        if cls in _RESIZERS:
            _RESIZERS[cls](module, layer, len(keep))
            break
    else:
        default_resize(module, layer, len(keep))
    if layer.kind == "head" and layer.query_heads > 1:
        return f"{layer.module_type} ({len(keep)} KV groups × {layer.query_heads} query heads)"
    if layer.kind == "head" and layer.kv_heads:
        return f"{layer.module_type} ({len(keep)} query heads per KV head × {layer.kv_heads})"
    return f"{layer.module_type} ({len(keep)} {layer.kind}s)"


@torch.no_grad()
def slice_members(model: nn.Module, layer: GroupLayer, keep: list[int]) -> None:
    """Delete the dropped units' entries of every member of ``layer`` and re-read the owners' shape attributes (the
    tensor half of :func:`slice_units`, for a rebuild that states the new size itself)."""
    dropped = [g for g in range(layer.count) if g not in set(keep)]
    by_tensor: dict[tuple[str, int], list] = {}
    for member in layer.members:
        by_tensor.setdefault((member.param, member.axis), []).append(member)
    owners = {}
    for (param, axis), members in by_tensor.items():
        owner_name, _, attr = param.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        tensor = getattr(owner, attr)
        index = removed_index(layer, tensor.shape[axis], members, dropped, tensor.device)
        sliced = tensor.detach().index_select(axis, index).clone()
        setattr(owner, attr, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
        owners[owner_name] = owner
    for owner in owners.values():
        _slice_shapes(owner)


def _rebuild_shared_bias(model: nn.Module, layer: GroupLayer, keep: list[int]) -> str:
    """Units coupled across a stack (``attention:shared-position-bias``): slice every layer's projections and the
    bias table, then every attention of the chain (the modules holding the ``q`` members) states the new count."""
    description = slice_units(model, layer, keep)
    for member in layer.members:
        if member.role == "q" and member.param.endswith(".q.weight"):
            attention = member.param[: -len(".q.weight")]
            if attention != layer.module:
                default_resize(model.get_submodule(attention), layer, len(keep))
    return f"{description}, in each of its stack's layers"


register_rebuild("attention:shared-position-bias", _rebuild_shared_bias)
