"""Channel thinning: physically remove the all-zero output channels of Linear/Conv layers and the matching inputs
of the layers that consume them, on a ``torch.fx`` graph of the model.

A zero output channel of a producer carries a constant (its bias), which stays a constant through the per-channel
operations this pass understands (BatchNorm in eval mode, elementwise activations, dropout, pooling, flatten). A
consumer's removed inputs are therefore folded exactly into its bias (Linear, or Conv without zero padding) or into
a :class:`~lightning_sparse.deployment.modules.FoldedConv` (zero-padded Conv, whose borders see fewer taps).
Anything else on the way (additions, concatenation, the model output, shared modules) leaves the producer as it is,
with the reason; every thinned producer is checked against the model's outputs and undone if they differ.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from lightning_sparse.core.targets import DEFAULT_MODULES
from lightning_sparse.structure import ops

#: The convolutions among the default compression targets (Conv1d/2d/3d).
CONVS = tuple(m for m in DEFAULT_MODULES if issubclass(m, nn.modules.conv._ConvNd))
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class Consumer:
    """A layer reading a producer's channels: its node, the node it reads, and entries per channel (flatten)."""

    node: fx.Node
    source: fx.Node
    block: int


@dataclass
class Flow:
    """Where a producer's output channels go: BatchNorms to slice on the way and the consuming layers."""

    producer: fx.Node
    norms: list[fx.Node] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)


@dataclass(frozen=True)
class Thinned:
    """One producer's outcome: channels before/after, and what was done or why nothing was."""

    name: str
    channels: int
    kept: int
    detail: str


def is_producer(module: nn.Module) -> bool:
    """Linear, or a plain (groups=1) Conv1d/2d/3d: a layer whose output channels can be removed."""
    return type(module) is nn.Linear or (type(module) in CONVS and module.groups == 1)


def zero_channels(weight: Tensor) -> Tensor:
    """Boolean per output channel: True where every weight of the channel is exactly zero."""
    return (weight.detach().reshape(weight.shape[0], -1) == 0).all(1)


def set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "output":
        return "the model's output"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.op} {node.name})"


