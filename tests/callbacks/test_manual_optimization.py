"""Manual optimization with several optimizers (a GAN-style LightningModule) is refused by every compression callback:
`trainer.global_step` advances once per optimizer step, so schedules, gradients and latent weights would be wrong."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_sparse import GradualMagnitudePruning, LearningCompression, QuantizationAwareTraining, RigL


class TwoNetworks(pl.LightningModule):
    """A classifier and an auxiliary critic on digits, each with its own optimizer, stepped by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.critic = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, second = self.optimizers()
        logits = self.classifier(x)
        loss = nn.functional.cross_entropy(logits, y) - 0.01 * self.critic(logits.softmax(-1)).mean()
        first.zero_grad()
        self.manual_backward(loss)
        first.step()
        critic_loss = self.critic(self.classifier(x).softmax(-1).detach()).pow(2).mean()
        second.zero_grad()
        self.manual_backward(critic_loss)
        second.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.classifier.parameters(), lr=0.05), torch.optim.SGD(self.critic.parameters(), lr=0.05)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GradualMagnitudePruning(sparsity=0.5),
        lambda: RigL(sparsity=0.5, frequency=4),
        lambda: QuantizationAwareTraining(bits=4),
        lambda: LearningCompression(lc_steps=2),
    ],
    ids=["gmp", "rigl", "qat", "lc"],
)
def test_several_optimizers_under_manual_optimization_are_refused(make_trainer, tmp_path, digits, make):
    callback = make()
    with pytest.raises(ValueError, match=rf"{type(callback).__name__} does not support manual optimization with 2 optimizers"):
        make_trainer(tmp_path, [callback], max_epochs=1).fit(TwoNetworks(), digits)


def test_one_optimizer_under_manual_optimization_still_prunes(make_trainer, tmp_path, digits):
    class OneOptimizer(TwoNetworks):
        def training_step(self, batch, batch_idx):
            x, y = batch
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self.classifier(x), y))
            optimizer.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    callback = GradualMagnitudePruning(sparsity=0.5, end=0.5, frequency=5)
    model = OneOptimizer()
    make_trainer(tmp_path, [callback], max_epochs=1).fit(model, digits)
    assert callback.masks.sparsity() == pytest.approx(0.5, abs=1e-3)
    assert float((model.classifier[1].weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
