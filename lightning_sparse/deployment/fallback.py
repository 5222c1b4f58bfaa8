"""Deploy never breaks a model that runs, and never returns one measurably slower than its input.

* :func:`failure` runs a model the ways users call it: with autograd off (``torch.no_grad``, where PyTorch takes
  fused paths such as ``nn.TransformerEncoderLayer``'s ``_transformer_encoder_layer_fwd``, which reads its Linear
  layers' weights itself and has no sparse kernel) and with autograd on (forward and backward: a deployed model is
  differentiable in its inputs and dense parameters; its sparse weights are fixed buffers). On an error it names
  the innermost module of the model on the traceback, so deploy can put that module's layers back to dense.
* :func:`decide` picks which measured variant deploy returns, as a pure function of the measured times, so the
  rule is tested without a clock.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_sparse.deployment.kernels import MARGIN, MIN_ROUNDS, timings, verdict

MODES = ("autograd off", "autograd on")
VARIANTS = ("input", "dense layers", "deployed")
#: Whole-model runs of each variant before a comparison counts as clear (more than for one layer: a wrong call
#: here undoes a whole deployment, and a whole forward is noisier than one product).
ROUNDS = 2 * MIN_ROUNDS


@dataclass(frozen=True)
class Failure:
    """How a model failed: the mode, the innermost module of the model on the traceback ("" for the model's own
    forward) and its class, and the error's first line."""

    mode: str
    module: str
    kind: str
    error: str

    def describe(self) -> str:
        where = f"{self.module!r} ({self.kind})" if self.module else f"the model ({self.kind})"
        return f"{where} fails with {self.mode}: {self.error}"


def failure(model: nn.Module, inputs: Sequence[Tensor], modes: Sequence[str] = MODES) -> Failure | None:
    """The first way ``model(*inputs)`` fails in ``modes`` (``autograd off``: under ``torch.no_grad``; ``autograd
    on``: floating inputs requiring gradients, then a backward from the floating outputs), or ``None``."""
    for mode in modes:
        try:
            if mode == "autograd off":
                with torch.no_grad():
                    model(*inputs)
            else:
                _forward_backward(model, inputs)
        except Exception as error:  # noqa: BLE001 - whatever a kernel raises, it is what the user would see
            module, kind = _raising(model, error)
            return Failure(mode, module, kind, f"{type(error).__name__}: {_first_sentence(str(error))}")
    return None


def _first_sentence(message: str) -> str:
    line = (message.splitlines() or [""])[0]
    end = line.find(". ")
    return (line[: end + 1] if end > 0 else line)[:200]


def _forward_backward(model: nn.Module, inputs: Sequence[Tensor]) -> None:
    with torch.enable_grad():
        args = [x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs]
        outputs = [y for y in tree_flatten(model(*args))[0] if isinstance(y, Tensor) and y.requires_grad]
        if outputs:
            torch.autograd.backward([y.float().sum() for y in outputs])
    model.zero_grad(set_to_none=True)  # the check's gradients are not the user's


def _raising(model: nn.Module, error: BaseException) -> tuple[str, str]:
    """Name and class of the innermost module of ``model`` whose method is on ``error``'s traceback."""
    names = {id(module): name for name, module in model.named_modules()}
    found: nn.Module = model
    traceback = error.__traceback__
    while traceback is not None:
        owner = traceback.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = owner
        traceback = traceback.tb_next
    return names[id(found)], type(found).__name__


def covers(module: str, layer: str) -> bool:
    """Whether ``layer`` is ``module`` or inside it ("" is the whole model)."""
    return module == "" or layer == module or layer.startswith(module + ".")


@dataclass(frozen=True)
class Decision:
    """The variant deploy returns (``input``, ``dense layers`` or ``deployed``) and why, with the times."""

    variant: str
    reason: str


