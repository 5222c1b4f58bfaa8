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

import copy
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


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


def _fsdp_internal(hook: Any) -> bool:
    """True for a hook that ``fully_shard`` registered (a bound method, partial or closure of its own modules)."""
    for _ in range(8):  # unwrap partials, bound methods and torch's ``_WrappedHook``
        inner = getattr(hook, "func", None) or getattr(hook, "__func__", None) or getattr(hook, "hook", None)
        owner = getattr(hook, "__self__", None)
        if owner is not None and type(owner).__module__.startswith("torch.distributed.fsdp"):
            return True
        if inner is None:
            break
        hook = inner
    return getattr(hook, "__module__", "").startswith("torch.distributed.fsdp")


def unsharded_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` as a plain (unsharded) module: every ``DTensor`` parameter replaced by its whole
    tensor (an all-gather: call on every rank), the ``FSDP<Name>`` classes ``fully_shard`` gave the submodules turned
    back into their own classes, and FSDP's state and hooks left behind (``FSDPModule`` refuses ``copy.deepcopy``).
    Device meshes and process groups are shared, not copied. A module without ``DTensor`` parameters is deep-copied
    as it is."""
    if not any_sharded(module.parameters()):
        return copy.deepcopy(module)
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule

    memo: dict[int, Any] = {}
    for param in module.parameters():
        if is_sharded(param):
            memo[id(param)] = nn.Parameter(full_tensor(param).detach().clone(), requires_grad=param.requires_grad)
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                swapped.append((sub, type(sub)))
                sub.__class__ = next(base for base in type(sub).__bases__ if base is not FSDPModule)
            for key, value in vars(sub).items():
                if isinstance(value, (DeviceMesh, ProcessGroup)):
                    memo[id(value)] = value
                elif isinstance(value, dict) and key.endswith("hooks"):
                    memo[id(value)] = type(value)((k, h) for k, h in value.items() if not _fsdp_internal(h))
                elif key.startswith("__composable_api_state_key"):
                    memo[id(value)] = {}  # fully_shard's per-module state and registry
        teacher = copy.deepcopy(module, memo)
    finally:
        for sub, cls in swapped:
            sub.__class__ = cls
    for sub in teacher.modules():
        for name in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            vars(sub).pop(name, None)
    return teacher
