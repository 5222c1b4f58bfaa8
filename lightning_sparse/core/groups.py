"""Coupled channel groups: the output channels that must be pruned, and removed, together.

Structure first, as in Torch-Pruning's DepGraph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023,
arXiv 2301.12900): the model is traced once with ``torch.fx`` (shapes from one example input) and every channel of
every tensor gets an id. A Linear/Conv (``groups=1``) makes fresh ids for its outputs; elementwise operations,
pooling, BatchNorm and flatten pass them on; a residual add (or a product) of two tensors *unites* their ids
position by position (every layer writing into one residual stream shares its channel index); a concat along the
channels places the ids of its parts at their offsets; a depthwise conv shares the ids of its input. What reads a
channel (the input columns of the next layers) is recorded as a *consumer*; what holds per-channel entries (the
producing weights and biases, BatchNorm's affine ``weight``/``bias``, a depthwise conv's filters) is a *member*.

A **group** is a set of channel slots joined by shared members: every slot holds one channel (or more) of each
member. It is the unit of scoring, ``score(slot) = Σ_members ||W_member[slot]||`` (L1 or L2 norm of the producing
weights' channels, :data:`~lightning_sparse.core.structured.NORMS`), and of removal: pruning a slot zeroes that
channel in every member, biases and norm affine entries included, so the channel is exactly zero wherever it goes
and :mod:`lightning_sparse.deployment.residual` can cut it out of every member and consumer.

Where a channel reaches an operation this analysis does not understand (a transpose, an indexing, a LayerNorm over
the channels, a grouped conv, an untraceable forward), its coupling is not proved: the group stays unpruned and
:attr:`ChannelGroup.reason` says why. Where a group's channels meet the model input or reach the model output they
are pruned (the masks are exact) but cannot be removed (:attr:`ChannelGroup.removable` is False, with the reason).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lightning_sparse.core.criteria import exact_mask
from lightning_sparse.core.structured import NORMS
from lightning_sparse.core.shards import full_tensor

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: f(0) = 0: a pruned (zero) channel stays zero through them.
ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Hardtanh,
    nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout,
)  # fmt: skip
#: elementwise, but f(0) != 0: the channel is a constant after them, so it is pruned but not removed.
CONSTANT_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
ZERO_PRESERVING_FUNCTIONS = (
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, torch.tanh, F.tanh, F.hardtanh,
    F.hardswish, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
)  # fmt: skip
CONSTANT_FUNCTIONS = (torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus)
POOL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
)  # fmt: skip
PASS_METHODS = ("relu", "relu_", "tanh", "contiguous", "clone", "float", "to", "type_as", "detach")
RESHAPE_METHODS = ("flatten", "view", "reshape")
REDUCE = ("mean", "sum", "amax")
UNITING = (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, operator.mul, operator.imul, torch.mul)


class GroupError(ValueError):
    """A coupled group that cannot hold together (members that disagree in size)."""


@dataclass(frozen=True)
class Member:
    """A tensor with one entry (row, filter, affine value) per channel of a group, along ``axis``.

    ``role``: ``weight`` (a Linear/Conv producing the channels: scored), ``bias`` (its bias), ``norm`` (a BatchNorm's
    affine weight or bias), ``depthwise`` (a depthwise conv's filters or bias, which read the channel one to one).
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
        return [name for name, (member, _) in self.members.items() if member.role in ("weight", "depthwise") and name.endswith("weight")]

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
    """Every group of a model, and how it was found."""

    groups: list[ChannelGroup]
    traced: bool
    note: str = ""

    def group_of(self, name: str) -> ChannelGroup | None:
        """The group in which parameter ``name`` is a member, if any."""
        return next((g for g in self.groups if name in g.members), None)


# ----------------------------------------------------------------------------- channel ids through a graph
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
    """A tensor whose channels along ``dim`` carry ``ids``; ``layers`` wrote into it (for error messages)."""

    dim: int
    ids: Tensor
    layers: frozenset[str]


INPUT = "input"  # a tensor computed from the model input alone
OPAQUE = "opaque"  # a tensor whose channels are not followed (a buffer, the result of an unknown operation)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target)) + f" ({node.name})"


class _Walker:
    def __init__(self, gm: fx.GraphModule, prefix: str) -> None:
        self.gm, self.prefix = gm, prefix
        self.ids = _Ids()
        self.members: dict[str, tuple[Member, Tensor]] = {}
        self.consumers: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}  # a module called again writes the same channels
        self.env: dict[fx.Node, Any] = {}

    def full(self, target: str) -> str:
        return f"{self.prefix}{target}"

    def add_member(self, layer: str, attribute: str, role: str, ids: Tensor) -> None:
        module = self.gm.get_submodule(layer)
        param = getattr(module, attribute, None)
        if isinstance(param, nn.Parameter):
            name = self.full(f"{layer}.{attribute}" if layer else attribute)
            if name in self.members:
                self.ids.union(self.members[name][1], ids)
            else:
                self.members[name] = (Member(name, self.full(layer), role, 0), ids)

    def block_inputs(self, node: fx.Node, reason: str) -> None:
        for value in self.tensor_inputs(node):
            if isinstance(value, _Value):
                self.ids.block(value.ids, reason)

    def tensor_inputs(self, node: fx.Node) -> list[Any]:
        return [self.env.get(n) for n in node.all_input_nodes if self.env.get(n) is not None]

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.env[node] = self.step(node)

    # one node: the value of its output
    def step(self, node: fx.Node) -> Any:
        shape = _shape(node)
        if node.op == "placeholder":
            return INPUT
        if node.op == "get_attr":
            return OPAQUE
        if node.op == "output":
            for value in self.tensor_inputs(node):
                if isinstance(value, _Value):
                    self.ids.fix(value.ids, "its channels reach the model's output")
            return None
        if shape is None and not self.tensor_inputs(node):
            return None  # sizes and other non-tensor values
        if shape is None:  # x.size(1), x.shape: not a tensor, reads no channel
            if node.op == "call_method" and node.target in ("size", "dim") or node.op == "call_function" and node.target in (getattr, len):
                return None
            if node.op == "call_function" and node.target is operator.getitem and not isinstance(self.env.get(node.args[0]), _Value):
                return None
            self.block_inputs(node, f"its channels reach {_name(node)}, whose output is not a tensor")
            return OPAQUE
        if node.op == "call_module":
            return self.module(node, self.gm.get_submodule(node.target), shape)
        if node.op == "call_function":
            return self.function(node, shape)
        if node.op == "call_method":
            return self.method(node, shape)
        return self.unknown(node)

    def unknown(self, node: fx.Node, why: str = "not an operation the channel analysis understands") -> Any:
        self.block_inputs(node, f"its channels reach {_name(node)}: {why}")
        return OPAQUE

    def first(self, node: fx.Node) -> Any:
        return self.env.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None

    def single_input(self, node: fx.Node) -> bool:
        return len(self.tensor_inputs(node)) <= 1

    def passed(self, node: fx.Node, value: Any, shape: tuple[int, ...], constant: str | None = None) -> Any:
        """Output carrying ``value``'s ids unchanged, if the channel axis keeps its place and size."""
        if not isinstance(value, _Value):
            return value
        in_shape = _shape(node.args[0])
        if in_shape is None or len(shape) != len(in_shape) or shape[value.dim] != in_shape[value.dim]:
            return self.unknown(node, "it changes the channel axis")
        if constant:
            self.ids.fix(value.ids, constant)
        return value

    def module(self, node: fx.Node, module: nn.Module, shape: tuple[int, ...]) -> Any:
        target, value = str(node.target), self.first(node)
        if not self.single_input(node):
            return self.unknown(node, "a module with several tensor inputs")
        if type(module) is nn.Linear or (type(module) in CONVS and module.groups == 1):
            dim = len(shape) - 1 if type(module) is nn.Linear else 1
            if isinstance(value, _Value):
                if value.dim != dim:
                    self.ids.block(value.ids, f"its channels reach {target} on another axis")
                else:
                    self.consume(target, value.ids)
            if target not in self.outputs:
                self.outputs[target] = self.ids.fresh(shape[dim])
            ids = self.outputs[target]
            self.add_member(target, "weight", "weight", ids)
            self.add_member(target, "bias", "bias", ids)
            return _Value(dim, ids, frozenset({self.full(target)}))
        if type(module) in CONVS:
            depthwise = module.groups == module.in_channels
            if not depthwise:
                self.block_inputs(node, f"its channels reach {target}, a grouped conv (groups={module.groups})")
                ids = self.ids.fresh(shape[1])
                self.ids.block(ids, f"{target} is a grouped conv (groups={module.groups}): its channels go in groups")
                return _Value(1, ids, frozenset({self.full(target)}))
            ids = value.ids.repeat_interleave(module.out_channels // module.in_channels) if isinstance(value, _Value) else self.ids.fresh(shape[1])
            if isinstance(value, _Value) and value.dim != 1:
                return self.unknown(node, "a depthwise conv over another axis")
            if value == OPAQUE:
                self.ids.block(ids, f"{target} (depthwise) reads channels that are not followed")
            self.add_member(target, "weight", "depthwise", ids)
            self.add_member(target, "bias", "depthwise", ids)
            return _Value(1, ids, (value.layers if isinstance(value, _Value) else frozenset()) | {self.full(target)})
        if type(module) in BATCH_NORMS:
            if isinstance(value, _Value):
                if value.dim != 1:
                    return self.unknown(node, "BatchNorm over another axis")
                if module.affine:
                    self.add_member(target, "weight", "norm", value.ids)
                    self.add_member(target, "bias", "norm", value.ids)
                else:
                    self.ids.fix(value.ids, f"{target} has no affine entries: a zero channel leaves it as -running_mean/std")
            return value
        if type(module) is nn.GroupNorm:
            if isinstance(value, _Value):
                if module.num_groups != module.num_channels or value.dim != 1:
                    return self.unknown(node, "GroupNorm normalizes several channels together")
                if module.affine:
                    self.add_member(target, "weight", "norm", value.ids)
                    self.add_member(target, "bias", "norm", value.ids)
            return value
        if type(module) is nn.LayerNorm:
            if isinstance(value, _Value) and value.dim >= len(shape) - len(module.normalized_shape):
                return self.unknown(node, "LayerNorm normalizes over the channels (removing one changes the others)")
            return value
        if type(module) in ZERO_PRESERVING_MODULES:
            return self.passed(node, value, shape)
        if type(module) in CONSTANT_MODULES:
            return self.passed(node, value, shape, f"{target} maps a pruned (zero) channel to a non-zero constant")
        if type(module) in POOL_MODULES:
            if isinstance(value, _Value) and value.dim != 1:
                return self.unknown(node, "pooling over the channels")
            return self.passed(node, value, shape)
        if type(module) is nn.Flatten:
            return self.reshape(node, value, shape)
        return self.unknown(node)

    def consume(self, layer: str, ids: Tensor) -> None:
        layer = self.full(layer) if not layer.startswith(self.prefix) else layer
        if layer in self.consumers:  # a module called twice reads the same columns twice
            self.ids.union(self.consumers[layer], ids)
        else:
            self.consumers[layer] = ids

    def function(self, node: fx.Node, shape: tuple[int, ...]) -> Any:
        fn, value = node.target, self.first(node)
        if fn in UNITING:
            return self.unite(node, shape)
        if fn is torch.cat:
            return self.concat(node, shape)
        if fn in ZERO_PRESERVING_FUNCTIONS and self.single_input(node):
            return self.passed(node, value, shape)
        if fn in CONSTANT_FUNCTIONS and self.single_input(node):
            return self.passed(node, value, shape, f"{_name(node)} maps a pruned (zero) channel to a non-zero constant")
        if fn in POOL_FUNCTIONS and self.single_input(node):
            if isinstance(value, _Value) and value.dim != 1:
                return self.unknown(node, "pooling over the channels")
            return self.passed(node, value, shape)
        if fn is torch.flatten and self.single_input(node):
            return self.reshape(node, value, shape)
        if fn in (torch.mean, torch.sum, torch.amax) and self.single_input(node):
            return self.reduce(node, value, shape)
        return self.unknown(node)

    def method(self, node: fx.Node, shape: tuple[int, ...]) -> Any:
        value = self.first(node)
        if not self.single_input(node):
            return self.unknown(node)
        if node.target in PASS_METHODS:
            return self.passed(node, value, shape)
        if node.target in RESHAPE_METHODS:
            return self.reshape(node, value, shape)
        if node.target in REDUCE:
            return self.reduce(node, value, shape)
        if node.target == "sigmoid":
            return self.passed(node, value, shape, f"{_name(node)} maps a pruned (zero) channel to a non-zero constant")
        return self.unknown(node)

    def reshape(self, node: fx.Node, value: Any, shape: tuple[int, ...]) -> Any:
        """Unchanged shapes pass; merging the axes after the channels keeps them; ``(N, C, *S) → (N, C·ΠS)`` makes
        each channel a block of ΠS columns."""
        if not isinstance(value, _Value):
            return value
        in_shape = _shape(node.args[0])
        dim = value.dim
        if in_shape == shape:
            return value
        if in_shape is not None and len(shape) == dim + 1 and shape[:dim] == in_shape[:dim] and shape[dim] == math.prod(in_shape[dim:]):
            return _Value(dim, value.ids.repeat_interleave(math.prod(in_shape[dim + 1 :])), value.layers)
        if in_shape is not None and len(shape) > dim and shape[: dim + 1] == in_shape[: dim + 1]:
            return value
        return self.unknown(node, f"a reshape from {list(in_shape or [])} to {list(shape)} that moves the channels")

    def reduce(self, node: fx.Node, value: Any, shape: tuple[int, ...]) -> Any:
        if not isinstance(value, _Value):
            return value
        in_shape = _shape(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if in_shape is None or dims is None:
            return self.unknown(node, "a reduction over every axis")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted(d % len(in_shape) for d in dims)
        if value.dim in dims:
            return self.unknown(node, "a reduction over the channels")
        keepdim = len(shape) == len(in_shape)
        return _Value(value.dim if keepdim else value.dim - sum(d < value.dim for d in dims), value.ids, value.layers)

    def unite(self, node: fx.Node, shape: tuple[int, ...]) -> Any:
        """An add/sub/mul: tensors of one shape share their channels (position by position)."""
        tensors = [arg for arg in list(node.args) + list(node.kwargs.values()) if isinstance(arg, fx.Node) and _shape(arg) is not None]
        values = [self.env.get(arg) for arg in tensors]
        tracked = [(arg, v) for arg, v in zip(tensors, values) if isinstance(v, _Value)]
        if not tracked:
            return INPUT if values and all(v == INPUT for v in values) else OPAQUE
        base_arg, base = tracked[0]
        dim = base.dim - len(_shape(base_arg)) + len(shape)  # broadcast aligns the trailing axes
        for arg, v in tracked:
            in_shape = _shape(arg)
            if v.dim - len(in_shape) + len(shape) != dim:
                return self.unknown(node, "the channels of its inputs lie on different axes")
        sizes = {v.ids.numel() for _, v in tracked}
        if len(sizes) > 1 or sizes != {shape[dim]}:
            layers = sorted(set().union(*(v.layers for _, v in tracked)))
            described = ", ".join(f"{sorted(v.layers)} with {v.ids.numel()}" for _, v in tracked)
            raise GroupError(
                f"channel groups: layers {layers} meet at {_name(node)} with channels that disagree in size ({described}, "
                f"result {shape[dim]}): a coupled group needs one channel count; make them equal, or prune these "
                f"layers 'unstructured' (a {{glob: granularity}} mapping)"
            )
        for _, v in tracked[1:]:
            self.ids.union(base.ids, v.ids)
        untracked = [v for v in values if not isinstance(v, _Value)]
        if INPUT in untracked:
            self.ids.fix(base.ids, f"its channels meet the model input at {_name(node)}")
        if OPAQUE in untracked:
            self.ids.block(base.ids, f"its channels meet a tensor that is not followed at {_name(node)}")
        if node.target in (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub):
            numbers = [a for a in node.args if isinstance(a, (int, float)) and a != 0]
            if numbers:
                self.ids.fix(base.ids, f"{_name(node)} adds a constant to the channels")
        return _Value(dim, base.ids, frozenset().union(*(v.layers for _, v in tracked)))

    def concat(self, node: fx.Node, shape: tuple[int, ...]) -> Any:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(parts, (list, tuple)) or not all(isinstance(p, fx.Node) for p in parts):
            return self.unknown(node)
        dim %= len(shape)
        values = [self.env.get(p) for p in parts]
        tracked = [v for v in values if isinstance(v, _Value)]
        if not tracked:
            return INPUT if all(v == INPUT for v in values) else OPAQUE
        if any(v.dim != tracked[0].dim for v in tracked):
            return self.unknown(node, "the channels of its parts lie on different axes")
        if tracked[0].dim != dim:  # a concat along another axis: the parts share their channels
            return self.unite_same(node, tracked, values)
        ids = []
        for part, value in zip(parts, values):
            if isinstance(value, _Value):
                ids.append(value.ids)
                continue
            fresh = self.ids.fresh(_shape(part)[dim])
            (self.ids.fix if value == INPUT else self.ids.block)(fresh, f"part of a concat ({_name(node)}) that is not a layer's output")
            ids.append(fresh)
        return _Value(dim, torch.cat(ids), frozenset().union(*(v.layers for v in tracked)))

    def unite_same(self, node: fx.Node, tracked: list[_Value], values: list[Any]) -> Any:
        for v in tracked[1:]:
            if v.ids.numel() != tracked[0].ids.numel():
                return self.unknown(node, "parts with different channel counts")
            self.ids.union(tracked[0].ids, v.ids)
        if len(tracked) < len(values):
            self.ids.block(tracked[0].ids, f"its channels meet a tensor that is not followed at {_name(node)}")
        return tracked[0]


def _groups(walker: _Walker, order: Sequence[str]) -> list[ChannelGroup]:
    """Slots (classes of ids) joined into groups by the members that hold them, in model order."""
    ids = walker.ids
    rank = {name: i for i, name in enumerate(order)}
    members = sorted(walker.members.items(), key=lambda item: rank.get(item[0], len(rank)))
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
    for g, group in groups.items():
        group.channels = len(slot_of[g])
        classes = set(slot_of[g])
        blocked = sorted({ids.blocked[i] for i in range(len(ids.parent)) if i in ids.blocked and ids.find(i) in classes})
        fixed = sorted({ids.fixed[i] for i in range(len(ids.parent)) if i in ids.fixed and ids.find(i) in classes})
        if blocked:
            group.prunable, group.removable, group.reason = False, False, "; ".join(blocked)
        elif fixed:
            group.removable, group.reason = False, "; ".join(fixed)
        for layer, columns in walker.consumers.items():
            slots = torch.tensor([slot_of[g].get(ids.find(i), -1) for i in columns.tolist()], dtype=torch.long)
            if bool((slots >= 0).any()):
                group.consumers[layer] = slots
    return list(groups.values())


def _propagate(gm: fx.GraphModule, inputs: Sequence[Tensor]) -> None:
    """Record shapes on ``gm``'s nodes without changing the model: eval mode (no BatchNorm statistics updated), no
    gradients, every module's mode restored."""
    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode


def find_groups(model: nn.Module, example_inputs: Sequence[Tensor] | Tensor | None) -> GroupPlan:
    """The coupled channel groups of ``model``, from a ``torch.fx`` trace with shapes of ``example_inputs``.

    Where the model cannot be traced, the module structure stands in: each ``nn.Sequential`` (traced alone, on the
    input it receives in a forward) gives the groups inside it, their channels unproved where they leave it. Without
    an example input (or where nothing can be traced) no group is proved and :attr:`GroupPlan.note` says why.
    Raises :class:`GroupError` for a group whose members disagree in size.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs or ())
    order = [name for name, _ in model.named_parameters()]
    if not inputs:
        return GroupPlan([], False, "no example input to trace the model with, so no coupling is proved")
    try:
        gm = fx.symbolic_trace(model)
        _propagate(gm, inputs)
    except GroupError:
        raise
    except Exception as error:  # fx cannot trace data-dependent control flow and more
        why = f"torch.fx could not trace {type(model).__name__} ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
        return _from_structure(model, inputs, order, why)
    walker = _Walker(gm, "")
    walker.run()
    return GroupPlan(_groups(walker, order), True)


def _from_structure(model: nn.Module, inputs: tuple[Tensor, ...], order: list[str], why: str) -> GroupPlan:
    """Groups inside each outermost ``nn.Sequential``, traced on the input it receives when the model runs."""
    seen: dict[str, tuple[Tensor, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and not any(name.startswith(f"{s}.") for s in seen) and name:
            def hook(m: nn.Module, args: tuple, name: str = name) -> None:
                seen.setdefault(name, tuple(a for a in args if isinstance(a, Tensor)))
            handles.append(module.register_forward_pre_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    except Exception:  # noqa: BLE001 - the input does not fit: nothing can be proved
        seen.clear()
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    groups: list[ChannelGroup] = []
    for name, args in seen.items():
        if any(name.startswith(f"{other}.") for other in seen if other != name):
            continue
        try:
            gm = fx.symbolic_trace(model.get_submodule(name))
            _propagate(gm, args)
        except Exception:  # noqa: BLE001 - this part cannot be traced either: nothing proved in it
            continue
        walker = _Walker(gm, f"{name}.")
        walker.run()
        for node in gm.graph.nodes:  # what leaves the Sequential goes where the fallback cannot see
            if node.op == "output":
                for value in walker.tensor_inputs(node):
                    if isinstance(value, _Value):
                        walker.ids.block(value.ids, f"its channels leave {name} (nn.Sequential), and {why}")
        for group in _groups(walker, order):
            group.index = len(groups)
            groups.append(group)
    return GroupPlan(groups, False, f"{why}: groups found inside nn.Sequential containers only")


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
                self.unpruned[name] = plan.note or "it is not a Linear/Conv producing channels in the traced forward"

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
        lines = [f"channel groups ({'torch.fx trace' if self.plan.traced else self.plan.note or 'module structure'}):"]
        for group, names in self.selected:
            line = f"  {group.describe().split('; not pruned')[0].split('; pruned but')[0]}; scored by {', '.join(names)}"
            if group.index in self.not_removable:
                line += f"; pruned but not removable at deploy: {self.not_removable[group.index]}"
            lines.append(line)
        for name, reason in self.unpruned.items():
            lines.append(f"  {name}: left dense, its channel coupling is not proved: {reason}")
        return "\n".join(lines)
