"""Which parameters are compressed: every weight that does a matrix product by default (Linear, Conv, ConvTranspose,
attention, LSTM/GRU/RNN, Bilinear, GPT-2 Conv1D, MoE experts; a MoE router stays dense: see :mod:`~lightning_sparse.core.layouts`), glob patterns to adjust,
every name of a tied tensor accepted.

A model's parameters as they really are: one tensor may be reached by several names (tied input/output embeddings,
``head.weight = tok.weight`` in GPT-2 and nanoGPT). ``model.named_parameters()`` yields it once, under its first name,
while ``state_dict()`` holds every name. Here a tied tensor is one target with one mask, keyed by its first name (the
one ``named_parameters()`` gives), and every alias may be used in ``include``/``exclude`` and ``{glob: value}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_sparse.core.counting import global_sparsity
from lightning_sparse.core.layouts import RECURRENT_KINDS, ROUTER_KIND, Layout, matmul_layout, moe_routers

V = TypeVar("V")

#: The layers whose ``weight`` deploy's sparse kernels take (Linear, Conv). The default targets are wider: every weight
#: that does a matrix product (:func:`~lightning_sparse.core.layouts.matmul_layout`: also ConvTranspose, attention,
#: LSTM/GRU/RNN, Bilinear, Hugging Face's ``Conv1D`` and MoE experts). Biases, norms, embeddings and MoE routers are
#: not pruned by default.
DEFAULT_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm,
)  # fmt: skip


@dataclass(frozen=True)
class Role:
    """What one parameter is to the module holding it.

    ``kind`` names the layer type (``Linear``, ``Conv2d``, ``ConvTranspose2d``, ``MultiheadAttention``, ``LSTM``,
    ``GRU``, ``Bilinear``, ``Conv1D``, ``MoE experts``, ``MoE router``, ``Embedding``, ``norm``, ``bias``, ``other``);
    ``default`` says whether it is
    compressed without ``include``; ``output_axis`` is the weight's output-channel axis (0; 1 for GPT-2's Conv1D,
    stored (in, out), and a ConvTranspose, stored (in, out/groups, k…)), ``None`` for a table with no input/output
    axes (an embedding), a bias or a norm; ``layout`` is the whole :class:`~lightning_sparse.core.layouts.Layout` of a
    weight that does a matrix product (``None`` otherwise).
    """

    kind: str
    default: bool
    output_axis: int | None
    layout: Layout | None = None


def _role(module: nn.Module, attribute: str, param: nn.Parameter, routers: set[int]) -> Role:
    if id(module) in routers and attribute == "weight":  # a MoE router: a matrix product, dense unless included
        found = matmul_layout(module, attribute)
        return Role(ROUTER_KIND, False, 0, found[1] if found is not None else Layout())
    found = matmul_layout(module, attribute)
    if found is not None:
        kind, layout = found
        return Role(kind, True, layout.output, layout)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and attribute == "weight":
        return Role("Embedding", False, None)
    if isinstance(module, NORM_MODULES):
        return Role("norm", False, None)
    if "bias" in attribute:
        return Role(_bias_kind(module), False, None)
    return Role("other", False, 0 if param.dim() >= 2 else None)


def _bias_kind(module: nn.Module) -> str:
    """``bias``, or ``LSTM bias`` (``GRU bias``, …) for a recurrent layer's ``bias_ih``/``bias_hh``, so the set-up
    summary names what an ``include`` glob such as ``"lstm.*"`` opted in."""
    found = next((matmul_layout(module, name) for name, _ in module.named_parameters(recurse=False)), None)
    return f"{found[0]} bias" if found is not None and found[0] in RECURRENT_KINDS else "bias"


def parameter_roles(model: nn.Module) -> dict[str, tuple[nn.Parameter, tuple[str, ...], Role]]:
    """Every distinct parameter tensor of ``model`` once: ``{first name: (parameter, all its names, role)}``.

    A tensor reached through several modules (tied weights) takes the role that keeps it safest: an embedding's table
    stays an embedding (dense by default) even when a Linear head shares it, and its axes are those of the layer that
    uses it as a matrix.
    """
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    roles: dict[int, list[Role]] = {}
    routers = moe_routers(model)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attribute, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if param is None:
                continue
            key = id(param)
            full = f"{module_name}.{attribute}" if module_name else attribute
            params[key] = param
            if full not in names.setdefault(key, []):
                names[key].append(full)
            roles.setdefault(key, []).append(_role(module, attribute, param, routers))
    # named_parameters() order (and first names) is the order the model and its state_dict use
    order = {name: index for index, (name, _) in enumerate(model.named_parameters(remove_duplicate=False))}
    result: dict[str, tuple[nn.Parameter, tuple[str, ...], Role]] = {}
    for key in sorted(names, key=lambda k: min(order.get(n, len(order)) for n in names[k])):
        aliases = tuple(sorted(names[key], key=lambda n: order.get(n, len(order))))
        result[aliases[0]] = (params[key], aliases, _merge(roles[key]))
    return result


def _merge(roles: list[Role]) -> Role:
    if len(roles) == 1:
        return roles[0]
    kinds = {r.kind for r in roles}
    matrix = next((r for r in roles if r.default), None)
    if "Embedding" in kinds:  # tied input/output embeddings: an embedding, unless included
        return Role("Embedding", False, matrix.output_axis if matrix else None, matrix.layout if matrix else None)
    return matrix or roles[0]


def _plain_layout(output_axis: int | None) -> Layout | None:
    """The layout of a weight with no table entry: its outputs on ``output_axis`` (no axes: none)."""
    return None if output_axis is None else Layout(output_axis)


class Targets(dict):
    """``{name: parameter}`` selected for compression (first names, in model order), with every alias of each tensor,
    its output axis and its :class:`~lightning_sparse.core.layouts.Layout` (``None`` for a tensor that does no matrix
    product): what :func:`per_layer` matches globs against, what tables print and what structure follows."""

    def __init__(self, params: Mapping[str, nn.Parameter], aliases: Mapping[str, Sequence[str]], axes: Mapping[str, int | None],
                 kinds: Mapping[str, str] | None = None, layouts: Mapping[str, Layout | None] | None = None) -> None:  # fmt: skip
        super().__init__(params)
        self.aliases = {name: tuple(aliases.get(name, (name,))) for name in params}
        self.output_axis = {name: axes.get(name, 0) for name in params}
        self.kinds = {name: (kinds or {}).get(name, "other") for name in params}
        given = layouts or {}
        self.layouts = {name: given[name] if name in given else _plain_layout(self.output_axis[name]) for name in params}

    def subset(self, names: Iterable[str]) -> Targets:
        """The targets named in ``names``, in this order (aliases and axes kept)."""
        names = list(names)
        return Targets({n: self[n] for n in names}, self.aliases, self.output_axis, self.kinds, self.layouts)

    def rebound(self, params: Mapping[str, nn.Parameter]) -> Targets:
        """The same targets over new tensors for the same names (a sharding strategy replaced them)."""
        return Targets({n: params[n] for n in self}, self.aliases, self.output_axis, self.kinds, self.layouts)

    def label(self, name: str) -> str:
        """``"tok.weight (= head.weight)"`` for a tied tensor, the name alone otherwise."""
        others = [alias for alias in self.aliases.get(name, (name,)) if alias != name]
        return f"{name} (= {', '.join(others)})" if others else name


def as_patterns(argument: str, value: str | Sequence[str] | None) -> list[str] | None:
    """``include``/``exclude`` as a list of glob patterns: one string is one pattern (``exclude="net.5.weight"``),
    not a sequence of one-character patterns."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable) or not all(isinstance(each, str) for each in value):
        raise ValueError(f"`{argument}` must be a glob pattern or a list of them (parameter names), got {value!r}")
    return list(value) or None


