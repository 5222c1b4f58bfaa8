"""One op-semantics table for the whole library: what an operation does to the channels that pass through it.

Every place that follows channels through a model (coupled channel groups in :mod:`lightning_sparse.core.groups`,
per-producer thinning in :mod:`lightning_sparse.deployment.thinning`, transposed Linear chains in
:mod:`lightning_sparse.deployment.modules`, MLP neurons in :mod:`lightning_sparse.structure.patterns`) reads it
here. An operation is named by :func:`op_name`: a function's ``__name__`` (``relu``, ``max_pool2d``), a tensor
method's (``add_`` → ``add``, ``__iadd__`` → ``add``), or an ``nn.Module`` class through :data:`MODULE_OPS`.

Categories (a name is in at most one of the elementwise sets):

- :data:`ZERO_PRESERVING`: elementwise with ``f(0) = 0``: a pruned (all-zero) channel stays exactly zero.
- :data:`CONSTANT`: elementwise with ``f(0) ≠ 0``: a pruned channel becomes a non-zero constant.
- :data:`CHANNEL_DROPOUT`: zero-preserving but random per *channel* in training (not per element).
- :data:`PASS`: copies, casts, device moves: values unchanged.
- :data:`POOL`: pooling over the axes after the channels (one output channel per input channel, zero stays zero).
- :data:`RESHAPE`, :data:`PERMUTE`, :data:`REDUCE`: move, merge or reduce axes.
- :data:`ADD` / :data:`MUL` / :data:`DIV` / :data:`CONCAT`: combine tensors (residual adds, gates, concatenations).
- :data:`PAD`: padding of the trailing (spatial) axes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

ZERO_PRESERVING = frozenset({
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "tanh", "hardtanh", "hardswish",
    "softsign", "tanhshrink", "hardshrink", "softshrink", "identity", "neg", "dropout", "alpha_dropout",
    "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d",
})  # fmt: skip
CONSTANT = frozenset({"sigmoid", "hardsigmoid", "softplus", "logsigmoid", "exp", "cos"})
CHANNEL_DROPOUT = frozenset({"dropout1d", "dropout2d", "dropout3d", "feature_alpha_dropout"})
ELEMENTWISE = ZERO_PRESERVING | CONSTANT
PASS = frozenset({"contiguous", "clone", "float", "half", "double", "bfloat16", "to", "type_as", "detach", "cpu", "cuda"})
POOL = frozenset({
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
})  # fmt: skip
RESHAPE = frozenset({"flatten", "view", "reshape", "squeeze", "unsqueeze"})
PERMUTE = frozenset({"permute", "transpose", "swapaxes", "swapdims"})
REDUCE = frozenset({"mean", "sum", "amax", "amin"})
ADD = frozenset({"add", "sub", "radd", "rsub", "iadd", "isub"})
MUL = frozenset({"mul", "rmul", "imul", "multiply"})
DIV = frozenset({"div", "truediv", "itruediv", "divide"})
CONCAT = frozenset({"cat", "concat", "concatenate"})
PAD = frozenset({"pad"})
CONVS = frozenset({"conv1d", "conv2d", "conv3d"})

#: Modules whose forward is one operation of the table.
MODULE_OPS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu",
    nn.GELU: "gelu", nn.SiLU: "silu", nn.Mish: "mish", nn.Tanh: "tanh", nn.Hardtanh: "hardtanh",
    nn.Hardswish: "hardswish", nn.Softsign: "softsign", nn.Tanhshrink: "tanhshrink", nn.Hardshrink: "hardshrink",
    nn.Softshrink: "softshrink", nn.Identity: "identity", nn.Dropout: "dropout", nn.AlphaDropout: "alpha_dropout",
    nn.FeatureAlphaDropout: "feature_alpha_dropout", nn.Dropout1d: "dropout1d", nn.Dropout2d: "dropout2d",
    nn.Dropout3d: "dropout3d", nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid", nn.Softplus: "softplus",
    nn.LogSigmoid: "logsigmoid",
    nn.MaxPool1d: "max_pool1d", nn.MaxPool2d: "max_pool2d", nn.MaxPool3d: "max_pool3d",
    nn.AvgPool1d: "avg_pool1d", nn.AvgPool2d: "avg_pool2d", nn.AvgPool3d: "avg_pool3d",
    nn.AdaptiveAvgPool1d: "adaptive_avg_pool1d", nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d",
    nn.AdaptiveAvgPool3d: "adaptive_avg_pool3d", nn.AdaptiveMaxPool1d: "adaptive_max_pool1d",
    nn.AdaptiveMaxPool2d: "adaptive_max_pool2d", nn.AdaptiveMaxPool3d: "adaptive_max_pool3d",
    nn.Flatten: "flatten",
}  # fmt: skip


def _modules(names: frozenset[str]) -> tuple[type[nn.Module], ...]:
    return tuple(module for module, name in MODULE_OPS.items() if name in names)


#: ``f(0) = 0`` modules: a pruned channel stays zero through them.
ZERO_PRESERVING_MODULES = _modules(ZERO_PRESERVING)
#: Elementwise modules with ``f(0) ≠ 0``: a pruned channel is a constant after them.
CONSTANT_MODULES = _modules(CONSTANT)
#: Modules acting on each element alone (the same result on a transposed activation): channel dropout excluded.
ELEMENTWISE_MODULES = _modules(ELEMENTWISE - CHANNEL_DROPOUT)
POOL_MODULES = _modules(POOL)


def op_name(op: Any) -> str:
    """The table's name of a function, tensor method (a method-name string too) or module: ``torch.relu`` →
    ``relu``, ``Tensor.__iadd__`` → ``add``, ``"relu_"`` → ``relu``, ``nn.ReLU()`` → ``relu``."""
    if isinstance(op, nn.Module):
        return MODULE_OPS.get(type(op), type(op).__name__)
    name = op if isinstance(op, str) else getattr(op, "__name__", str(op))
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith("i") and name[1:] in ("add", "sub", "mul", "truediv"):
            name = name[1:]
        return name
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # in place: relu_, add_
    return name.lstrip("_") if name.lstrip("_") in POOL else name


def is_inplace(op: Any) -> bool:
    """``relu_``, ``add_``, ``__iadd__``: the result is the first argument itself."""
    name = op if isinstance(op, str) else getattr(op, "__name__", "")
    return (name.endswith("_") and not name.startswith("_")) or name in ("__iadd__", "__isub__", "__imul__", "__itruediv__")
