"""Calibration for one-shot pruning: the inputs of each layer, gathered with forward hooks, block after block.

Both references (``locuslab/wanda`` ``prune_wanda``/``prune_sparsegpt``, ``IST-DASLab/sparsegpt`` ``opt_sequential``)
prune a model's repeated blocks (decoder layers) **in sequence**: the layers of block ``b`` are calibrated on the
block's inputs as the already pruned blocks ``0..b-1`` produce them, every layer of the block sees the block still
dense, then the whole block is pruned and the next one is calibrated. Here that is done without knowing the model:

- a *block* is one entry of the model's ``nn.ModuleList`` holding the most selected layers (a transformer's decoder
  layers), or every module matching a ``blocks`` glob; a selected layer outside them is a block of its own;
- blocks are taken in the order the forward first calls them (one recorded forward), and a selected layer the
  forward never calls is an error naming it;
- block ``b`` is calibrated by running the whole forward (``run(batch)``: the user's own code, so any model that
  runs works, Hugging Face ones included) with hooks on its layers, stopped by an exception right after block ``b``
  returns. This costs ``b + 1`` blocks' forwards per batch for block ``b`` (the references cache the block inputs
  instead: 2 per batch, and the activations of every calibration batch in memory); it holds only the statistics.

The statistics are sums over the calibration tokens: ``Σ x_j²`` (Wanda, OWL) or ``Σ x xᵀ`` (SparseGPT), with the
token count; ``reduce`` (e.g. a sum over DDP ranks) is applied to both before a block is pruned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.core.layouts import _hf_conv1d

Reduce = Callable[[Tensor], Tensor]


class _StopForward(Exception):
    """Raised by a hook after the block being calibrated has run: the rest of the forward is not needed."""


@dataclass
class Layer:
    """A selected weight whose inputs are calibrated: the module applying it and whether it is stored ``(in, out)``
    (Hugging Face's GPT-2 ``Conv1D``) rather than ``(out, in)`` (``nn.Linear``)."""

    name: str
    module: nn.Module
    transposed: bool = False

    def as_rows(self, weight: Tensor) -> Tensor:
        """The weight as ``(outputs, inputs)``."""
        return weight.t() if self.transposed else weight

    def inputs(self) -> int:
        weight = self.module.weight
        assert isinstance(weight, Tensor)
        return weight.shape[0] if self.transposed else weight.shape[1]


@dataclass
class InputStatistics:
    """Running sums over a layer's calibration inputs: ``Σ x_j²`` per input (``kind="norms"``) or ``Σ x xᵀ``
    (``kind="hessian"``), and the number of input rows (tokens) ``n``."""

    kind: str
    size: int
    sums: Tensor | None = None
    count: Tensor | None = None

    def add(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if self.sums is None:
            shape = (self.size,) if self.kind == "norms" else (self.size, self.size)
            self.sums = torch.zeros(shape, device=rows.device)
            self.count = torch.zeros((), device=rows.device)
        assert self.count is not None
        self.sums += rows.pow(2).sum(0) if self.kind == "norms" else rows.t() @ rows
        self.count += rows.shape[0]

    def reduce(self, reduce: Reduce | None) -> None:
        if reduce is not None and self.sums is not None and self.count is not None:
            self.sums, self.count = reduce(self.sums), reduce(self.count)

    @property
    def squared_norms(self) -> Tensor:
        """``‖X_j‖₂² / n`` (Wanda's ``scaler_row``, up to the reference's constant factor): XᵀX's diagonal for
        ``kind="hessian"``."""
        sums, count = self._totals()
        return (sums if self.kind == "norms" else torch.diagonal(sums)) / count

    @property
    def hessian(self) -> Tensor:
        """``H = 2 XᵀX / n``."""
        sums, count = self._totals()
        return 2 * sums / count

    def _totals(self) -> tuple[Tensor, Tensor]:
        if self.sums is None or self.count is None:
            raise RuntimeError("no calibration inputs were added to these statistics")
        return self.sums, self.count


def find_layers(model: nn.Module, names: Iterable[str], aliases: Mapping[str, Sequence[str]] | None = None) -> dict[str, Layer]:
    """``{parameter name: Layer}`` for selected weights applied by an ``nn.Linear`` or a Hugging Face ``Conv1D`` (any of
    a tied tensor's names may be the one). Other layers are refused, naming them: their inputs are not ``(tokens,
    inputs)`` rows of the weight's columns."""
    conv1d = _hf_conv1d()
    result = {}
    for name in names:
        found = None
        for alias in (aliases or {}).get(name, (name,)):
            prefix, _, attribute = alias.rpartition(".")
            module = model.get_submodule(prefix) if prefix else model
            if attribute == "weight" and isinstance(module, nn.Linear):
                found = Layer(name, module)
            elif attribute == "weight" and conv1d is not None and isinstance(module, conv1d):
                found = Layer(name, module, transposed=True)
            if found:
                break
        if found is None:
            raise ValueError(
                f"{name!r} is not the weight of an nn.Linear (or Hugging Face Conv1D) layer, so its calibration inputs "
                f"cannot rank its weights; leave it out (`exclude`) or prune it with method='magnitude'"
            )
        result[name] = found
    return result


def find_blocks(model: nn.Module, layers: Mapping[str, Layer], pattern: str | None = None) -> dict[str, list[str]]:
    """``{block name: [layer names]}``: with ``pattern``, every module whose name matches the glob is a block;
    otherwise the entries of the ``nn.ModuleList`` holding the most selected layers. Layers in no block are blocks of
    their own (named after the layer)."""
    owner = {id(layer.module): name for name, layer in layers.items()}
    if pattern is not None:
        candidates = [(name, module) for name, module in model.named_modules() if name and fnmatchcase(name, pattern)]
        if not candidates:
            raise ValueError(f"`blocks` pattern {pattern!r} matches no module of {type(model).__name__}")
    else:
        best: list[tuple[str, nn.Module]] = []
        best_count = 0
        for list_name, module in model.named_modules():
            if not isinstance(module, nn.ModuleList):
                continue
            entries = [(f"{list_name}.{index}" if list_name else str(index), entry) for index, entry in enumerate(module)]
            count = sum(1 for _, entry in entries for sub in entry.modules() if id(sub) in owner)
            if count > best_count and len(entries) > 1:
                best, best_count = entries, count
        candidates = best
    blocks: dict[str, list[str]] = {}
    assigned: set[str] = set()
    for block_name, block in candidates:
        inside = [owner[id(sub)] for sub in block.modules() if id(sub) in owner and owner[id(sub)] not in assigned]
        if inside:
            blocks[block_name] = inside
            assigned.update(inside)
    for name in layers:
        if name not in assigned:
            blocks[name] = [name]
    return blocks


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` (no dropout while calibrating) under ``torch.no_grad()``; every module's mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def _run(run: Callable[[Any], Any], batch: Any) -> None:
    try:
        run(batch)
    except _StopForward:
        pass


def execution_order(modules: Mapping[str, nn.Module], run: Callable[[Any], Any], batch: Any) -> list[str]:
    """The names of ``modules`` in the order one forward (``run(batch)``) first calls them; a module it never calls is
    an error naming it."""
    order: list[str] = []
    hooks = []
    for name, module in modules.items():
        def record(_module: nn.Module, _args: Any, name: str = name) -> None:
            if name not in order:
                order.append(name)
        hooks.append(module.register_forward_pre_hook(record))
    try:
        _run(run, batch)
    finally:
        for hook in hooks:
            hook.remove()
    missing = [name for name in modules if name not in order]
    if missing:
        raise ValueError(
            f"the forward never calls the layer(s) {missing}, so their calibration inputs never arrive (unused in "
            f"forward?); leave them out with `exclude`"
        )
    return order


def collect(
    layers: Mapping[str, Layer],
    kind: str,
    batches: Sequence[Any],
    run: Callable[[Any], Any],
    stop_after: nn.Module | None = None,
    reduce: Reduce | None = None,
) -> dict[str, InputStatistics]:
    """Statistics of ``kind`` (``norms`` or ``hessian``) of the inputs of ``layers`` over ``batches``, the forward
    stopped once ``stop_after`` has returned (``None``: the whole forward)."""
    stats = {name: InputStatistics(kind, layer.inputs()) for name, layer in layers.items()}
    hooks = []
    for name, layer in layers.items():
        def add(_module: nn.Module, args: tuple, _output: Any, name: str = name) -> None:
            stats[name].add(args[0])
        hooks.append(layer.module.register_forward_hook(add))
    if stop_after is not None:
        def stop(_module: nn.Module, _args: Any, _output: Any) -> None:
            raise _StopForward
        hooks.append(stop_after.register_forward_hook(stop))
    try:
        for batch in batches:
            _run(run, batch)
    finally:
        for hook in hooks:
            hook.remove()
    for name, each in stats.items():
        if each.sums is None:
            raise ValueError(f"the calibration forward never called {name!r} (unused in forward?); leave it out with `exclude`")
        each.reduce(reduce)
    return stats


@dataclass
class BlockOrder:
    """The blocks of a model in forward order, each with the module after which its calibration forward stops."""

    blocks: dict[str, list[str]] = field(default_factory=dict)
    stops: dict[str, nn.Module] = field(default_factory=dict)


def ordered_blocks(model: nn.Module, layers: Mapping[str, Layer], run: Callable[[Any], Any], batch: Any,
                   pattern: str | None = None) -> BlockOrder:  # fmt: skip
    """The blocks (:func:`find_blocks`) in the order one forward reaches them (the first call of any of their
    layers), each with its stop module (the block, or the layer itself)."""
    blocks = find_blocks(model, layers, pattern)
    order = execution_order({name: layer.module for name, layer in layers.items()}, run, batch)
    position = {name: index for index, name in enumerate(order)}
    ordered = sorted(blocks, key=lambda block: min(position[layer] for layer in blocks[block]))
    modules = dict(model.named_modules())
    result = BlockOrder()
    for block in ordered:
        result.blocks[block] = sorted(blocks[block], key=position.__getitem__)
        result.stops[block] = modules[block] if block in modules else layers[block].module
    return result


def calibrate_sequentially(
    order: BlockOrder,
    layers: Mapping[str, Layer],
    kind: str,
    batches: Sequence[Any],
    run: Callable[[Any], Any],
    prune_block: Callable[[str, dict[str, InputStatistics]], None],
    reduce: Reduce | None = None,
) -> None:
    """For each block in order: gather its layers' input statistics on the current (already partly pruned) model,
    then ``prune_block(block, statistics)``."""
    for block, names in order.blocks.items():
        stats = collect({name: layers[name] for name in names}, kind, batches, run, order.stops[block], reduce)
        prune_block(block, stats)
