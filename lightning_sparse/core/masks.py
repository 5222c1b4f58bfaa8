"""The one place masks live: bit-packed boolean masks applied in place to weights and gradients.

A mask costs one bit per weight (3% of an fp32 weight), so a pruning run stays within 10% of the dense
run's memory. There are no ``weight_orig`` copies, float masks, forward hooks or parametrizations: the
model keeps its dense parameters and ``state_dict`` keys, with pruned entries held at exactly zero.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from lightning_sparse.core.shards import all_ranks_min, full_tensor, gather_like, is_sharded, local_part, local_tensor, sum_over_shards

_BIT_VALUES = (1, 2, 4, 8, 16, 32, 64, 128)
_CHUNK_BYTES = 1 << 16  # packed bytes expanded at once: 512 KiB of bool scratch, whatever the layer size


@functools.lru_cache(maxsize=None)
def _bits(device: torch.device) -> Tensor:
    """The 8 bit values on ``device``, made once per device (mask ops run every optimizer step)."""
    return torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=device)


@functools.lru_cache(maxsize=None)
def _pruned_table(device: torch.device) -> Tensor:
    """Row ``b`` holds, for the 8 bits of byte ``b``, True where the bit is 0 (pruned)."""
    codes = torch.arange(256, dtype=torch.uint8, device=device).unsqueeze(1)
    return torch.bitwise_and(codes, _bits(device)) == 0


@functools.lru_cache(maxsize=None)
def _kept_table(device: torch.device, dtype: torch.dtype) -> Tensor:
    """Row ``b`` holds the 8 bits of byte ``b`` as 0/1 in ``dtype``."""
    return (~_pruned_table(device)).to(dtype)


def _by_chunks(tensor: Tensor, packed: Tensor, table: Tensor, apply: Callable[[Tensor, Tensor], object]) -> None:
    """Run ``apply(rows, table rows)`` over ``tensor`` 8 entries per packed byte, a bounded chunk at a time."""
    flat = tensor.view(-1)
    full, tail = divmod(flat.numel(), 8)
    rows = flat[: 8 * full].view(full, 8)
    for begin in range(0, full, _CHUNK_BYTES):  # bounded temporaries: at most 8 * _CHUNK_BYTES entries
        end = min(begin + _CHUNK_BYTES, full)
        apply(rows[begin:end], table.index_select(0, packed[begin:end].long()))
    if tail:
        apply(flat[8 * full :], table[packed[full].long()][:tail])


def mask_(tensor: Tensor, packed: Tensor) -> None:
    """Set the pruned entries of ``tensor`` to +0.0 in place (weights: a product would leave -0.0 behind
    negative weights, and the compressed export would pay a sign bit per zero)."""
    if not tensor.is_contiguous():
        tensor.masked_fill_(~unpack(packed, tensor.shape), 0)
        return
    _by_chunks(tensor, packed, _pruned_table(packed.device), lambda rows, pruned: rows.masked_fill_(pruned, 0))


def multiply_(tensor: Tensor, packed: Tensor) -> None:
    """``tensor *= mask`` in place through a 0/1 table: about three times as fast as :func:`mask_`, but NaN · 0 is
    NaN, so only for tensors known to be finite (gradients after :func:`non_finite`), where the sign of a zero does
    not matter."""
    if not tensor.is_contiguous():
        tensor.mul_(unpack(packed, tensor.shape))
        return
    table = _kept_table(packed.device, tensor.dtype)
    if tensor.numel() % 8 == 0 and packed.numel() <= _CHUNK_BYTES:  # one chunk: the per-step case, in three ops
        tensor.view(-1, 8).mul_(table.index_select(0, packed.long()))
        return
    _by_chunks(tensor, packed, table, lambda rows, kept: rows.mul_(kept))


def non_finite(tensors: Mapping[str, Tensor | None]) -> list[str]:
    """Names of the tensors that hold a NaN or an infinity (``None`` entries are skipped).

    Cheap enough for every optimizer step: one sum per tensor (NaN and inf propagate through a sum) and a single
    host synchronisation; each tensor is looked at on its own only when a sum is not finite (which a finite tensor
    can also give, by overflow, so that look decides).
    Sharded tensors (FSDP2) are looked at shard by shard and the verdict reduced over the ranks, so every rank names
    the same tensors.
    """
    present = [(name, t) for name, t in tensors.items() if t is not None and t.numel()]
    if not present:
        return []
    everything = [t for _, t in present]
    named = [(name, local_tensor(t).detach()) for name, t in present]
    device = named[0][1].device
    sums = torch.stack([t.sum().float().to(device) if t.numel() else torch.zeros((), device=device) for _, t in named])
    if bool(all_ranks_min(torch.isfinite(sums).all().to(torch.uint8), everything)):
        return []
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in named]).to(torch.uint8)
    finite = all_ranks_min(finite, everything)
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def param_state(state: Mapping[Tensor, Mapping[str, object]], param: Tensor) -> list[Tensor]:
    """The per-weight tensors of an optimizer's state for ``param``: floating tensors of the same shape."""
    return [
        value
        for value in state.get(param, {}).values()
        if isinstance(value, Tensor) and value.shape == param.shape and value.is_floating_point()
    ]


