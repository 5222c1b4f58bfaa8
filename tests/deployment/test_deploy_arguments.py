"""Every ``deploy()`` argument checked with an error naming it, and non-finite weights refused naming the layer
(issue 30). The model is a pruned digits classifier, as a user's would be."""

from __future__ import annotations

import pytest
import torch

from support import digits_model
from lightning_sparse import deploy
from lightning_sparse.deployment import deploy_model


@pytest.fixture
def pruned():
    model = digits_model().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("weight") and parameter.dim() == 2:
                parameter.masked_fill_(parameter.abs() < parameter.abs().median(), 0.0)
    return model


BATCH = torch.randn(4, 1, 8, 8)


@pytest.mark.parametrize(
    ("model", "example_input", "device", "error", "message"),
    [
        ("net.pt", BATCH, None, TypeError, "`model` must be an nn.Module, got str"),  # main: AttributeError
        (None, BATCH, None, TypeError, "`model` must be an nn.Module, got NoneType"),
        ("pruned", None, None, TypeError, "`example_input` must be a tensor or a non-empty sequence of tensors, got NoneType"),
        ("pruned", [], None, TypeError, "`example_input` must be a tensor or a non-empty sequence of tensors, got list"),
        ("pruned", torch.randn(0, 1, 8, 8), None, ValueError, "`example_input` must have a batch dimension with at least one sample"),
        ("pruned", torch.tensor(1.0), None, ValueError, "got shape []"),
        ("pruned", BATCH, "gpu0", ValueError, "`device` 'gpu0' is not a device this machine can run on"),  # main: RuntimeError
        ("pruned", BATCH, 3.5, ValueError, "`device` 3.5 is not a device this machine can run on"),
    ],
)
def test_each_deploy_argument_is_checked_naming_it(pruned, model, example_input, device, error, message):
    with pytest.raises(error) as raised:
        deploy_model(pruned if model == "pruned" else model, example_input, device)
    assert message in str(raised.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_named(pruned):
    with pytest.raises(ValueError, match=r"`device` 'cuda' is not a device this machine can run on"):  # main: AssertionError
        deploy(pruned, BATCH, "cuda", verbose=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_layer(pruned, value):
    with torch.no_grad():
        pruned.net[3].weight[2, 7] = value
    name = next(n for n, p in pruned.named_parameters() if p is pruned.net[3].weight)
    with pytest.raises(ValueError, match=f"`model` has non-finite values in '{name}'"):  # main: deployed silently
        deploy(pruned, BATCH, verbose=False)


def test_a_sound_model_still_deploys(pruned):
    deployed = deploy(pruned, BATCH, verbose=False)
    with torch.inference_mode():
        assert torch.allclose(deployed(BATCH), pruned(BATCH), atol=1e-5)
