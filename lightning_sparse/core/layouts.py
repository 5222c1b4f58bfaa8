"""Which weights do a matrix product, and on which axes: the one place every consumer asks.

A weight that multiplies its input has output units (what it computes) and inputs (what each unit sums over). Where
they sit depends on the layer, not on the tensor:

==========================  ==========================  ==============  ===========================================
layer                       weight shape                output axis     inputs of one output unit
==========================  ==========================  ==============  ===========================================
``nn.Linear``               ``(out, in)``               0               ``in``
``nn.Conv1d/2d/3d``         ``(out, in/groups, k…)``    0               ``in/groups × k…``
``nn.ConvTranspose1d/2d/3d``  ``(in, out/groups, k…)``  1               ``in/groups × k…`` (each row holds
                                                                        ``groups`` units' inputs side by side)
``nn.MultiheadAttention``   ``(3·E, E)`` / ``(E, kdim)``  0             ``E`` / ``kdim``
``nn.LSTM/GRU/RNN``         ``weight_ih_l*`` ``(G·h, in)``, ``weight_hh_l*`` ``(G·h, h)`` (``_reverse`` too),
                            ``weight_hr_l*`` ``(proj, h)``: output axis 0, gate blocks (G = 4, 3, 1) stacked on it
``nn.LSTMCell/GRUCell/RNNCell``  ``weight_ih`` / ``weight_hh`` as above
``nn.Bilinear``             ``(out, in1, in2)``         0               ``in1 × in2``
HF ``Conv1D`` (GPT-2)       ``(in, out)``               1               ``in``
MoE experts (transformers   ``(experts, out, in)``      1, per expert   ``in`` (expert axis 0: one unit per expert
5: ``MixtralExperts``, …)   (``is_transposed``:         (2)             and output; ``gate_up_proj`` holds gate
                            ``(experts, in, out)``)                     rows then up rows)
==========================  ==========================  ==============  ===========================================

Unstructured pruning, L-C, RigL's drop-and-grow and the export format do not depend on the axes; channel pruning (an
output unit whole), N:M groups (M consecutive inputs of one unit) and per-channel quantization scales do, so they read
a :class:`Layout` from here (through :class:`~lightning_sparse.core.targets.Targets`). ERK's density
``Σ dims / Π dims`` is symmetric in the axes, so a ConvTranspose weight ``(in, out, k…)`` gets the density of the Conv
``(out, in, k…)`` with the same fan-in and fan-out. A user's own module kind is added
with :func:`register_layout`, as Torch-Pruning registers a customized layer.

**Mixture of experts.** Transformers 5 stores a sparse MoE block's experts as 3-D parameters of one module that holds
``num_experts`` (``MixtralExperts``, ``Qwen2MoeExperts``, … and ``GptOssExperts`` with ``is_transposed``); its forward
runs ``linear(x, w[e])`` per expert (``x @ w[e]`` when transposed). Every 3-D parameter of such a module whose first
axis has ``num_experts`` entries is a default target (kind ``"MoE experts"``) with its expert axis 0: an output unit
is one row of one expert, N:M groups run along one expert's inputs and per-channel quantization scales are per
expert row. Its output units are not pruned as channels (a neuron is pruned in every expert together, by
``granularity="neuron"``: :mod:`~lightning_sparse.structure.patterns`). The router that picks the experts (a
sibling of the experts module whose weight has ``num_experts`` rows, or one row: Qwen2-MoE's
``shared_expert_gate``) stays dense (kind ``"MoE router"``, :func:`moe_routers`): its few weights decide which experts run.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class Layout:
    """The axes of one weight that does a matrix product.

    ``output``: the axis of its output units. ``kernel``: spatial kernel axes (convolutions); every other axis is an
    input axis. ``blocks``: how many output units' inputs one slice along ``output`` holds side by side (a grouped
    ``ConvTranspose``: slice ``j`` of its weight ``(in, out/groups, k…)`` feeds outputs ``j, j + out/groups, …``; 1
    elsewhere). ``gates``: blocks stacked on the output axis (LSTM 4: i, f, g, o; GRU 3: r, z, n; 1 elsewhere).
    ``no_channels``: why whole output units of this weight cannot be pruned as channels (``None``: they can).
    ``experts``: the expert axis of a mixture of experts' 3-D weight (``None`` elsewhere): each expert is a matrix of
    its own, so an output unit is one (expert, output) pair and it is no input axis.
    """

    output: int = 0
    kernel: tuple[int, ...] = ()
    blocks: int = 1
    gates: int = 1
    no_channels: str | None = None
    experts: int | None = None

    def inputs(self, ndim: int) -> tuple[int, ...]:
        """The input axes of a weight with ``ndim`` dimensions."""
        skip = (self.output, self.experts, *self.kernel)
        return tuple(axis for axis in range(ndim) if axis not in skip)

    def fan_in(self, shape: Sequence[int]) -> int:
        """Inputs (times kernel positions) one output unit sums over."""
        experts = 1 if self.experts is None else shape[self.experts]
        return math.prod(shape) // shape[self.output] // self.blocks // experts

    def units(self, weight: Tensor) -> Tensor:
        """``weight`` as a ``(output units, fan-in)`` matrix, one row per real output unit (a copy when the output
        axis is not first). For a grouped ``ConvTranspose`` ``(in, out/groups, k…)``, row ``g·out/groups + j`` is
        output channel ``g·out/groups + j``: ``weight[g·in/groups : (g+1)·in/groups, j]``. For a mixture of experts'
        weight, row ``e·out + j`` is output ``j`` of expert ``e``."""
        if self.experts is not None:
            per_expert = weight.movedim((self.experts, self.output), (0, 1))
            return per_expert.reshape(per_expert.shape[0] * per_expert.shape[1], -1)
        moved = weight.movedim(self.output, 0)
        if self.blocks == 1:
            return moved.reshape(moved.shape[0], -1)
        split = moved.unflatten(1, (self.blocks, -1))  # the inputs (axis 0 before the move) split into the groups
        return split.movedim(1, 0).reshape(self.blocks * moved.shape[0], -1)

    def from_units(self, units: Tensor, shape: Sequence[int]) -> Tensor:
        """The inverse of :meth:`units`: a tensor of the weight's ``shape``."""
        if self.experts is not None:
            front = (self.experts, self.output)
            order = [*(shape[axis] for axis in front), *(size for axis, size in enumerate(shape) if axis not in front)]
            return units.reshape(order).movedim((0, 1), front)
        moved = [shape[self.output], *(size for axis, size in enumerate(shape) if axis != self.output)]
        if self.blocks == 1:
            return units.reshape(moved).movedim(0, self.output)
        split = units.reshape(self.blocks, moved[0], moved[1] // self.blocks, *moved[2:])
        return split.movedim(0, 1).reshape(moved).movedim(0, self.output)


#: ``(kind, layout)`` of ``module.<attribute>``, or ``None`` when that parameter does no matrix product.
Finder = Callable[[nn.Module, str], "tuple[str, Layout] | None"]
_REGISTRY: list[tuple[type[nn.Module], Finder]] = []


def register_layout(module_type: type[nn.Module], finder: Finder) -> None:
    """Teach the library a module kind: ``finder(module, attribute)`` gives ``(kind, Layout)`` for each parameter of
    a ``module_type`` module that does a matrix product (``None`` for the others). Those parameters then become
    default targets on their real axes. Later registrations are asked first, so a subclass may override."""
    _REGISTRY.insert(0, (module_type, finder))


def _base_name(module: nn.Module, bases: tuple[type[nn.Module], ...]) -> str:
    return next(base.__name__ for base in bases if isinstance(module, base))


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
_CELLS = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)
#: The kinds whose rows are gates of hidden units (their biases are named ``"<kind> bias"`` in the set-up summary).
RECURRENT_KINDS = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_RECURRENT_WEIGHT = re.compile(r"^weight_(ih|hh|hr)_l\d+(_reverse)?$")
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _no_unit_channels(kind: str) -> str:
    return (
        f"a row of an {kind} weight is one gate of one hidden unit; hidden units (their rows in every gate, their "
        f"column of weight_hh and the inputs that read them) are pruned as channels only as whole units of an "
        f"nn.LSTM/GRU/RNN whose reader the structure layer finds (lightning_sparse.structure.recurrent)"
    )


