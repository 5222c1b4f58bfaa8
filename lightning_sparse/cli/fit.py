"""``lightning-sparse fit|validate|test|predict``: :class:`SparseCLI`, LightningCLI with ``--compare_dense`` and
sweep-key overrides, for any module and datamodule of either Lightning package."""

from __future__ import annotations

import contextlib
import copy
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pytorch_lightning import LightningDataModule, LightningModule, Trainer, seed_everything
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from jsonargparse import Namespace
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from rich.console import Console
from rich.table import Table

from lightning_sparse import wandb_mode
from lightning_sparse.callbacks import dropped_for_dense_baseline
from lightning_sparse.cli.args import add_flag
from lightning_sparse.cli.quiet import quiet_loggers
from lightning_sparse.callbacks import LearningCompression, SparsityCallback
from lightning_sparse.core.counting import global_sparsity
from lightning_sparse.core.targets import prunable_names
from lightning_sparse.sweep.overrides import set_value, split_arguments

DESCRIPTION = (
    "Sparsify models inside Trainer.fit. Subcommands: fit, validate, test, predict (LightningCLI) and "
    "`report CKPT [--plot FILE.png]` (per-layer sparsity of a checkpoint) and "
    "`export CKPT OUT` (the checkpoint's weights as one compressed file) and "
    "`sweep --config SWEEP.yaml` (Ax search for the most compressed model that meets an accuracy constraint) and "
    "`deploy CKPT OUT` (a model rebuilt to run faster: pruned channels removed, sparse kernels where faster). "
    "Our flags are spelled with underscores (--compare_dense, --max_trials); the hyphen spelling is accepted too."
)


@contextlib.contextmanager
def _one_line_refusals(parser: Any) -> Iterator[None]:
    """Print a ``ValueError``/``TypeError`` that lightning_sparse itself raised as one line and exit with 2: it is a
    refusal with its reason, not a crash. Errors raised elsewhere (user code, torch) keep their traceback."""
    try:
        yield
    except (ValueError, TypeError) as error:
        frames = traceback.extract_tb(error.__traceback__)
        if not frames or not Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE):
            raise
        text = " ".join(str(error).split()) or type(error).__name__
        parser.exit(2, f"lightning-sparse: error: {text}\n")


_PACKAGE = Path(__file__).resolve().parents[1]  # lightning_sparse/


def _unified_lightning() -> Any:
    """The unified package's ``lightning.pytorch`` when it is installed, else None."""
    try:
        import lightning.pytorch
    except ImportError:
        return None
    return lightning.pytorch


