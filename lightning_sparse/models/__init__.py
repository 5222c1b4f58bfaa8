"""The embedded demo's reference models (nothing in the library imports this package).

- :mod:`~lightning_sparse.models.vision`: LeNet-300-100, LeNet-5, a small CNN and ResNet-8 under :class:`Classifier`.
- :mod:`~lightning_sparse.models.chargpt`: :class:`CharGPT`, a nanoGPT-style character-level decoder.
- :mod:`~lightning_sparse.models.text`: :class:`TextClassifier`, a Hugging Face encoder with a linear head (the
  ``[hf]`` extra, imported when the model is built).

Every name is re-exported here, so configs name ``lightning_sparse.models.Classifier`` whatever module holds it.
"""

from lightning_sparse.models.chargpt import GPT, MLP, Block, CausalSelfAttention, CharGPT, fused_adam
from lightning_sparse.models.text import NO_DECAY, TextClassifier
from lightning_sparse.models.vision import (
    ARCHITECTURES,
    LR_SCHEDULES,
    OPTIMIZERS,
    BasicBlock,
    Classifier,
    ResNet,
    lenet5,
    lenet_300_100,
    resnet8,
    resnet8x2,
    small_cnn,
)

__all__ = [
    "ARCHITECTURES",
    "GPT",
    "LR_SCHEDULES",
    "MLP",
    "NO_DECAY",
    "OPTIMIZERS",
    "BasicBlock",
    "Block",
    "CausalSelfAttention",
    "CharGPT",
    "Classifier",
    "ResNet",
    "TextClassifier",
    "fused_adam",
    "lenet5",
    "lenet_300_100",
    "resnet8",
    "resnet8x2",
    "small_cnn",
]