def _matches(names: Sequence[str], patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for name in names for pattern in patterns)


def prunable_names(model: nn.Module) -> list[str]:
    """Names of the parameters compressed by default: every weight that does a matrix product (Linear, Conv1d/2d/3d,
    ConvTranspose1d/2d/3d, ``nn.MultiheadAttention``'s ``in_proj_weight`` or ``q/k/v_proj_weight``, LSTM/GRU/RNN and
    their cells' ``weight_ih``/``weight_hh``/``weight_hr``, Bilinear, Hugging Face ``Conv1D``, the 3-D weights of
    mixture-of-experts modules (not their router), and kinds added by
    :func:`~lightning_sparse.core.layouts.register_layout`).
    A tied tensor is listed once, under its first name; one that is also an embedding's table is not listed."""
    return [name for name, (_, _, role) in parameter_roles(model).items() if role.default]


def _all_names(roles: Mapping[str, tuple[nn.Parameter, tuple[str, ...], Role]]) -> str:
    return ", ".join(" = ".join(aliases) for _, aliases, _ in roles.values())


def _refuse_unmatched(model: nn.Module, argument: str, pattern: str, roles: Any, default: list[str]) -> None:
    """The error for an ``include``/``exclude`` glob that matches no parameter (a typo, or a buffer's name)."""
    buffers = [name for name, _ in model.named_buffers(remove_duplicate=False) if fnmatchcase(name, pattern)]
    if buffers:
        raise ValueError(
            f"`{argument}` pattern {pattern!r} matches only buffers, which are not trained weights: {buffers}. "
            f"Parameters: {_all_names(roles)}"
        )
    raise ValueError(
        f"`{argument}` pattern {pattern!r} matches no parameter. Prunable by default: {default}; "
        f"all parameters (tied names joined by =): {_all_names(roles)}"
    )


