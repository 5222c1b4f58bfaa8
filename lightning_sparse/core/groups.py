"""Coupled channel groups: the output channels that must be pruned, and removed, together.

Structure first, as in Torch-Pruning's DepGraph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023,
arXiv 2301.12900), found from one **real forward** of the example input, not from a ``torch.fx`` trace (Hugging Face
models and forwards with data-dependent branches do not trace): a :class:`~torch.overrides.TorchFunctionMode`
records every torch operation the forward runs, with its arguments and its real output, and layers are identified
by the parameters they are called with (``F.conv2d(x, weight, …)`` with ``weight`` the parameter
``…convolution.weight``). Every channel of every tensor gets an id. A Linear/Conv (``groups=1``) makes fresh ids for
its outputs; elementwise operations, pooling, padding, BatchNorm, permutes and reshapes pass them on (to the axis
they move to); a residual add, or a product such as a squeeze-and-excitation gate, *unites* its operands' ids
position by position; a concat along the channels places the ids of its parts at their offsets; a depthwise conv
shares the ids of its input, and a grouped conv (``1 < groups < in_channels``) unites each of its groups into one
slot (a group keeps whole conv groups). What reads a channel (the input columns of the next layers) is a *consumer*;
what holds per-channel entries (producing weights and biases, BatchNorm/GroupNorm affine entries, depthwise/grouped
filters, a layer-scale parameter multiplying the channels) is a *member*. What each operation does is read from
the library's one op table, :mod:`lightning_sparse.structure.ops`.

A pruned slot's channel is followed as *zero* or *constant*: a zero channel stays zero through zero-preserving
operations and products; a constant one (after a sigmoid, a BatchNorm without affine entries, a constant added)
is zero again after a BatchNorm whose affine entries are members, or in a product with a zero channel (the SE
gate); a layer reading a constant channel, or the model output receiving one, makes the group not removable.

A **group** is a set of channel slots joined by shared members: every slot holds one channel (or more) of each
member. It is the unit of scoring, ``score(slot) = Σ_members ||W_member[slot]||`` (L1 or L2 norm of the producing
weights' channels, :data:`~lightning_sparse.core.structured.NORMS`), and of removal: pruning a slot zeroes that
channel in every member, biases and norm affine entries included, so the channel is exactly zero wherever it goes
and :mod:`lightning_sparse.deployment.residual` can cut it out of every member and consumer.

Where a channel reaches an operation this analysis does not understand (an indexing, a LayerNorm over the channels,
a reduction over the channels, an unknown function), its coupling is not proved: the group stays unpruned and
:attr:`ChannelGroup.reason` names the op and the module running it. Where a group's channels meet the model input
or reach the model output they are pruned (the masks are exact) but cannot be removed
(:attr:`ChannelGroup.removable` is False, with the reason).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_sparse.core.criteria import exact_mask
from lightning_sparse.core.shards import full_tensor
from lightning_sparse.core.structured import NORMS
from lightning_sparse.structure import ops

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Member roles whose entries are whole parameters of a module that is not rebuilt (sliced in place at deploy).
PARAMETER_ROLES = ("scale", "shift")


class GroupError(ValueError):
    """A coupled group that cannot hold together (members that disagree in size)."""


@dataclass(frozen=True)
class Member:
    """A tensor with one entry (row, filter, affine value) per channel of a group, along ``axis``.

    ``role``: ``weight`` (a Linear/Conv producing the channels: scored), ``bias`` (its bias), ``norm`` (a BatchNorm's
    or per-channel GroupNorm's affine weight or bias), ``depthwise`` / ``grouped`` (a depthwise or grouped conv's
    filters or bias, which read their input group), ``scale`` / ``shift`` (a parameter multiplied with / added to
    the channels, such as ConvNeXt's layer-scale ``gamma``).
    """

    name: str
    layer: str
    role: str
    axis: int


@dataclass
class ChannelGroup:
    """Channel slots pruned and removed together: ``members[name] = (Member, slot of each of its channels)`` and
    ``consumers[layer] = slot of each input column`` (-1: a column of another group)."""

    index: int
    channels: int
    members: dict[str, tuple[Member, Tensor]] = field(default_factory=dict)
    consumers: dict[str, Tensor] = field(default_factory=dict)
    prunable: bool = True
    removable: bool = True
    reason: str = ""

    @property
    def weights(self) -> list[str]:
        """The producing weights (scored members), in model order."""
        return [name for name, (member, _) in self.members.items() if member.role in ("weight", "depthwise", "grouped") and name.endswith("weight")]

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(member.layer for member, _ in self.members.values()))

    def describe(self) -> str:
        """One line: the slots, every member, every consumer, and why it is not pruned or not removable."""
        members = ", ".join(f"{name} ({member.role})" for name, (member, _) in self.members.items())
        text = f"group {self.index}: {self.channels} channels; members {members}"
        if self.consumers:
            text += f"; read by {', '.join(self.consumers)}"
        if not self.prunable:
            text += f"; not pruned: {self.reason}"
        elif not self.removable:
            text += f"; pruned but not removable: {self.reason}"
        return text


@dataclass
class GroupPlan:
    """Every group of a model, and how it was found (``traced``: True when the example forward ran and was
    followed to its outputs; ``note`` says why not)."""

    groups: list[ChannelGroup]
    traced: bool
    note: str = ""

    def group_of(self, name: str) -> ChannelGroup | None:
        """The group in which parameter ``name`` is a member, if any."""
        return next((g for g in self.groups if name in g.members), None)


# ----------------------------------------------------------------------------- channel ids through a real forward
class _Ids:
    """Union-find over channel ids, with the reasons a class is blocked (unproved) or fixed (not removable)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.blocked: dict[int, str] = {}
        self.fixed: dict[int, str] = {}

    def fresh(self, count: int) -> Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return torch.arange(start, start + count)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: Tensor, b: Tensor) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx

    def block(self, ids: Tensor, reason: str) -> None:
        for i in ids.tolist():
            self.blocked.setdefault(i, reason)

    def fix(self, ids: Tensor, reason: str) -> None:
        for i in ids.tolist():
            self.fixed.setdefault(i, reason)


