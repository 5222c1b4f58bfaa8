"""Pure-torch pieces of dynamic sparse training: drop-and-grow, top-k, cosine fraction, random starts."""

import math

import pytest
import torch
from torch import nn

from lightning_sparse.core.allocation import erk_sparsities, round_half_up
from lightning_sparse.core.criteria import top_k_mask
from lightning_sparse.core.dynamic import (
    cosine_fraction,
    drop_and_grow,
    is_dynamic_update_step,
    move_connections,
    random_masks,
)
from lightning_sparse.core.masks import MaskSet


def test_top_k_keeps_the_highest_scores_and_breaks_ties_by_index():
    scores = torch.tensor([0.5, 2.0, 0.5, 1.0, 0.5])
    assert top_k_mask(scores, 2).tolist() == [False, True, False, True, False]
    assert top_k_mask(scores, 3).tolist() == [True, True, False, True, False]  # first of the tied 0.5s
    assert not top_k_mask(scores, 0).any() and top_k_mask(scores, 5).all()
    with pytest.raises(ValueError, match=r"`k` must be in \[0, 5\]"):
        top_k_mask(scores, 6)


def test_drop_and_grow_on_a_hand_checked_layer():
    weight = torch.tensor([0.9, -0.1, 0.0, 0.5, 0.0, 0.0, -0.3, 0.0])
    mask = torch.tensor([True, True, False, True, False, False, True, False])
    grad = torch.tensor([0.0, 5.0, 0.2, 0.0, 3.0, 0.1, 0.0, 4.0])
    new = drop_and_grow(weight, mask, grad, n_move=2)
    # drop the 2 smallest active |w| (indices 1 and 6); grow the 2 largest |g| among the rest: index 1
    # (just dropped, |g| = 5, regrown as in the reference code) and index 7 (|g| = 4), not 4 (|g| = 3).
    assert new.tolist() == [True, True, False, True, False, False, False, True]
    assert int(new.sum()) == int(mask.sum())


def test_drop_and_grow_keeps_the_count_and_picks_extremes():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=generator)
    mask = torch.rand(64, 32, generator=generator) > 0.8
    weight *= mask
    grad = torch.randn(64, 32, generator=generator)
    k = 50
    new = drop_and_grow(weight, mask, grad.abs(), k)
    assert int(new.sum()) == int(mask.sum())
    dropped, grown = mask & ~new, new & ~mask
    assert 0 < int(dropped.sum()) == int(grown.sum()) <= k
    threshold = weight.abs()[mask].sort().values[k - 1]  # the k-th smallest active magnitude
    assert weight.abs()[dropped].max() <= threshold  # only the k smallest could go
    assert new[mask & (weight.abs() > threshold)].all()  # every larger one stayed
    not_chosen = ~new
    assert grad.abs()[grown].min() >= grad.abs()[not_chosen].max()  # largest dense gradients came


def test_cosine_fraction_decays_from_alpha_to_zero():
    assert cosine_fraction(0, 0, 100, 0.3) == pytest.approx(0.3)
    assert cosine_fraction(50, 0, 100, 0.3) == pytest.approx(0.15)
    assert cosine_fraction(100, 0, 100, 0.3) == pytest.approx(0.0, abs=1e-12)
    assert cosine_fraction(30, 10, 110, 0.5) == pytest.approx(0.25 * (1 + math.cos(math.pi * 0.2)))


def test_updates_every_frequency_steps_strictly_before_end():
    steps = [t for t in range(200) if is_dynamic_update_step(t, 0, 150, 50)]
    assert steps == [50, 100]
    assert [t for t in range(200) if is_dynamic_update_step(t, 20, 151, 50)] == [70, 120]


def test_random_masks_are_exact_erk_and_reproducible():
    model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    first, second = MaskSet(params), MaskSet(params)
    counts = random_masks(first, 0.9, "erk", seed=3)
    random_masks(second, 0.9, "erk", seed=3)
    assert first.checksum() == second.checksum()
    target = erk_sparsities({n: tuple(p.shape) for n, p in params.items()}, 0.9)
    for name, param in params.items():
        assert counts[name] == round_half_up(target[name] * param.numel())
        assert param.numel() - first.nonzeros(name) == counts[name]
    other = MaskSet(params)
    random_masks(other, 0.9, "erk", seed=4)
    assert other.checksum() != first.checksum()