def _linear(module: nn.Module, attribute: str) -> tuple[str, Layout] | None:
    return ("Linear", Layout()) if attribute == "weight" else None


def _conv(module: nn.Module, attribute: str) -> tuple[str, Layout] | None:
    if attribute != "weight":
        return None
    assert isinstance(module, nn.modules.conv._ConvNd)
    dims = len(module.kernel_size)
    return _base_name(module, _CONVS), Layout(0, tuple(range(2, 2 + dims)))


def _transposed(module: nn.Module, attribute: str) -> tuple[str, Layout] | None:
    if attribute != "weight":  # (in, out/groups, k…): the inputs on axis 0, the outputs on axis 1
        return None
    assert isinstance(module, nn.modules.conv._ConvTransposeNd)
    dims = len(module.kernel_size)
    return _base_name(module, _TRANSPOSED), Layout(1, tuple(range(2, 2 + dims)), blocks=module.groups)


def _attention(module: nn.Module, attribute: str) -> tuple[str, Layout] | None:
    return ("MultiheadAttention", Layout()) if attribute in ATTENTION_WEIGHTS else None


def _recurrent(module: nn.Module, attribute: str) -> tuple[str, Layout] | None:
    match = _RECURRENT_WEIGHT.match(attribute)
    if match is None:
        return None
    kind = _base_name(module, _RECURRENT)
    if match.group(1) == "hr":  # LSTM's projection (proj_size): (proj, h), one block
        return kind, Layout(no_channels=_no_unit_channels(kind))
    return kind, Layout(gates=_GATES.get(getattr(module, "mode", kind), 1), no_channels=_no_unit_channels(kind))


