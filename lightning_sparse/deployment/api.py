"""``deploy``: turn a sparse model into one that runs faster (or smaller) on the target device, and say how.

Steps: check the example input (naming the first layer that rejects it), trace the model with ``torch.fx``, remove
zero output channels and the inputs that read them (:mod:`.thinning`), give each Linear layer with zeros the
fastest of its dense and sparse forms as timed on its real input (:mod:`.kernels`), run chains of Linear layers
(elementwise modules between them) on transposed activations where that is faster (:mod:`.chains`), make convolution
weights channels-last where that is faster (:mod:`.channels_last`), check the outputs against the original model,
and measure parameter bytes, peak forward memory and forward time before and after.
"""

from __future__ import annotations

import copy
import os
import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_flatten

from lightning_sparse.core.counting import global_sparsity
from lightning_sparse.core.targets import DEFAULT_MODULES
from lightning_sparse.deployment import chains, channels_last, fallback, groups, kernels, memory, residual, thinning
from lightning_sparse.deployment.kernels import KERNELS, nm_pattern, outputs_match
from lightning_sparse.deployment.modules import FoldedConv, SemiStructuredLinear, SparseLinear, flat_graph_module
from lightning_sparse.deployment.report import DeployReport, LayerReport, print_deploy_report
from lightning_sparse.files import atomic_writer
from lightning_sparse.structure.plan import StructurePlan, as_plan

#: The layers deploy reads: those compression targets by default (Linear, Conv1d/2d/3d).
LAYERS = DEFAULT_MODULES
ExampleInput = Tensor | Sequence[Tensor]


@dataclass
class Deployment:
    """The deployed model and the report of what was done."""

    model: nn.Module
    report: DeployReport


def deploy(model: nn.Module, example_input: ExampleInput, device: str | torch.device | None = None, **options: Any) -> nn.Module:
    """Return ``model`` rebuilt to run faster on ``device`` (default: the example input's), printing what was done.

    Pruned output channels are removed (with the matching inputs of the layers that read them), Linear layers whose
    sparse form (PyTorch CSR/BSR, 2:4 semi-structured on a capable GPU) is faster on ``example_input`` become
    sparse, convolution weights become channels-last where the whole model is faster so, outputs are checked against
    the original, and parameter bytes, peak forward memory and forward time are reported before and after. A model without zeros in its Linear/Conv weights is returned unchanged.
    ``options`` go to :func:`deploy_model` (``kernel``, ``repeats``, ``plan``, ``memory_format``, ``verbose``).
    """
    verbose = options.pop("verbose", True)
    result = deploy_model(model, example_input, device, **options)
    if verbose:
        print_deploy_report(result.report)
    return result.model