def _other_tensors(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads ``node`` other than as its first argument, or reads another tensor (add, cat, mul...).

    Non-tensor graph values (``x.size(0)`` in ``x.view(x.size(0), -1)``) do not count."""
    first = user.args[0] if user.args else None
    others = [n for n in user.all_input_nodes if n is not node and n.meta.get("tensor_meta") is not None]
    return first is not node or bool(others)


def _size_query(user: fx.Node, dim: int, ndim: int) -> bool:
    """``x.size(d)`` for a dimension ``d`` other than the channels': its value does not change when they go."""
    if user.op != "call_method" or user.target != "size" or len(user.args) != 2 or not isinstance(user.args[1], int):
        return False
    return user.args[1] % ndim != dim


def follow(gm: fx.GraphModule, producer: fx.Node) -> Flow | str:
    """Trace where ``producer``'s output channels flow; a reason string where a step is not understood."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    if calls[producer.target] > 1:
        return "the layer is called more than once"
    shape = _shape(producer)
    if shape is None:
        return "its output shape is unknown"
    flow = Flow(producer)
    conv = isinstance(gm.get_submodule(producer.target), CONVS)
    stack = [(producer, 1 if conv else len(shape) - 1, 1)]
    seen: set[fx.Node] = set()
    while stack:
        node, dim, block = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        in_shape = _shape(node)
        for user in node.users:
            if user.op == "output":
                return "its channels reach the model's output (removing them would change the output shape)"
            if in_shape is not None and _size_query(user, dim, len(in_shape)):
                continue
            if _other_tensors(user, node):
                return f"its channels meet another tensor at {_describe(gm, user)}"
            step = _step(gm, user, calls, dim, block, in_shape)
            if isinstance(step, str):
                return f"its channels reach {_describe(gm, user)}: {step}"
            kind, dim_after, block_after = step
            if kind == "consumer":
                flow.consumers.append(Consumer(user, node, block))
            else:
                if kind == "norm":
                    flow.norms.append(user)
                stack.append((user, dim_after, block_after))
    if not flow.consumers:
        return "no layer consumes its channels"
    return flow


def _step(
    gm: fx.GraphModule, user: fx.Node, calls: Counter, dim: int, block: int, in_shape: tuple[int, ...] | None
) -> tuple[str, int, int] | str:
    """How channels at ``dim`` (``block`` entries each) pass ``user``: (kind, dim, block), or why they cannot."""
    if in_shape is None:
        return "shape unknown"
    ndim = len(in_shape)
    if user.op == "call_module":
        module = gm.get_submodule(user.target)
        if is_producer(module):
            if calls[user.target] > 1:
                return "the layer is called more than once"
            if type(module) is nn.Linear:
                return ("consumer", dim, block) if dim == ndim - 1 else "channels are not on the last dimension"
            return ("consumer", dim, block) if dim == 1 and block == 1 else "channels were flattened"
        if type(module) in NORMS:
            if calls[user.target] > 1:
                return "the BatchNorm is called more than once"
            if not module.track_running_stats or module.running_mean is None:
                return "BatchNorm without running statistics"
            return ("norm", dim, block) if dim == 1 and block == 1 else "BatchNorm over a different dimension"
        if ops.op_name(module) in ops.ELEMENTWISE:  # the one op table: lightning_sparse.structure.ops
            return ("pass", dim, block)
        if ops.op_name(module) in ops.POOL:
            return ("pass", dim, block) if dim == 1 and block == 1 and ndim >= 3 else "pooling over channels"
        if type(module) is nn.Flatten:
            return _reshape(user, dim, block, in_shape)
        return "not a per-channel operation this pass understands"
    if user.op == "call_function":
        if ops.op_name(user.target) in ops.ELEMENTWISE:
            return ("pass", dim, block)
        if ops.op_name(user.target) in ops.POOL:
            return ("pass", dim, block) if dim == 1 and block == 1 and ndim >= 3 else "pooling over channels"
        if user.target is torch.flatten:
            return _reshape(user, dim, block, in_shape)
        return "not a per-channel operation this pass understands"
    if user.op == "call_method":
        if ops.op_name(user.target) in ops.ELEMENTWISE | ops.PASS:
            return ("pass", dim, block)
        if user.target in ("flatten", "view", "reshape"):
            return _reshape(user, dim, block, in_shape)
    return "not a per-channel operation this pass understands"


def _reshape(user: fx.Node, dim: int, block: int, in_shape: tuple[int, ...]) -> tuple[str, int, int] | str:
    """Flatten/view/reshape: unchanged shapes pass; ``(N, C, *S) → (N, C·ΠS)`` makes each channel a block."""
    out_shape = _shape(user)
    if out_shape == in_shape:
        return ("pass", dim, block)
    if out_shape is not None and dim == 1 and len(out_shape) == 2 and out_shape[0] == in_shape[0] and out_shape[1] == math.prod(in_shape[1:]):
        return ("pass", 1, block * math.prod(in_shape[2:]))
    return f"a reshape from {list(in_shape)} to {list(out_shape or [])} this pass does not follow"


# --- applying one flow --------------------------------------------------------------------------------------


@torch.no_grad()
def thin(gm: fx.GraphModule, flow: Flow, values: dict[fx.Node, Tensor]) -> tuple[dict[str, nn.Module], str] | str:
    """Remove the producer's zero channels: returns ``{target: new module}`` and a description, or a reason.

    ``values`` holds the current model's activations (on the example input) at each consumer's source node.
    Nothing is changed here; the caller swaps the modules in, checks the outputs and undoes the swap if needed.
    """
    target = str(flow.producer.target)
    producer = gm.get_submodule(target)
    removed = zero_channels(producer.weight)
    if removed.all():
        return "every output channel is zero (nothing would be left)"
    keep = ~removed
    new: dict[str, nn.Module] = {target: _slice_out(producer, keep)}
    for norm in flow.norms:
        new[str(norm.target)] = slice_norm(gm.get_submodule(norm.target), keep)
    folds = []
    for consumer in flow.consumers:
        layer = gm.get_submodule(consumer.node.target)
        result = _fold_consumer(layer, values[consumer.source], removed, consumer.block)
        if isinstance(result, str):
            return f"{consumer.node.target}: {result}"
        new[str(consumer.node.target)], how = result
        folds.append(f"{consumer.node.target} ({how})")
    detail = f"{int(removed.sum())} zero channels removed; inputs removed from " + ", ".join(folds)
    return new, detail


def _fold_consumer(layer: nn.Module, value: Tensor, removed: Tensor, block: int) -> tuple[nn.Module, str] | str:
    """The consumer without the removed input channels, their constant contribution folded in."""
    channels = removed.numel()
    if type(layer) is nn.Linear:
        if layer.in_features != channels * block:
            return f"expects {layer.in_features} inputs, the producer gives {channels} channels × {block}"
        columns = removed.repeat_interleave(block)
        constant = value.reshape(-1, layer.in_features)[0, columns]
        bias = layer.weight[:, columns] @ constant.to(layer.weight.dtype)
        if layer.bias is not None:
            bias = bias + layer.bias
        has_bias = layer.bias is not None or bool(constant.any())
        return _linear(layer.weight[:, ~columns], bias if has_bias else None), "bias folded" if constant.any() else "sliced"
    if layer.in_channels != channels or block != 1:
        return f"expects {layer.in_channels} input channels, the producer gives {channels}"
    gone = value[0, removed]  # (removed, *spatial), the same for every input: only constants reach here
    constant = gone.reshape(gone.shape[0], -1)[:, 0]
    uniform = constant.view(-1, *([1] * (gone.dim() - 1)))
    if not torch.allclose(gone, uniform.expand_as(gone), rtol=1e-6, atol=1e-6 * max(1.0, float(constant.abs().max()))):
        return "the removed channels are not uniform over positions"
    spatial = tuple(range(2, layer.weight.dim()))
    kept = _slice_in(layer, ~removed)
    if not constant.any():
        return kept, "sliced"
    contribution = layer.weight[:, removed] * uniform.unsqueeze(0).to(layer.weight.dtype)
    zero_padded = layer.padding_mode == "zeros" and layer.padding != "valid" and any(p != 0 for p in _padding(layer))
    if not zero_padded:  # every output position sees all taps of a constant input: a plain bias
        bias = contribution.sum(dim=(1, *spatial))
        kept.bias = nn.Parameter(bias if kept.bias is None else kept.bias + bias, requires_grad=False)
        return kept, "bias folded"
    from lightning_sparse.deployment.modules import FoldedConv

    return FoldedConv(kept, contribution.sum(dim=1, keepdim=True)), "constant folded, zero padding included"


def _padding(conv: nn.Module) -> tuple[int, ...]:
    if conv.padding == "same":
        return tuple(1 if k > 1 else 0 for k in conv.kernel_size)  # "same" pads whenever the kernel is wider than 1
    return tuple(conv.padding)


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return layer


def _conv(conv: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    layer = type(conv)(
        weight.shape[1], weight.shape[0], conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=1, bias=bias is not None, padding_mode=conv.padding_mode,
        device=weight.device, dtype=weight.dtype,
    )  # fmt: skip
    layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return layer


def _slice_out(layer: nn.Module, keep: Tensor) -> nn.Module:
    bias = None if layer.bias is None else layer.bias[keep]
    return _linear(layer.weight[keep], bias) if type(layer) is nn.Linear else _conv(layer, layer.weight[keep], bias)


def _slice_in(conv: nn.Module, keep: Tensor) -> nn.Module:
    return _conv(conv, conv.weight[:, keep], conv.bias)


def slice_norm(norm: nn.Module, keep: Tensor) -> nn.Module:
    """A BatchNorm (or per-channel GroupNorm) holding only the ``keep`` channels: affine entries and running
    statistics copied, frozen, in eval mode."""
    n = int(keep.sum())
    like = next(iter([*norm.parameters(), *norm.buffers()]), keep.float())  # a norm without state: keep's device
    where = {"device": like.device, "dtype": like.dtype if like.is_floating_point() else None}
    if type(norm) is nn.GroupNorm:
        sliced = nn.GroupNorm(n, n, eps=norm.eps, affine=norm.affine, **where)
    else:
        sliced = type(norm)(n, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                            track_running_stats=norm.track_running_stats, **where)  # fmt: skip
    with torch.no_grad():
        if getattr(norm, "track_running_stats", False):
            sliced.running_mean.copy_(norm.running_mean[keep])
            sliced.running_var.copy_(norm.running_var[keep])
            sliced.num_batches_tracked.copy_(norm.num_batches_tracked)
        if norm.affine:
            sliced.weight.copy_(norm.weight[keep])
            sliced.bias.copy_(norm.bias[keep])
    return sliced.eval().requires_grad_(False)
