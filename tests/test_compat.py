"""``lightning_sparse.compat``: the private Lightning/W&B attributes it reads exist on the installed versions (so a
release that renames one fails here), and each function gives what a user would read from Lightning itself."""

import pytorch_lightning as pl
import pytest
import torch
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from lightning_sparse.compat import drop_unset_wandb_anonymous, logged_step, train_dataloader, wandb_run_started


class _Record(pl.Callback):
    def __init__(self) -> None:
        self.at_setup = None
        self.steps: list[tuple[int, int]] = []

    def setup(self, trainer, pl_module, stage):
        self.at_setup = train_dataloader(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # where the callbacks log
        self.steps.append((logged_step(trainer), trainer.global_step))


def test_the_private_attributes_exist_on_the_installed_lightning(tmp_path, digits, digits_model, make_trainer):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(digits_model(), datamodule=digits)
    assert isinstance(trainer.fit_loop.epoch_loop._batches_that_stepped, int)
    assert trainer.fit_loop._data_source.is_defined()
    assert hasattr(WandbLogger(offline=True, save_dir=str(tmp_path)), "_experiment")


def test_logged_step_is_the_optimizer_step_and_the_loader_is_there_at_setup(tmp_path, digits, digits_model, make_trainer):
    record = _Record()
    trainer = make_trainer(tmp_path, callbacks=[record], max_steps=6, accumulate_grad_batches=2)
    trainer.fit(digits_model(), datamodule=digits)
    assert [logged for logged, _ in record.steps] == [step for _, step in record.steps]
    assert [step for _, step in record.steps] == [0, 1, 2, 3, 4, 5]  # once per optimizer step (2 batches each)
    batch = next(iter(record.at_setup))
    assert batch[0].shape[1:] == (1, 8, 8)


def test_fallbacks_when_a_trainer_has_no_private_attributes(digits, digits_model):
    class Bare:  # what a future Lightning without these private attributes would offer: public names only
        global_step = 7
        datamodule = digits

    digits.setup("fit")
    assert logged_step(Bare()) == 7
    assert len(train_dataloader(Bare(), digits_model())) == len(digits.train_dataloader())
    assert not wandb_run_started(CSVLogger("unused"))


@pytest.mark.slow
def test_wandb_run_started_turns_true_only_once_the_run_exists(tmp_path):
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="compat")
    assert not wandb_run_started(logger)
    logger.experiment.log({"x": torch.tensor(1.0).item()})
    assert wandb_run_started(logger)
    logger.experiment.finish()


def test_an_unset_wandb_anonymous_is_left_out_and_a_given_one_kept(tmp_path):
    unset = WandbLogger(offline=True, save_dir=str(tmp_path))
    assert "anonymous" in unset._wandb_init  # what makes W&B warn "The anonymous setting has no effect"
    drop_unset_wandb_anonymous(unset)
    assert "anonymous" not in unset._wandb_init
    given = WandbLogger(offline=True, save_dir=str(tmp_path), anonymous=True)
    drop_unset_wandb_anonymous(given)
    assert given._wandb_init["anonymous"] == "allow"