@dataclass
class _Value:
    """A tensor whose channels along ``dim`` carry ``ids``; ``const[i]``: channel ``i`` is a non-zero constant (not
    zero) when its slot is pruned; ``layers`` wrote into it (for error messages)."""

    dim: int
    ids: Tensor
    const: Tensor
    layers: frozenset[str]


FREE = "free"  # computed from the model input and constants alone (no layer's channels in it)
OPAQUE = "opaque"  # computed by an operation that is not followed, or from a parameter used in an unknown way


def _tensors(tree: Any) -> list[Tensor]:
    """The tensors in a (nested) tuple/list/dict/ModelOutput, in order."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (tuple, list)):
        return [t for v in tree for t in _tensors(v)]
    return []


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


class _Recorder(TorchFunctionMode):
    """Follows channel ids through every torch operation of one forward (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.ids = _Ids()
        self.members: dict[str, tuple[Member, Tensor]] = {}
        self.consumers: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}  # a layer called again writes the same channels
        self.values: dict[int, tuple[Tensor, Any]] = {}  # id(tensor) -> (tensor, _Value | FREE | OPAQUE)
        self.params = {id(p): name for name, p in model.named_parameters()}  # the canonical (first) name of each
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        self.tied = {i: names for i, names in aliases.items() if len(names) > 1}  # one tensor in several modules
        self.buffers = {id(b): name for name, b in model.named_buffers(remove_duplicate=False)}
        self.stack: list[str] = []  # the modules whose forward is running
        self.failure: BaseException | None = None

    # --- bookkeeping
    def value(self, tensor: Any) -> Any:
        if not isinstance(tensor, Tensor):
            return None
        if id(tensor) in self.params:
            return ("param", self.params[id(tensor)])
        entry = self.values.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else FREE

    def set(self, tensor: Tensor, value: Any) -> None:
        self.values[id(tensor)] = (tensor, value)

    def where(self) -> str:
        return f" in {self.stack[-1]}" if self.stack and self.stack[-1] else ""

    def layer_of(self, param: Any) -> tuple[str, str] | None:
        name = self.params.get(id(param)) if isinstance(param, Tensor) else None
        if name is None:
            return None
        layer, _, attribute = name.rpartition(".")
        return layer, attribute

    def add_member(self, param: Any, role: str, ids: Tensor, axis: int = 0) -> None:
        name = self.params.get(id(param)) if isinstance(param, Tensor) else None
        if name is None:
            return
        if name in self.members:
            self.ids.union(self.members[name][1], ids)
        else:
            self.members[name] = (Member(name, name.rpartition(".")[0], role, axis), ids)

    def consume(self, layer: str, value: _Value, op: str) -> None:
        if bool(value.const.any()):
            self.ids.fix(value.ids[value.const], f"a pruned channel is a non-zero constant where {layer} ({op}) reads it")
        if layer in self.consumers:  # a layer called twice reads the same columns twice
            self.ids.union(self.consumers[layer], value.ids)
        else:
            self.consumers[layer] = value.ids

    def block_all(self, inputs: list[Any], reason: str) -> None:
        for value in inputs:
            if isinstance(value, _Value):
                self.ids.block(value.ids, reason)

    # --- the mode
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.failure is None:
            try:
                self.record(func, args, kwargs, result)
            except Exception as error:  # noqa: BLE001 - GroupError is raised after the forward; nothing else may break it
                self.failure = error
        return result

    def record(self, func: Any, args: tuple, kwargs: dict, result: Any) -> None:
        outs = _tensors(result)
        name = ops.op_name(func)
        if name == "setitem" and args and isinstance(args[0], Tensor):  # x[...] = y writes into x's channels
            self.block_all([self.value(t) for t in _tensors(args)], f"its channels are written in place by setitem{self.where()}")
            self.set(args[0], OPAQUE)
            return
        if not outs:
            return  # sizes, shapes, booleans: no channel flows on
        inputs = [self.value(t) for t in _tensors(args) + _tensors(kwargs)]
        tracked = [v for v in inputs if isinstance(v, _Value)]
        out = self.step(name, func, args, kwargs, outs, inputs, tracked)
        if ops.is_inplace(func) and args and isinstance(args[0], Tensor):
            self.set(args[0], out)
        for t in outs:
            self.set(t, out)

    def plain(self, inputs: list[Any]) -> str:
        """The value of an output computed without any followed channel."""
        return OPAQUE if any(v == OPAQUE or isinstance(v, tuple) for v in inputs) else FREE

    def unknown(self, name: str, tracked: list[_Value], why: str = "not an operation the channel analysis understands") -> str:
        self.block_all(tracked, f"its channels reach {name}{self.where()}: {why}")
        return OPAQUE

    def step(self, name: str, func: Any, args: tuple, kwargs: dict, outs: list[Tensor], inputs: list[Any],
             tracked: list[_Value]) -> Any:  # fmt: skip
        out = outs[0]
        x = self.value(args[0]) if args else None
        if name in ops.CONVS:
            return self.conv(name, args, kwargs, out, x)
        if name == "linear":
            return self.linear(args, kwargs, out, x)
        if name in ("batch_norm", "group_norm", "instance_norm", "layer_norm"):
            return self.norm(name, args, kwargs, out, x, inputs, tracked)
        if not tracked:
            return self.plain(inputs)
        if name in ops.ADD | ops.MUL | ops.DIV:
            return self.combine(name, args, kwargs, out, tracked)
        if name in ops.CONCAT:
            return self.concat(name, args, kwargs, out)
        if len(tracked) > 1 or (len(outs) > 1 and name not in ops.POOL) or not isinstance(x, _Value):
            return self.unknown(name, tracked)
        if any(isinstance(v, tuple) or v == OPAQUE for v in inputs[1:]):
            return self.unknown(name, tracked, "it takes another tensor that is not followed")
        in_shape, shape = tuple(args[0].shape), tuple(out.shape)
        if name in ops.ZERO_PRESERVING or name in ops.PASS:
            return self.passed(name, x, in_shape, shape)
        if name in ops.CONSTANT:
            kept = self.passed(name, x, in_shape, shape)
            return _Value(kept.dim, kept.ids, torch.ones_like(kept.const), kept.layers) if isinstance(kept, _Value) else kept
        if name in ops.POOL:
            if x.dim != 1 or len(in_shape) < 3:
                return self.unknown(name, tracked, "pooling over the channels")
            return self.passed(name, x, in_shape, shape)
        if name in ops.PAD:
            pad = _arg(args, kwargs, 1, "pad")
            mode, fill = _arg(args, kwargs, 2, "mode", "constant"), _arg(args, kwargs, 3, "value", None)
            if x.dim >= len(in_shape) - len(pad) // 2:
                return self.unknown(name, tracked, "padding of the channel axis")
            kept = self.passed(name, x, in_shape, shape)
            if mode == "constant" and fill not in (None, 0, 0.0) and isinstance(kept, _Value):
                kept = _Value(kept.dim, kept.ids, torch.ones_like(kept.const), kept.layers)
            return kept
        if name in ops.RESHAPE:
            return self.reshape(name, x, in_shape, shape)
        if name in ops.PERMUTE:
            return self.permute(name, args, kwargs, x, len(in_shape), shape)
        if name in ops.REDUCE:
            return self.reduce(name, args, kwargs, x, in_shape, shape)
        return self.unknown(name, tracked)

    # --- layers
    def conv(self, name: str, args: tuple, kwargs: dict, out: Tensor, x: Any) -> Any:
        weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        groups = int(_arg(args, kwargs, 6, "groups", 1))
        found = self.layer_of(weight)
        if found is None:
            return self.unknown(name, [x] if isinstance(x, _Value) else [], "a convolution with a weight that is not a parameter")
        layer = found[0]
        if id(weight) in self.tied:
            return self.tied_layer(name, x, int(out.shape[1]), 1, weight)
        c_in, c_out = int(args[0].shape[1]), int(out.shape[1])
        if isinstance(x, _Value) and x.dim != 1:
            self.ids.block(x.ids, f"its channels reach {layer} ({name}) on another axis")
            x = OPAQUE
        if groups == 1:
            if isinstance(x, _Value):
                self.consume(layer, x, name)
            if layer not in self.outputs:
                self.outputs[layer] = self.ids.fresh(c_out)
            ids = self.outputs[layer]
            self.add_member(weight, "weight", ids)
            self.add_member(bias, "bias", ids)
            return _Value(1, ids, torch.zeros(c_out, dtype=torch.bool), frozenset({layer}))
        role = "depthwise" if groups == c_in else "grouped"
        if isinstance(x, _Value):
            in_ids = x.ids
        else:
            in_ids = self.ids.fresh(c_in)
            if x == OPAQUE:
                self.ids.block(in_ids, f"{layer} ({role} conv) reads channels that are not followed")
            else:
                self.ids.fix(in_ids, f"{layer} ({role} conv) reads channels that no layer wrote (the model input)")
        per_in, per_out = c_in // groups, c_out // groups
        if role == "depthwise":
            ids = in_ids.repeat_interleave(per_out)
        else:  # a conv group is one slot: its input channels and its output channels go together
            blocks = in_ids.view(groups, per_in)
            for k in range(groups):
                self.ids.union(blocks[k, :1].expand(per_in).clone(), blocks[k])
            ids = self.ids.fresh(c_out)
            self.ids.union(blocks[:, :1].repeat_interleave(per_out, 0).flatten(), ids)
        self.add_member(weight, role, ids)
        self.add_member(bias, role, ids)
        layers = (x.layers if isinstance(x, _Value) else frozenset()) | {layer}
        return _Value(1, ids, torch.zeros(c_out, dtype=torch.bool), layers)

    def tied_layer(self, op: str, x: Any, channels: int, dim: int, weight: Tensor) -> _Value:
        """A layer whose weight is tied to another module's (an LM head sharing the embedding): its channels, and
        the channels it reads, are not followed (removing them would change the other module)."""
        reason = f"{op} with weight tied to several modules ({', '.join(self.tied[id(weight)])})"
        if isinstance(x, _Value):
            self.ids.block(x.ids, f"its channels reach {reason}")
        ids = self.ids.fresh(channels)
        self.ids.block(ids, f"written by {reason}")
        return _Value(dim, ids, torch.zeros(channels, dtype=torch.bool), frozenset())

    def linear(self, args: tuple, kwargs: dict, out: Tensor, x: Any) -> Any:
        weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        found = self.layer_of(weight)
        if found is None:
            return self.unknown("linear", [x] if isinstance(x, _Value) else [], "a linear map with a weight that is not a parameter")
        layer = found[0]
        last = out.dim() - 1
        if id(weight) in self.tied:
            return self.tied_layer("linear", x, int(out.shape[-1]), last, weight)
        if isinstance(x, _Value):
            if x.dim != args[0].dim() - 1:
                self.ids.block(x.ids, f"its channels reach {layer} (linear) on another axis than its input features")
            else:
                self.consume(layer, x, "linear")
        if layer not in self.outputs:
            self.outputs[layer] = self.ids.fresh(int(out.shape[-1]))
        ids = self.outputs[layer]
        self.add_member(weight, "weight", ids)
        self.add_member(bias, "bias", ids)
        return _Value(last, ids, torch.zeros(ids.numel(), dtype=torch.bool), frozenset({layer}))

    def norm(self, name: str, args: tuple, kwargs: dict, out: Tensor, x: Any, inputs: list[Any], tracked: list[_Value]) -> Any:
        index = {"batch_norm": 3, "group_norm": 2, "instance_norm": 3, "layer_norm": 2}[name]
        weight, bias = _arg(args, kwargs, index, "weight"), _arg(args, kwargs, index + 1, "bias")
        found = self.layer_of(weight) or self.layer_of(bias)
        if found is None and name == "batch_norm":
            mean = _arg(args, kwargs, 1, "running_mean")
            buffer = self.buffers.get(id(mean)) if isinstance(mean, Tensor) else None
            found = (buffer.rpartition(".")[0], "") if buffer else None
        layer = found[0] if found is not None else f"{name}{self.where()}"
        if not isinstance(x, _Value):
            if tracked:
                return self.unknown(name, tracked, "its statistics or affine entries are tensors that are not followed")
            return self.plain(inputs)
        ndim = args[0].dim()
        if name == "layer_norm":
            shape = _arg(args, kwargs, 1, "normalized_shape")
            if x.dim >= ndim - len(shape):  # blocked; its output keeps the (blocked) channels, so what meets it says why
                self.unknown(name, tracked, f"LayerNorm {layer} normalizes over the channels (removing one changes the others)")
                return x
            const = torch.ones_like(x.const) if bias is not None else x.const  # a zero row normalizes to its bias
            return _Value(x.dim, x.ids, const, x.layers)
        if x.dim != 1:
            return self.unknown(name, tracked, f"{layer} normalizes another axis than the channels")
        if name == "group_norm" and int(_arg(args, kwargs, 1, "num_groups")) != int(args[0].shape[1]):
            self.unknown(name, tracked, f"GroupNorm {layer} normalizes several channels together")
            return x
        if name == "instance_norm" and weight is None:
            return self.unknown(name, tracked, f"InstanceNorm {layer} has no affine entries")
        if isinstance(weight, Tensor) and isinstance(bias, Tensor) and self.layer_of(weight) and self.layer_of(bias):
            self.add_member(weight, "norm", x.ids)
            self.add_member(bias, "norm", x.ids)
            return _Value(1, x.ids, torch.zeros_like(x.const), x.layers | {layer})  # w·x̂ + b = 0 where w, b are pruned
        return _Value(1, x.ids, torch.ones_like(x.const), x.layers)  # -mean/std: a pruned channel is a constant

    # --- channels moved
    def passed(self, name: str, x: _Value, in_shape: tuple[int, ...], shape: tuple[int, ...]) -> Any:
        if len(shape) != len(in_shape) or shape[x.dim] != in_shape[x.dim]:
            return self.unknown(name, [x], "it changes the channel axis")
        return x

    def reshape(self, name: str, x: _Value, in_shape: tuple[int, ...], shape: tuple[int, ...]) -> Any:
        """Unchanged shapes pass; merging axes before or after the channels, or adding/removing axes of size 1, keeps
        them; ``(N, C, *S) → (N, C·ΠS)`` makes each channel a block of ΠS columns."""
        dim = x.dim
        if in_shape == shape:
            return x
        if len(shape) == dim + 1 and shape[:dim] == in_shape[:dim] and shape[dim] == math.prod(in_shape[dim:]):
            block = math.prod(in_shape[dim + 1 :])
            return _Value(dim, x.ids.repeat_interleave(block), x.const.repeat_interleave(block), x.layers)
        tail = in_shape[dim:]
        if len(shape) >= len(tail) and shape[len(shape) - len(tail) :] == tail and math.prod(shape) == math.prod(in_shape):
            return _Value(len(shape) - len(tail), x.ids, x.const, x.layers)  # axes before the channels merged or split
        if len(shape) > dim and shape[: dim + 1] == in_shape[: dim + 1]:
            return x  # axes after the channels merged or split
        if in_shape[dim] > 1:
            old = [i for i, s in enumerate(in_shape) if s != 1]
            new = [i for i, s in enumerate(shape) if s != 1]
            if [in_shape[i] for i in old] == [shape[i] for i in new]:
                return _Value(new[old.index(dim)], x.ids, x.const, x.layers)
        return self.unknown(name, [x], f"a reshape from {list(in_shape)} to {list(shape)} that moves the channels")

    def permute(self, name: str, args: tuple, kwargs: dict, x: _Value, ndim: int, shape: tuple[int, ...]) -> Any:
        if name == "permute":
            dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else _arg(args, kwargs, 1, "dims")
            order = [int(d) % ndim for d in dims]
            return _Value(order.index(x.dim), x.ids, x.const, x.layers)
        a, b = (int(_arg(args, kwargs, 1, "dim0")) % ndim, int(_arg(args, kwargs, 2, "dim1")) % ndim)
        dim = b if x.dim == a else a if x.dim == b else x.dim
        return _Value(dim, x.ids, x.const, x.layers)

    def reduce(self, name: str, args: tuple, kwargs: dict, x: _Value, in_shape: tuple[int, ...], shape: tuple[int, ...]) -> Any:
        dims = _arg(args, kwargs, 1, "dim")
        if dims is None:
            return self.unknown(name, [x], "a reduction over every axis")
        dims = sorted({int(d) % len(in_shape) for d in ([dims] if isinstance(dims, int) else dims)})
        if x.dim in dims:
            return self.unknown(name, [x], "a reduction over the channels")
        keepdim = len(shape) == len(in_shape)
        return _Value(x.dim if keepdim else x.dim - sum(d < x.dim for d in dims), x.ids, x.const, x.layers)

    # --- tensors combined
    def combine(self, name: str, args: tuple, kwargs: dict, out: Tensor, tracked: list[_Value]) -> Any:
        """An add/sub/mul/div: operands of one shape share their channels (position by position). A pruned channel is
        zero after a product when one factor is zero, after a sum when every term is."""
        where = f"{name}{self.where()}"
        operands = [a for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)]
        values = [self.value(a) for a in operands]
        ndim = out.dim()
        dims = {v.dim - a.dim() + ndim for a, v in zip(operands, values) if isinstance(v, _Value)}
        if len(dims) > 1:
            return self.unknown(name, tracked, "the channels of its operands lie on different axes")
        dim = dims.pop()
        sizes = {v.ids.numel() for v in tracked}
        if len(sizes) > 1 or sizes != {out.shape[dim]}:
            layers = sorted(set().union(*(v.layers for v in tracked)))
            described = ", ".join(f"{sorted(v.layers)} with {v.ids.numel()}" for v in tracked)
            raise GroupError(
                f"channel groups: layers {layers} meet at {where} with channels that disagree in size ({described}, "
                f"result {out.shape[dim]}): a coupled group needs one channel count; make them equal, or prune these "
                f"layers 'unstructured' (a {{glob: granularity}} mapping)"
            )
        base = tracked[0]
        for v in tracked[1:]:
            self.ids.union(base.ids, v.ids)
        product = name in ops.MUL or name in ops.DIV
        divisor = args[1] if len(args) > 1 else kwargs.get("other")
        if name in ops.DIV and isinstance(divisor, Tensor) and isinstance(self.value(divisor), _Value):
            return self.unknown(name, tracked, "a division by the channels")
        const = base.const.clone()
        for v in tracked[1:]:
            const = const & v.const if product else const | v.const
        for a, v in zip(operands, values):
            if isinstance(v, _Value):
                continue
            axis = dim - (ndim - a.dim())
            per_channel = 0 <= axis < a.dim() and a.shape[axis] == out.shape[dim] and out.shape[dim] > 1
            if isinstance(v, tuple):  # a parameter: a layer scale or shift with one entry per channel
                if per_channel and all(s == 1 for i, s in enumerate(a.shape) if i != axis):
                    self.add_member(a, "scale" if product else "shift", base.ids, axis)
                    continue
                if per_channel or product is False:
                    self.ids.block(base.ids, f"its channels meet parameter {v[1]} at {where}, which is not one entry per channel")
                continue
            if v == OPAQUE:
                self.ids.block(base.ids, f"its channels meet a tensor that is not followed at {where}")
            elif not product:
                self.ids.fix(base.ids, f"its channels meet a tensor no layer wrote (the model input or a constant) at {where}")
            elif per_channel:
                self.ids.fix(base.ids, f"its channels are multiplied by a tensor no layer wrote at {where}")
        if not product:
            numbers = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool) and a != 0]
            if numbers:
                const = torch.ones_like(const)
        return _Value(dim, base.ids, const, frozenset().union(*(v.layers for v in tracked)))

    def concat(self, name: str, args: tuple, kwargs: dict, out: Tensor) -> Any:
        parts = _arg(args, kwargs, 0, "tensors")
        dim = int(_arg(args, kwargs, 1, "dim", 0)) % out.dim()
        values = [self.value(p) for p in parts]
        tracked = [v for v in values if isinstance(v, _Value)]
        if any(v.dim != tracked[0].dim for v in tracked):
            return self.unknown(name, tracked, "the channels of its parts lie on different axes")
        if tracked[0].dim != dim:  # a concat along another axis: the parts share their channels
            for v in tracked[1:]:
                if v.ids.numel() != tracked[0].ids.numel():
                    return self.unknown(name, tracked, "parts with different channel counts")
                self.ids.union(tracked[0].ids, v.ids)
            if len(tracked) < len(values):
                self.ids.block(tracked[0].ids, f"its channels meet a tensor that is not followed at {name}{self.where()}")
            const = torch.stack([v.const for v in tracked]).any(0)
            return _Value(dim, tracked[0].ids, const, frozenset().union(*(v.layers for v in tracked)))
        ids, const = [], []
        for part, value in zip(parts, values):
            if isinstance(value, _Value):
                ids.append(value.ids)
                const.append(value.const)
                continue
            fresh = self.ids.fresh(int(part.shape[dim]))
            if value == FREE:
                self.ids.fix(fresh, f"part of a concat ({name}{self.where()}) that no layer wrote")
            else:
                self.ids.block(fresh, f"part of a concat ({name}{self.where()}) that is not followed")
            ids.append(fresh)
            const.append(torch.ones(fresh.numel(), dtype=torch.bool))
        return _Value(dim, torch.cat(ids), torch.cat(const), frozenset().union(*(v.layers for v in tracked)))


