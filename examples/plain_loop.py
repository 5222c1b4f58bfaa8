"""GMP, RigL, QAT and L-C from a plain PyTorch loop: no Trainer, the same `lightning_sparse.core` verbs the callbacks call.

    python examples/plain_loop.py gmp      # or rigl, qat, lc

Each function below is one method written out: it trains LeNet-300-100 on sklearn's real 8×8 digits with SGD and
returns the network. With the same seed, data order and settings, the weights are bit for bit those of a Lightning
``Trainer`` running the matching callback (``tests/test_plain_loop.py`` checks it). ``step`` is the optimizer step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lightning_sparse.core import (
    FakeQuantizer,
    LearningCompressor,
    MaskSet,
    cosine_fraction,
    is_dynamic_update_step,
    is_update_step,
    move_connections,
    prune_by_magnitude,
    random_masks,
    select_targets,
    sparsity_at,
)
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import lenet_300_100

EPOCHS = 4


def batches(epochs: int = EPOCHS) -> Iterator[tuple[Tensor, Tensor]]:
    """The digits training batches, shuffled per epoch exactly as Lightning does with this data module."""
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    loader = data.train_dataloader()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        yield from loader


def network(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = lenet_300_100((1, 8, 8), 10)
    return net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)


def loss_of(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(net(x), y)


def gmp(sparsity: float = 0.9, start: int = 8, end: int = 40, frequency: int = 8) -> nn.Module:
    """Gradual magnitude pruning (Zhu & Gupta 2017): masks on the cubic schedule, pruned weights held at 0."""
    net, optimizer = network()
    masks = MaskSet(select_targets(net))
    for step, (x, y) in enumerate(batches()):
        optimizer.zero_grad()
        loss_of(net, x, y).backward()
        if is_update_step(step, start, end, frequency):
            prune_by_magnitude(masks, sparsity_at(step, start, end, 0.0, sparsity))
            masks.mask_state_(optimizer.state)  # stale momentum must not push pruned weights
        masks.mask_grads_()
        optimizer.step()
        masks.apply_()  # a no-op for SGD/Adam (zero gradient and state keep 0 at 0), needed for other optimizers
    return net


def rigl(sparsity: float = 0.9, frequency: int = 10, alpha: float = 0.3, end: int = 60, seed: int = 0) -> nn.Module:
    """RigL (Evci et al. 2020): sparse from the start (ERK), connections moved by magnitude drop and gradient growth."""
    net, optimizer = network()
    masks = MaskSet(select_targets(net))
    random_masks(masks, sparsity, "erk", seed)
    for step, (x, y) in enumerate(batches()):
        optimizer.zero_grad()
        loss_of(net, x, y).backward()
        if is_dynamic_update_step(step, 0, end, frequency):  # the dense gradient, before masking
            move_connections(masks, cosine_fraction(step, 0, end, alpha), "gradient", [optimizer.state], seed, step)
            masks.mask_state_(optimizer.state)
        masks.mask_grads_()
        optimizer.step()
        masks.apply_()
    return net


def qat(bits: int = 4, start: int = 8) -> nn.Module:
    """Quantization-aware training: forward and backward at q(w), the optimizer steps the latent w (the STE)."""
    net, optimizer = network()
    targets = select_targets(net)
    quantizer = FakeQuantizer(targets, {name: bits for name in targets})
    for step, (x, y) in enumerate(batches()):
        if step >= start and not quantizer.quantized:
            quantizer.quantize(step)
        optimizer.zero_grad()
        loss_of(net, x, y).backward()
        quantizer.restore()  # the gradient taken at q(w) updates w
        optimizer.step()
        if step + 1 >= start:
            quantizer.quantize(step + 1)
    return net  # holds q(w): what will be deployed


def lc(sparsity: float = 0.8, lc_steps: int = 4, every: int = 15, first: int = 10) -> nn.Module:
    """Learning-Compression (Carreira-Perpiñán 2017): L steps with the penalty gradient, closed-form C steps."""
    net, optimizer = network()
    compressor = LearningCompressor(select_targets(net), "prune", sparsity, "global")

    def c_step_due(step: int) -> bool:
        return compressor.c_steps_done < lc_steps and step == first + compressor.c_steps_done * every

    step = 0
    for x, y in batches():
        if c_step_due(step):
            compressor.c_step([optimizer.state])
        optimizer.zero_grad()
        loss_of(net, x, y).backward()
        compressor.add_penalty_gradients()  # μ(w - Δ(Θ)) - λ
        optimizer.step()
        step += 1
        if compressor.c_steps_done == lc_steps:
            compressor.hold_compressed()  # after the last C step the model stays at Δ(Θ)
        if c_step_due(step):
            compressor.c_step([optimizer.state])
            if compressor.c_steps_done == lc_steps:
                compressor.hold_compressed()
    compressor.finish()
    return net


METHODS: dict[str, Callable[[], nn.Module]] = {"gmp": gmp, "rigl": rigl, "qat": qat, "lc": lc}


def zeros_and_values(net: nn.Module) -> str:
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    distinct = max(torch.unique(w).numel() for w in weights)
    return f"sparsity {zeros:.2%}, at most {distinct} distinct values per layer"


if __name__ == "__main__":
    method = sys.argv[1] if len(sys.argv) > 1 else "gmp"
    if method not in METHODS:
        sys.exit(f"usage: python examples/plain_loop.py {{{','.join(METHODS)}}}")
    print(f"{method}: {zeros_and_values(METHODS[method]())}")
