"""The pattern registry: how attention heads, key/value groups and MLP neurons are found in a module, keyed by what
the module *is and holds* (its projections, the head counts it or its ``config`` states), never by model name.

A **pattern** is a function ``(name, module) -> Match | None``: ``None`` when the module is not of its layout,
:class:`Match` with the group layers (:class:`~lightning_sparse.core.heads.GroupLayer`) it found, or with a reason it
keeps the module dense ("kept dense because …"). Patterns are tried in order, user-registered ones first
(:func:`register_attention`, :func:`register_mlp`, :func:`register_pattern`), the way Torch-Pruning's
``register_customized_layer`` teaches its dependency graph a new module kind.

Built in:

* **separate projections**: a module holding q/k/v/o Linears under one of the names of :data:`QKVO_NAMES`
  (Llama, Qwen2, Qwen3 with ``q_norm``/``k_norm``, Mistral, Gemma, ViT: ``q_proj/k_proj/v_proj/o_proj``; OPT, BART:
  ``…/out_proj``; DistilBERT ``q_lin/…/out_lin``; ALBERT ``query/key/value/dense``; BERT ``self.query/…`` with
  ``output.dense``; Swin with its per-head relative position bias table),
* **a stack sharing a position bias** (T5 ``q/k/v/o``: the first layer's ``relative_attention_bias`` is added in
  every layer, so head h of every layer of the stack, with bias column h, is one unit),
* **fused q|k|v blocks** (Phi-3 ``qkv_proj``: ``H·d`` query rows, then ``KV·d`` key rows, then ``KV·d`` value rows),
* **interleaved q/k/v per head** (GPT-NeoX ``query_key_value``: rows ``[3d·h, 3d·(h+1))`` are head h's q, k, v),
* **gated MLPs** (SwiGLU/GeGLU ``gate_proj/up_proj/down_proj``; T5 ``wi_0/wi_1/wo``; Phi-3's fused
  ``gate_up_proj``: gate rows then up rows),
* **mixture of experts** as 3-D parameters (``gate_up_proj``/``down_proj`` of Mixtral and Qwen2-MoE experts: a neuron
  is one hidden unit of every expert together; the router stays dense),
* **two-layer MLPs** (``fc1/fc2`` of OPT/BART, ``dense_h_to_4h/dense_4h_to_h`` of GPT-NeoX, ``lin1/lin2`` of
  DistilBERT, ``wi/wo`` of T5, ``ffn/ffn_output`` of ALBERT).

**Units.** With ``H`` query heads, ``KV`` key/value heads of ``head_dim`` d and ``G = H / KV``, one unit is a KV head
with its ``G`` query heads: ``G·d`` query rows, ``d`` key and ``d`` value rows, ``G·d`` output-projection columns
(grouped-query attention, Ainslie et al. 2023: query head h reads KV head ``h // G``). Removing whole units keeps
``G`` an integer, so the pruned model is still valid GQA with the config's group size; with ``KV = H`` a unit is a
head. With one KV head (multi-query attention) a unit is a query head, and the key/value projections stay. Counts
are read from the module (``num_heads``, ``num_attention_heads``, ``n_heads``, ``n_head``,
``num_key_value_heads``, ``head_dim``) or its ``config`` and checked against the projections' shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_sparse.core.heads import GroupLayer, Member
from lightning_sparse.structure import ops

#: ``(q, k, v, o)`` child names of attention with separate projections, tried in order.
QKVO_NAMES: list[tuple[str, str, str, str]] = [
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("q_lin", "k_lin", "v_lin", "out_lin"),
    ("query", "key", "value", "dense"),
    ("q", "k", "v", "o"),
]
#: ``(gate, up, down)`` child names of gated MLPs (``down(act(gate(x)) * up(x))``).
GATED_NAMES: list[tuple[str, str, str]] = [("gate_proj", "up_proj", "down_proj"), ("wi_0", "wi_1", "wo")]
#: ``(up, down)`` child names of two-layer MLPs (``down(act(up(x)))``) held by one module.
TWO_LAYER_NAMES: list[tuple[str, str]] = [
    ("c_fc", "c_proj"), ("intermediate.dense", "output.dense"), ("fc1", "fc2"), ("dense_h_to_4h", "dense_4h_to_h"), ("lin1", "lin2"), ("wi", "wo"), ("ffn", "ffn_output"),
]  # fmt: skip
#: Modules between an ``nn.Sequential``'s up- and down-projection that act on each hidden unit alone (the op table's).
ELEMENTWISE = ops.ELEMENTWISE_MODULES
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads")
DIM_ATTRS = ("head_dim", "head_size", "attention_head_size", "key_value_proj_dim")


@dataclass
class Match:
    """What a pattern found in one module: its group layers, or why it keeps the module dense."""

    layers: list[GroupLayer] = field(default_factory=list)
    dense: str = ""  # "kept dense because …" (naming the module and what would make it work)


Pattern = Callable[[str, nn.Module], "Match | None"]
#: ``{pattern: {"heads": attrs, "kv": attrs}}``: attribute names a registered module states its counts under, which
#: deploy's surgery rewrites besides :data:`HEAD_ATTRS` / :data:`KV_ATTRS`.
STATED_ATTRS: dict[str, dict[str, tuple[str, ...]]] = {}
_PATTERNS: list[tuple[str, Pattern]] = []  # built-in ones, in order
_USER: list[tuple[str, Pattern]] = []  # registered by users, tried first


def register_pattern(name: str, pattern: Pattern) -> None:
    """Teach the structure layer a module layout named ``"attention:<label>"`` (heads) or ``"mlp:<label>"`` (neurons):
    ``pattern(module_name, module)`` returns ``None`` (not this layout),
    or a :class:`Match` with the :class:`~lightning_sparse.core.heads.GroupLayer` s of the module (``style="pattern"``
    so deploy removes them with the generic surgery of :mod:`lightning_sparse.structure.surgery`). Registered patterns
    are tried before the built-in ones; registering a name again replaces it."""
    if not isinstance(name, str) or name.partition(":")[0] not in ("attention", "mlp") or not name.partition(":")[2]:
        raise ValueError(f"`name` must be 'attention:<label>' or 'mlp:<label>' (the kind of unit it finds), got {name!r}")
    if not callable(pattern):
        raise TypeError(f"`pattern` must be callable (module name, module) -> Match | None, got {type(pattern).__name__}")
    _USER[:] = [(n, p) for n, p in _USER if n != name]
    _USER.insert(0, (name, pattern))


def unregister_pattern(name: str) -> None:
    """Forget a pattern registered with :func:`register_pattern` (or the helpers below)."""
    _USER[:] = [(n, p) for n, p in _USER if n != name]
    STATED_ATTRS.pop(name, None)


def _builtin(name: str) -> Callable[[Pattern], Pattern]:
    def add(pattern: Pattern) -> Pattern:
        _PATTERNS.append((name, pattern))
        return pattern

    return add


def match_patterns(name: str, module: nn.Module) -> tuple[list[GroupLayer], list[tuple[str, str]]]:
    """Every registered pattern's group layers for ``module``, and ``(module, reason)`` for a dense refusal.

    Attention is matched once (the first pattern that answers); MLP patterns add their layers (an OPT decoder layer
    holds its MLP's ``fc1``/``fc2`` itself)."""
    layers: list[GroupLayer] = []
    dense: list[tuple[str, str]] = []
    done: set[str] = set()  # "attention", "mlp": one answer per kind
    for pattern_name, pattern in [*_USER, *_PATTERNS]:
        kind = pattern_name.partition(":")[0]
        if kind in done:
            continue
        found = pattern(name, module)
        if found is None:
            continue
        done.add(kind)
        if found.dense:
            dense.append((name, found.dense))
        layers += found.layers
    return layers, dense


# ----------------------------------------------------------------------------- helpers
def _linear(module: object) -> bool:
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None
    )