def deploy_model(
    model: nn.Module,
    example_input: ExampleInput,
    device: str | torch.device | None = None,
    *,
    kernel: str = "auto",
    repeats: int = 30,
    plan: StructurePlan | Mapping[str, Any] | None = None,
    memory_format: str = "auto",
) -> Deployment:
    """:func:`deploy`, returning the model and its :class:`DeployReport` instead of printing.

    Args:
        model: the trained (sparse) model; it is not modified (a model without sparsity is returned as it is).
        example_input: a tensor, or a sequence of tensors for a multi-input forward, shaped like real inputs
            (its batch size is the one the kernels are timed at).
        device: where the deployed model runs; default the device of ``example_input``.
        kernel: ``auto`` (per layer, the form measured fastest), ``sparse`` (every Linear with zeros in its
            fastest sparse form, for memory) or ``dense`` (only remove channels, heads and neurons: what
            ``torch.onnx.export`` needs, since a CSR ``SparseLinear`` does not export).
        repeats: interleaved timing runs per layer and for the whole model.
        plan: the structured units found at training set-up and which are kept (a pruning callback's
            ``structure_plan``, or the ``"structure_plan"`` entry of its checkpoint state): its heads and neurons are
            removed without finding them again (a model whose attention layout was registered only while it trained
            deploys too). A plan stored for a LightningModule fits the model it holds too (the prefix is taken off).
            Refused, naming the difference, when it does not describe ``model``. Default: units are found in
            ``model`` by the structure registry.
        memory_format: the memory format of 2-D/3-D convolution weights (:mod:`.channels_last`): ``auto`` (channels-last
            where the whole model is measured faster with it on ``example_input``), ``channels_last`` or
            ``contiguous`` (as they are).
    """
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be an int >= 1, got {repeats!r}")
    if memory_format not in channels_last.MEMORY_FORMATS:
        raise ValueError(f"`memory_format` must be one of {channels_last.MEMORY_FORMATS}, got {memory_format!r}")
    _check_model(model)
    plan = as_plan(plan).for_model(model) if plan is not None else None
    inputs = _as_inputs(example_input)
    requested = device
    device = _as_device(device) if device is not None else inputs[0].device
    inputs = tuple(x.to(device).clone() for x in inputs)  # own storage: a batch sliced from a data set is not the data set
    report = DeployReport(device=str(device))
    sparse_layers = [name for name, m in model.named_modules() if isinstance(m, LAYERS) and bool((m.weight == 0).any())]
    if not sparse_layers and not groups.has_zero_groups(model, plan):  # GPT-2's Conv1D heads are not in LAYERS
        check_input(copy.deepcopy(model).to(device).eval(), inputs)  # a copy: training-mode BN would update statistics
        report.notes.append("no Linear/Conv weight has a zero: there is nothing to deploy, the model is returned unchanged")
        return Deployment(model.to(requested) if requested is not None else model, report)

    original = copy.deepcopy(model).to(device).eval()
    reference = check_input(original, inputs)
    probe = _probe_inputs(inputs)
    probe_reference = _run(original, probe) if probe is not None else None
    report.layers = _layer_rows(original)

    work, traced = _trace(_remove_groups(original, inputs, reference, probe, probe_reference, report, plan), inputs, report)
    report.traced = traced
    _cut_groups(work, inputs, reference, probe, probe_reference, report, traced)  # from a real forward: no trace needed
    if traced:
        _thin_all(work, inputs, reference, probe, probe_reference, report)
    else:
        report.notes.append("coupled channel groups were found from a real forward; the per-layer pass that folds a "
                            "zero channel's constant into the next layer's bias needs the traced graph and was skipped")
    sparse_linear = kernel != "dense" and any(type(m) is nn.Linear and bool((m.weight == 0).any()) for m in work.modules())
    structural = copy.deepcopy(work) if sparse_linear else work  # the "dense layers" variant (before kernels)
    rows = copy.deepcopy(report.layers)  # and its report rows
    swapped: dict[str, nn.Module] = {}
    if sparse_linear:
        swapped = _choose_kernels(work, inputs, kernel, repeats, report)
        if traced and kernel == "auto":
            swapped.update(_transpose_chains(work, inputs, kernel, repeats, report))
    # the input ran with autograd off already (check_input, under inference mode: the same fused paths)
    modes = ["autograd off"] + (["autograd on"] if fallback.failure(original, inputs, ["autograd on"]) is None else [])
    work = _keep_running(work, structural, swapped, inputs, modes, rows, report)
    if work is None:
        return Deployment(original, report)
    if not swapped:
        structural = None  # nothing but dense layers: the variant is the deployed model itself
    _describe_unchanged(work, report)
    if traced:
        work = flat_graph_module(work)  # layers as direct attributes: no per-call lookups through the hierarchy
        structural = flat_graph_module(structural) if structural is not None else None
    converted, note = channels_last.choose(work, inputs, memory_format, repeats, lambda m: _same(_run(m, inputs), reference), modes)
    if note is not None:
        report.notes.append(note)
    if converted is not work:
        work, structural = converted, channels_last.convert(structural) if structural is not None else None
        report.memory_format = "channels_last"

    if not _same(_run(work, inputs), reference) or (probe is not None and not _same(_run(work, probe), probe_reference)):
        report.notes.append(_differed("the deployed model's", reference) + ": the original is returned")
        return Deployment(original, report)
    return Deployment(_returned(original, work, structural, inputs, kernel, repeats, rows, report), report)


