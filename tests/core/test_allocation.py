import math

import pytest
import torch

from lightning_sparse.core.allocation import erk_sparsities, global_zero_counts, round_half_up, zero_counts
from lightning_sparse.core.criteria import exact_mask, magnitude

SHAPES = {"fc1": (300, 784), "fc2": (100, 300), "fc3": (10, 100)}


def _scores(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator).abs() for name, shape in SHAPES.items()}


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.98, 0.999])
def test_uniform_gives_exactly_round_s_n_zeros_per_layer(sparsity):
    scores = _scores()
    counts = zero_counts("uniform", scores, sparsity)
    for name, score in scores.items():
        mask = exact_mask(score, counts[name])
        assert int((~mask).sum()) == round_half_up(sparsity * score.numel())


def test_exact_mask_prunes_lowest_scores_and_breaks_ties_by_index():
    scores = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.9, 0.1])
    assert exact_mask(scores, 2).tolist() == [True, False, False, True, True, True]
    assert exact_mask(scores, 2).tolist() == exact_mask(scores.clone(), 2).tolist()
    all_tied = torch.zeros(10)
    assert exact_mask(all_tied, 3).tolist() == [False] * 3 + [True] * 7


def test_global_uses_one_threshold_across_layers():
    scores = _scores()
    counts = global_zero_counts(scores, 0.9)
    assert sum(counts.values()) == round_half_up(0.9 * sum(s.numel() for s in scores.values()))
    threshold = torch.cat([s.flatten() for s in scores.values()]).sort().values[sum(counts.values()) - 1]
    for name, score in scores.items():
        assert counts[name] == int((score <= threshold).sum())


def test_erk_densities_follow_the_formula_and_hit_the_target():
    sparsities = erk_sparsities(SHAPES, 0.9)
    sizes = {name: math.prod(shape) for name, shape in SHAPES.items()}
    kept = sum((1 - s) * sizes[name] for name, s in sparsities.items())
    assert kept == pytest.approx(0.1 * sum(sizes.values()))
    # The small output layer would exceed density 1, so it is dense and eps is re-solved over the rest.
    assert sparsities["fc3"] == 0.0
    eps = [(1 - sparsities[n]) / (sum(SHAPES[n]) / sizes[n]) for n in ("fc1", "fc2")]
    assert eps[0] == pytest.approx(eps[1])


def test_erk_conv_uses_kernel_dimensions():
    shapes = {"conv": (64, 32, 3, 3), "fc": (10, 1024)}
    sparsities = erk_sparsities(shapes, 0.8)
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    assert (1 - sparsities["conv"]) / raw["conv"] == pytest.approx((1 - sparsities["fc"]) / raw["fc"])


def test_unknown_distribution_is_an_error():
    with pytest.raises(ValueError, match=r"`distribution` must be one of \('uniform', 'global', 'erk'\)"):
        zero_counts("random", _scores(), 0.5)


def test_magnitude_ranks_already_pruned_weights_first():
    weight = torch.tensor([0.0, 0.0, 3.0, 0.5])
    mask = torch.tensor([True, False, True, True])
    # The live zero at index 0 must not displace the pruned index 1.
    assert exact_mask(magnitude(weight, mask), 1).tolist() == [True, False, True, True]


def test_non_finite_weights_never_win_a_place():
    from lightning_sparse.core.criteria import exact_mask, magnitude

    weight = torch.tensor([0.5, float("nan"), -3.0, float("inf"), 0.1, -float("inf")])
    assert exact_mask(magnitude(weight), 3).tolist() == [True, False, True, False, True, False]


@pytest.mark.parametrize("distribution", ["uniform", "global", "erk"])
def test_no_layer_is_zeroed_whole(distribution):
    # round(0.96 · 10) = 10: a 2x5 layer used to lose every weight (587 of 51,000 (N, s) pairs checked did)
    scores = {"tiny": torch.rand(2, 5, generator=torch.Generator().manual_seed(0)) * 1e-3, "big": torch.rand(40, 50)}
    counts = zero_counts(distribution, scores, 0.96)
    assert counts["tiny"] <= 9 and counts["big"] <= 1999
    if distribution == "global":
        assert sum(counts.values()) == round_half_up(0.96 * 2010)  # the total stays exact, taken from `big`
    assert zero_counts("uniform", {"tiny": scores["tiny"]}, 0.96)["tiny"] == 9
    assert zero_counts("uniform", {"tiny": scores["tiny"]}, 0.96, keep=0)["tiny"] == 10  # asked for explicitly
    assert zero_counts("uniform", scores, {"tiny": 0.99, "big": 0.5})["tiny"] == 9


def test_gmp_keeps_one_weight_of_a_2x5_layer_at_096():
    from lightning_sparse.core.masks import MaskSet
    from lightning_sparse.core.pruning import prune_by_magnitude

    layer = torch.nn.Linear(5, 2)
    masks = MaskSet({"weight": layer.weight})
    assert prune_by_magnitude(masks, 0.96) == {"weight": 9}
    assert int((layer.weight != 0).sum()) == 1


def test_er_leaves_kernel_dimensions_out_and_power_scale_zero_is_uniform():
    shapes = {"conv": (64, 32, 3, 3), "fc": (10, 256)}
    n = {name: math.prod(shape) for name, shape in shapes.items()}
    er = erk_sparsities(shapes, 0.9, kernel=False)
    ratio = (1 - er["conv"]) / (1 - er["fc"])  # density ∝ (n_out + n_in) / (n_out · n_in), no kernel terms
    assert ratio == pytest.approx((96 / (64 * 32)) / (266 / 2560))
    assert sum((1 - er[k]) * n[k] for k in n) == pytest.approx(0.1 * sum(n.values()))
    assert erk_sparsities(shapes, 0.9, power_scale=0.0) == pytest.approx({"conv": 0.9, "fc": 0.9})
    counts = zero_counts("er", {k: torch.rand(s) for k, s in shapes.items()}, 0.9)
    assert sum(counts.values()) == pytest.approx(0.9 * sum(n.values()), abs=2)