def _out_axis(module: nn.Module) -> int:
    return 0 if isinstance(module, nn.Linear) else 1  # Hugging Face Conv1D stores (in, out)


def _outputs(module: nn.Module) -> int:
    return module.weight.shape[_out_axis(module)]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _rows(prefix: str, module: nn.Module, role: str, width: int, offsets: tuple[int, ...] = (0,)) -> list[Member]:
    """Members for output units of ``module``: weight rows (Conv1D columns) and bias entries, ``width`` per unit."""
    members = [Member(_join(prefix, "weight"), _out_axis(module), offsets, role, width)]
    if getattr(module, "bias", None) is not None:
        members.append(Member(_join(prefix, "bias"), 0, offsets, f"{role} bias", width))
    return members


def _columns(prefix: str, module: nn.Module, role: str, width: int) -> Member:
    return Member(_join(prefix, "weight"), 1 - _out_axis(module), (0,), role, width)


def _read(module: nn.Module, names: tuple[str, ...]) -> int | None:
    """The first positive int among ``module``'s attributes ``names``, then its ``config``'s."""
    for source in (module, getattr(module, "config", None)):
        for attr in names:
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def attention_units(name: str, module: nn.Module, *, q: nn.Module, k: nn.Module, v: nn.Module, heads: int | None,
                    kv_heads: int | None = None, head_dim: int | None = None) -> tuple[int, int, int] | str:  # fmt: skip
    """``(units, query heads per unit, head_dim)`` from the counts and the projections' shapes, or why they disagree."""
    if heads is None:
        return (f"kept dense because {name!r} ({type(module).__name__}) states no head count (none of "
                f"{', '.join(HEAD_ATTRS)} on it or its config): register it with "
                f"`lightning_sparse.structure.register_attention(..., heads=...)`")  # fmt: skip
    q_rows, k_rows, v_rows = _outputs(q), _outputs(k), _outputs(v)
    d = head_dim or q_rows // heads
    if q_rows != heads * d:
        return (f"kept dense because {name!r} ({type(module).__name__}) has {heads} heads of {d}, which does not give its "
                f"{q_rows} query rows (the head count does not divide the projection)")  # fmt: skip
    kv = k_rows // d if k_rows % d == 0 else None
    if kv is None or v_rows != k_rows or heads % kv or (kv_heads is not None and kv_heads != kv):
        return (f"kept dense because {name!r} ({type(module).__name__}) has {k_rows} key / {v_rows} value rows, which are "
                f"not whole key/value heads of {d} dividing its {heads} query heads"
                + (f" (it states {kv_heads} KV heads)" if kv_heads is not None else ""))  # fmt: skip
    return kv, heads // kv, d