def _restructured(report: DeployReport) -> bool:
    """Whether deploy changed the model's structure (traced into a graph, channels or heads removed, convolution
    weights made channels-last), so that the deployed model with dense layers is not simply the input model."""
    thinned = any(row.deployed_as == "thinned" for row in report.layers) or any(row.removed for row in report.removed_groups)
    return report.traced or thinned or report.memory_format != "contiguous"


def _keep_running(work: nn.Module, structural: nn.Module, swapped: dict[str, nn.Module], inputs: tuple[Tensor, ...],
                  modes: list[str], rows: list[LayerReport], report: DeployReport) -> nn.Module | None:  # fmt: skip
    """``work``, runnable in the ``modes`` the input model runs in (:func:`.fallback.failure`: autograd off and on),
    or ``None``.

    A module that fails with sparse layers inside it (torch's fused ``TransformerEncoderLayer`` path reads their
    weights itself) gets those layers back dense, one failure at a time; a failure not inside such a module sends
    every layer back to dense (``structural``, the model before kernels were chosen); if that fails too, ``None``
    (the input model is returned). ``swapped``: sparse layer or chain name → its dense module (``None``: a chain).
    """
    while True:
        failed = fallback.failure(work, inputs, modes)
        if failed is None:
            return work
        if not swapped:
            report.notes.append(f"the deployed model: {failed.describe()}; the input model is returned")
            return None
        names = [name for name in swapped if fallback.covers(failed.module, name)]
        if not names or not all(_is_linear_name(work, name) for name in names):
            report.notes.append(f"the deployed model: {failed.describe()}; every layer is dense again")
            _restore_rows(report, rows, list(swapped), f"dense again: {failed.describe()}")
            swapped.clear()
            work = structural
            continue
        for name in names:
            thinning.set_module(work, name, swapped.pop(name))
        _restore_rows(report, rows, names, f"kept dense: {failed.describe()}")


def _is_linear_name(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), (SparseLinear, SemiStructuredLinear))
    except AttributeError:
        return False


def _restore_rows(report: DeployReport, rows: list[LayerReport], names: list[str], why: str) -> None:
    """Rows of layers put back to what they were before kernels were chosen (times and reasons kept), with ``why``."""
    before = {row.name: row for row in rows}
    for row in report.layers:
        old = before.get(row.name)
        if old is not None and row.deployed_as != old.deployed_as and any(fallback.covers(name, row.name) for name in names):
            row.deployed_as, row.deployed_shape = old.deployed_as, old.deployed_shape
            _explain(row, why)


def _returned(original: nn.Module, work: nn.Module, structural: nn.Module | None, inputs: tuple[Tensor, ...], kernel: str,
              repeats: int, rows: list[LayerReport], report: DeployReport) -> nn.Module:  # fmt: skip
    """Time the input, the deployed model and (where it has sparse kernels) the deployed model with dense layers on
    the example input, return the one :func:`.fallback.decide` picks, and fill in the report's measurements."""
    variants = {"input": original, "deployed": work} | ({"dense layers": structural} if structural is not None else {})
    same = {"dense layers": "input"} if structural is not None and not _restructured(report) else {}
    samples = fallback.measure(variants, inputs, repeats, inputs[0].device, kernel, same)
    decision = fallback.decide(samples, kernel)
    report.variant_ms = {name: statistics.median(values) for name, values in samples.items()}
    report.variant_runs = samples
    report.returned, report.decision = decision.variant, decision.reason
    chosen = variants[decision.variant]
    if decision.variant == "dense layers":
        _restore_rows(report, rows, [""], "dense again: the whole model was not faster with the sparse kernels")
        report.chains = [f"{chain} (dropped with the other sparse kernels)" for chain in report.chains]
    elif decision.variant == "input":
        for row in report.layers:
            row.deployed_as, row.deployed_shape = "dense", row.shape
            _explain(row, "the input model is returned: it is measurably faster")
    report.changed = decision.variant != "input"
    report.param_bytes = (memory.parameter_bytes(original), memory.parameter_bytes(chosen))
    report.peak_forward_bytes = (memory.peak_forward_bytes(original, inputs), memory.peak_forward_bytes(chosen, inputs))
    report.forward_ms = (report.variant_ms["input"], report.variant_ms[decision.variant])
    return chosen