def _ms(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def decide(samples: Mapping[str, Sequence[float]], kernel: str = "auto") -> Decision:
    """Which model deploy returns, from interleaved whole-model times (ms per run) on the example input.

    ``samples`` holds ``input`` (the model as given), ``deployed`` and, when deploy chose sparse kernels (or
    transposed chains), ``dense layers`` (the same deployed model with every layer dense again).

    With ``kernel="auto"``:

    1. The sparse kernels stay only if the whole model is faster with them: median ``deployed`` <
       :data:`~lightning_sparse.deployment.kernels.MARGIN` × median ``dense layers`` (the rule each layer passed
       alone; what is faster alone can be slower in the model, e.g. from the layout of its outputs).
    2. The input model is returned if it is measurably faster than the chosen one: at least :data:`ROUNDS` runs
       each, its interquartile range below ``MARGIN`` × the other's
       (:func:`~lightning_sparse.deployment.kernels.verdict`). Removed heads and channels are otherwise kept: they
       were asked for by training, and save memory where the times tie.

    ``kernel="sparse"`` and ``kernel="dense"`` are explicit requests (memory, or structure only): the deployed model
    is returned, and the reason says when it is slower.
    """
    deployed = samples["deployed"]
    compared = f"{_ms(deployed):.4f} ms vs {_ms(samples['input']):.4f} ms for the input model"
    if kernel != "auto":
        slower = verdict(samples["input"], deployed) is True
        return Decision("deployed", f"kernel={kernel!r} asked for: deployed {compared}" + (" (slower)" if slower else ""))
    chosen, why = "deployed", []
    if "dense layers" in samples:
        dense = samples["dense layers"]
        ratio = _ms(dense) / _ms(deployed)
        if _ms(deployed) < MARGIN * _ms(dense):
            why.append(f"sparse kernels kept: the whole model runs {_ms(deployed):.4f} ms with them vs {_ms(dense):.4f} ms with every layer dense ({ratio:.2f}×)")
        else:
            chosen = "dense layers"
            why.append(f"sparse kernels dropped, every layer dense: the whole model runs {_ms(deployed):.4f} ms with them vs "
                       f"{_ms(dense):.4f} ms without ({ratio:.2f}×, not {1 / MARGIN:.2f}× faster), though each sparse layer was faster alone")  # fmt: skip
    if verdict(samples["input"], samples[chosen], min_runs=ROUNDS) is True:
        return Decision("input", "; ".join(why + [
            f"the input model is returned: it is measurably faster ({_ms(samples['input']):.4f} ms vs {_ms(samples[chosen]):.4f} ms "
            f"for the {'deployed model' if chosen == 'deployed' else 'deployed model with dense layers'})"]))  # fmt: skip
    verb = "faster than" if _ms(samples[chosen]) < _ms(samples["input"]) else "not measurably slower than"
    return Decision(chosen, "; ".join(why + [f"{'deployed' if chosen == 'deployed' else 'with dense layers'} {verb} the input: "
                                             f"{_ms(samples[chosen]):.4f} ms vs {_ms(samples['input']):.4f} ms"]))  # fmt: skip


def settled(samples: Mapping[str, Sequence[float]], kernel: str = "auto") -> bool:
    """Whether more runs would hardly change :func:`decide`'s answer.

    Each comparison it makes must be clear (:func:`~lightning_sparse.deployment.kernels.verdict`, on
    :data:`~lightning_sparse.deployment.kernels.MIN_ROUNDS` runs) or a tie (medians within the margin): first the
    deployed model against the same with dense layers, then the input against the one that rule keeps. "The input is
    faster" undoes the deployment, so it is only settled on :data:`ROUNDS` runs, as :func:`decide` requires.
    """
    if kernel != "auto":
        return True
    chosen = "deployed"
    if "dense layers" in samples:
        deployed, dense = samples["deployed"], samples["dense layers"]
        if verdict(deployed, dense) is None and not _tie(deployed, dense):
            return False
        chosen = "deployed" if _ms(deployed) < MARGIN * _ms(dense) else "dense layers"
    faster = verdict(samples["input"], samples[chosen])
    if faster is True:
        return len(samples["input"]) >= ROUNDS
    return faster is False or _tie(samples["input"], samples[chosen])


def _tie(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) >= MIN_ROUNDS and MARGIN < _ms(a) / _ms(b) < 1 / MARGIN


def measure(variants: Mapping[str, nn.Module], inputs: Sequence[Tensor], repeats: int, device: torch.device,
            kernel: str = "auto", same: Mapping[str, str] | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Interleaved whole-model times of each variant on ``inputs`` (inference mode), ``repeats`` rounds at most,
    fewer once :func:`settled`. ``same``: variants that are the same model as another
    (``{"dense layers": "input"}`` when deploy changed nothing but kernels), timed once and reported under both."""
    same = dict(same or {})
    functions: dict[str, Any] = {name: (lambda m=model: m(*inputs)) for name, model in variants.items() if name not in same}

    def complete(samples: dict[str, list[float]]) -> dict[str, list[float]]:
        return {**samples, **{name: samples[twin] for name, twin in same.items()}}

    with torch.inference_mode():
        samples = timings(functions, repeats, device, warmup=1, settled=lambda t: settled(complete(t), kernel))
    return complete(samples)