def _layer(kind: str, name: str, module: nn.Module, count: int, width: int, members: list[Member], pattern: str,
           query_heads: int = 1) -> GroupLayer:  # fmt: skip
    return GroupLayer(kind, name, type(module).__name__, count, width, tuple(members), pattern, query_heads)


# ----------------------------------------------------------------------------- attention
@_builtin("attention:multihead")
def _multihead(name: str, module: nn.Module) -> Match | None:
    """``nn.MultiheadAttention``: packed ``in_proj_weight`` (q, k, v blocks of ``embed_dim`` rows) or separate
    ``q/k/v_proj_weight``; ``bias_k``/``bias_v`` (``add_bias_kv``) hold ``head_dim`` entries per head; ``out_proj``."""
    if not isinstance(module, nn.MultiheadAttention):
        return None
    e, h = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        members = [Member(_join(name, "in_proj_weight"), 0, (0, e, 2 * e), "q/k/v")]
    else:
        members = [Member(_join(name, f"{p}_proj_weight"), 0, (0,), p) for p in "qkv"]
    if module.in_proj_bias is not None:
        members.append(Member(_join(name, "in_proj_bias"), 0, (0, e, 2 * e), "q/k/v bias"))
    for extra in ("bias_k", "bias_v"):
        if getattr(module, extra, None) is not None:
            members.append(Member(_join(name, extra), 2, (0,), extra))
    members.append(Member(_join(name, "out_proj.weight"), 1, (0,), "out"))
    return Match([_layer("head", name, module, h, e // h, members, "attention:multihead")])


@_builtin("attention:fused-blocks")
def _fused_blocks(name: str, module: nn.Module) -> Match | None:
    """One projection whose outputs are ``[q (H·d) | k (KV·d) | v (KV·d)]`` and an output projection from ``H·d``:
    Phi-3 ``qkv_proj``/``o_proj``, nanoGPT (``c_attn`` Linear) and GPT-2 (``c_attn`` Conv1D, not cross-attention)
    ``c_attn``/``c_proj``."""
    for fused, out in (("qkv_proj", "o_proj"), ("c_attn", "c_proj")):
        qkv, proj = getattr(module, fused, None), getattr(module, out, None)
        if _linear(qkv) and _linear(proj):
            break
    else:
        return None
    if getattr(module, "is_cross_attention", False) is not False:
        return Match(dense=f"kept dense because {name!r} ({type(module).__name__}) is cross-attention with a separate "
                           f"query projection; its heads are not split")  # fmt: skip
    heads = _read(module, HEAD_ATTRS)
    kv = _read(module, KV_ATTRS) or heads
    rows = _outputs(qkv)
    d = _read(module, ("head_dim",)) if fused == "qkv_proj" else (rows // 3 // heads if heads else None)
    if heads is None or d is None or heads % kv or rows != (heads + 2 * kv) * d:
        return Match(dense=f"kept dense because {name!r} ({type(module).__name__}): its fused {fused} of {rows} rows is "
                           f"not [q | k | v] blocks of the stated heads ({heads}), KV heads ({kv}) and head_dim ({d}); "
                           f"register its layout with `lightning_sparse.structure.register_pattern`")  # fmt: skip
    group, path = heads // kv, _join(name, fused)
    if group == 1:  # one member per tensor, q/k/v at three offsets
        members = _rows(path, qkv, "q/k/v", d, (0, heads * d, 2 * heads * d))
    else:
        members = _rows(path, qkv, "q", group * d) + _rows(path, qkv, "k", d, (heads * d,))
        members += _rows(path, qkv, "v", d, ((heads + kv) * d,))
    members.append(_columns(_join(name, out), proj, "out", group * d))
    return Match([_layer("head", name, module, kv, d, members, "attention:fused-blocks", group)])


def _holder(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """Where the q/k/v projections live: the module itself, or its ``self``/``attention`` child."""
    for prefix in ("", "self", "attention"):
        holder = getattr(module, prefix, None) if prefix else module
        if not isinstance(holder, nn.Module):
            continue
        if all(_linear(getattr(holder, n, None)) for n in names):
            return prefix, holder
    return None


def register_attention(match: type | Callable[[nn.Module], bool], *, q: str, k: str, v: str, o: str,
                       heads: str | int | None = None, kv_heads: str | int | None = None,
                       head_dim: str | int | None = None, name: str | None = None) -> None:  # fmt: skip
    """Teach the structure layer an attention module of your own with separate projections.

    Args:
        match: the module class (instances of it match) or a predicate on a module.
        q: path of its query projection (``nn.Linear``), relative to the module (e.g. ``"attn.wq"``).
        k: path of its key projection.
        v: path of its value projection.
        o: path of its output projection.
        heads: its number of query heads, or the name of the attribute holding it (default: read from the module /
            its ``config`` as for built-in layouts).
        kv_heads: key/value heads (grouped-query attention), an int or an attribute name; default from the shapes.
        head_dim: the width of one head, an int or an attribute name; default ``q rows / heads``.
        name: the pattern's name (default the class name).

    Deploy removes the pruned units' rows/columns and updates the head counts the module states under the names of
    :data:`HEAD_ATTRS` / :data:`KV_ATTRS`; a forward that reads its head count elsewhere needs its own
    :func:`lightning_sparse.structure.surgery.register_resize`.
    """
    test = (lambda m: isinstance(m, match)) if isinstance(match, type) else match
    label = name or (match.__name__ if isinstance(match, type) else getattr(match, "__name__", "attention"))

    def value(module: nn.Module, given: str | int | None, default: tuple[str, ...]) -> int | None:
        if isinstance(given, int):
            return given
        return _read(module, (given,) if given else default)

    def pattern(path: str, module: nn.Module) -> Match | None:
        if not test(module):
            return None
        parts = {}
        for role, where in (("q", q), ("k", k), ("v", v), ("o", o)):
            try:
                parts[role] = module.get_submodule(where)
            except AttributeError:
                return Match(dense=f"kept dense because {path!r} has no {role} projection {where!r} (registered "
                                   f"pattern {label!r})")  # fmt: skip
        return _separate(path, module, parts, [_join(path, where) for where in (q, k, v, o)],
                         value(module, heads, HEAD_ATTRS), value(module, kv_heads, KV_ATTRS) if kv_heads else None,
                         value(module, head_dim, DIM_ATTRS) if head_dim else None, f"attention:{label}")  # fmt: skip

    register_pattern(f"attention:{label}", pattern)
    STATED_ATTRS[f"attention:{label}"] = {
        "heads": (heads,) if isinstance(heads, str) else (), "kv": (kv_heads,) if isinstance(kv_heads, str) else ()
    }


def _separate(name: str, module: nn.Module, parts: dict[str, nn.Module], paths: list[str], heads: int | None,
              kv_heads: int | None, head_dim: int | None, pattern: str) -> Match:  # fmt: skip
    units = attention_units(name, module, q=parts["q"], k=parts["k"], v=parts["v"], heads=heads, kv_heads=kv_heads,
                            head_dim=head_dim)  # fmt: skip
    if isinstance(units, str):
        return Match(dense=units)
    kv, group, d = units
    if kv == 1 and group > 1:  # multi-query: one KV head, so a unit is a query head (K/V stay)
        members = _rows(paths[0], parts["q"], "q", d) + [_columns(paths[3], parts["o"], "out", d)]
        shared = tuple(f"{path}.{p}" for path, role in ((paths[1], "k"), (paths[2], "v")) for p in ("weight", "bias")
                       if getattr(parts[role], p, None) is not None)  # fmt: skip
        return Match([GroupLayer("head", name, type(module).__name__, group, d, tuple(members), pattern, 1, kv, shared)])
    members = _rows(paths[0], parts["q"], "q", group * d)
    members += _rows(paths[1], parts["k"], "k", d) + _rows(paths[2], parts["v"], "v", d)
    members.append(_columns(paths[3], parts["o"], "out", group * d))
    members += _per_head_tables(name, module, kv * group, group)
    return Match([_layer("head", name, module, kv, d, members, pattern, group)])


def _per_head_tables(name: str, module: nn.Module, heads: int, group: int) -> list[Member]:
    """Swin's relative position bias table ``(positions, heads)`` (a column per query head, read with ``-1`` heads):
    a member of every unit, ``group`` columns each."""
    members = []
    for path, param in module.named_parameters():
        if path.rpartition(".")[2] == "relative_position_bias_table" and param.dim() == 2 and param.shape[1] == heads:
            members.append(Member(_join(name, path), 1, (0,), "relative position bias", group))
    return members


@_builtin("attention:separate")
def _separate_projections(name: str, module: nn.Module) -> Match | None:
    for q, k, v, o in QKVO_NAMES:
        found = _holder(module, (q, k, v))
        if found is None:
            continue
        prefix, holder = found
        if _linear(getattr(module, o, None)):
            out_path = o
        elif _linear(getattr(getattr(module, "output", None), "dense", None)):
            out_path = "output.dense"  # BERT: BertAttention holds self.query/key/value and output.dense
        else:
            continue  # q/k/v without an output projection here (BERT's self-attention: its parent holds the output)
        if hasattr(holder, "has_relative_attention_bias"):
            return Match(dense=f"kept dense because {name!r} ({type(module).__name__}) adds a per-head position bias that "
                               f"the first layer of its stack computes and the others share: its heads are units of the "
                               f"whole stack (pattern 'attention:shared-position-bias'), found when the stack that "
                               f"holds its layers is in the model")  # fmt: skip
        parts = {"q": getattr(holder, q), "k": getattr(holder, k), "v": getattr(holder, v), "o": module.get_submodule(out_path)}
        heads = _read(holder, HEAD_ATTRS) or _read(module, HEAD_ATTRS)
        return _separate(name, module, parts, [_join(name, prefix, q), _join(name, prefix, k), _join(name, prefix, v),
                                               _join(name, out_path)], heads, _read(holder, KV_ATTRS),
                         _read(holder, ("head_dim",)) if isinstance(getattr(holder, "head_dim", None), int) else None,
                         "attention:separate")  # fmt: skip
    return None


def _biased_attention(module: nn.Module) -> bool:
    return isinstance(getattr(module, "has_relative_attention_bias", None), bool) and all(
        _linear(getattr(module, p, None)) for p in "qkvo"
    )


@_builtin("attention:shared-position-bias")
def _shared_position_bias(name: str, module: nn.Module) -> Match | None:
    """A stack of layers whose attention adds a position bias that the first layer computes and every later one reuses
    (T5, mT5, LongT5, Switch: ``T5Stack`` holds ``block``, a ModuleList; block 0's self-attention holds
    ``relative_attention_bias``, an ``Embedding(buckets, heads)``, and returns ``position_bias`` of shape
    ``(1, heads, q, k)``, which the stack passes to every later block; cross-attention shares a zero bias plus the mask
    in the same way). Adding that bias to another layer's scores pairs head h of every layer with head h of the first,
    so **a unit is head h of every layer of the stack together** (q/k/v rows and output columns of each, and column h
    of the bias table): removing it keeps the bias's heads aligned with every layer's, exactly. One coupled unit layer
    per attention position inside a block (self-attention, cross-attention), named by the first block's module."""
    blocks = [(child_name, child) for child_name, child in module.named_children() if isinstance(child, nn.ModuleList)]
    if len(blocks) != 1 or len(blocks[0][1]) == 0:
        return None
    block_name, stack = blocks[0]
    chains: dict[str, list[tuple[str, nn.Module]]] = {}  # path inside a block -> that attention in every block
    for index, block in enumerate(stack):
        for path, child in block.named_modules():
            if _biased_attention(child):
                chains.setdefault(path, []).append((_join(name, block_name, str(index), path), child))
    if not any(attention.has_relative_attention_bias for chain in chains.values() for _, attention in chain):
        return None
    layers = []
    for path, chain in chains.items():
        first_name, first = chain[0]
        biased = [n for n, attention in chain if attention.has_relative_attention_bias]
        if len(chain) != len(stack) or biased not in ([], [first_name]):
            return Match(dense=f"kept dense because the attention {path!r} of {name!r}'s blocks is not in every block, or "
                               f"holds its own position bias in a later block ({biased}): the shared-bias units are "
                               f"head h of every block with the first block's bias")  # fmt: skip
        members: list[Member] = []
        units = None
        for attention_name, attention in chain:
            found = attention_units(attention_name, attention, q=attention.q, k=attention.k, v=attention.v,
                                    heads=_read(attention, HEAD_ATTRS), head_dim=_read(attention, DIM_ATTRS))  # fmt: skip
            if isinstance(found, str):
                return Match(dense=found)
            if units is not None and found != units:
                return Match(dense=f"kept dense because the {path!r} attentions of {name!r} do not all have "
                                   f"{units[0]} heads of {units[2]} ({attention_name!r}: {found[0]} of {found[2]}), so "
                                   f"the shared position bias cannot pair their heads")  # fmt: skip
            units = found
            if found[1] != 1:
                return Match(dense=f"kept dense because {attention_name!r} has grouped key/value heads, which the "
                                   f"shared-position-bias pattern does not pair across layers")  # fmt: skip
            d = found[2]
            members += _rows(_join(attention_name, "q"), attention.q, "q", d) + _rows(_join(attention_name, "k"), attention.k, "k", d)
            members += _rows(_join(attention_name, "v"), attention.v, "v", d)
            members.append(_columns(_join(attention_name, "o"), attention.o, "out", d))
        table = getattr(first, "relative_attention_bias", None)
        if first.has_relative_attention_bias:
            if not (isinstance(table, nn.Embedding) and table.embedding_dim == units[0]):
                return Match(dense=f"kept dense because {first_name!r}'s relative_attention_bias is not an Embedding with "
                                   f"a column per head ({units[0]})")  # fmt: skip
            members.append(Member(_join(first_name, "relative_attention_bias.weight"), 1, (0,), "position bias", 1))
        layers.append(_layer("head", first_name, first, units[0], units[2], members, "attention:shared-position-bias"))
    return Match(layers)


@_builtin("attention:interleaved")
def _interleaved(name: str, module: nn.Module) -> Match | None:
    """GPT-NeoX (and BLOOM): ``query_key_value`` viewed as ``(…, H, 3·d)``: head h's q, k, v are rows
    ``[3d·h, 3d·(h+1))``; ``dense`` maps ``H·d`` back."""
    qkv, out = getattr(module, "query_key_value", None), getattr(module, "dense", None)
    if not (_linear(qkv) and _linear(out)):
        return None
    heads = _read(module, HEAD_ATTRS)
    if heads is None or _outputs(qkv) % (3 * heads):
        return Match(dense=f"kept dense because {name!r} ({type(module).__name__}): query_key_value has {_outputs(qkv)} "
                           f"rows, not 3 × head_dim per stated head ({heads})")  # fmt: skip
    d = _outputs(qkv) // (3 * heads)
    members = _rows(_join(name, "query_key_value"), qkv, "q/k/v", 3 * d) + [_columns(_join(name, "dense"), out, "out", d)]
    return Match([_layer("head", name, module, heads, d, members, "attention:interleaved")])


# ----------------------------------------------------------------------------- MLPs
def register_mlp(match: type | Callable[[nn.Module], bool], *, up: str | list[str], down: str,
                 name: str | None = None) -> None:  # fmt: skip
    """Teach the structure layer an MLP of your own: ``down(f(up_1(x), up_2(x), …))`` where ``f`` acts on each hidden
    unit alone (an activation, a gate product). ``up`` is the path of the up-projection (or a list: gate and up of a
    gated MLP), ``down`` the down-projection's; a neuron is one row of every ``up`` and one column of ``down``."""
    test = (lambda m: isinstance(m, match)) if isinstance(match, type) else match
    label = name or (match.__name__ if isinstance(match, type) else getattr(match, "__name__", "mlp"))
    ups = [up] if isinstance(up, str) else list(up)

    def pattern(path: str, module: nn.Module) -> Match | None:
        if not test(module):
            return None
        return _mlp(path, module, ups, down, f"mlp:{label}") or Match(
            dense=f"kept dense because {path!r}: its projections {ups} / {down!r} are not Linears of matching width"
        )

    register_pattern(f"mlp:{label}", pattern)


def _mlp(name: str, module: nn.Module, ups: list[str], down: str, pattern: str) -> Match | None:
    try:
        up_modules = [module.get_submodule(u) for u in ups]
        down_module = module.get_submodule(down)
    except AttributeError:
        return None
    if any(isinstance(m, nn.Sequential) for m in [*up_modules, down_module]):
        return None
    if not all(_linear(m) for m in [*up_modules, down_module]):
        return None
    units = _outputs(up_modules[0])
    if any(_outputs(m) != units for m in up_modules) or down_module.weight.shape[1 - _out_axis(down_module)] != units:
        return None
    members = []
    for path, m in zip(ups, up_modules):
        members += _rows(_join(name, path), m, "up", 1)
    members.append(_columns(_join(name, down), down_module, "down", 1))
    return Match([_layer("neuron", name, module, units, 1, members, pattern)])


def _elementwise(activation: object) -> bool:
    """``nn.Transformer*Layer``'s ``activation``: a module of :data:`ELEMENTWISE` or torch's relu/gelu (the two its
    ``activation="relu"|"gelu"`` set); any other callable may mix units, so that layer's MLP is not offered."""
    return isinstance(activation, ELEMENTWISE) or activation in (nn.functional.relu, nn.functional.gelu, torch.relu)


@_builtin("mlp:torch-transformer-layer")
def _torch_layer(name: str, module: nn.Module) -> Match | None:
    """``nn.TransformerEncoderLayer`` / ``DecoderLayer``: ``linear1 → activation → dropout → linear2``."""
    if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return None
    if not _elementwise(module.activation):
        return Match(dense=f"kept dense because {name!r}'s activation {module.activation!r} is a callable that could mix "
                           f"hidden units; give it an activation module (e.g. nn.GELU()) or register the MLP")  # fmt: skip
    return _mlp(name, module, ["linear1"], "linear2", "mlp:torch-transformer-layer")


@_builtin("mlp:sequential")
def _sequential(name: str, module: nn.Module) -> Match | None:
    """``Linear → elementwise… → Linear`` inside an ``nn.Sequential`` (one group layer per such pair)."""
    if not isinstance(module, nn.Sequential):
        return None
    layers, children = [], list(module.named_children())
    for i, (child_name, child) in enumerate(children):
        if not isinstance(child, nn.Linear):
            continue
        j = i + 1
        while j < len(children) and isinstance(children[j][1], ELEMENTWISE):
            j += 1
        if j < len(children) and isinstance(children[j][1], nn.Linear) and children[j][1].in_features == child.out_features:
            members = [*_rows(_join(name, child_name), child, "up", 1), _columns(_join(name, children[j][0]), children[j][1], "down", 1)]
            layer = _layer("neuron", _join(name, child_name), child, child.out_features, 1, members, "mlp:sequential")
            layers.append(layer)
    return Match(layers) if layers else None


@_builtin("mlp:gated")
def _gated(name: str, module: nn.Module) -> Match | None:
    for gate, up, down in GATED_NAMES:
        found = _mlp(name, module, [gate, up], down, "mlp:gated")
        if found is not None:
            return found
    fused, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if _linear(fused) and _linear(down) and _outputs(fused) == 2 * down.weight.shape[1 - _out_axis(down)]:
        units = _outputs(fused) // 2  # Phi-3: gate rows then up rows (``chunk(2, dim=-1)``)
        members = _rows(_join(name, "gate_up_proj"), fused, "up", 1, (0, units))
        members.append(_columns(_join(name, "down_proj"), down, "down", 1))
        return Match([_layer("neuron", name, module, units, 1, members, "mlp:gated")])
    return None


@_builtin("mlp:experts")
def _experts(name: str, module: nn.Module) -> Match | None:
    """Mixture of experts stored as 3-D parameters (transformers 5: ``MixtralExperts``, ``Qwen2MoeExperts``):
    ``gate_up_proj`` ``(experts, 2·I, hidden)`` used as ``linear(x, w[e]).chunk(2)`` (gate rows, then up rows) and
    ``down_proj`` ``(experts, hidden, I)``. Neuron ``i`` is gate row ``i``, up row ``I + i`` and down column ``i`` of
    **every** expert together (so all experts keep one width, as the 3-D tensors and the config's one
    ``intermediate_size`` require); the router stays dense."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3 and down.dim() == 3):
        return None
    experts, rows, hidden = gate_up.shape
    if down.shape[0] != experts or down.shape[1] != hidden or rows != 2 * down.shape[2]:
        return Match(dense=f"kept dense because {name!r} ({type(module).__name__}): gate_up_proj {list(gate_up.shape)} and "
                           f"down_proj {list(down.shape)} are not (experts, 2·I, hidden) and (experts, hidden, I)")  # fmt: skip
    units = down.shape[2]
    members = [Member(_join(name, "gate_up_proj"), 1, (0, units), "up", 1), Member(_join(name, "down_proj"), 2, (0,), "down", 1)]
    return Match([_layer("neuron", name, module, units, 1, members, "mlp:experts")])


@_builtin("mlp:two-layer")
def _two_layer(name: str, module: nn.Module) -> Match | None:
    for up, down in TWO_LAYER_NAMES:
        found = _mlp(name, module, [up], down, "mlp:two-layer")
        if found is not None:
            return found
    return None


# recurrent hidden units and transposed-convolution channels (granularity "channel"): their own module, registered here
from lightning_sparse.structure import recurrent as _recurrent  # noqa: E402,F401
