import pytest
import torch
from torch import nn

from lightning_sparse.core.masks import MaskSet, pack, unpack


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 7), (300, 784)])
def test_pack_unpack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.3
    packed = pack(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack(packed, mask.shape), mask)


def _layer_masks():
    torch.manual_seed(0)
    layer = nn.Linear(20, 10)
    masks = MaskSet({"weight": layer.weight})
    mask = torch.rand(10, 20) > 0.75
    masks.set("weight", mask)
    return layer, masks, mask


def test_set_zeroes_pruned_weights_in_place_and_reports_density():
    layer, masks, mask = _layer_masks()
    assert torch.equal(layer.weight != 0, mask)
    assert masks.density("weight") == pytest.approx(mask.float().mean().item())
    assert masks.sparsity() == pytest.approx(1 - mask.float().mean().item())
    assert masks.nonzeros("weight") == int(mask.sum())


def test_masks_cost_one_bit_per_weight():
    _, masks, _ = _layer_masks()
    assert masks.packed_bytes() == 25  # 200 weights / 8


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_momentum_and_adam_state_never_resurrect_pruned_weights(optimizer_cls):
    layer, masks, mask = _layer_masks()
    kwargs = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01} if optimizer_cls is torch.optim.SGD else {"lr": 0.1}
    optimizer = optimizer_cls(layer.parameters(), **kwargs)
    # Build up optimizer state on the dense weights first, then prune: the state is now non-zero where
    # the mask is False, which is exactly the case that resurrects weights without gradient masking.
    dense = nn.Linear(20, 10)
    layer.weight.data.copy_(dense.weight)
    masks._packed.clear()
    x = torch.randn(32, 20)
    for _ in range(3):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
    masks.set("weight", mask)
    for _ in range(5):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        masks.mask_grads_()
        assert torch.all(layer.weight.grad[~mask] == 0)
        optimizer.step()
        masks.apply_()
        assert torch.all(layer.weight[~mask] == 0)
    assert torch.all(layer.weight[mask] != 0)


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam])
def test_mask_state_zeroes_optimizer_state_at_pruned_positions_only(optimizer_cls):
    layer, masks, mask = _layer_masks()
    masks._packed.clear()  # dense while the optimizer builds up state
    kwargs = {"lr": 0.1, "momentum": 0.9} if optimizer_cls is torch.optim.SGD else {"lr": 0.1}
    optimizer = optimizer_cls(layer.parameters(), **kwargs)
    layer(torch.randn(32, 20)).square().mean().backward()
    optimizer.step()
    state = optimizer.state[layer.weight]
    before = {key: value.clone() for key, value in state.items()}
    bias_before = {key: value.clone() for key, value in optimizer.state[layer.bias].items()}
    masks.set("weight", mask)
    masks.mask_state_(optimizer.state)
    shaped = [key for key, value in state.items() if value.shape == layer.weight.shape]
    assert shaped  # momentum_buffer, or exp_avg and exp_avg_sq
    assert all(torch.any(before[key][~mask] != 0) for key in shaped)  # there was stale state to clear
    for key, value in state.items():
        if key in shaped:
            assert torch.all(value[~mask] == 0) and torch.equal(value[mask], before[key][mask])
        else:
            assert torch.equal(value, before[key])  # Adam's scalar step is left alone
    for key, value in optimizer.state[layer.bias].items():  # parameters without a mask are untouched
        assert torch.equal(value, bias_before[key])


def test_state_dict_round_trip_restores_masks_and_zeroes():
    layer, masks, mask = _layer_masks()
    state = masks.state_dict()
    fresh = nn.Linear(20, 10)
    restored = MaskSet({"weight": fresh.weight})
    restored.load_state_dict(state)
    assert torch.equal(restored.mask("weight"), mask)
    assert torch.all(fresh.weight[~mask] == 0)


def test_loading_masks_that_do_not_fit_loads_nothing():
    a, b = nn.Linear(20, 10), nn.Linear(10, 5)
    masks = MaskSet({"a": a.weight, "b": b.weight})
    masks.set("a", torch.rand(10, 20) > 0.5)
    before = masks.state_dict()
    wrong_shape = {"shapes": {"a": [10, 20], "b": [5, 11]}, "packed": {"a": pack(torch.ones(10, 20, dtype=torch.bool)), "b": pack(torch.ones(5, 11, dtype=torch.bool))}}
    with pytest.raises(ValueError, match=r"mask for 'b' has shape \[5, 11\] but the parameter has shape \[5, 10\]"):
        masks.load_state_dict(wrong_shape)
    unknown = {"shapes": {"c": [3]}, "packed": {"c": pack(torch.ones(3, dtype=torch.bool))}}
    with pytest.raises(ValueError, match=r"\['c'\] are not sparsified parameters"):
        masks.load_state_dict(unknown)
    after = masks.state_dict()
    assert after["shapes"] == before["shapes"]
    assert all(torch.equal(after["packed"][n], before["packed"][n]) for n in before["packed"])