@torch.no_grad()
def reset_state_(state: Mapping[Tensor, Mapping[str, object]], param: Tensor, where: Tensor) -> None:
    """Zero ``param``'s per-weight optimizer state (momentum, Adam moments) where ``where`` (shaped like the whole
    parameter) is True; a sharded state is zeroed on this rank's shard."""
    values = param_state(state, param)
    if values:
        where = local_part(where, param)
    for value in values:
        local_tensor(value).masked_fill_(where, 0)


def pack(mask: Tensor) -> Tensor:
    """Pack a boolean tensor into ``ceil(numel / 8)`` bytes (little-endian bit order)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # Weighted sum of 8 bits, each below 256, so uint8 arithmetic cannot overflow.
    return (flat.view(-1, 8).to(torch.uint8) * _bits(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack`: a boolean tensor of ``shape``."""
    numel = 1
    for size in shape:
        numel *= size
    bits = torch.bitwise_and(packed.unsqueeze(1), _bits(packed.device)) != 0
    return bits.view(-1)[:numel].view(shape)


class MaskSet:
    """Boolean masks for a fixed set of parameters, stored once and bit-packed.

    ``True`` keeps a weight, ``False`` prunes it. A parameter without a mask yet is dense. Verbs:
    :meth:`set` a mask, :meth:`apply_` masks to weights, :meth:`mask_grads_`, and read :meth:`density`.

    Sharded parameters (FSDP2 ``DTensor``): each rank stores the mask of its own shard only and masks its shard of
    the weight, gradient and optimizer state. Masks go in and come out whole (:meth:`set`, :meth:`mask`,
    :meth:`weight`, :meth:`grad`, :meth:`state_dict`), so the algorithms decide on the whole tensor exactly as
    unsharded, and a checkpoint is the same whatever the sharding; those verbs gather, so call them on every rank.
    """

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.params = dict(params)
        self._packed: dict[str, Tensor] = {}

    def __contains__(self, name: str) -> bool:
        """True for every parameter of the set (as :meth:`__iter__` yields them), masked yet or not."""
        return name in self.params

    def is_masked(self, name: str) -> bool:
        """True once ``name`` has a mask (before that it is dense)."""
        return name in self._packed

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def is_empty(self) -> bool:
        """True while no parameter has a mask yet (the model is dense)."""
        return not self._packed

    def mask(self, name: str) -> Tensor:
        """The boolean mask of ``name``, whole (all ``True`` while the parameter is dense; gathered if sharded)."""
        param = self.params[name]
        if name not in self._packed:
            return torch.ones(param.shape, dtype=torch.bool, device=param.device)
        return gather_like(self.local_mask(name), param)

    def local_mask(self, name: str) -> Tensor:
        """The boolean mask of this rank's shard of ``name`` (the whole mask for a plain parameter)."""
        local = local_tensor(self.params[name])
        if name not in self._packed:
            return torch.ones_like(local, dtype=torch.bool)
        return unpack(self._packed[name], local.shape)

    def weight(self, name: str) -> Tensor:
        """The whole weight of ``name``, detached (gathered if sharded): what a pruning decision reads."""
        return full_tensor(self.params[name].detach())

    def grad(self, name: str) -> Tensor | None:
        """The whole gradient of ``name`` (gathered if sharded), or None."""
        grad = self.params[name].grad
        return None if grad is None else full_tensor(grad)

    def set(self, name: str, mask: Tensor) -> None:
        """Store ``mask`` (shaped like the whole parameter) for ``name`` and zero the pruned weights in place."""
        param = self.params[name]
        if mask.shape != param.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"Mask for {name!r} must be a bool tensor of shape {tuple(param.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        local = local_part(mask.to(param.device), param)
        self._packed[name] = pack(local)
        with torch.no_grad():
            local_tensor(param).masked_fill_(~local, 0)

    @torch.no_grad()
    def fill_(self, name: str, where: Tensor, value: float = 0.0) -> None:
        """Write ``value`` into parameter ``name`` where ``where`` (shaped like the whole parameter) is True."""
        param = self.params[name]
        local_tensor(param).masked_fill_(local_part(where.to(param.device), param), value)

    def rebind(self, params: Mapping[str, Tensor]) -> None:
        """Point the set at new tensors for the same parameters (``fully_shard`` replaces every parameter by a
        ``DTensor``), keeping each mask: the whole mask is cut to the new shard, and the new weights are masked."""
        missing = sorted(set(self.params) - set(params))
        if missing:
            raise ValueError(f"Cannot rebind masks: the model no longer has parameters {missing}")
        changed = [name for name in self.params if params[name] is not self.params[name]]
        for name in changed:
            if tuple(params[name].shape) != tuple(self.params[name].shape):
                raise ValueError(
                    f"Cannot rebind the mask of {name!r}: the parameter changed shape from "
                    f"{tuple(self.params[name].shape)} to {tuple(params[name].shape)}"
                )
        whole = {name: self.mask(name) for name in changed if name in self._packed}
        self.params.update({name: params[name] for name in changed})
        for name, mask in whole.items():
            self.set(name, mask)

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every pruned weight in place (after an optimizer step may have moved it)."""
        for name, packed in self._packed.items():
            mask_(local_tensor(self.params[name]), packed)

    @torch.no_grad()
    def mask_tensor_(self, name: str, tensor: Tensor) -> None:
        """Zero the pruned entries of ``tensor`` (shaped like parameter ``name``, and sharded like it or whole),
        e.g. another callback's copy."""
        if name not in self._packed:
            return
        if is_sharded(self.params[name]) and not is_sharded(tensor):
            tensor.masked_fill_(~self.mask(name).to(tensor.device), 0)
            return
        mask_(local_tensor(tensor), self._packed[name])

    @torch.no_grad()
    def mask_grads_(self, finite: bool = False) -> None:
        """Zero the gradients of pruned weights so momentum and Adam moments never see them.

        A select, so a NaN gradient at a pruned position cannot survive (NaN · 0 = NaN). ``finite=True`` says the
        caller has checked that every gradient is finite (:func:`non_finite`): then a product through a 0/1 table
        gives the same zeros about three times faster, which matters because this runs every optimizer step.
        """
        for name, packed in self._packed.items():
            grad = self.params[name].grad
            if grad is not None:
                (multiply_ if finite else mask_)(local_tensor(grad), packed)

    @torch.no_grad()
    def mask_grads_and_check_(self) -> bool:
        """Zero the gradients of pruned weights by a product and return whether every gradient of the set is finite.

        The per-step path when no decision reads the gradients: one pass per gradient instead of a check and then a
        mask (each gradient is summed right after it is masked, while it is still in cache). A NaN or an infinity
        anywhere survives the product (NaN·0 and inf·0 are NaN), so ``False`` covers the pruned positions too; the
        caller must then not step (:func:`non_finite` names the tensors). A finite sum proves a tensor finite; an
        infinite one may be an overflow of finite values, which :func:`non_finite` decides. Sharded gradients are
        summed shard by shard and the verdict is taken over every rank.
        """
        sums, grads = [], []
        for name, param in self.params.items():
            grad = param.grad
            if grad is None:
                continue
            local = local_tensor(grad)
            if name in self._packed:
                multiply_(local, self._packed[name])
            sums.append(local.sum())
            grads.append(grad)
        if not sums:
            return True
        device = sums[0].device
        finite = torch.isfinite(torch.stack([s.to(device=device, dtype=torch.float32) for s in sums])).all().to(torch.uint8)
        return bool(all_ranks_min(finite, grads))

    @torch.no_grad()
    def mask_state_(self, state: Mapping[Tensor, Mapping[str, object]]) -> None:
        """Zero an optimizer's per-weight state (momentum, Adam moments) at pruned positions.

        ``state`` is ``optimizer.state``. Only tensors shaped like their parameter are touched (Adam's
        scalar ``step`` is not). Once zero, masked gradients keep that state zero for SGD/Adam-style rules,
        so a weight that is later regrown starts from fresh state.
        """
        for name, packed in self._packed.items():
            for value in param_state(state, self.params[name]):
                mask_(local_tensor(value), packed)

    def numel(self, name: str) -> int:
        return self.params[name].numel()

    def nonzeros(self, name: str) -> int:
        """Number of kept weights of ``name`` according to its mask."""
        if name not in self._packed:
            return self.numel(name)
        return int(sum_over_shards(self.local_mask(name).sum(), self.params[name]))

    def density(self, name: str | None = None) -> float:
        """Fraction of kept weights of one parameter, or of all of them when ``name`` is None."""
        names = [name] if name is not None else list(self.params)
        total = sum(self.numel(n) for n in names)
        return sum(self.nonzeros(n) for n in names) / total if total else 1.0

    def sparsity(self, name: str | None = None) -> float:
        """``1 - density``: the fraction of pruned weights."""
        return 1.0 - self.density(name)

    def packed_bytes(self) -> int:
        """Bytes held by the stored masks."""
        return sum(p.numel() * p.element_size() for p in self._packed.values())

    def checksum(self) -> int:
        """An order-sensitive integer fingerprint of all masks (to compare masks across processes)."""
        total = 0
        for index, name in enumerate(self.params):
            if name in self._packed:
                packed = self._whole_packed(name)
                weights = torch.arange(1, packed.numel() + 1, dtype=torch.int64)
                total += (index + 1) * int((packed.cpu().to(torch.int64) * weights).sum())
        return total

    def _whole_packed(self, name: str) -> Tensor:
        """The packed mask of the whole parameter (this rank's one for a plain parameter; gathered if sharded)."""
        return pack(self.mask(name)) if is_sharded(self.params[name]) else self._packed[name]

    def state_dict(self) -> dict[str, dict]:
        """Packed masks of the whole parameters, on CPU, with the shapes they belong to (the same whatever the
        sharding, so a sharded run's checkpoint loads unsharded and the reverse)."""
        return {
            "shapes": {name: list(self.params[name].shape) for name in self._packed},
            "packed": {name: self._whole_packed(name).cpu().clone() for name in self._packed},
        }

    def load_state_dict(self, state: Mapping[str, Mapping]) -> None:
        """Restore masks; every mask is checked against the model before any is loaded."""
        shapes, packed = state["shapes"], state["packed"]
        unknown = sorted(set(shapes) - set(self.params))
        if unknown:
            raise ValueError(
                f"Checkpoint masks do not fit the model: {unknown} are not sparsified parameters of this model "
                f"(sparsified here: {list(self.params)})"
            )
        for name, shape in shapes.items():
            expected = list(self.params[name].shape)
            if list(shape) != expected or packed[name].numel() != (self.numel(name) + 7) // 8:
                raise ValueError(
                    f"Checkpoint mask for {name!r} has shape {list(shape)} but the parameter has shape {expected}"
                )
        loaded = {}
        for name in shapes:
            param = self.params[name]
            whole = packed[name].to(device=param.device, dtype=torch.uint8)
            loaded[name] = pack(local_part(unpack(whole, param.shape), param)) if is_sharded(param) else whole
        self._packed = loaded
        self.apply_()
