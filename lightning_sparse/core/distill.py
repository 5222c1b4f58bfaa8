"""Knowledge distillation losses for recovery training: logit KL at a temperature and SquareHead's hidden-state MSE.

- **Logits** (Hinton, Vinyals & Dean 2015, arXiv 1503.02531): ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``, averaged
  over every position (all leading dimensions of the logits); ``T²`` keeps the gradient's scale independent of ``T``.
- **SquareHead** (Kurtić et al. 2023, arXiv 2310.06927, Eq. 2): per layer ``MSE(h_s, h_t) / Var(h_t)``, averaged
  over the layers, so that layers of different scale weigh alike.

The recovery loss is ``(1 - α) · L_user + α · T² · KL + β · L_hidden``; ``α = 0`` and ``β = 0`` give ``L_user``
itself (the same tensor, not a sum with zeros).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def kd_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(z_t/T) ‖ softmax(z_s/T))`` averaged over positions (without the ``T²`` factor), in fp32."""
    classes = student.shape[-1]
    s = torch.log_softmax(student.float().reshape(-1, classes) / temperature, dim=-1)
    t = torch.log_softmax(teacher.detach().float().reshape(-1, classes) / temperature, dim=-1)
    return nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


def squarehead_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], eps: float = 1e-8) -> Tensor:
    """SquareHead: the mean over layers of ``MSE(h_s, h_t) / Var(h_t)``."""
    if not student or len(student) != len(teacher):
        raise ValueError(f"SquareHead needs one teacher hidden state per student one, got {len(student)} and {len(teacher)}")
    terms = []
    for s, t in zip(student, teacher):
        t = t.detach().float()
        terms.append(nn.functional.mse_loss(s.float(), t) / (t.var() + eps))
    return torch.stack(terms).mean()


def recovery_loss(loss: Tensor, kl: Tensor, temperature: float, alpha: float, hidden: Tensor | None = None,
                  hidden_weight: float = 0.0) -> Tensor:  # fmt: skip
    """``(1 - α) · loss + α · T² · kl + β · hidden``; ``loss`` itself when ``α = β = 0``."""
    if alpha == 0 and (hidden is None or hidden_weight == 0):
        return loss
    total = (1 - alpha) * loss + alpha * temperature**2 * kl.to(loss.dtype)
    if hidden is not None and hidden_weight:
        total = total + hidden_weight * hidden.to(loss.dtype)
    return total


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def as_logits(output: Any, logits: Callable[[Any], Tensor] | None = None, where: str = "the model") -> Tensor:
    """The logits in a forward's ``output``: ``logits(output)`` if given, else the output tensor itself, or its
    ``.logits`` (Hugging Face ``ModelOutput``) or ``["logits"]``. Refuses anything but a floating tensor of shape
    ``(..., classes)`` with ``classes >= 2``, saying how to give a function that returns them."""
    if logits is not None:
        value = logits(output)
    elif isinstance(output, Tensor):
        value = output
    elif hasattr(output, "logits"):
        value = output.logits
    elif isinstance(output, Mapping) and "logits" in output:
        value = output["logits"]
    else:
        value = output
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() < 2 or value.shape[-1] < 2:
        raise ValueError(
            f"Distillation: the output of {where} is {_describe(value)}, not logits (a floating tensor of shape "
            f"(..., classes)). Give `logits=lambda output: ...` returning them (e.g. `output[0]`), or `module=` naming "
            f"the submodule whose forward returns them"
        )
    return value


def first_tensor(output: Any) -> Tensor:
    """A hidden state: the output itself, or the first tensor of a tuple/list (a Hugging Face layer's output)."""
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, Tensor):
        raise ValueError(f"Distillation: a hidden-state layer returned {_describe(output)}, not a tensor")
    return output


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the entries of the ``nn.ModuleList`` holding the most parameters (a transformer's layers): the default
    hidden states SquareHead compares."""
    best: list[str] = []
    best_size = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = [f"{name}.{i}" if name else str(i) for i in range(len(module))], size
    return best