def test_checksum_distinguishes_masks():
    _, masks, mask = _layer_masks()
    first = masks.checksum()
    flipped = mask.clone()
    flipped[0, 0] = ~flipped[0, 0]
    masks.set("weight", flipped & mask) if flipped[0, 0] == 0 else masks.set("weight", flipped)
    assert masks.checksum() != first


@pytest.mark.parametrize("shape", [(5,), (8,), (13, 3), (64, 32, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_mask_matches_bool_mask_including_tails_and_non_contiguous(shape, dtype):
    from lightning_sparse.core.masks import mask_

    generator = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=generator) > 0.5
    values = torch.randn(shape, generator=generator).to(dtype)
    expected = values * mask
    contiguous = values.clone()
    mask_(contiguous, pack(mask))
    assert torch.equal(contiguous, expected)
    assert not torch.signbit(contiguous[~mask]).any()  # pruned entries are +0.0, never -0.0
    if len(shape) == 2:
        transposed = values.clone().t().contiguous().t()  # same values, non-contiguous layout
        mask_(transposed, pack(mask))
        assert torch.equal(transposed, expected)


def test_mask_handles_layers_larger_than_one_chunk(monkeypatch):
    from lightning_sparse.core import masks as masks_module

    monkeypatch.setattr(masks_module, "_CHUNK_BYTES", 3)
    mask = torch.rand(101, generator=torch.Generator().manual_seed(2)) > 0.5
    values = torch.randn(101)
    expected = values * mask
    masks_module.mask_(values, pack(mask))
    assert torch.equal(values, expected)


def test_masking_gradients_and_state_is_a_select_so_nan_cannot_survive_at_pruned_positions():
    layer, masks, mask = _layer_masks()
    layer.weight.grad = torch.full_like(layer.weight, float("nan"))  # NaN · 0 = NaN: a product kept these
    masks.mask_grads_()
    assert torch.all(layer.weight.grad[~mask] == 0) and torch.all(torch.isnan(layer.weight.grad[mask]))
    state = {layer.weight: {"exp_avg": torch.full_like(layer.weight, float("inf"))}}
    masks.mask_state_(state)
    assert torch.all(state[layer.weight]["exp_avg"][~mask] == 0)


@pytest.mark.parametrize("poison", [None, "kept", "pruned", "inf", "dense layer"])
def test_mask_grads_and_check_masks_in_one_pass_and_sees_every_non_finite_gradient(poison):
    layer, masks, mask = _layer_masks()
    other = nn.Linear(4, 3)  # a selected parameter without a mask yet: checked, not masked
    masks = MaskSet({"weight": layer.weight, "other": other.weight})
    masks.set("weight", mask)
    grad = torch.randn(10, 20)
    other.weight.grad = torch.randn(3, 4)
    if poison == "kept":
        grad[mask.nonzero()[0].tolist()] = float("nan")
    elif poison == "pruned":  # NaN · 0 = NaN: the product keeps it, so the verdict sees it
        grad[(~mask).nonzero()[0].tolist()] = float("nan")
    elif poison == "inf":
        grad[(~mask).nonzero()[0].tolist()] = float("inf")
    elif poison == "dense layer":
        other.weight.grad[1, 2] = float("nan")
    layer.weight.grad = grad.clone()
    assert masks.mask_grads_and_check_() is (poison is None)
    if poison is None:
        assert torch.equal(layer.weight.grad, torch.where(mask, grad, torch.zeros(())))


def test_non_finite_names_exactly_the_tensors_with_nan_or_inf():
    from lightning_sparse.core.masks import non_finite

    a, b, c = torch.randn(5), torch.randn(3, 3), torch.randn(4, dtype=torch.float64)
    assert non_finite({"a": a, "b": b, "c": c, "none": None}) == []
    b[1, 2], c[0] = float("nan"), -float("inf")
    assert non_finite({"a": a, "b": b, "c": c}) == ["b", "c"]
