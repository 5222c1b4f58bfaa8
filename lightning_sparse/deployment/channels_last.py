"""Channels-last convolution weights, kept where the whole model is measured faster with them.

oneDNN (CPU) and cuDNN (GPU) run a 2-D or 3-D convolution in the channels-last layout (NHWC / NDHWC) when its input
*or its weight* is channels-last, and then return a channels-last output (``torch.nn.functional.conv2d`` with
``suggest_memory_format``; PyTorch's tutorial "Channels Last Memory Format"), so turning every convolution weight
channels-last carries the whole network in that layout without touching the input. Values are unchanged, only the
strides: ``W.contiguous(memory_format=torch.channels_last)``. Whether it is faster depends on the layers and the
machine (on one AVX-512 core a Hugging Face ResNet at batch 64 runs 1.1-1.5× faster: its convolutions and its
max-pooling are faster in that layout), so :func:`choose` times it on the example input, interleaved with the model as it is.

A forward that needs its activations in the default layout (``x.view(b, -1)`` on a convolution's output) fails or
differs with channels-last weights: :func:`choose` then keeps the model as it is and says why.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lightning_sparse.deployment import fallback
from lightning_sparse.deployment.kernels import timings, verdict

#: ``memory_format`` values deploy accepts: measured (``auto``), always channels-last, never.
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
_LAYOUTS = {4: torch.channels_last, 5: torch.channels_last_3d}
_CONVS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def convolutions(model: nn.Module) -> list[str]:
    """Names of the 2-D/3-D (transposed) convolutions of ``model`` whose weight is a plain dense tensor."""
    return [name for name, module in model.named_modules()
            if isinstance(module, _CONVS) and isinstance(module.weight, Tensor) and module.weight.layout == torch.strided]  # fmt: skip


def convert(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every 2-D/3-D convolution weight in the channels-last memory format (same values)."""
    model = copy.deepcopy(model)
    for name in convolutions(model):
        weight = model.get_submodule(name).weight
        weight.data = weight.data.contiguous(memory_format=_LAYOUTS[weight.dim()])
    return model


def choose(model: nn.Module, inputs: Sequence[Tensor], memory_format: str, repeats: int,
           same: Callable[[nn.Module], bool], modes: Sequence[str]) -> tuple[nn.Module, str | None]:  # fmt: skip
    """``model`` or its :func:`convert`ed copy, and a note saying which and why (``None``: no convolution).

    ``memory_format``: ``auto`` keeps the channels-last copy when its whole forward on ``inputs`` is measurably
    faster (interleaved runs, :func:`~lightning_sparse.deployment.kernels.verdict` with its margin); ``channels_last``
    keeps it whenever it runs and matches; ``contiguous`` never tries. The copy must run in ``modes``
    (:func:`.fallback.failure`) and give the outputs ``same`` accepts.
    """
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"`memory_format` must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    layers = convolutions(model)
    if memory_format == "contiguous" or not layers:
        return model, None
    candidate = convert(model)
    failed = fallback.failure(candidate, inputs, modes)
    if failed is not None:
        return model, f"convolution weights kept in the default memory format: with channels-last weights {failed.describe()}"
    if not same(candidate):
        return model, "convolution weights kept in the default memory format: with channels-last weights the outputs differed"
    if memory_format == "channels_last":
        return candidate, f"{len(layers)} convolution weights in the channels-last memory format (memory_format='channels_last')"
    with torch.inference_mode():
        samples = timings({"channels_last": lambda: candidate(*inputs), "contiguous": lambda: model(*inputs)}, repeats,
                          inputs[0].device, warmup=2, settled=lambda t: verdict(t["channels_last"], t["contiguous"]) is not None)  # fmt: skip
    last, default = statistics.median(samples["channels_last"]), statistics.median(samples["contiguous"])
    times = f"{last:.4f} ms vs {default:.4f} ms ({default / last:.2f}×, {len(samples['contiguous'])} interleaved runs)"
    if verdict(samples["channels_last"], samples["contiguous"]) is True:
        return candidate, f"{len(layers)} convolution weights in the channels-last memory format: the whole model runs {times}"
    return model, f"convolution weights kept in the default memory format: channels-last was not measurably faster ({times})"