def _groups(recorder: _Recorder, order: Sequence[str]) -> list[ChannelGroup]:
    """Slots (classes of ids) joined into groups by the members that hold them, in model order."""
    ids = recorder.ids
    rank = {name: i for i, name in enumerate(order)}
    members = sorted(recorder.members.items(), key=lambda item: rank.get(item[0], len(rank)))
    parent: dict[int, int] = {}

    def find(c: int) -> int:
        while parent.setdefault(c, c) != c:
            c = parent[c]
        return c

    for _, (_, member_ids) in members:
        roots = [ids.find(i) for i in member_ids.tolist()]
        for r in roots[1:]:
            a, b = find(roots[0]), find(r)
            if a != b:
                parent[b] = a
    groups: dict[int, ChannelGroup] = {}
    slot_of: dict[int, dict[int, int]] = {}
    for name, (member, member_ids) in members:
        roots = [ids.find(i) for i in member_ids.tolist()]
        g = find(roots[0])
        if g not in groups:
            groups[g] = ChannelGroup(index=len(groups), channels=0)
            slot_of[g] = {}
        slots = slot_of[g]
        for r in roots:
            if r not in slots:
                slots[r] = len(slots)
        groups[g].members[name] = (member, torch.tensor([slots[r] for r in roots], dtype=torch.long))
    blocked: dict[int, set[str]] = {}
    fixed: dict[int, set[str]] = {}
    for i, reason in ids.blocked.items():
        blocked.setdefault(ids.find(i), set()).add(reason)
    for i, reason in ids.fixed.items():
        fixed.setdefault(ids.find(i), set()).add(reason)
    for g, group in groups.items():
        group.channels = len(slot_of[g])
        why_blocked = sorted(set().union(*(blocked.get(c, set()) for c in slot_of[g])))
        why_fixed = sorted(set().union(*(fixed.get(c, set()) for c in slot_of[g])))
        if why_blocked:
            group.prunable, group.removable, group.reason = False, False, "; ".join(why_blocked)
        elif why_fixed:
            group.removable, group.reason = False, "; ".join(why_fixed)
        for layer, columns in recorder.consumers.items():
            slots = torch.tensor([slot_of[g].get(ids.find(i), -1) for i in columns.tolist()], dtype=torch.long)
            if bool((slots >= 0).any()):
                group.consumers[layer] = slots
    return list(groups.values())