def save_deployed(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a deployed model with ``torch.save`` (the whole module: graph, torch and lightning_sparse modules).

    Written to a temporary file beside ``path``, fsynced and renamed over it once complete (see
    :func:`lightning_sparse.files.atomic_writer`): a failed or killed save leaves any earlier file in place.
    """
    path = Path(path)
    with atomic_writer(path) as f:
        torch.save(model, f)
    return path


def load_deployed(
    path: str | os.PathLike, map_location: str | torch.device | None = None, *, trusted: bool = False
) -> nn.Module:
    """Load a model written by :func:`save_deployed`; needs ``torch`` and ``lightning_sparse``, not the training code.

    A deployed model is a pickled module whose traced graph is Python code regenerated at load: unpickling it can
    run any code the file holds, so it is only loaded with ``trusted=True`` (for files you wrote or trust; it
    warns). For a file from elsewhere, deploy again from its checkpoint (``lightning-sparse deploy CKPT OUT``
    reads checkpoints weights-only) or use its compressed export (:func:`lightning_sparse.export.load_compressed`).
    """
    if not trusted:
        raise ValueError(
            f"{path}: a deployed model is a pickled module (its traced graph is Python code), and unpickling it can "
            f"run any code the file holds; load it with `load_deployed(path, trusted=True)` only if you trust where "
            f"it came from, or deploy the model again from its checkpoint"
        )
    warnings.warn(f"unpickling {path} in full (trusted=True): this runs any code the file holds", stacklevel=2)
    model = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a deployed nn.Module")
    return model.eval()


# --- input checks ---------------------------------------------------------------------------------------------


def _check_model(model: Any) -> None:
    """``model`` is an ``nn.Module`` whose weights and buffers are all finite (a NaN weight makes every output NaN,
    and NaN outputs compare equal to nothing: deploy could neither check nor time it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            raise ValueError(f"`model` has non-finite values in {name!r} ({nan} NaN, {inf} infinite of "
                             f"{tensor.numel()}): fix or retrain the model before deploying it")  # fmt: skip


def _as_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` that exists here, or a ``ValueError`` naming it."""
    try:
        checked = torch.device(device)
        torch.empty(0, device=checked)
    except (RuntimeError, TypeError, AssertionError, ValueError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"`device` {device!r} is not a device this machine can run on: {reason}") from None
    return checked


def _as_inputs(example_input: ExampleInput) -> tuple[Tensor, ...]:
    if isinstance(example_input, Tensor):
        inputs: tuple[Any, ...] = (example_input,)
    elif isinstance(example_input, (list, tuple)):
        inputs = tuple(example_input)
    else:
        inputs = ()
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise TypeError(f"`example_input` must be a tensor or a non-empty sequence of tensors, got "
                        f"{type(example_input).__name__}")  # fmt: skip
    for index, x in enumerate(inputs):
        label = "`example_input`" if len(inputs) == 1 else f"`example_input[{index}]`"
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"{label} must have a batch dimension with at least one sample (the kernels are timed "
                             f"at its batch size), got shape {list(x.shape)}")  # fmt: skip
    return inputs


def check_input(model: nn.Module, inputs: tuple[Tensor, ...]) -> Any:
    """The model's outputs on ``inputs``, or a ValueError naming the first layer that rejects them."""
    entered: list[tuple[str, nn.Module]] = []
    names = {module: name for name, module in model.named_modules()}

    def pre_hook(module: nn.Module, args: Any) -> None:
        entered.append((names.get(module, type(module).__name__), module))

    def post_hook(module: nn.Module, args: Any, out: Any) -> None:
        if entered and entered[-1][1] is module:
            entered.pop()

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules() if not list(m.children())]
    handles += [m.register_forward_hook(post_hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            return model(*inputs)
    except Exception as error:
        shapes = ", ".join(str(list(x.shape)) for x in inputs)
        if entered:
            name, module = entered[-1]
            raise ValueError(
                f"`example_input` of shape {shapes} is rejected by layer {name!r} ({module}): {str(error).splitlines()[0]}"
            ) from error
        raise ValueError(f"`example_input` of shape {shapes} is rejected by the model: {error}") from error
    finally:
        for handle in handles:
            handle.remove()


def _probe_inputs(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
    """A second, different input of the same shape (floating inputs only), so a check cannot pass by coincidence."""
    if not all(x.is_floating_point() for x in inputs):
        return None
    generator = torch.Generator(device="cpu").manual_seed(0)
    return tuple(
        x + (x.float().std() if x.numel() > 1 else 1.0) * torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        for x in inputs
    )


def _run(model: nn.Module, inputs: tuple[Tensor, ...]) -> Any:
    with torch.inference_mode():
        return model(*inputs)


_PLAIN = (Tensor, int, float, bool, complex, str, bytes, type(None), torch.device, torch.dtype)


def _opens(leaf: Any) -> bool:
    """Whether an output leaf is an object to compare by its attributes (a cache) rather than by ``==``."""
    return not isinstance(leaf, _PLAIN) and hasattr(leaf, "__dict__")


def _leaves(value: Any, depth: int = 3) -> list[Any]:
    """The pytree leaves of a model's output, with objects pytree does not know opened into their attributes.

    A Hugging Face decoder with ``use_cache=True`` returns a ``DynamicCache`` beside its logits; two caches holding
    equal key/value tensors are different objects, so they are compared by type and by the leaves of their attributes
    (``layers`` → each layer's ``keys`` and ``values``), ``depth`` objects deep.
    """
    leaves: list[Any] = []
    for leaf in tree_flatten(value)[0]:
        if depth == 0 or not _opens(leaf):
            leaves.append(leaf)
        else:
            leaves.append(type(leaf))
            leaves.extend(_leaves(sorted(vars(leaf).items()), depth - 1))
    return leaves


def _opened(output: Any) -> list[str]:
    """Type names of the objects in ``output`` that :func:`_leaves` opens (a cache), for the reason a check failed."""
    return sorted({type(leaf).__name__ for leaf in tree_flatten(output)[0] if _opens(leaf)})


def _same(got: Any, want: Any) -> bool:
    got_leaves, want_leaves = _leaves(got), _leaves(want)
    if len(got_leaves) != len(want_leaves):
        return False
    for a, b in zip(got_leaves, want_leaves):
        if isinstance(b, Tensor):
            if not isinstance(a, Tensor) or a.shape != b.shape or not outputs_match(a, b):
                return False
        elif a != b:
            return False
    return True


def _differed(what: str, reference: Any) -> str:
    """Why a rebuilt model was not kept; names a cache in the outputs, whose tensors shrink when heads are removed."""
    caches = _opened(reference)
    if not caches:
        return f"{what} outputs differed from the original"
    return (
        f"{what} outputs differed from the original (they include {', '.join(caches)}: a key/value cache holds a slice per "
        f"attention head, so removing heads changes its shape; deploy with the cache off, e.g. `model.config.use_cache = False`)"
    )


# --- steps ----------------------------------------------------------------------------------------------------


def _layer_rows(model: nn.Module) -> list[LayerReport]:
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, LAYERS):
            weight = module.weight.detach()
            sparsity = global_sparsity([weight])
            rows.append(LayerReport(name, type(module).__name__, tuple(weight.shape), sparsity, _pattern(weight)))
    return rows


def _pattern(weight: Tensor) -> str:
    if not bool((weight == 0).any()):
        return "dense"
    zero = thinning.zero_channels(weight)
    nonzero_rows = weight.reshape(weight.shape[0], -1)[~zero]
    if zero.any() and bool((nonzero_rows != 0).all()):
        return f"channel ({int(zero.sum())}/{zero.numel()} zero)"
    pattern = nm_pattern(weight)
    if pattern is not None:
        return f"{pattern[0]}:{pattern[1]}"
    return "unstructured" if not zero.any() else f"unstructured + {int(zero.sum())} zero channels"


def _trace(model: nn.Module, inputs: tuple[Tensor, ...], report: DeployReport) -> tuple[nn.Module, bool]:
    """A ``torch.fx`` GraphModule of ``model`` with shapes recorded, or a copy of the model where tracing fails."""
    try:
        model = copy.deepcopy(model)  # the graph module shares the modules it calls whole: swapping a layer inside one must not touch the original
        gm = fx.GraphModule(model, groups.LeafTracer().trace(model), type(model).__name__)
        for node in gm.graph.nodes:
            node.type = None  # string annotations ("Tensor") would make the module unpicklable
        gm.recompile()
        ShapeProp(gm).propagate(*inputs)
        return gm.eval(), True
    except Exception as error:  # fx cannot trace data-dependent control flow and more; deploy still swaps kernels
        report.notes.append(
            f"torch.fx could not trace {type(model).__name__} ({type(error).__name__}: {str(error).splitlines()[0][:160]}); "
            "the deployed model keeps its class, so loading it needs that class's code"
        )
        return copy.deepcopy(model), False


def _thin_all(gm: fx.GraphModule, inputs: tuple[Tensor, ...], reference: Any, probe: Any, probe_reference: Any,
              report: DeployReport) -> None:  # fmt: skip
    """Thin every producer with zero channels, last first, each checked against the original outputs."""
    producers = [
        node for node in gm.graph.nodes
        if node.op == "call_module" and thinning.is_producer(gm.get_submodule(node.target))
        and bool(thinning.zero_channels(gm.get_submodule(node.target).weight).any())
    ]  # fmt: skip
    for node in reversed(producers):  # consumers are then still plain layers when their producer is thinned
        row = _row(report, str(node.target))
        flow = thinning.follow(gm, node)
        if isinstance(flow, str):
            _explain(row, f"zero channels kept: {flow}")
            continue
        values = _record(gm, inputs, [c.source for c in flow.consumers])
        result = thinning.thin(gm, flow, values)
        if isinstance(result, str):
            _explain(row, f"zero channels kept: {result}")
            continue
        new, detail = result
        old = {target: gm.get_submodule(target) for target in new}
        for target, module in new.items():
            thinning.set_module(gm, target, module)
        if not _same(_run(gm, inputs), reference) or (probe is not None and not _same(_run(gm, probe), probe_reference)):
            for target, module in old.items():
                thinning.set_module(gm, target, module)
            _explain(row, "zero channels kept: the thinned model's outputs differed from the original (undone)")
            continue
        _explain(row, detail)
        row.deployed_as = "thinned"
        for target, module in new.items():
            consumer = _row_or_none(report, target)
            if consumer is not None and consumer is not row:
                _explain(consumer, f"input channels of {node.target} removed")
                if consumer.deployed_as == "dense":
                    consumer.deployed_as = "thinned"


def _cut_groups(gm: nn.Module, inputs: tuple[Tensor, ...], reference: Any, probe: Any, probe_reference: Any,
                report: DeployReport, traced: bool = True) -> None:  # fmt: skip
    """Remove the coupled channel groups (residual streams, concats) whose channels are zero in every member."""

    def matches() -> bool:
        return _same(_run(gm, inputs), reference) and (probe is None or _same(_run(gm, probe), probe_reference))

    try:
        cuts, layers = residual.cut_groups(gm, inputs, matches)
    except ValueError as error:  # a group whose members disagree in size: leave it to the per-producer pass
        report.notes.append(f"channel groups not cut: {error}")
        return
    report.groups = [cut.describe() for cut in cuts]
    if layers and traced:
        ShapeProp(gm).propagate(*inputs)  # the shapes the per-producer pass reads are the cut model's
    for cut in cuts:
        if not cut.removed or not layers:
            continue
        for name in cut.group.layers:
            row = _row_or_none(report, name)
            if row is not None:
                _explain(row, f"channel group {cut.group.index}: {cut.detail}")
                row.deployed_as = "thinned"
        for name in cut.group.consumers:
            row = _row_or_none(report, name)
            if row is not None:
                _explain(row, f"input channels of group {cut.group.index} removed")
                row.deployed_as = "thinned"


def _remove_groups(original: nn.Module, inputs: tuple[Tensor, ...], reference: Any, probe: Any, probe_reference: Any,
                   report: DeployReport, plan: StructurePlan | None = None) -> nn.Module:  # fmt: skip
    """A copy of ``original`` with its all-zero attention heads and MLP neurons removed (:mod:`.groups`; those a
    ``plan`` drops), or ``original`` itself when there are none or the rebuilt model's outputs differ."""
    pruned = copy.deepcopy(original)
    notes: list[str] = []
    report.removed_groups = groups.remove_zero_groups(pruned, notes, plan)
    if not any(row.removed for row in report.removed_groups):
        return original
    try:
        failed = not _same(_run(pruned, inputs), reference) or (probe is not None and not _same(_run(pruned, probe), probe_reference))
        why = _differed("the rebuilt model's", reference) + ": kept"
    except Exception as error:  # a forward that reads a count the surgery could not state (a shared config)
        failed, why = True, f"the rebuilt model fails ({type(error).__name__}: {str(error).splitlines()[0][:160]}): kept"
        if any("kept different numbers of units" in note for note in notes):
            why += ("; its layers kept different numbers of units, which a forward reading its counts from the model's "
                    "one config cannot run (Phi-3 splits qkv_proj at config.num_attention_heads): prune with "
                    "distribution='uniform'")  # fmt: skip
    if failed:
        for row in report.removed_groups:
            row.reason, row.removed, row.rebuilt_as = why, [], ""
        report.notes.append(f"heads and neurons not removed: {why}")
        return original
    report.notes += notes
    for row in report.removed_groups:
        for member in row.members if row.removed else []:
            layer = _row_or_none(report, member.rpartition(".")[0])
            if layer is not None:
                _explain(layer, f"{len(row.removed)} of the {row.before} {row.kind}s of {row.module} removed")
                layer.deployed_as = "thinned"
    return pruned


def _record(gm: fx.GraphModule, inputs: tuple[Tensor, ...], nodes: list[fx.Node]) -> dict[fx.Node, Tensor]:
    """The values of ``nodes`` when ``gm`` runs on ``inputs``."""
    wanted = set(nodes)
    values: dict[fx.Node, Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n in wanted:
                values[n] = out
            return out

    with torch.inference_mode():
        Recorder(gm).run(*inputs)
    return values


def _choose_kernels(model: nn.Module, inputs: tuple[Tensor, ...], kernel: str, repeats: int, report: DeployReport) -> dict[str, nn.Module]:
    """Give each Linear with zeros the faster of dense and sparse as timed on its real input, all in one forward.

    At a layer's first call (a forward hook), its forms are timed on the input it got (:func:`.kernels.choose`,
    sharing times between layers of the same shape, input and non-zeros), the chosen module replaces it, and the
    forward goes on with the chosen module's output, so the next layers are timed on what they will really get
    (a sparse layer's output is a transposed view). Returns ``{name: the dense layer}`` of the layers made sparse.
    """
    names = {module: name for name, module in model.named_modules() if type(module) is nn.Linear and bool((module.weight == 0).any())}
    chosen: dict[str, nn.Module] = {}
    swapped: dict[str, nn.Module] = {}
    shared: dict[tuple, list[kernels.Timed]] = {}

    timing: list[nn.Module] = []  # the layer being timed: its own calls while timing pass through

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        name = names[module]
        if timing or not args or not isinstance(args[0], Tensor):
            return output
        if name not in chosen:
            timing.append(module)
            try:
                choice = kernels.choose(module, args[0], kernel, repeats, shared, name)
            finally:
                timing.clear()
            chosen[name] = choice.module
            row = _row_or_none(report, name)
            if row is not None:
                row.dense_ms, row.sparse_ms = choice.dense_ms, choice.sparse_ms
                _explain(row, choice.reason)
            if choice.form != "dense":
                thinning.set_module(model, name, choice.module)
                swapped[name] = module
                if row is not None:
                    row.deployed_as = choice.form
        return output if chosen[name] is module else chosen[name](args[0])

    handles = [module.register_forward_hook(hook) for module in names]
    try:
        _run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return swapped


def _transpose_chains(gm: fx.GraphModule, inputs: tuple[Tensor, ...], kernel: str, repeats: int, report: DeployReport) -> dict[str, None]:
    """Run each chain Linear → elementwise* → Linear … on transposed activations where that is measured faster;
    returns the names of the chains put in (``{name: None}``: there is no single dense module to put back)."""
    used: dict[str, None] = {}
    for path in chains.find_chains(gm):
        x = _record(gm, inputs, [path[0].args[0]])[path[0].args[0]]
        if not isinstance(x, Tensor) or x.dim() < 1:
            continue
        result = chains.build(gm, path, x, kernel, repeats)
        report.chains.append(result.describe())
        if not result.used:
            continue
        for choice in result.layers:
            row = _row_or_none(report, choice.name)
            if row is None:
                continue
            thinned = row.deployed_as == "thinned" or _deployed_shape(gm.get_submodule(choice.name)) != row.shape
            row.deployed_as = choice.form if choice.form != "dense" else ("thinned" if thinned else "dense")
            row.dense_ms, row.sparse_ms = choice.dense_ms, choice.sparse_ms
            row.deployed_shape = tuple(getattr(result.module, f"weight{result.layers.index(choice)}").shape)
            _explain(row, f"in {' → '.join(result.names)}, run on transposed activations: {choice.reason}")
        used[chains.replace(gm, path, result.module)] = None
    return used


def _describe_unchanged(model: nn.Module, report: DeployReport) -> None:
    """Fill in each layer's deployed shape, and say why sparse layers that were neither thinned nor swapped stay dense."""
    for row in report.layers:
        try:
            module = model.get_submodule(row.name)
        except AttributeError:  # a traced graph drops modules the forward never calls
            _explain(row, "not called by forward: dropped from the deployed model")
            row.deployed_as = "unused"
            continue
        row.deployed_shape = row.deployed_shape or _deployed_shape(module)
        if row.deployed_as == "dense" and row.pattern != "dense":
            if row.kind.startswith("Conv"):
                _explain(row, "PyTorch has no sparse convolution kernel: kept dense")
            elif not row.reason:
                _explain(row, "kept dense")


def _deployed_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, (SparseLinear, SemiStructuredLinear)):
        return (module.out_features, module.in_features)
    if isinstance(module, FoldedConv):
        return tuple(module.conv.weight.shape)
    return tuple(module.weight.shape)


def _row(report: DeployReport, name: str) -> LayerReport:
    return report.layer(name)


def _row_or_none(report: DeployReport, name: str) -> LayerReport | None:
    try:
        return report.layer(name)
    except KeyError:
        return None


def _explain(row: LayerReport, text: str) -> None:
    row.reason = f"{row.reason}; {text}" if row.reason else text