class SparseCLI(LightningCLI):
    """LightningCLI with ``--compare_dense``: after ``fit``, train the same config without compression and
    print the test metrics of both models side by side.

    ``--model`` and ``--data`` take subclasses of either package's ``LightningModule`` / ``LightningDataModule``
    (``pytorch_lightning`` or the unified ``lightning.pytorch``); a ``lightning.pytorch`` model is trained by
    ``lightning.pytorch.Trainer`` (each Trainer only runs its own package's modules).
    """

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        unified = _unified_lightning()
        if unified is None or self.model_class is not None or self.datamodule_class is not None:
            super().add_core_arguments_to_parser(parser)
            return
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        # jsonargparse accepts a subclass of any of the given base classes
        parser.add_subclass_arguments((LightningModule, unified.LightningModule), "model", fail_untyped=False, required=True)
        parser.add_subclass_arguments(
            (LightningDataModule, unified.LightningDataModule), "data", fail_untyped=False, required=False
        )

    def _add_instantiators(self) -> None:
        super()._add_instantiators()
        unified = _unified_lightning()
        if unified is not None:  # save_hyperparameters of a lightning.pytorch module reads its own package's context
            from lightning.pytorch.cli import _InstantiatorFn

            self.parser.add_instantiator(_InstantiatorFn(cli=self, key="model"), unified.LightningModule, subclasses=True)
            self.parser.add_instantiator(_InstantiatorFn(cli=self, key="data"), unified.LightningDataModule, subclasses=True)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        unified = _unified_lightning()
        if unified is not None and isinstance(self.model, unified.LightningModule) and self.trainer_class is Trainer:
            self.trainer_class = unified.Trainer  # same arguments; it refuses pytorch_lightning modules and vice versa
        trainer = super()._instantiate_trainer(config, callbacks)
        quiet_loggers(trainer.loggers)
        return trainer

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("description", DESCRIPTION)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_flag(
            parser,
            "compare_dense",
            type=bool,
            default=False,
            help="After fit: test the compressed model, train and test a dense baseline with the same config "
            "(compression callbacks removed) and print both (fit only).",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Also accept ``--trainer.callbacks.0.init_args.sparsity=0.9`` and ``--KEY[glob]=value`` (sweep keys, which
        jsonargparse cannot parse itself): the rest is parsed first, then these are written in and re-validated."""
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
            return
        plain, overrides = split_arguments(sys.argv[1:] if args is None else list(args))
        plain = replace_callbacks_whole(plain)
        if not overrides:
            self.config = parser.parse_args(plain)
            return
        print_config = [arg for arg in plain if arg.startswith("--print_config")]
        self.config = parser.parse_args([arg for arg in plain if arg not in print_config])
        subcommand = self.config["subcommand"]
        values = self.config[subcommand].as_dict()
        for key, value in overrides:
            try:
                set_value(values, key, value)
            except KeyError as error:
                parser.error(str(error.args[0]))
        values.pop("config", None)
        self.config[subcommand] = self._parser(subcommand).parse_object(values)
        if print_config:
            print(self._parser(subcommand).dump(self.config[subcommand], skip_none=False), end="")
            sys.exit(0)

    def instantiate_classes(self) -> None:
        with _one_line_refusals(self.parser):  # a callback's or model's own refusal of its arguments
            super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        with _one_line_refusals(self.parser):  # a callback refusing the set-up (the run is too short, ...)
            super()._run_subcommand(subcommand)

    def after_fit(self) -> None:
        wandb_mode.announce_runs(self.trainer.loggers)
        checkpoint = self.trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_path:
            rank_zero_info(f"Checkpoint: {checkpoint.best_model_path} (`lightning-sparse report` prints its sparsity)")
        if self._get(self.config, "compare_dense"):
            self._compare_with_dense()

    def _compare_with_dense(self) -> None:
        sparse = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)[0]
        config = copy.deepcopy(self.config)
        trainer_config = config[self.subcommand]["trainer"]
        trainer_config["callbacks"] = [c for c in trainer_config.get("callbacks") or [] if not dropped_for_dense_baseline(c)]
        trainer_config["logger"] = False
        trainer_config["enable_checkpointing"] = False
        trainer_config["enable_model_summary"] = False
        seed = config[self.subcommand]["seed_everything"]
        if seed is not False:
            seed_everything(seed, workers=True)  # the baseline starts from the same weights and data order
        init = self.parser.instantiate_classes(config)[self.subcommand]
        trainer = self.trainer_class(**init["trainer"])
        rank_zero_info("Training the dense baseline (same config, no compression callbacks)...")
        trainer.fit(init["model"], datamodule=init["data"])
        dense = trainer.test(init["model"], datamodule=init["data"], verbose=False)[0]
        for logger in self.trainer.loggers:
            logger.log_metrics({f"dense/{name}": value for name, value in dense.items()})
        names = self._sparsified_names()
        sparse["sparsity"] = global_sparsity(_compared_weights(self.model, names))
        dense["sparsity"] = global_sparsity(_compared_weights(init["model"], names))
        _print_comparison(dense, sparse)

    def _sparsified_names(self) -> list[str]:
        names: list[str] = []
        for callback in self.trainer.callbacks:
            if isinstance(callback, SparsityCallback) and callback.masks:
                names += [n for n in callback.masks if n not in names]
            elif isinstance(callback, LearningCompression):
                names += [n for n in callback.params if n not in names]
        return names


def replace_callbacks_whole(args: list[str]) -> list[str]:
    """Put ``--trainer.callbacks=[]`` before every ``--trainer.callbacks=VALUE`` (a preset file or a class path) that
    replaces the list: jsonargparse otherwise keeps the earlier callback's arguments at the same position when the new
    class accepts them (``--trainer.callbacks=callbacks/rigl.yaml`` after a config with GMP ``start: 0.1`` gave RigL
    ``start: 0.1``). A preset sets a callback's arguments whole: the file's values, the rest the class defaults.
    ``--trainer.callbacks+=...`` (append) and ``--trainer.callbacks.ARG=...`` (one argument) are left as they are."""
    result: list[str] = []
    for index, arg in enumerate(args):
        replaces = arg.startswith("--trainer.callbacks=") or (
            arg == "--trainer.callbacks" and index + 1 < len(args) and not args[index + 1].startswith("--")
        )
        if replaces:
            result.append("--trainer.callbacks=[]")
        result.append(arg)
    return result


def _compared_weights(model: Any, names: list[str] | None = None) -> list[Any]:
    """The parameters whose sparsity the dense comparison reports: the sparsified ones (default: every Linear/Conv
    weight)."""
    params = dict(model.named_parameters())
    return [params[n] for n in names or prunable_names(model)]


@rank_zero_only
def _print_comparison(dense: dict[str, float], sparse: dict[str, float]) -> None:
    table = Table(title="Test metrics: dense baseline vs compressed")
    for column in ("metric", "dense", "compressed", "difference"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name in sorted(set(dense) & set(sparse)):
        table.add_row(name, f"{dense[name]:.4f}", f"{sparse[name]:.4f}", f"{sparse[name] - dense[name]:+.4f}")
    Console().print(table)
