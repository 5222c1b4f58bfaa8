"""GMP, movement, RigL, QAT and L-C from a plain PyTorch loop: no Trainer, the same `lightning_sparse.core` objects the
callbacks drive.

    python examples/plain_loop.py gmp      # or movement, rigl, qat, lc

The pruning methods are one pruner object each (:mod:`lightning_sparse.core.pruners`: the protocol the callbacks are
hooks over): built over the model, planned with the run's optimizer steps, then ``pruner.step(step, states)`` between
``backward`` and ``optimizer.step()``.

Each function below is one method written out: it trains LeNet-300-100 on sklearn's real 8×8 digits with SGD and
returns the network. With the same seed, data order and settings, the weights are bit for bit those of a Lightning
``Trainer`` running the matching callback (``tests/core/test_plain_loop.py`` checks it). ``step`` is the optimizer step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lightning_sparse.core import (
    FakeQuantizer,
    LearningCompressor,
    MagnitudePruner,
    MovementPruner,
    Pruner,
    RigLPruner,
    StepSchedule,
    select_targets,
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


def prune(net: nn.Module, optimizer: torch.optim.Optimizer, pruner: Pruner) -> nn.Module:
    """The loop every pruner runs in: the dense gradient to the pruner, the masked one to the optimizer."""
    pruner.start(total_steps=EPOCHS * 20)  # 20 batches of 64 per epoch: fractional start/end resolve against this
    for step, (x, y) in enumerate(batches()):
        optimizer.zero_grad()
        loss_of(net, x, y).backward()
        pruner.step(step, [optimizer.state])  # observe, update on the schedule (stale state zeroed), mask gradients
        optimizer.step()
        pruner.after_optimizer_step()  # pruned weights back to exactly 0 whatever the optimizer did
    return net


def gmp(sparsity: float = 0.9, start: int = 8, end: int = 40, frequency: int = 8) -> nn.Module:
    """Gradual magnitude pruning (Zhu & Gupta 2017): masks on the cubic schedule, pruned weights held at 0."""
    net, optimizer = network()
    return prune(net, optimizer, MagnitudePruner(net, sparsity, StepSchedule(start, end, frequency)))


def movement(sparsity: float = 0.9, start: int = 8, end: int = 40, frequency: int = 1) -> nn.Module:
    """Movement pruning (Sanh et al. 2020): the same schedule, masks from scores trained on ``w · ∂L/∂w``."""
    net, optimizer = network()
    return prune(net, optimizer, MovementPruner(net, sparsity, StepSchedule(start, end, frequency)))


def rigl(sparsity: float = 0.9, frequency: int = 10, alpha: float = 0.3, end: int = 60, seed: int = 0) -> nn.Module:
    """RigL (Evci et al. 2020): sparse from the start (ERK), connections moved by magnitude drop and gradient growth."""
    net, optimizer = network()
    schedule = StepSchedule(0, end, frequency, updates="moves")
    return prune(net, optimizer, RigLPruner(net, sparsity, schedule, alpha=alpha, seed=seed))


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


METHODS: dict[str, Callable[[], nn.Module]] = {"gmp": gmp, "movement": movement, "rigl": rigl, "qat": qat, "lc": lc}


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
