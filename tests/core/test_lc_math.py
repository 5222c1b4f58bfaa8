"""``core/lc.py`` math directly: each C step is the exact minimiser of ||w - Δ||² over its set (checked by
exhaustive search on small inputs), the penalty gradient is autograd's, and the multiplier and μ follow L-C's
updates (Carreira-Perpiñán 2017, arXiv 1707.01209)."""

import itertools
import math

import pytest
import torch

from lightning_sparse.core import lc


def _w(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_mu_grows_geometrically_and_stops_at_its_cap():
    assert [lc.mu_at(k, 1e-3, 1.1, 1.0) for k in range(3)] == pytest.approx([1e-3, 1.1e-3, 1.21e-3])
    assert lc.mu_at(1000, 1e-3, 1.1, 1e4) == 1e4


def test_l_step_learning_rate_restarts_at_each_c_step_and_anneals():
    args = dict(first=100, every=10, lc_steps=3, total=150, base=0.1, decay=0.5)
    assert lc.l_step_lr(99, **args) is None  # before C step 0: the user's schedule
    assert lc.l_step_lr(100, **args) == pytest.approx(0.1)
    assert lc.l_step_lr(105, **args) == pytest.approx(0.05)  # half-way down the cosine
    assert lc.l_step_lr(110, **args) == pytest.approx(0.05)  # L step 1 restarts at 0.1 · 0.5
    assert lc.l_step_lr(135, **args) == pytest.approx(0.025 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))  # last stretch
    assert lc.l_step_lr(115, **args, schedule="constant") == pytest.approx(0.05)
    with pytest.raises(ValueError, match="l_step_schedule"):
        lc.l_step_lr(100, **args, schedule="linear")


def test_prune_c_step_keeps_the_largest_magnitudes_per_layer_or_globally():
    targets = {"a": _w(20, 1), "b": 5 * _w(30, 2)}
    uniform = lc.prune_c_step(targets, 0.5, "uniform")
    for name, w in targets.items():
        kept = uniform[name] != 0
        assert int(kept.sum()) == w.numel() // 2
        assert w[kept].abs().min() >= w[~kept].abs().max()
        assert torch.equal(uniform[name][kept], w[kept])
    glob = lc.prune_c_step(targets, 0.5, "global")
    everything = torch.cat([targets["a"], targets["b"]]).abs()
    threshold = everything.sort(descending=True).values[24]
    assert int(sum((t != 0).sum() for t in glob.values())) == 25
    assert all(bool((glob[n][glob[n] != 0].abs() >= threshold).all()) for n in glob)


def test_binary_c_step_is_the_best_plus_minus_a():
    w = _w(12, 3)
    delta, codebook = lc.binary_c_step(w)
    a = w.abs().mean()
    assert torch.equal(codebook, torch.stack([-a, a]))
    error = ((w - delta) ** 2).sum()
    for scale in torch.linspace(0.5, 1.5, 41) * a:  # no other a does better
        assert error <= ((w - torch.where(w >= 0, scale, -scale)) ** 2).sum() + 1e-12


def test_ternary_c_step_is_the_best_of_every_subset_and_scale():
    w = _w(9, 4)
    delta, _ = lc.ternary_c_step(w)
    error = float(((w - delta) ** 2).sum())
    best = math.inf
    for keep in itertools.product([False, True], repeat=w.numel()):  # every support; a = mean |w| over it is optimal
        mask = torch.tensor(keep)
        a = w[mask].abs().mean() if mask.any() else torch.tensor(0.0, dtype=w.dtype)
        best = min(best, float(((w - torch.where(mask, torch.sign(w) * a, torch.zeros_like(w))) ** 2).sum()))
    assert error == pytest.approx(best, rel=1e-12)


def test_kmeans_c_step_is_the_optimal_codebook_by_exhaustive_partition():
    w = _w(10, 5)
    delta, codebook = lc.kmeans_c_step(w, 3)
    error = float(((w - delta) ** 2).sum())
    values = w.sort().values  # optimal 1-D clusters are contiguous in sorted order
    best = math.inf
    for i, j in itertools.combinations(range(1, len(values)), 2):
        parts = (values[:i], values[i:j], values[j:])
        best = min(best, float(sum(((p - p.mean()) ** 2).sum() for p in parts)))
    assert error == pytest.approx(best, rel=1e-9)
    assert codebook.numel() == 3 and set(delta.tolist()) <= set(codebook.tolist())


def test_kmeans_c_step_with_skip_zeros_leaves_the_zeros_alone():
    w = _w(40, 6)
    w[::2] = 0
    delta, codebook = lc.kmeans_c_step(w, 3, skip_zeros=True)
    assert torch.equal(delta[::2], torch.zeros(20, dtype=w.dtype))
    assert bool((delta[1::2] != 0).all()) and codebook.numel() == 3


def test_penalty_gradient_is_the_gradient_of_the_quadratic_penalty():
    w, delta, lam, mu = _w(15, 7).requires_grad_(), _w(15, 8), _w(15, 9), 0.3
    (mu / 2 * ((w - delta - lam / mu) ** 2).sum()).backward()
    assert torch.allclose(lc.penalty_gradient(w, delta, lam, mu), w.grad)


def test_update_multiplier_moves_lambda_against_the_constraint_violation():
    w, delta, lam, mu = _w(15, 10), _w(15, 11), _w(15, 12), 0.3
    expected = lam - mu * (w - delta)
    lc.update_multiplier(lam, w, delta, mu)
    assert torch.allclose(lam, expected)


def test_project_prunes_then_quantizes_the_kept_weights():
    w = {"layer": _w(64, 13)}
    codebooks: dict[str, torch.Tensor] = {}
    delta = lc.project(w, "prune+quantize", sparsity=0.75, distribution="uniform", codebook_sizes={"layer": 4},
                       codebooks=codebooks)["layer"]  # fmt: skip
    assert int((delta != 0).sum()) == 16  # κ = 25% kept
    assert len(set(delta[delta != 0].tolist())) <= 3 and codebooks["layer"].numel() == 3  # zero is the 4th value
    with pytest.raises(ValueError, match="codebook_sizes"):
        lc.project(w, "quantize")
