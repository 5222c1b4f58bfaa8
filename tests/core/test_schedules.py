import pytest

from lightning_sparse.core.schedules import is_update_step, sparsity_at


def test_cubic_matches_zhu_and_gupta_eq_1():
    s_i, s_f, t0, n_dt = 0.1, 0.9, 100, 400
    for t in (100, 200, 300, 400, 500):
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / n_dt) ** 3
        assert sparsity_at(t, t0, t0 + n_dt, s_i, s_f, "cubic") == pytest.approx(expected)


def test_linear_and_constant():
    assert sparsity_at(50, 0, 100, 0.0, 0.8, "linear") == pytest.approx(0.4)
    assert sparsity_at(10, 10, 100, 0.0, 0.8, "constant") == 0.8


def test_zero_before_start_and_final_held_after_end():
    assert sparsity_at(9, 10, 100, 0.2, 0.9) == 0.0
    assert sparsity_at(10, 10, 100, 0.2, 0.9) == pytest.approx(0.2)
    assert sparsity_at(100, 10, 100, 0.2, 0.9) == 0.9
    assert sparsity_at(10_000, 10, 100, 0.2, 0.9) == 0.9


def test_update_steps_follow_frequency_and_always_include_end():
    steps = [t for t in range(200) if is_update_step(t, 10, 95, 20)]
    assert steps == [10, 30, 50, 70, 90, 95]


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match=r"`schedule` must be one of \('cubic', 'linear', 'constant'\)"):
        sparsity_at(0, 0, 1, 0.0, 0.5, "exponential")


def test_polynomial_power_generalises_the_cubic():
    from lightning_sparse.core.schedules import polynomial

    assert sparsity_at(5, 0, 10, 0.0, 0.8, "cubic", 3.0) == sparsity_at(5, 0, 10, 0.0, 0.8, "cubic")
    assert sparsity_at(5, 0, 10, 0.0, 0.8, "cubic", 1.0) == pytest.approx(0.4)
    assert polynomial(0.5, 2.0) == pytest.approx(0.75)
