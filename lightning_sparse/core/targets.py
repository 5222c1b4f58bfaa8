"""Which parameters are sparsified: weights of Linear/Conv layers by default, glob patterns to adjust."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import TypeVar

from torch import nn

V = TypeVar("V")

#: Module types whose ``weight`` is pruned by default. Biases, norms and embeddings are not.
DEFAULT_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_names(model: nn.Module) -> list[str]:
    """Names of the parameters pruned by default: the ``weight`` of every Linear and Conv1d/2d/3d."""
    names = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, DEFAULT_MODULES) and isinstance(weight, nn.Parameter) and id(weight) not in seen:
            seen.add(id(weight))  # tied weights are pruned once, under their first name
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def select_targets(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> dict[str, nn.Parameter]:
    """Return ``{name: parameter}`` to sparsify, in model order.

    Without ``include`` the targets are :func:`prunable_names`; with it, any parameter whose name matches
    one of the glob patterns (so a user may opt in embeddings or biases). ``exclude`` globs then remove names.
    Raises ``ValueError`` when an include pattern matches nothing or when nothing is left to prune.
    """
    params = dict(model.named_parameters())
    default = prunable_names(model)
    if include:
        for pattern in include:
            if not any(fnmatchcase(name, pattern) for name in params):
                raise ValueError(
                    f"`include` pattern {pattern!r} matches no parameter. Prunable by default: {default}; "
                    f"all parameters: {list(params)}"
                )
        names = [name for name in params if _matches(name, include)]
    else:
        names = default
    if exclude:
        names = [name for name in names if not _matches(name, exclude)]
    if not names:
        raise ValueError(
            f"Nothing to prune in {type(model).__name__}: no Linear/Conv weights are selected "
            f"(include={list(include or [])}, exclude={list(exclude or [])}). Prunable by default: {default}"
        )
    return {name: params[name] for name in names}


def per_layer(argument: str, value: V | Mapping[str, V], names: Sequence[str]) -> dict[str, V]:
    """Expand a per-layer setting: one value for every name, or ``{glob: value}`` (first matching glob wins).

    Names that no glob matches are left out, so a mapping also selects the layers. A glob that matches
    none of ``names`` is an error naming ``argument`` and listing the names.
    """
    if not isinstance(value, Mapping):
        return {name: value for name in names}
    result: dict[str, V] = {}
    for pattern, setting in value.items():
        matched = [name for name in names if fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"`{argument}` pattern {pattern!r} matches no selected parameter; selected: {list(names)}")
        for name in matched:
            result.setdefault(name, setting)
    return {name: result[name] for name in names if name in result}


def each_setting(argument: str, value: V | Mapping[str, V]) -> list[tuple[str, V]]:
    """``(label, value)`` pairs to validate a per-layer setting: ``argument`` itself, or ``argument['glob']`` for
    each entry of a mapping, so an error names exactly the entry at fault."""
    if isinstance(value, Mapping):
        return [(f"{argument}[{pattern!r}]", each) for pattern, each in value.items()]
    return [(argument, value)]