def select_targets(
    model: nn.Module, include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None
) -> Targets:
    """Return ``{name: parameter}`` to compress, in model order, as :class:`Targets` (with aliases and axes).

    Without ``include`` the targets are :func:`prunable_names`; with it, any parameter any of whose names matches one
    of the glob patterns (so a user may opt in embeddings or biases). ``exclude`` globs then remove every tensor one
    of whose names they match. A tied tensor is one target, under its first name.
    Raises ``ValueError`` when an include or exclude pattern matches no parameter (or only buffers) or nothing is
    left.
    """
    include, exclude = as_patterns("include", include), as_patterns("exclude", exclude)
    roles = parameter_roles(model)
    default = [name for name, (_, _, role) in roles.items() if role.default]
    every = [alias for _, aliases, _ in roles.values() for alias in aliases]
    for argument, patterns in (("include", include), ("exclude", exclude)):  # a typo must not pass silently
        for pattern in patterns or ():
            if not any(fnmatchcase(name, pattern) for name in every):
                _refuse_unmatched(model, argument, pattern, roles, default)
    if include:
        names = [name for name, (_, aliases, _) in roles.items() if _matches(aliases, include)]
    else:
        names = default
    if exclude:
        names = [name for name in names if not _matches(roles[name][1], exclude)]
    if not names:
        raise ValueError(
            f"Nothing to prune in {type(model).__name__}: no Linear/Conv/attention weights are selected "
            f"(include={list(include or [])}, exclude={list(exclude or [])}). Prunable by default: {default}"
        )
    return Targets(
        {name: roles[name][0] for name in names},
        {name: roles[name][1] for name in names},
        {name: roles[name][2].output_axis for name in names},
        {name: roles[name][2].kind for name in names},
        {name: roles[name][2].layout for name in names},
    )


def per_layer(argument: str, value: V | Mapping[str, V], names: Sequence[str] | Targets) -> dict[str, V]:
    """Expand a per-layer setting: one value for every name, or ``{glob: value}`` (first matching glob wins).

    Names that no glob matches are left out, so a mapping also selects the layers. A glob that matches
    none of ``names`` is an error naming ``argument`` and listing the names. With :class:`Targets`, a glob may match
    any alias of a tied tensor; two aliases given different values is an error naming both.
    """
    aliases: Mapping[str, Sequence[str]] = getattr(names, "aliases", {})
    names = list(names)
    if not isinstance(value, Mapping):
        return {name: value for name in names}
    result: dict[str, V] = {}
    for name in names:
        chosen: dict[str, tuple[str, V]] = {}  # alias -> (first glob matching it, its value)
        for alias in aliases.get(name, (name,)):
            for pattern, setting in value.items():
                if fnmatchcase(alias, pattern):
                    chosen[alias] = (pattern, setting)
                    break
        distinct = {repr(setting) for _, setting in chosen.values()}
        if len(distinct) > 1:
            described = "; ".join(f"{alias!r} is given {setting!r} by {pattern!r}" for alias, (pattern, setting) in chosen.items())
            raise ValueError(
                f"`{argument}`: {' and '.join(map(repr, chosen))} are one tied tensor, which takes one setting, but "
                f"{described}. Give both names the same value (or name one of them only)"
            )
        if chosen:
            result[name] = next(iter(chosen.values()))[1]
    for pattern in value:
        if not any(fnmatchcase(alias, pattern) for name in names for alias in aliases.get(name, (name,))):
            selected = [" = ".join(aliases.get(name, (name,))) for name in names]
            raise ValueError(f"`{argument}` pattern {pattern!r} matches no selected parameter; selected: {selected}")
    return {name: result[name] for name in names if name in result}


