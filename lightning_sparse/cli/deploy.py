"""``lightning-sparse deploy CKPT OUT``: rebuild a model from a Lightning checkpoint, deploy it, save it.

The model is rebuilt with ``--model``'s ``load_from_checkpoint`` (its saved ``hyper_parameters``; default
``lightning_sparse.models.Classifier``). The example input is the first test batch of ``--data`` (a
LightningDataModule class path), or else a seeded random batch of ``--input_shape`` (default: the model's
``hparams.input_shape``), ``--batch_size`` samples either way.
"""

from __future__ import annotations

import argparse
import io
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_sparse.cli.args import INPUT_ERRORS, add_flag, at_least_one, checkpoint_parser, fail, parse_checkpoint_args
from lightning_sparse.imports import import_object
from lightning_sparse.deployment import KERNELS, MEMORY_FORMATS, deploy_model, print_deploy_report, save_deployed
from lightning_sparse.export import load_checkpoint

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


def _read_checkpoint(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint, read as every command reads one (bounded, weights-only unless ``--trust``), once it is known
    to be a Lightning checkpoint: deploy rebuilds the model from its ``hyper_parameters``."""
    try:
        checkpoint = load_checkpoint(parsed.checkpoint, trusted=parsed.trust)
    except INPUT_ERRORS as error:
        fail(parser, error, parsed.checkpoint)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict", checkpoint), Mapping):
        fail(parser, f"{parsed.checkpoint} holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    if "state_dict" not in checkpoint or "pytorch-lightning_version" not in checkpoint:
        fail(parser, f"{parsed.checkpoint} is a plain state dict without Lightning metadata (no hyper_parameters to "
                     f"rebuild the model from): build the model yourself, load the state dict and call "
                     f"lightning_sparse.deployment.deploy_model, or give the Lightning .ckpt")  # fmt: skip
    return checkpoint


def _check_model_size(parser: argparse.ArgumentParser, parsed: argparse.Namespace, cls: Any, checkpoint: dict) -> None:
    """Build the model on the meta device (no memory) from the checkpoint's hyper-parameters and refuse it when its
    weights are not the checkpoint's: a crafted ``hyper_parameters`` (``input_shape: [1, 1000, 1000]``) cannot make
    deploy allocate gigabytes before the weights are compared. Skipped for a model that cannot be built on meta."""
    weights = {name: tuple(value.shape) for name, value in checkpoint["state_dict"].items() if isinstance(value, torch.Tensor)}
    empty = io.BytesIO()
    torch.save({**checkpoint, "state_dict": {}, "callbacks": {}, "optimizer_states": []}, empty)
    empty.seek(0)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = cls.load_from_checkpoint(empty, map_location="meta", strict=False, weights_only=not parsed.trust)
    except Exception:  # noqa: BLE001  a model whose __init__ needs real tensors: the real build reports its own errors
        return
    for name, value in probe.state_dict().items():
        if name in weights and tuple(value.shape) != weights[name]:
            fail(parser, f"{parsed.checkpoint}: its hyper_parameters build --model {parsed.model} with `{name}` of "
                         f"shape {list(value.shape)}, but the checkpoint's weight has shape {list(weights[name])}")  # fmt: skip
    built = sum(value.numel() * value.element_size() for value in probe.state_dict().values())
    held = sum(value.numel() * value.element_size() for value in checkpoint["state_dict"].values()
               if isinstance(value, torch.Tensor))  # fmt: skip
    if built > 2 * held + (16 << 20):
        fail(parser, f"{parsed.checkpoint}: its hyper_parameters build --model {parsed.model} with {built:,} bytes of "
                     f"weights, but the checkpoint holds {held:,}: they do not describe the same model")  # fmt: skip


def stored_plan(parser: argparse.ArgumentParser, parsed: argparse.Namespace, checkpoint: Mapping[str, Any]) -> Any:
    """The structure plan a pruning callback stored in the checkpoint (its ``"structure_plan"`` state: the heads and
    neurons found at set-up and which are kept), so deploy reuses it instead of finding them again; ``None`` when no
    callback stored one. Two callbacks with different plans are refused."""
    plans = [state["structure_plan"] for state in (checkpoint.get("callbacks") or {}).values()
             if isinstance(state, Mapping) and state.get("structure_plan") is not None]  # fmt: skip
    if any(plan != plans[0] for plan in plans[1:]):
        fail(parser, f"{parsed.checkpoint} holds {len(plans)} different structure plans (one per pruning callback): "
                     f"deploy removes one model's units, so train with one callback pruning heads/neurons")  # fmt: skip
    return plans[0] if plans else None


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
    add_flag(parser, "memory_format", choices=MEMORY_FORMATS, default="auto",
                        help="convolution weights: auto: channels-last where the whole model is measured faster; channels_last; contiguous")  # fmt: skip
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
    checkpoint = _read_checkpoint(parser, parsed)
    _check_model_size(parser, parsed, cls, checkpoint)  # before any real model is built from its hyper-parameters
    plan = stored_plan(parser, parsed, checkpoint)
    source: Any = parsed.checkpoint
    if Path(parsed.checkpoint).is_dir():  # a distributed folder, read whole: hand Lightning one in-memory file
        source = io.BytesIO()
        torch.save(checkpoint, source)
        source.seek(0)
    del checkpoint
    try:
        model = cls.load_from_checkpoint(source, map_location=parsed.device, weights_only=not parsed.trust)
    except Exception as error:  # wrong class for this checkpoint, a bad device...
        first = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
        fail(parser, f"cannot rebuild --model {parsed.model} from {parsed.checkpoint}: {first}")
    x = example_input(parsed, model, parser)
    try:
        result = deploy_model(model, x, parsed.device, kernel=parsed.kernel, plan=plan, memory_format=parsed.memory_format)
    except ValueError as error:  # the example input does not fit the model: the message names the layer
        fail(parser, error, parsed.checkpoint)
    print_deploy_report(result.report)
    save_deployed(result.model, parsed.output)
    needs = "torch and lightning_sparse" if result.report.traced or not result.report.changed else f"torch, lightning_sparse and {parsed.model}"
    print(f"Saved {parsed.output} (example input {list(x.shape)}, {math.prod(x.shape[1:])} values per sample); "
          f"load it with lightning_sparse.deployment.load_deployed(path, trusted=True): it needs {needs}.")  # fmt: skip
