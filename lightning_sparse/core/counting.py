"""The one zero counter: exact zeros over a set of tensors, each tensor counted once however many names reach it.

Global sparsity is ``zeros / total`` with ``zeros = Σ_t #{i : t_i = 0}`` and ``total = Σ_t numel(t)`` over the
*distinct* tensors: a tied weight (one tensor reached by two names, e.g. a language model's embedding and output
head) is one tensor, pruned once, and so counted once. Two tensors are the same when they view the same memory
with the same offset, shape and strides (``param`` and ``param.detach()`` are the same tensor here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from lightning_sparse.core.shards import local_tensor, sum_over_shards

__all__ = ["count_zeros", "global_sparsity", "tensor_key", "zero_fraction"]


def tensor_key(tensor: Tensor) -> tuple:
    """What makes two tensors one for counting: the memory they view (storage pointer, offset, shape, strides);
    tensors without memory (meta, empty) are only the same object as themselves."""
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        pointer = 0
    if not pointer:
        return ("object", id(tensor))
    return (tensor.device.type, pointer, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


@torch.no_grad()
def count_zeros(tensors: Mapping[str, Tensor] | Iterable[Tensor]) -> tuple[int, int]:
    """``(zeros, total)`` over the distinct tensors given (a mapping's values, or any iterable of tensors):
    the number of entries exactly equal to zero, and the number of entries, each tied tensor counted once. A
    sharded tensor (FSDP2 ``DTensor``) is counted over all its shards (a collective: call on every rank)."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    seen: set[tuple] = set()
    zeros = total = 0
    for tensor in values:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"count_zeros takes tensors, got {type(tensor).__name__}")
        key = tensor_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        zeros += int(sum_over_shards((local_tensor(tensor) == 0).sum(), tensor))  # FSDP2: every rank's shard
        total += tensor.numel()
    return zeros, total


def global_sparsity(tensors: Mapping[str, Tensor] | Iterable[Tensor]) -> float:
    """The package's one global sparsity: ``zeros / total`` of :func:`count_zeros` over the distinct tensors given (a
    mapping's values, or any iterable of tensors; 0.0 for no entries). Every other figure of a whole model's sparsity
    (the report's global row, the sweep's metric, the CLI's dense comparison, L-C's log) is this one."""
    return zero_fraction(*count_zeros(tensors))


def zero_fraction(zeros: int, total: int) -> float:
    """``zeros / total``, 0.0 when there are no entries: the ratio for counts already taken (e.g. per-layer rows that
    :func:`count_zeros` counted one tensor at a time, each tied tensor once)."""
    if isinstance(zeros, bool) or isinstance(total, bool) or not 0 <= zeros <= total:
        raise ValueError(f"`zeros` and `total` must be ints with 0 <= zeros <= total, got zeros={zeros!r}, total={total!r}")
    return zeros / total if total else 0.0
