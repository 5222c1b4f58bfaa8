"""``lightning-sparse deploy CKPT OUT``: rebuild a model from a Lightning checkpoint, deploy it, save it.

The model is rebuilt with ``--model``'s ``load_from_checkpoint`` (its saved ``hyper_parameters``; default
``lightning_sparse.models.Classifier``). The example input is the first test batch of ``--data`` (a
LightningDataModule class path), or else a seeded random batch of ``--input_shape`` (default: the model's
``hparams.input_shape``), ``--batch_size`` samples either way.
"""

from __future__ import annotations

import argparse
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_sparse.cli.args import add_flag, at_least_one, checkpoint_parser, fail, parse_checkpoint_args
from lightning_sparse.imports import import_object
from lightning_sparse.deployment import KERNELS, deploy_model, print_deploy_report, save_deployed

DEFAULT_MODEL = "lightning_sparse.models.Classifier"


def _import(class_path: str, option: str, parser: argparse.ArgumentParser) -> Any:
    try:
        return import_object(class_path)
    except ImportError as error:
        parser.error(f"{option} {class_path!r} cannot be imported: {error}")


def _shape(text: str, parser: argparse.ArgumentParser) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        parser.error(f"--input_shape must be positive sizes of one sample such as 1,28,28, got {text!r}")
    return shape


def example_input(parsed: argparse.Namespace, model: Any, parser: argparse.ArgumentParser) -> torch.Tensor:
    """The first test batch of ``--data``, or a seeded random batch of ``--input_shape`` / ``hparams.input_shape``."""
    if parsed.data:
        datamodule = _import(parsed.data, "--data", parser)(batch_size=parsed.batch_size)
        datamodule.prepare_data()
        datamodule.setup("test")
        batch = next(iter(datamodule.test_dataloader()))
        return batch[0] if isinstance(batch, (list, tuple)) else batch
    if parsed.input_shape:
        shape = _shape(parsed.input_shape, parser)
    else:
        saved = getattr(getattr(model, "hparams", {}), "get", lambda key: None)("input_shape")
        if saved is None:
            parser.error("give --data CLASS_PATH or --input_shape C,H,W: the model's hyper_parameters hold no input_shape")
        shape = tuple(int(size) for size in saved)
    generator = torch.Generator().manual_seed(0)
    return torch.randn((parsed.batch_size, *shape), generator=generator)


def build_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(
        "deploy",
        "Rebuild a model from a checkpoint, remove its pruned channels, run its sparse Linear layers on "
        "PyTorch's sparse kernels where they are measured faster, print what was done and save the deployed model "
        "(load it with lightning_sparse.deployment.load_deployed(OUT, trusted=True): it is a pickled module, so only "
        "load files you trust). The checkpoint is read weights-only unless --trust.",
        "a Lightning .ckpt holding hyper_parameters",
    )
    parser.add_argument("output", help="where to save the deployed model")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"class path of the LightningModule (default {DEFAULT_MODEL})")
    parser.add_argument("--data", help="class path of a LightningDataModule; its first test batch is the example input")
    add_flag(parser, "input_shape", help="shape of one sample, e.g. 1,28,28 (without --data; default hparams.input_shape)")
    add_flag(parser, "batch_size", type=int, default=64, help="samples in the example input (timing batch size)")
    parser.add_argument("--device", default="cpu", help="device the deployed model runs on (default cpu)")
    parser.add_argument("--kernel", choices=KERNELS, default="auto",
                        help="auto: per layer the form measured fastest; sparse: sparse wherever possible; dense: only remove channels")  # fmt: skip
    return parser


def main(args: list[str]) -> None:
    """``lightning-sparse deploy CKPT OUT [--model CLASS] [--data CLASS | --input_shape C,H,W] [--batch_size N]``."""
    parser = build_parser()
    parsed = parse_checkpoint_args(parser, args)
    output = Path(parsed.output)
    if output.is_dir():
        parser.error(f"output {output} is a directory: give the file to write")
    if not output.parent.is_dir():
        parser.error(f"cannot write {output}: the folder {output.parent} does not exist")
    at_least_one(parser, parsed, "batch_size")
    cls = _import(parsed.model, "--model", parser)
    if not hasattr(cls, "load_from_checkpoint"):
        parser.error(f"--model {parsed.model!r} is not a LightningModule (it has no load_from_checkpoint)")
    if parsed.trust:
        warnings.warn(f"unpickling {parsed.checkpoint} in full (--trust): this runs any code the file holds", stacklevel=1)
    try:
        model = cls.load_from_checkpoint(parsed.checkpoint, map_location=parsed.device, weights_only=not parsed.trust)
    except pickle.UnpicklingError as error:  # a global that a weights-only load refuses
        reason = next((line.split("error:")[-1].strip() for line in str(error).splitlines() if "Unsupported" in line),
                      str(error).splitlines()[0] if str(error) else "not a checkpoint")  # fmt: skip
        fail(parser, f"{parsed.checkpoint} cannot be read weights-only ({reason}); a pickle can run code, so pass "
                     "--trust only if you trust where it came from")
    except Exception as error:  # wrong class for this checkpoint, missing hyper_parameters, not a checkpoint...
        first = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
        parser.error(f"cannot rebuild --model {parsed.model} from {parsed.checkpoint}: {first}")
    x = example_input(parsed, model, parser)
    try:
        result = deploy_model(model, x, parsed.device, kernel=parsed.kernel)
    except ValueError as error:  # the example input does not fit the model: the message names the layer
        fail(parser, error, parsed.checkpoint)
    print_deploy_report(result.report)
    save_deployed(result.model, parsed.output)
    needs = "torch and lightning_sparse" if result.report.traced or not result.report.changed else f"torch, lightning_sparse and {parsed.model}"
    print(f"Saved {parsed.output} (example input {list(x.shape)}, {math.prod(x.shape[1:])} values per sample); "
          f"load it with lightning_sparse.deployment.load_deployed(path, trusted=True): it needs {needs}.")  # fmt: skip
