"""Every multi-word flag of our subcommands is spelled with underscores and also accepted with hyphens: both
spellings parse, through the real parser, to the same value."""

import pytest

from lightning_sparse.cli import deploy, sweep
from lightning_sparse.cli.args import spellings
from lightning_sparse.cli.fit import SparseCLI

DIGITS = [
    "--model=lightning_sparse.models.Classifier", "--model.arch=lenet300", "--model.input_shape=[1, 8, 8]",
    "--data=lightning_sparse.data.DigitsDataModule", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
]  # fmt: skip


def test_spellings_put_the_underscore_flag_first_and_add_the_hyphen_one():
    assert spellings("max_trials") == ["--max_trials", "--max-trials"]
    assert spellings("export-wandb") == ["--export_wandb", "--export-wandb"]
    assert spellings("config") == ["--config"]


@pytest.mark.parametrize(
    ("build", "before", "flag", "value", "expected"),
    [
        (sweep.build_parser, ["--config", "s.yaml"], "max_trials", "7", 7),
        (sweep.build_parser, ["--config", "s.yaml"], "export_wandb", "w.yaml", "w.yaml"),
        (deploy.build_parser, ["a.ckpt", "out.pt"], "input_shape", "1,8,8", "1,8,8"),
        (deploy.build_parser, ["a.ckpt", "out.pt"], "batch_size", "16", 16),
        (deploy.build_parser, ["a.ckpt", "out.pt"], "memory_format", "contiguous", "contiguous"),
    ],
)
def test_both_spellings_of_a_subcommand_flag_parse_to_the_same_value(build, before, flag, value, expected):
    underscore, hyphen = spellings(flag)
    values = [getattr(build().parse_args([*before, spelling, value]), flag) for spelling in (underscore, hyphen)]
    joined = [getattr(build().parse_args([*before, f"{spelling}={value}"]), flag) for spelling in (underscore, hyphen)]
    assert values == joined == [expected, expected]


def test_the_underscore_spelling_is_the_one_help_shows_first():
    text = sweep.build_parser().format_help() + deploy.build_parser().format_help()
    for flag in ("max_trials", "export_wandb", "input_shape", "batch_size", "memory_format"):
        assert f"--{flag}" in text and text.index(f"--{flag}") < text.index(f"--{flag.replace('_', '-')}")


@pytest.mark.parametrize("spelling", ["--compare_dense", "--compare-dense"])
def test_fit_accepts_both_spellings_of_compare_dense(spelling):
    cli = SparseCLI(model_class=None, datamodule_class=None, args=[*DIGITS, f"{spelling}=true"], run=False)
    assert cli.config["compare_dense"] is True
    default = SparseCLI(model_class=None, datamodule_class=None, args=DIGITS, run=False)
    assert default.config["compare_dense"] is False