def find_groups(model: nn.Module, example_inputs: Sequence[Tensor] | Tensor | None) -> GroupPlan:
    """The coupled channel groups of ``model``, from one real forward of ``example_inputs`` (eval mode, no
    gradients, every module's mode restored; no ``torch.fx`` trace, so data-dependent branches and Hugging Face
    models work). Without an example input, or where the forward fails, no group is proved and
    :attr:`GroupPlan.note` says why. Raises :class:`GroupError` for a group whose members disagree in size.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs or ())
    order = [name for name, _ in model.named_parameters()]
    if not inputs:
        return GroupPlan([], False, "no example input to run the model with, so no coupling is proved")
    recorder = _Recorder(model)
    names = {module: name for name, module in model.named_modules()}

    def enter(module: nn.Module, args: Any) -> None:
        if module in names:
            recorder.stack.append(f"{names[module] or 'the model'} ({type(module).__name__})")

    def leave(module: nn.Module, args: Any, output: Any) -> None:  # returns None: the output is unchanged
        if module in names and recorder.stack:
            recorder.stack.pop()

    handles = [
        torch.nn.modules.module.register_module_forward_pre_hook(enter),
        torch.nn.modules.module.register_module_forward_hook(leave),
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), recorder:
            for x in inputs:
                recorder.set(x, FREE)
            output = model(*inputs)
    except GroupError:
        raise
    except Exception as error:  # noqa: BLE001 - the input does not fit the model: nothing can be proved
        why = f"the example forward of {type(model).__name__} failed ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
        return GroupPlan([], False, f"{why}, so no coupling is proved")
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    if isinstance(recorder.failure, GroupError):
        raise recorder.failure
    if recorder.failure is not None:
        error = recorder.failure
        return GroupPlan([], False, f"the channel analysis failed ({type(error).__name__}: {str(error).splitlines()[0][:160]}), so no coupling is proved")
    for tensor in _tensors(output):
        value = recorder.value(tensor)
        if isinstance(value, _Value):
            recorder.ids.fix(value.ids, "its channels reach the model's output")
    return GroupPlan(_groups(recorder, order), True)


# ----------------------------------------------------------------------------- scoring and pruning groups
def slot_scores(group: ChannelGroup, params: Mapping[str, Tensor], names: Sequence[str], norm: str = "l1",
                pruned: Tensor | None = None) -> Tensor:  # fmt: skip
    """``score(slot) = Σ_{member in names} ||member's channel(s) at slot||`` (``norm``: ``l1`` or ``l2``), already
    ``pruned`` slots at -1 so they stay pruned as the sparsity rises."""
    if norm not in NORMS:
        raise ValueError(f"`channel_norm` must be one of {NORMS}, got {norm!r}")
    scores = None
    for name in names:
        member, slots = group.members[name]
        weight = full_tensor(params[name].detach())  # whole (gathered) under FSDP2: groups are decided as unsharded
        rows = weight.movedim(member.axis, 0).reshape(weight.shape[member.axis], -1).float()
        per = rows.abs().sum(1) if norm == "l1" else rows.pow(2).sum(1).sqrt()
        if scores is None:
            scores = torch.zeros(group.channels, device=weight.device)
        scores.index_add_(0, slots.to(weight.device), per)
    if scores is None:
        raise ValueError(f"channel group {group.index} has no scored member among {list(group.members)}")
    if pruned is not None:
        scores = scores.masked_fill(pruned.to(scores.device), -1.0)
    return scores


def member_mask(group: ChannelGroup, name: str, keep: Tensor, shape: Sequence[int]) -> Tensor:
    """The bool mask of member ``name`` (a tensor of ``shape``) keeping the channels of the kept slots."""
    member, slots = group.members[name]
    kept = keep.to(slots.device)[slots]
    view = [1] * len(shape)
    view[member.axis] = -1
    return kept.view(view).expand(*shape).clone()


def pruned_slots(group: ChannelGroup, masks: Any, names: Sequence[str]) -> Tensor:
    """Slots whose channels are fully pruned in the first masked scored member (all members agree)."""
    pruned = torch.zeros(group.channels, dtype=torch.bool)
    for name in names:
        if masks.is_masked(name):
            member, slots = group.members[name]
            mask = masks.mask(name)
            rows = ~mask.movedim(member.axis, 0).reshape(mask.shape[member.axis], -1).any(1)
            pruned[slots[rows.cpu()]] = True
            return pruned
    return pruned


def prune_group(masks: Any, group: ChannelGroup, names: Sequence[str], n_slots: int, norm: str = "l1") -> Tensor:
    """Prune the ``n_slots`` slots of lowest :func:`slot_scores` (ties: lower slot first) in every masked member of
    ``group`` (``masks`` a :class:`~lightning_sparse.core.masks.MaskSet`); returns the kept slots."""
    scores = slot_scores(group, masks.params, names, norm, pruned_slots(group, masks, names))
    keep = exact_mask(scores, n_slots).cpu()
    for name in group.members:
        if name in masks:
            masks.set(name, member_mask(group, name, keep, masks.params[name].shape))
    return keep


class GroupedChannels:
    """The groups a ``channel``-granularity pruning run prunes, from a :class:`GroupPlan` and its targets.

    A group is pruned when one of its producing weights is a target with ``channel`` granularity: those weights are
    scored (:func:`slot_scores`), and every other member that is not a target of its own (biases, BatchNorm affine
    entries, depthwise filters) is masked with them as a *companion*, so a pruned channel is exactly zero (unless
    it is in ``excluded``, the names the user's ``exclude`` globs match). Members
    the run does not prune as a group (a weight left out of ``include``, or pruned ``unstructured``) keep the group's
    masks exact but make it not removable. A target in a group whose coupling is not proved stays dense
    (:attr:`unpruned`, with the reason).
    """

    def __init__(self, plan: GroupPlan, targets: Mapping[str, Tensor], channel: Sequence[str], params: Mapping[str, Tensor],
                 excluded: Collection[str] = ()) -> None:  # fmt: skip
        self.plan = plan
        self.selected: list[tuple[ChannelGroup, list[str]]] = []
        self.companions: dict[str, Tensor] = {}
        self.unpruned: dict[str, str] = {}
        self.not_removable: dict[int, str] = {}
        channel_set = set(channel)
        for group in plan.groups:
            scored = [name for name in group.weights if name in channel_set]
            if not scored:
                continue
            if not group.prunable:
                self.unpruned.update({name: group.reason for name in scored})
                continue
            reasons = [group.reason] if not group.removable else []
            for name, (member, _) in group.members.items():
                if name in channel_set:
                    continue
                if name in targets:
                    reasons.append(f"{name} is pruned with another granularity")
                elif member.role in ("weight",) and name.endswith("weight"):
                    reasons.append(f"{name} is not selected (`include`/`exclude`/`sparsity`)")
                elif name in excluded:
                    reasons.append(f"{name} is excluded (`exclude`): its pruned channels are constants, not zeros")
                else:
                    self.companions[name] = params[name]
            if reasons:
                self.not_removable[group.index] = "; ".join(reasons)
            self.selected.append((group, scored))
        grouped = {name for group, _ in self.selected for name in group.weights}
        for name in channel:
            if name not in grouped and name not in self.unpruned:
                self.unpruned[name] = plan.note or "it is not a Linear/Conv producing channels in the example forward"

    @property
    def names(self) -> set[str]:
        """Every parameter whose mask this object writes (scored weights and companions), and the unpruned targets."""
        scored = {name for _, names in self.selected for name in names}
        return scored | set(self.companions) | set(self.unpruned)

    def sparsity_of(self, group: ChannelGroup, names: Sequence[str], sparsity: float | Mapping[str, float]) -> float:
        """The one sparsity of a group; its scored members given different ones is an error naming them."""
        if not isinstance(sparsity, Mapping):
            return float(sparsity)
        values = {name: float(sparsity[name]) for name in names}
        if len(set(values.values())) > 1:
            given = ", ".join(f"{name}: {value:.4g}" for name, value in values.items())
            raise ValueError(
                f"`sparsity`: the layers of coupled channel group {group.index} ({', '.join(names)}) share their channels "
                f"(one residual stream or concat), so they take one sparsity, but are given {given}"
            )
        return next(iter(values.values()))

    def check(self, sparsity: float | Mapping[str, float], multiple: int = 1) -> None:
        """Refuse, before training, groups given several sparsities or a sparsity that removes every channel."""
        from lightning_sparse.core.structured import channels_to_prune

        for group, names in self.selected:
            channels_to_prune(f"channel group {group.index} ({', '.join(names)})", self.sparsity_of(group, names, sparsity), group.channels, multiple)

    def prune(self, masks: Any, sparsity: float | Mapping[str, float], norm: str = "l1", multiple: int = 1) -> dict[str, int]:
        """Prune every selected group to ``sparsity`` (one value, or one per parameter), keeping a multiple of
        ``multiple`` channels in each; zeros written per member."""
        from lightning_sparse.core.structured import channels_to_prune

        counts = {}
        for group, names in self.selected:
            target = self.sparsity_of(group, names, sparsity)
            prune_group(masks, group, names, channels_to_prune(f"channel group {group.index}", target, group.channels, multiple), norm)
            counts.update({name: masks.numel(name) - masks.nonzeros(name) for name in group.members if name in masks})
        return counts

    def summary(self) -> str:
        """What is pruned as which group, what is not removable and what stays dense, with the reasons."""
        lines = [f"channel groups ({'from a real forward' if self.plan.traced else self.plan.note or 'none found'}):"]
        for group, names in self.selected:
            line = f"  {group.describe().split('; not pruned')[0].split('; pruned but')[0]}; scored by {', '.join(names)}"
            if group.index in self.not_removable:
                line += f"; pruned but not removable at deploy: {self.not_removable[group.index]}"
            lines.append(line)
        for name, reason in self.unpruned.items():
            lines.append(f"  {name}: left dense, its channel coupling is not proved: {reason}")
        return "\n".join(lines)
