"""Pruning and quantization together in a Lightning Fabric loop: the core objects the callbacks use, without a Trainer.

    python examples/fabric.py

Fabric handles the device, the precision and the backward pass; `lightning_sparse.core` does the rest. The verbs
run in the order the callbacks run them: q(w) in the parameters for the forward pass, the latent weights back
after backward, the pruning masks decided on the dense gradient before the optimizer step, q(w) again after it.
"""

from __future__ import annotations

import torch
from lightning_fabric import Fabric
from torch import nn

from lightning_sparse.core import FakeQuantizer, MagnitudePruner, StepSchedule, select_targets
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import lenet_300_100


def train(epochs: int = 4, sparsity: float = 0.9, bits: int = 4, start: int = 8, end: int = 40, frequency: int = 8,
          fabric: Fabric | None = None) -> nn.Module:  # fmt: skip
    """LeNet-300-100 on digits: GMP from ``start`` to ``end``, 4-bit QAT from ``end`` on; returns the network."""
    fabric = fabric or Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    net = lenet_300_100((1, 8, 8), 10)
    targets = select_targets(net)  # names and parameters of the unwrapped module
    pruner = MagnitudePruner(net, sparsity, StepSchedule(start, end, frequency))  # the object GradualMagnitudePruning drives
    masks = pruner.masks
    quantizer = FakeQuantizer(targets, {name: bits for name in targets})
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    loader = fabric.setup_dataloaders(data.train_dataloader(), use_distributed_sampler=False, move_to_device=True)
    pruner.start(total_steps=epochs * len(loader))
    step = 0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            if step >= end and not quantizer.quantized:
                quantizer.quantize(step, [masks])
            optimizer.zero_grad()
            fabric.backward(nn.functional.cross_entropy(model(x), y))
            quantizer.restore()  # the straight-through estimator: the gradient at q(w) steps w
            pruner.step(step, [optimizer.state])  # prune on the schedule, zero stale momentum, mask the gradients
            optimizer.step()
            pruner.after_optimizer_step()
            step += 1
            if step >= end:
                quantizer.quantize(step, [masks])  # pruned weights stay 0: q(0) = 0
    return net


if __name__ == "__main__":
    trained = train()
    weight = trained[1].weight.detach()
    rows = max(torch.unique(row).numel() for row in weight)
    print(f"net.1: sparsity {float((weight == 0).float().mean()):.2%}, at most {rows} distinct values per output channel")