def each_setting(argument: str, value: V | Mapping[str, V]) -> list[tuple[str, V]]:
    """``(label, value)`` pairs to validate a per-layer setting: ``argument`` itself, or ``argument['glob']`` for
    each entry of a mapping, so an error names exactly the entry at fault."""
    if isinstance(value, Mapping):
        return [(f"{argument}[{pattern!r}]", each) for pattern, each in value.items()]
    return [(argument, value)]


# ----------------------------------------------------------------------------- what is compressed, what stays dense
@dataclass(frozen=True)
class TargetRow:
    """One line of the set-up summary: the tensors of one ``kind`` that are compressed (or left dense)."""

    kind: str
    compressed: bool
    tensors: int
    numel: int
    share: float  # of all the model's parameters (each tied tensor counted once)
    names: tuple[str, ...]


def describe_targets(model: nn.Module, targets: Mapping[str, nn.Parameter]) -> list[TargetRow]:
    """What a callback compresses and what it leaves dense, by kind of tensor: compressed rows first, then dense
    ones, each with its tensor count, weights and share of all the model's weights (tied tensors once)."""
    roles = parameter_roles(model)
    chosen = {id(p) for p in targets.values()}
    total = sum(p.numel() for p, _, _ in roles.values()) or 1
    groups: dict[tuple[bool, str], list[tuple[str, int]]] = {}
    for name, (param, aliases, role) in roles.items():
        kind = f"{role.kind} (tied)" if len(aliases) > 1 else role.kind
        label = f"{name} (= {', '.join(aliases[1:])})" if len(aliases) > 1 else name
        groups.setdefault((id(param) in chosen, kind), []).append((label, param.numel()))
    rows = [
        TargetRow(kind, compressed, len(items), sum(n for _, n in items), sum(n for _, n in items) / total, tuple(l for l, _ in items))
        for (compressed, kind), items in groups.items()
    ]
    return sorted(rows, key=lambda row: (not row.compressed, -row.numel))


def format_targets(rows: Sequence[TargetRow], title: str) -> str:
    """The set-up summary as text: one line for the compressed kinds, one for the dense ones."""

    def part(row: TargetRow) -> str:
        return f"{row.kind} ×{row.tensors} ({row.numel:,} weights, {row.share:.1%})"

    compressed = [part(row) for row in rows if row.compressed]
    dense = [part(row) for row in rows if not row.compressed]
    share = sum(row.share for row in rows if row.compressed)
    lines = [f"{title} compresses {share:.1%} of the model's weights: {', '.join(compressed) or 'nothing'}"]
    lines.append(f"  left dense: {', '.join(dense) or 'nothing'}")
    tied = [name for row in rows for name in row.names if " (= " in name]
    if tied:
        lines.append(f"  tied tensors (one mask each): {', '.join(tied)}")
    return "\n".join(lines)


def weight_matrices(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every distinct parameter with two or more dimensions (weight matrices, conv kernels, embedding tables), once."""
    return {name: param for name, (param, _, _) in parameter_roles(model).items() if param.dim() >= 2}


@torch.no_grad()
def model_sparsity(matrices: Mapping[str, torch.Tensor]) -> float:
    """Zeros over all the given weight matrices (:func:`weight_matrices`: dense ones included), counted in the
    tensors themselves (:func:`~lightning_sparse.core.counting.global_sparsity`; FSDP2 shards are counted whole)."""
    return global_sparsity(matrices)
