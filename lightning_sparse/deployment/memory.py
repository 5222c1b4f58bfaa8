"""Memory at inference (Smart-DNN+'s concern): bytes a model holds, and the peak of one forward pass.

The peak is counted by watching every tensor an operator returns during the forward (a dispatch mode) and
releasing it when its storage is freed: parameters and inputs plus the largest total of live intermediate tensors.
The same count runs on every device; kernel-internal workspaces outside PyTorch's tensors are not seen.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_sparse.deployment.modules import FoldedConv


def _parts(tensor: Tensor) -> list[Tensor]:
    """The strided tensors holding ``tensor``'s data (values and indices for sparse layouts)."""
    layout = tensor.layout
    if layout == torch.strided:
        return [tensor]
    if layout in (torch.sparse_csr, torch.sparse_bsr):
        return [tensor.values(), tensor.crow_indices(), tensor.col_indices()]
    if layout in (torch.sparse_csc, torch.sparse_bsc):
        return [tensor.values(), tensor.ccol_indices(), tensor.row_indices()]
    if layout == torch.sparse_coo:
        return [tensor._values(), tensor._indices()]
    return []


def _storage_bytes(tensors: Iterable[Tensor]) -> dict[int, int]:
    """``{storage pointer: bytes}`` of the storages behind ``tensors`` (shared storages counted once)."""
    storages: dict[int, int] = {}
    for tensor in tensors:
        for part in _parts(tensor):
            try:
                storage = part.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
                storages[id(part)] = part.numel() * part.element_size()
                continue
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return storages


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (sparse ones: values plus indices), shared storages once."""
    return sum(_storage_bytes([*model.parameters(), *model.buffers()]).values())


class _LiveTensors(TorchDispatchMode):
    """Tracks the bytes of tensors created by operators while active: current and peak."""

    def __init__(self, known: set[int]) -> None:
        super().__init__()
        self.known, self.live, self.current, self.peak = set(known), {}, 0, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, Tensor):
                for part in _parts(value):
                    self._track(part)
        return out

    def _track(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.known or key in self.live or storage.nbytes() == 0:
            return  # a view of a parameter, an input or a tensor already counted
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


@torch.inference_mode()
def peak_forward_bytes(model: nn.Module, inputs: Sequence[Tensor]) -> int:
    """Parameter and input bytes plus the peak of intermediate tensors alive at once during ``model(*inputs)``."""
    model(*inputs)  # warm lazily built caches (FoldedConv) so they count as held, not as a per-call peak
    held = _storage_bytes([*model.parameters(), *model.buffers(), *inputs, *_caches(model)])
    with _LiveTensors(set(held)) as tracker:
        out = model(*inputs)
    del out
    return sum(held.values()) + tracker.peak


def _caches(model: nn.Module) -> list[Tensor]:
    """Per-input-size constants :class:`FoldedConv` builds once and keeps (held memory, not per-call)."""
    return [tensor for module in model.modules() if isinstance(module, FoldedConv) for tensor in module._cache.values()]