def test_nan_gradients_are_grown_last():
    weight = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 3.0])
    mask = torch.tensor([False, False, False, True, True, True])
    grad = torch.tensor([float("nan"), 0.5, float("inf"), 0.0, 0.0, 0.0])
    new = drop_and_grow(weight, mask, grad.abs(), 1)  # drops |w| = 1, grows the one finite score
    assert new.tolist() == [False, True, False, False, True, True]


def test_cosine_with_a_later_start_is_stretched_over_start_to_end():
    # one definition: alpha at `start`, alpha/2 halfway, 0 at `end` (the paper's cos(pi t / end) when start = 0)
    assert cosine_fraction(20, 20, 60, 0.3) == pytest.approx(0.3)
    assert cosine_fraction(40, 20, 60, 0.3) == pytest.approx(0.15)
    assert cosine_fraction(60, 20, 60, 0.3) == pytest.approx(0.0)
    assert cosine_fraction(25, 0, 100, 0.3) == pytest.approx(0.15 * (1 + math.cos(math.pi * 25 / 100)))


def test_update_fraction_decays_cosine_linear_or_not_at_all():
    from lightning_sparse.core.dynamic import update_fraction

    assert update_fraction(40, 20, 60, 0.3, "cosine") == pytest.approx(cosine_fraction(40, 20, 60, 0.3))
    assert update_fraction(30, 20, 60, 0.3, "linear") == pytest.approx(0.225)
    assert update_fraction(59, 20, 60, 0.3, "constant") == 0.3
    with pytest.raises(ValueError, match=r"`decay` must be one of \('cosine', 'constant', 'linear'\)"):
        update_fraction(30, 20, 60, 0.3, "step")


def _one_layer_with_a_gradient() -> tuple[nn.Linear, MaskSet, torch.optim.SGD]:
    """A 2×4 layer, half of it active, with a known dense gradient (largest where the weight is inactive)."""
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.9, 0.0, 0.5, 0.0], [0.0, -0.1, 0.0, 0.3]]))
    masks = MaskSet({"weight": layer.weight})
    masks.set("weight", layer.weight != 0)
    layer.weight.grad = torch.tensor([[0.1, -2.0, 0.2, 0.05], [3.0, 0.0, -0.4, 0.1]])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    return layer, masks, optimizer


def test_grown_weights_start_at_zero_by_default_and_at_minus_scaled_gradient_when_asked():
    layer, masks, optimizer = _one_layer_with_a_gradient()
    moved = move_connections(masks, 0.5, "gradient", [optimizer.state])  # 2 of 4 active move: -0.1, 0.3 dropped
    assert moved == {"weight": 2}
    grown = torch.tensor([[False, True, False, False], [True, False, False, False]])  # |grad| 2.0 and 3.0
    kept = torch.tensor([[True, False, True, False], [False, False, False, False]])  # 0.9 and 0.5
    assert torch.equal(masks.mask("weight"), kept | grown)
    assert torch.equal(layer.weight[grown], torch.zeros(2))

    layer, masks, optimizer = _one_layer_with_a_gradient()
    move_connections(masks, 0.5, "gradient", [optimizer.state], grow_init="gradient", grow_scale=0.01)
    assert torch.allclose(layer.weight[grown], torch.tensor([0.02, -0.03]), rtol=1e-6, atol=0)  # -0.01·(-2), -0.01·3
    assert torch.equal(layer.weight[~masks.mask("weight")], torch.zeros(4))  # dropped weights are zeroed
    assert layer.weight[0, 0] == 0.9 and layer.weight[0, 2] == 0.5  # kept weights untouched

    with pytest.raises(ValueError, match=r"`grow_init` must be one of \['zeros', 'gradient'\], got 'ones'"):
        move_connections(masks, 0.5, "gradient", [optimizer.state], grow_init="ones")
