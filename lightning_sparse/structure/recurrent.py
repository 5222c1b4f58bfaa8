"""Recurrent hidden units and transposed-convolution channels as structured units (``granularity="channel"``).

Found from the module structure, like the attention and MLP patterns of :mod:`.patterns`, and pruned and removed as
``neuron`` group layers (:class:`~lightning_sparse.core.heads.GroupLayer`): scored by the sum of their members'
norms, masked whole in training, cut out by deploy's surgery (:mod:`.surgery`).

**Recurrent layers** (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``; G = 4, 3, 1 gate blocks of ``hidden_size`` H rows). Hidden
unit ``j`` of layer ``k`` is

* its rows ``j, H + j, …, (G-1)·H + j`` (one per gate) of ``weight_ih_lk``, ``weight_hh_lk``, ``bias_ih_lk`` and
  ``bias_hh_lk``;
* its column ``j`` of ``weight_hh_lk`` (what it feeds back into every unit);
* the columns of whatever reads layer ``k``'s output: ``weight_ih_l(k+1)`` inside the module, and for the last layer
  the ``nn.Linear`` registered right after the recurrent module in its parent (only ``nn.Dropout``/``nn.Identity``
  between them) whose ``in_features`` is the output width ``H × directions``.

With every member zero the unit is exactly zero at every step from a zero initial state: an LSTM's gates read
``σ(0) = ½`` and ``g = tanh(0) = 0``, so ``c_t = ½ c_{t-1} = 0`` and ``h_t = ½ tanh(0) = 0``; a GRU's candidate is
``tanh(0) = 0`` so ``h_t = ½ h_{t-1} = 0``; an Elman RNN's ``tanh(0) = relu(0) = 0``. A **bidirectional** layer's
unit ``j`` is unit ``j`` of both directions at once (both ``_reverse`` tensors too, and reader columns ``j`` and
``H + j``): ``nn.LSTM`` holds one ``hidden_size`` for both. Deploy needs every layer of one module to keep the same
number of units (one ``hidden_size``; uniform sparsity gives that) and rebuilds the module with ``hidden_size``
reduced. An LSTM with ``proj_size`` is refused (its projection, not the units, is what the next layer reads), and
so is a last layer whose reader cannot be found from the module structure (the refusal says why).

**Transposed convolutions** (``nn.ConvTranspose1d/2d/3d``, weight ``(in, out/groups, k…)``). In an
``nn.Sequential``, a producer (``nn.Conv*d``: output axis 0; ``nn.ConvTranspose*d``: output axis 1; ``groups=1``)
followed, after only elementwise modules (activations, dropout) and BatchNorms (their affine entries are members,
their running statistics are sliced at deploy), by a consumer (``nn.ConvTranspose*d``: input axis 0;
``nn.Conv*d``: input axis 1; ``groups=1``), with one of the two a transposed convolution: output channel ``j`` of the
producer (its weight slice and bias entry) with input channel ``j`` of the consumer is one unit. A channel whose
members are zero is a constant after the activations (``f(0)``), which the consumer's zero inputs weigh by 0, so it
contributes exactly nothing (a BatchNorm's zero affine entries make it exactly zero already). Plain Conv→Conv
chains are left to the coupled channel groups of :mod:`lightning_sparse.core.groups`.

The reader is found by module order and shapes; where an example batch is at hand (the pruning callbacks' set-up)
:func:`check_readers` runs the model once and refuses a reader that does not read the recurrent module's output, and
deploy keeps a rebuilt model only where its outputs equal the masked model's (:func:`lightning_sparse.deploy`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.core.heads import GroupLayer, Member
from lightning_sparse.structure.patterns import ELEMENTWISE, Match, _builtin, _join
from lightning_sparse.structure.surgery import KeptDense, register_rebuild, slice_members

RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
READER = "reader"  # the role of a member that only reads the units (the next layer's input columns)
_PASS = (nn.Dropout, nn.Identity)


def _rnn_layers(name: str, rnn: nn.RNNBase, reader: tuple[str, nn.Linear] | None) -> Match:
    """The unit layers of one recurrent module (the last layer's only with a ``reader``)."""
    kind = type(rnn).__name__
    if getattr(rnn, "proj_size", 0):
        return Match(dense=f"kept dense because {name!r} ({kind}) has proj_size={rnn.proj_size}: the next layer reads "
                           f"its projection weight_hr, not its hidden units, so they are not pruned as channels")  # fmt: skip
    gates, hidden = GATES.get(rnn.mode, 1), rnn.hidden_size
    suffixes = ("", "_reverse") if rnn.bidirectional else ("",)
    rows = tuple(g * hidden for g in range(gates))
    layers: list[GroupLayer] = []
    dense = ""
    for k in range(rnn.num_layers):
        members: list[Member] = []
        for suffix in suffixes:
            for kind_ in ("ih", "hh"):
                members.append(Member(_join(name, f"weight_{kind_}_l{k}{suffix}"), 0, rows, f"{kind_} gates"))
            if rnn.bias:
                members += [Member(_join(name, f"bias_{b}_l{k}{suffix}"), 0, rows, f"{b} gate bias") for b in ("ih", "hh")]
            members.append(Member(_join(name, f"weight_hh_l{k}{suffix}"), 1, (0,), "recurrent input"))
        outputs = tuple(d * hidden for d in range(len(suffixes)))  # the output is [forward H | reverse H]
        if k + 1 < rnn.num_layers:
            members += [Member(_join(name, f"weight_ih_l{k + 1}{s}"), 1, outputs, READER) for s in suffixes]
        elif reader is not None:
            members.append(Member(_join(reader[0], "weight"), 1, outputs, READER))
        else:
            dense = (f"kept dense because the reader of {name!r} ({kind}) layer {k} is not proved: no nn.Linear with "
                     f"in_features={hidden * len(suffixes)} is registered right after it in its parent module")  # fmt: skip
            break
        label = f"{name}/l{k}" if name else f"l{k}"
        layers.append(GroupLayer("neuron", label, kind, hidden, 1, tuple(members), "recurrent:rnn"))
    return Match(layers, dense)


def _reader(children: list[tuple[str, nn.Module]], i: int, width: int) -> tuple[str, nn.Linear] | None:
    j = i + 1
    while j < len(children) and isinstance(children[j][1], _PASS):
        j += 1
    if j < len(children) and type(children[j][1]) is nn.Linear and children[j][1].in_features == width:
        return children[j][0], children[j][1]
    return None


@_builtin("recurrent:rnn")
def _recurrent(name: str, module: nn.Module) -> Match | None:
    """The recurrent modules among ``module``'s children (and ``module`` itself when it is the whole model)."""
    if isinstance(module, RECURRENT) and not name:
        return _rnn_layers("", module, None)
    children = list(module.named_children())
    found = Match()
    reasons = []
    for i, (child_name, child) in enumerate(children):
        if type(child) not in RECURRENT:
            continue
        width = child.hidden_size * (2 if child.bidirectional else 1)
        found_reader = _reader(children, i, width)
        reader = (_join(name, found_reader[0]), found_reader[1]) if found_reader else None
        match = _rnn_layers(_join(name, child_name), child, reader)
        found.layers += match.layers
        if match.dense:
            reasons.append(match.dense)
    found.dense = "; ".join(reasons)
    return found if found.layers or found.dense else None


def _channels(module: nn.Module, produce: bool) -> tuple[int, int] | None:
    """``(axis, channels)`` of a conv's outputs (``produce``) or inputs in its weight; ``None`` when grouped."""
    if not isinstance(module, (*CONVS, *TRANSPOSED)) or module.groups != 1:
        return None
    transposed = isinstance(module, TRANSPOSED)
    axis = (1 if transposed else 0) if produce else (0 if transposed else 1)
    return axis, module.weight.shape[axis]


@_builtin("transposed:sequential")
def _transposed(name: str, module: nn.Module) -> Match | None:
    """Producer → elementwise… → consumer pairs in an ``nn.Sequential`` where one of the two is transposed."""
    if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
        return None  # a subclass with a forward of its own may not run its children in order
    children = list(module.named_children())
    layers, reasons = [], []
    for i, (child_name, child) in enumerate(children):
        if not isinstance(child, (*CONVS, *TRANSPOSED)):
            continue
        j = i + 1
        while j < len(children) and isinstance(children[j][1], (*ELEMENTWISE, *NORMS)):
            j += 1
        if j >= len(children) or not isinstance(children[j][1], (*CONVS, *TRANSPOSED)):
            continue
        consumer_name, consumer = children[j]
        if not isinstance(child, TRANSPOSED) and not isinstance(consumer, TRANSPOSED):
            continue  # Conv → Conv: the coupled channel groups' business
        out, into = _channels(child, True), _channels(consumer, False)
        path = _join(name, child_name)
        if out is None or into is None or out[1] != into[1]:
            reasons.append(f"kept dense because the channels of {path!r} ({type(child).__name__}) feed "
                           f"{_join(name, consumer_name)!r} ({type(consumer).__name__}) through a grouped convolution "
                           f"(groups > 1), whose channels are not removed one by one")  # fmt: skip
            continue
        norms = [(n, m) for n, m in children[i + 1 : j] if isinstance(m, NORMS)]
        if any(m.num_features != out[1] for _, m in norms):
            continue
        members = [Member(_join(path, "weight"), out[0], (0,), "output channel")]
        if child.bias is not None:
            members.append(Member(_join(path, "bias"), 0, (0,), "output channel bias"))
        for norm_name, norm in norms:  # BatchNorm's affine entries (its running statistics go at deploy)
            members += [Member(_join(name, norm_name, p), 0, (0,), f"norm {p}") for p in ("weight", "bias")
                        if getattr(norm, p, None) is not None]  # fmt: skip
        members.append(Member(_join(name, consumer_name, "weight"), into[0], (0,), READER))
        layers.append(GroupLayer("neuron", path, type(child).__name__, out[1], 1, tuple(members), "transposed:sequential"))
    return Match(layers, "; ".join(reasons)) if layers or reasons else None


def _reads(read: Tensor, outputs: list[Tensor], width: int) -> bool:
    """Whether ``read`` (a reader's input) is the recurrent output itself or a view of it whose rows are whole
    output rows (same storage, last axis the output width, contiguous along it, rows starting at multiples of it)."""
    if read.shape[-1] != width or read.stride(-1) != 1 or read.storage_offset() % width:
        return False
    if any(stride % width for stride in read.stride()[:-1] if stride):
        return False
    pointer = read.untyped_storage().data_ptr()
    return any(out.untyped_storage().data_ptr() == pointer for out in outputs)


@torch.no_grad()
def check_readers(model: nn.Module, layers: Sequence[GroupLayer], inputs: tuple[Tensor, ...] | None) -> None:
    """Run ``model`` once on ``inputs`` (eval mode, restored after) and refuse, naming the layer, each recurrent unit
    layer whose reader Linear (found by module order) does not read that module's output as it is: a LayerNorm, a
    concatenation or a copy in between would break the unit (its columns would not be the ones its units feed).
    Without ``inputs``, or where the forward fails on them, nothing is checked (deploy still compares outputs)."""
    readers = {}
    for layer in layers:
        if layer.pattern != "recurrent:rnn" or not layer.members[-1].param.endswith(".weight") or ".weight_ih_l" in layer.members[-1].param:
            continue
        path = layer.module.rpartition("/")[0]
        readers[path] = (layer, layer.members[-1].param.rpartition(".")[0])
    if not readers or inputs is None:
        return
    seen: dict[str, list[Tensor]] = {}
    read: dict[str, list[bool]] = {}
    handles = []
    for path, (layer, reader) in readers.items():
        rnn = model.get_submodule(path)
        width = rnn.hidden_size * (2 if rnn.bidirectional else 1)

        def output(module: nn.Module, args: Any, out: Any, path: str = path) -> None:
            flat = [out] if isinstance(out, Tensor) else [t for part in out for t in (part if isinstance(part, tuple) else (part,))]
            seen.setdefault(path, []).extend(t for t in flat if isinstance(t, Tensor))

        def reading(module: nn.Module, args: Any, path: str = path, width: int = width) -> None:
            first = args[0] if args and isinstance(args[0], Tensor) else None
            read.setdefault(path, []).append(first is not None and _reads(first, seen.get(path, []), width))

        handles.append(rnn.register_forward_hook(output))
        handles.append(model.get_submodule(reader).register_forward_pre_hook(reading))
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        model(*inputs)
    except Exception:  # noqa: BLE001 - a forward the example input does not fit: unchecked (deploy compares outputs)
        return
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    for path, (layer, reader) in readers.items():
        if not read.get(path) or not all(read[path]):
            how = "is not called" if not read.get(path) else "reads something other than its output as it is"
            raise ValueError(
                f"`granularity`='channel' on the hidden units of {path!r} ({layer.module_type}): the Linear registered "
                f"after it, {reader!r}, {how} (e.g. a norm, a concatenation or a copy in between), so its units cannot "
                f"be pruned as channels. Prune {path!r} 'unstructured' or 'N:M' (a {{glob: granularity}} mapping) or "
                f"leave it out (`exclude`)"
            )


# ----------------------------------------------------------------------------- deploy's surgery
def _unequal(model: nn.Module, path: str, rnn: nn.RNNBase, layer: GroupLayer) -> str | None:
    """Why the layers of ``rnn`` cannot all lose their zero units (they have different numbers of them), or ``None``;
    read before any of its layers is sliced."""
    from lightning_sparse.core.heads import find_group_layers, zero_groups

    params = dict(model.named_parameters())
    siblings = [other for other in find_group_layers(model) if other.pattern == layer.pattern and other.module.rpartition("/")[0] == path]
    zeros = {other.module: min(int(zero_groups(other, params).sum()), other.count - 1) for other in siblings}
    if len(siblings) != rnn.num_layers or len(set(zeros.values())) > 1:
        return (f"the layers of {path or 'the model'!r} ({type(rnn).__name__}) have different numbers of all-zero hidden "
                f"units ({zeros}) but one hidden_size: units kept (prune every layer to one sparsity)")  # fmt: skip
    return None


_VERDICTS: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def _rebuild_rnn(model: nn.Module, layer: GroupLayer, keep: list[int]) -> str:
    """Slice the units out of one layer of a recurrent module (layers come in order); every layer of the module must
    keep as many units (``nn.LSTM`` holds one ``hidden_size``), checked on all of them before the first is sliced.
    The last layer's rebuild states the new ``hidden_size``."""
    path, _, label = layer.module.rpartition("/")
    rnn = model.get_submodule(path) if path else model
    assert isinstance(rnn, nn.RNNBase)
    if rnn not in _VERDICTS:
        _VERDICTS[rnn] = _unequal(model, path, rnn, layer)
    reason = _VERDICTS[rnn]
    if reason is not None:
        raise KeptDense(reason)
    slice_members(model, layer, keep)
    if int(label[1:]) == rnn.num_layers - 1:
        rnn.hidden_size = len(keep)
        rnn.flatten_parameters()
        _VERDICTS.pop(rnn, None)
    return f"{type(rnn).__name__}(hidden_size={len(keep)})"


def _rebuild_sequential(model: nn.Module, layer: GroupLayer, keep: list[int]) -> str:
    """Slice a producer/consumer pair's units, and the running statistics of the BatchNorms between them."""
    slice_members(model, layer, keep)
    parent, _, first = layer.module.rpartition(".")
    sequential = model.get_submodule(parent) if parent else model
    names = [n for n, _ in sequential.named_children()]
    index = torch.tensor(keep, dtype=torch.long)
    for child_name in names[names.index(first) + 1 :]:
        child = sequential.get_submodule(child_name)
        if isinstance(child, (*CONVS, *TRANSPOSED)):
            break
        if isinstance(child, NORMS):
            for buffer in ("running_mean", "running_var"):
                value = getattr(child, buffer, None)
                if value is not None:
                    setattr(child, buffer, value.index_select(0, index.to(value.device)).clone())
            child.num_features = len(keep)
    return f"{layer.module_type} ({len(keep)} channels)"


register_rebuild("recurrent:rnn", _rebuild_rnn)
register_rebuild("transposed:sequential", _rebuild_sequential)
