"""Sharded parameters (FSDP2's ``DTensor``) in one place: the whole tensor, this rank's shard, and the way back.

Under ``torch.distributed.fsdp.fully_shard`` (Lightning's ``ModelParallelStrategy``) every parameter, its gradient and
its optimizer state are ``DTensor`` shards: each rank holds a slice (``Shard(0)``: a block of rows). The rest of
``core/`` is written for whole tensors; it goes through these helpers at the few places where it touches storage:

- decisions read :func:`full_tensor` (an all-gather: every rank gets the same whole tensor, so every rank reaches the
  same masks, codebooks and projections as an unsharded run);
- in-place writes go to :func:`local_tensor` (this rank's shard), with whole-tensor values cut by :func:`local_part`
  (no communication: the slice of a tensor every rank already holds).

For a plain tensor each helper is the identity, so single-process and DDP runs execute exactly the code they did.
Every helper that communicates must be called on all ranks in the same order (as callbacks' hooks are).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def _dtensor() -> Any:
    """``torch.distributed.tensor`` (imported only once a sharded tensor exists: it takes ~2 s to import, and
    ``lightning-sparse report`` should not wait for it)."""
    import torch.distributed.tensor

    return torch.distributed.tensor


def is_sharded(tensor: object) -> bool:
    """True for a ``DTensor`` (a parameter, gradient or optimizer state of a ``fully_shard``-ed module). No tensor
    can be one before ``torch.distributed.tensor`` is imported, so this imports nothing."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def any_sharded(tensors: Iterable[object]) -> bool:
    """True when one of ``tensors`` is a ``DTensor`` (then a collective is needed for a whole-model answer)."""
    return any(is_sharded(t) for t in tensors)


def local_tensor(tensor: Any) -> Tensor:
    """This rank's shard of ``tensor`` (its storage: in-place writes change the parameter); ``tensor`` itself if plain."""
    return tensor._local_tensor if is_sharded(tensor) else tensor  # to_local() would record an autograd view


def full_tensor(tensor: Any) -> Tensor:
    """The whole tensor (all-gathered from the shards: a collective) as a plain tensor; ``tensor`` itself if plain."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_part(whole: Tensor, like: Any) -> Tensor:
    """The part of ``whole`` (a plain tensor shaped like ``like``, the same on every rank) that this rank holds of
    ``like``; ``whole`` itself when ``like`` is plain. No communication: every rank slices its own part."""
    if not is_sharded(like):
        return whole
    part = _dtensor().distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return part._local_tensor


def sharded_like(whole: Tensor, like: Any) -> Tensor:
    """``whole`` as a ``DTensor`` sharded like ``like`` (state kept beside a parameter: L-C's Δ and λ); ``whole``
    itself when ``like`` is plain."""
    if not is_sharded(like):
        return whole
    return _dtensor().distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def from_local_like(local: Tensor, like: Any) -> Tensor:
    """A ``DTensor`` sharded like ``like`` whose shard on this rank is ``local`` (no communication); ``local`` itself
    when ``like`` is plain."""
    if not is_sharded(like):
        return local
    return _dtensor().DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


def gather_like(local: Tensor, like: Any) -> Tensor:
    """The whole tensor of which ``local`` is this rank's part, sharded as ``like`` is (a collective); ``local`` if
    ``like`` is plain. Bool tensors travel as uint8 (gloo has no bool all-gather)."""
    if not is_sharded(like):
        return local
    dtype = local.dtype
    sent = local.to(torch.uint8) if dtype == torch.bool else local
    whole = _dtensor().DTensor.from_local(sent, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return whole.full_tensor().to(dtype)


def sum_over_shards(value: Tensor, like: Any) -> Tensor:
    """``value``, a quantity computed on this rank's shard of ``like`` (a count, a sum), summed over the shards (a
    collective); ``value`` itself when ``like`` is plain. Mesh dimensions along which ``like`` is replicated are not
    summed twice."""
    if not is_sharded(like):
        return value
    dt = _dtensor()
    placements = [dt.Partial() if p.is_shard() else dt.Replicate() for p in like.placements]
    return dt.DTensor.from_local(value, like.device_mesh, placements).full_tensor()


def all_ranks_min(value: Tensor, tensors: Iterable[object]) -> Tensor:
    """``value`` reduced by minimum over every rank when one of ``tensors`` is sharded (so all ranks take the same
    decision, e.g. that a tensor holds a NaN on some rank's shard); ``value`` itself otherwise."""
    if not any_sharded(tensors):
        return value
    reduced = value.clone()
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MIN)
    return reduced
