"""Structured granularities in the engine: whole channels and exact N:M groups, on their own and through GMP on digits."""

import pytest
import torch

from lightning_sparse import GradualMagnitudePruning
from lightning_sparse.core.structured import (
    Granularity,
    channel_mask,
    channels_to_prune,
    check_shape,
    nm_counts,
    nm_mask,
    parse_granularity,
)


def _weight(rows: int = 12, cols: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("4:4", r"`granularity`='4:4': N:M needs 1 <= N < M"),
        ("5:4", r"N:M needs 1 <= N < M .* got N=5, M=4"),
        ("0:4", r"N:M needs 1 <= N < M"),
        ("rows", r"`granularity` must be 'unstructured', 'channel', 'head', 'neuron' or an 'N:M' string such as '2:4', got 'rows'"),
        (2, r"`granularity` must be 'unstructured', 'channel', 'head', 'neuron' or an 'N:M' string"),
    ],
)
def test_bad_granularity_names_the_argument_and_allowed_values(value, message):
    with pytest.raises(ValueError, match=message):
        parse_granularity("granularity", value)


def test_granularity_strings_parse():
    assert parse_granularity("g", "unstructured") == Granularity("unstructured")
    assert parse_granularity("g", "channel") == Granularity("channel")
    assert parse_granularity("g", " 2 : 4") == Granularity("nm", 2, 4)
    assert Granularity("nm", 2, 4).final_sparsity == 0.5 and str(Granularity("nm", 1, 8)) == "1:8"


def test_m_must_divide_the_input_dimension():
    check_shape("conv.weight", (8, 3, 3, 3), Granularity("nm", 1, 3))  # input dimension 3·3·3 = 27
    with pytest.raises(ValueError, match=r"M=4 does not divide the input dimension 27 of 'conv.weight'"):
        check_shape("conv.weight", (8, 3, 3, 3), Granularity("nm", 2, 4))
    with pytest.raises(ValueError, match=r"needs a weight with output and input dimensions, but 'fc.bias'"):
        check_shape("fc.bias", (10,), Granularity("channel"))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8)])
def test_nm_mask_keeps_exactly_the_n_largest_of_every_group(n, m):
    weight = _weight()
    mask = nm_mask(weight, n, m, weight.numel() // m * (m - n))
    counts = nm_counts(weight * mask, m)
    assert torch.equal(counts, torch.full_like(counts, n))
    groups, kept = weight.abs().reshape(-1, m), mask.reshape(-1, m)
    assert torch.all(groups[kept].reshape(-1, n).min(1).values >= groups.masked_fill(kept, -1).max(1).values)


def test_nm_ramp_prunes_only_candidates_and_never_revives():
    weight = _weight()
    half = nm_mask(weight, 2, 4, 40)  # part way up the schedule: 40 of the final 96 zeros
    assert int((~half).sum()) == 40 and int(nm_counts(weight * half, 4).min()) >= 2
    full = nm_mask(weight * half, 2, 4, 96, mask=half)
    assert not torch.any(full & ~half)  # pruned weights stay pruned
    assert torch.equal(nm_counts(weight * full, 4), torch.full((12, 4), 2))
    with pytest.raises(ValueError, match=r"`n_zeros` for 2:4 must be in \[0, 96\]"):
        nm_mask(weight, 2, 4, 97)


@pytest.mark.parametrize(("norm", "pruned"), [("l1", {3, 7}), ("l2", {3, 9})])
def test_channel_mask_prunes_whole_rows_of_lowest_norm(norm, pruned):
    weight = _weight()
    weight[3] = 0.01  # lowest under both norms
    weight[7] = torch.tensor([5.0] + [0.0] * 15)  # L1 5, L2 5: low by L1 only
    weight[9] = 0.5  # L1 8, L2 2: low by L2 only
    mask = channel_mask(weight, 2, norm)
    assert torch.equal(mask.all(1) | ~mask.any(1), torch.ones(12, dtype=torch.bool))  # rows all kept or all pruned
    assert set(torch.nonzero(~mask.all(1)).flatten().tolist()) == pruned
    again = channel_mask(weight * mask, 3, norm, mask)  # a later, higher target keeps the pruned channels pruned
    assert not torch.any(again & ~mask) and int((~again.all(1)).sum()) == 3


def test_channel_count_that_removes_every_channel_is_refused():
    assert channels_to_prune("fc.weight", 0.9, 10) == 9
    with pytest.raises(ValueError, match=r"would remove every one of the 10 output channels of 'fc.weight'"):
        channels_to_prune("fc.weight", 0.95, 10)


# --- through GradualMagnitudePruning on real digits ----------------------------------------------------------


def test_gmp_channel_granularity_prunes_whole_output_channels(digits_model, make_trainer, tmp_path, digits):
    model = digits_model()
    callback = GradualMagnitudePruning(sparsity=0.5, granularity="channel", exclude=["net.5.weight"], start=0, end=0.5,
                                       frequency=5, verbose=False)  # fmt: skip
    make_trainer(tmp_path, [callback], max_epochs=1).fit(model, digits)
    for layer, out in ((model.net[1], 300), (model.net[3], 100)):
        zero_rows = (layer.weight == 0).all(1)
        assert int(zero_rows.sum()) == out // 2
        assert bool((layer.weight[~zero_rows] != 0).all())  # nothing pruned inside the kept channels
    assert not bool((model.net[5].weight == 0).any())


def test_gmp_nm_granularity_every_group_exact_and_per_layer(digits_model, make_trainer, tmp_path, digits):
    model = digits_model()
    callback = GradualMagnitudePruning(sparsity=0.9, granularity={"net.1.*": "2:4", "net.3.*": "1:4"}, start=0, end=0.5,
                                       frequency=5, verbose=False)  # fmt: skip
    make_trainer(tmp_path, [callback], max_epochs=1).fit(model, digits)
    assert torch.equal(nm_counts(model.net[1].weight, 4), torch.full((300, 16), 2))
    assert torch.equal(nm_counts(model.net[3].weight, 4), torch.full((100, 75), 1))
    assert int((model.net[5].weight == 0).sum()) == 900  # unmatched: unstructured at `sparsity`
    assert "granularity" in callback.state_key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"granularity": "3:3"}, r"`granularity`='3:3': N:M needs 1 <= N < M"),
        ({"granularity": {"net.1.*": "2:2"}}, r"`granularity\['net.1.\*'\]`='2:2': N:M needs 1 <= N < M"),
        ({"granularity": "filters"}, r"`granularity` must be 'unstructured', 'channel', 'head', 'neuron' or an 'N:M' string"),
        ({"granularity": "channel", "distribution": "global"}, r"`distribution`='global' ranks single weights"),
        ({"channel_norm": "l3"}, r"`channel_norm` must be one of \('l1', 'l2'\)"),
    ],
)
def test_gmp_refuses_bad_granularity_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradualMagnitudePruning(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"granularity": "1:7"}, r"M=7 does not divide the input dimension 64 of 'net.1.weight'"),
        ({"granularity": "channel", "sparsity": 0.95}, r"would remove every one of the 10 output channels of 'net.5.weight'"),
        ({"granularity": {"decoder.*": "channel"}}, r"`granularity` pattern 'decoder.\*' matches no selected parameter"),
    ],
)
def test_gmp_refuses_layers_that_cannot_hold_the_granularity_before_training(digits_model, make_trainer, tmp_path, digits, kwargs, message):
    model = digits_model()
    before = model.net[1].weight.detach().clone()
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, [GradualMagnitudePruning(**kwargs)]).fit(model, digits)
    assert torch.equal(model.net[1].weight, before)  # refused before any step