def _cell(module: nn.Module, attribute: str) -> tuple[str, Layout] | None:
    if attribute not in ("weight_ih", "weight_hh"):
        return None
    kind = _base_name(module, _CELLS)
    return kind, Layout(gates={"LSTMCell": 4, "GRUCell": 3}.get(kind, 1), no_channels=_no_unit_channels(kind))


def _bilinear(module: nn.Module, attribute: str) -> tuple[str, Layout] | None:
    return ("Bilinear", Layout()) if attribute == "weight" else None  # (out, in1, in2)


for _types, _finder in (((nn.Linear,), _linear), (_CONVS, _conv), (_TRANSPOSED, _transposed),
                        ((nn.MultiheadAttention,), _attention), (_RECURRENT, _recurrent), (_CELLS, _cell),
                        ((nn.Bilinear,), _bilinear)):  # fmt: skip
    for _type in _types:
        _REGISTRY.append((_type, _finder))


#: The end of a state-dict name that may be a matrix-product weight, for files read without their model (``*weight``,
#: and the recurrent ``*weight_ih_l0``, ``*weight_hh_l1_reverse``, ``*weight_hr_l0``, cells' ``*weight_ih``).
WEIGHT_NAME = re.compile(r"weight(_(ih|hh|hr)(_l\d+(_reverse)?)?)?$")


def _hf_conv1d() -> type[nn.Module] | None:
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` if transformers is already imported (a model holding one
    must have imported it): core never imports transformers itself."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


#: The summary's kinds for a mixture of experts' expert weights (compressed) and its router (dense by default).
EXPERTS_KIND, ROUTER_KIND = "MoE experts", "MoE router"
_NO_EXPERT_CHANNELS = (
    "a row of an expert weight is one output of one expert, and an expert's outputs feed the other experts' "
    "weights too (all experts keep one width); prune them with granularity='neuron' (gate/up rows with the down "
    "column of every expert)"
)


def _num_experts(module: nn.Module) -> int | None:
    count = getattr(module, "num_experts", None)
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def expert_layout(module: nn.Module, attribute: str) -> tuple[str, Layout] | None:
    """``("MoE experts", Layout)`` for a 3-D parameter ``(num_experts, …)`` of a module holding ``num_experts``
    (transformers 5's experts modules): outputs on axis 1, or 2 where the module says ``is_transposed``
    (``GptOssExperts``: ``x @ w[e]``); ``None`` otherwise."""
    count = _num_experts(module)
    param = module._parameters.get(attribute)
    if count is None or param is None or param.dim() != 3 or param.shape[0] != count:
        return None
    output = 2 if getattr(module, "is_transposed", False) is True else 1
    return EXPERTS_KIND, Layout(output, experts=0, no_channels=_NO_EXPERT_CHANNELS)


def _holds_experts(module: nn.Module) -> int | None:
    count = _num_experts(module)
    found = count is not None and any(expert_layout(module, name) for name, _ in module.named_parameters(recurse=False))
    return count if found else None


def moe_routers(model: nn.Module) -> set[int]:
    """``id`` of each router module of ``model``'s mixtures of experts: a sibling of an experts module (one that
    :func:`expert_layout` knows) whose own 2-D ``weight`` has ``num_experts`` rows (``MixtralTopKRouter``, a
    ``Linear(hidden, num_experts)`` gate) or one row (Qwen2-MoE's ``shared_expert_gate``, which scales the shared
    expert). They stay dense by default: a router's few weights decide which experts run."""
    routers: set[int] = set()
    for block in model.modules():
        children = list(block.children())
        counts = {count for child in children if (count := _holds_experts(child)) is not None}
        for child in children if counts else ():
            weight = child._parameters.get("weight")
            if weight is not None and weight.dim() == 2 and (weight.shape[0] in counts or weight.shape[0] == 1):
                routers.add(id(child))
    return routers


def matmul_layout(module: nn.Module, attribute: str) -> tuple[str, Layout] | None:
    """``(kind, Layout)`` of parameter ``attribute`` of ``module`` if it does a matrix product, else ``None``."""
    for module_type, finder in _REGISTRY:  # registered kinds first: a user's own experts module keeps its finder
        if isinstance(module, module_type):
            found = finder(module, attribute)
            if found is not None:
                return found
    experts = expert_layout(module, attribute)
    if experts is not None:
        return experts
    conv1d = _hf_conv1d()
    if conv1d is not None and isinstance(module, conv1d) and attribute == "weight":
        return "Conv1D", Layout(1)  # GPT-2's Conv1D stores its weight (in, out)
    return None
