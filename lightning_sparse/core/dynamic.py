"""Dynamic sparse training (RigL, SET): random sparse starts, the cosine update fraction, drop-and-grow.

RigL (Evci et al. 2020, arXiv 1911.11134, Alg. 1): every ΔT steps until T_end each layer drops the
``k = f(t) · n_active`` active weights of smallest magnitude and grows the ``k`` inactive weights of largest
dense-gradient magnitude (SET: random ones), so per-layer non-zero counts never change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_sparse.core.allocation import zero_counts
from lightning_sparse.core.criteria import exact_mask, magnitude, top_k_mask
from lightning_sparse.core.masks import MaskSet, reset_state_
from lightning_sparse.core.shards import local_part, local_tensor


GROW_INITS = ("zeros", "gradient")


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys: same keys, same numbers, on every rank and after a resume."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def random_scores(like: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform scores in [0, 1) shaped like ``like``, drawn on CPU (device-independent) then moved to its device."""
    return torch.rand(like.shape, generator=generator).to(like.device)


def random_masks(
    masks: MaskSet, sparsity: float | Mapping[str, float], distribution: str, seed: int, power_scale: float = 1.0
) -> dict[str, int]:
    """Random sparse start: each layer gets its exact number of zeros (``distribution``) at random positions."""
    scores = {name: random_scores(masks.params[name], seeded_generator(seed, i)) for i, name in enumerate(masks)}
    counts = zero_counts(distribution, scores, sparsity, power_scale=power_scale)
    for name, score in scores.items():
        masks.set(name, exact_mask(score, counts[name]))
    return counts


DECAYS = ("cosine", "constant", "linear")


def update_fraction(step: int, start: int, end: int, alpha: float, decay: str = "cosine") -> float:
    """Fraction of active weights moved at ``step``: :func:`cosine_fraction` (RigL), ``constant`` (``alpha``
    throughout, as SET) or ``linear`` (``alpha · (1 - (t - start) / (end - start))``), the reference's choices."""
    if decay == "cosine":
        return cosine_fraction(step, start, end, alpha)
    if decay == "constant":
        return alpha
    if decay == "linear":
        return alpha * (1.0 - (step - start) / (end - start))
    raise ValueError(f"`decay` must be one of {DECAYS}, got {decay!r}")


def cosine_fraction(step: int, start: int, end: int, alpha: float) -> float:
    """RigL's update fraction ``f(t) = alpha/2 · (1 + cos(π (t - start) / (end - start)))``.

    With ``start = 0`` this is the paper's ``alpha/2 · (1 + cos(π t / T_end))`` (Evci et al. 2020, Eq. 1). With a
    later ``start`` the cosine is stretched over ``[start, end]``, so it still begins at ``alpha`` where the network
    becomes sparse and reaches 0 at ``end`` (the paper's form would begin below ``alpha`` and waste the early decay).
    """
    return alpha / 2.0 * (1.0 + math.cos(math.pi * (step - start) / (end - start)))


def is_dynamic_update_step(step: int, start: int, end: int, frequency: int) -> bool:
    """Connections move at ``start + frequency, start + 2·frequency, ...`` strictly before ``end``."""
    return start < step < end and (step - start) % frequency == 0


def drop_and_grow(weight: Tensor, mask: Tensor, grow_scores: Tensor, n_move: int) -> Tensor:
    """New mask: drop the ``n_move`` smallest active ``|weight|``, grow the ``n_move`` best-scoring others.

    A weight just dropped may be regrown (as in the reference implementation); it then keeps its value.
    The number of active entries is unchanged. Ties are broken by flat index, so the result is exact. A NaN or
    infinite score never wins: such weights are dropped first and such gradients grown last.
    """
    n_active = int(mask.sum())
    n_move = min(n_move, n_active, mask.numel() - n_active)
    kept = top_k_mask(magnitude(weight, mask), n_active - n_move)
    lowest = -torch.finfo(torch.float32).max  # below every finite score, above the kept weights' -inf
    grow = torch.nan_to_num(grow_scores.detach().float(), nan=lowest, posinf=lowest).masked_fill(kept, -math.inf)
    return kept | top_k_mask(grow, n_move)


@torch.no_grad()
def move_connections(
    masks: MaskSet,
    fraction: float,
    grow: str,
    states: list[Mapping[Tensor, Mapping[str, object]]],
    seed: int = 0,
    step: int = 0,
    grow_init: str = "zeros",
    grow_scale: float = 1.0,
) -> dict[str, int]:
    """One RigL/SET update of every layer: move ``fraction`` of its active weights; returns the count grown.

    ``grow="gradient"`` ranks inactive weights by the dense ``|grad|`` held in ``.grad`` (a layer without a
    gradient, frozen or unused in this step, is left as it is rather than grown by index); ``"random"`` by
    scores seeded from ``(seed, step, layer)``. Grown weights start at ``grow_init``: ``"zeros"`` (+0.0, the
    paper's choice) or ``"gradient"``: ``w = -grow_scale · ∂L/∂w``, a descent step along the dense gradient
    (google-research/rigl's ``grow_init="grad_scale_d"`` sets ``+∂L/∂w / d``; the sign here points downhill); a
    layer without a gradient grows zeros. Their per-weight state in each of ``states`` (``optimizer.state``) is
    zeroed.
    """
    if grow_init not in GROW_INITS:
        raise ValueError(f"`grow_init` must be one of {list(GROW_INITS)}, got {grow_init!r}")
    moved = {}
    for index, name in enumerate(masks):
        param, old = masks.params[name], masks.mask(name)  # whole tensors (gathered when sharded), as decided unsharded
        if grow == "gradient":
            grad = masks.grad(name)
            if grad is None:  # frozen or unused this step: no gradient to grow by, so the layer does not move
                moved[name] = 0
                continue
            scores = grad.abs()
        else:
            scores = random_scores(param, seeded_generator(seed, step, index))
        new = drop_and_grow(masks.weight(name), old, scores, int(fraction * int(old.sum())))
        grown = new & ~old
        masks.set(name, new)
        masks.fill_(name, grown, 0.0)  # already 0 while inactive; stated, not assumed
        if grow_init == "gradient" and param.grad is not None:  # this rank's shard of -scale · grad at grown places
            local, where = local_tensor(param), local_part(grown.to(param.device), param)
            local.copy_(torch.where(where, local_tensor(param.grad).to(local.dtype) * -grow_scale, local))
        for state in states:
            reset_state_(state, param, grown)
        moved[name] = int(grown.sum())
    return moved
