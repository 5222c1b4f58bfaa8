"""Deploy pruned attention heads and MLP neurons: rebuild each module with only the heads / hidden units it kept.

A head (neuron) whose every member is exactly zero (:mod:`lightning_sparse.core.heads`: its q/k/v rows and biases and
the output projection's columns; the up-projection row, its bias and the down-projection column) contributes nothing,
so dropping it changes no output. Units are removed by the structure layer's surgery
(:mod:`lightning_sparse.structure.surgery`, keyed by the pattern that found them): the generic slicing keeps the
module classes (Hugging Face attention and MLPs of every layout: sliced projections, head counts updated, the config
rewritten where it can describe the result); two rebuilds are registered here for modules whose class cannot hold
fewer heads:

* a nanoGPT-style attention (fused ``c_attn`` Linear whose forward splits by the input's width) becomes
  :class:`HeadPrunedSelfAttention`;
* ``nn.MultiheadAttention`` becomes :class:`HeadPrunedMultiheadAttention`: ``nn.MultiheadAttention`` cannot hold fewer
  heads of the same ``head_dim`` (its query input and output width are both ``embed_dim = num_heads × head_dim``).

Each module is kept only where the model's outputs stay equal (checked by the caller, :func:`~lightning_sparse.deploy`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor, nn

from lightning_sparse.core.heads import GroupLayer, Member, find_group_layers, zero_groups
from lightning_sparse.structure.hf_config import Resized, update_configs
from lightning_sparse.structure.plan import StructurePlan
from lightning_sparse.structure.surgery import KeptDense, register_rebuild, remove_units, slice_units


@dataclass
class GroupReport:
    """One attention module's heads or one MLP's neurons: what was removed, what is left, the members, and why."""

    module: str
    kind: str  # head / neuron
    module_type: str
    before: int
    removed: list[int] = field(default_factory=list)  # group indices removed
    members: list[str] = field(default_factory=list)  # "param[axis a]" of every member tensor
    rebuilt_as: str = ""
    reason: str = ""
    params: list[str] = field(default_factory=list)  # the member tensors' names
    query_heads: int = 1  # query heads per unit (KV groups)
    kv_heads: int = 0  # query-slot units: the KV heads kept whole
    width: int = 1  # head_dim for heads

    @property
    def after(self) -> int:
        return self.before - len(self.removed)


# ----------------------------------------------------------------------------- modules
class HeadPrunedSelfAttention(nn.Module):
    """nanoGPT causal self-attention with ``n_head`` heads of ``head_dim`` whatever the model width: ``c_attn`` maps
    ``n_embd → 3 · n_head · head_dim`` (q, k, v), ``c_proj`` maps ``n_head · head_dim → n_embd``."""

    def __init__(self, c_attn: nn.Linear, c_proj: nn.Linear, n_head: int, head_dim: int, dropout: float, resid_dropout: nn.Module) -> None:
        super().__init__()
        self.c_attn, self.c_proj, self.resid_dropout = c_attn, c_proj, resid_dropout
        self.n_head, self.head_dim, self.dropout = n_head, head_dim, dropout

    def forward(self, x: Tensor) -> Tensor:
        batch, time, _ = x.shape
        inner = self.n_head * self.head_dim
        q, k, v = self.c_attn(x).split(inner, dim=2)
        q, k, v = (t.view(batch, time, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(batch, time, inner)))


class HeadPrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward with fewer heads of the original ``head_dim``: separate ``q_proj``, ``k_proj``,
    ``v_proj`` (``embed_dim → heads · head_dim``) and ``out_proj`` (``heads · head_dim → embed_dim``).

    Same arguments and outputs as ``nn.MultiheadAttention.forward`` (``key_padding_mask``, ``attn_mask`` 2-D or 3-D
    per original head, bool or additive, ``is_causal``, batch-first or not, unbatched inputs). The attention weights
    returned (``need_weights=True``) cover the kept heads only, and their average is over those heads.
    """

    # nn.TransformerEncoderLayer reads these of its ``self_attn`` to choose torch's fused encoder kernel, which needs
    # the packed projections; None sends it down its regular path, which calls this module's forward
    in_proj_weight = in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, out_proj: nn.Linear, heads: list[int],
                 original_heads: int, head_dim: int, dropout: float, batch_first: bool) -> None:  # fmt: skip
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.register_buffer("heads", torch.tensor(heads, dtype=torch.long), persistent=False)
        self.num_heads, self.original_heads, self.head_dim = len(heads), original_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first

    def _mask(self, mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
        return mask.to(dtype)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, _ = query.shape
        source = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, length, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, source, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, source, h, d).transpose(1, 2)
        scores = (q * d**-0.5) @ k.transpose(-2, -1)  # (n, h, length, source)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=query.device).triu(1)
        mask = self._mask(attn_mask, scores.dtype)
        if mask is not None:
            if mask.dim() == 3:  # (n · original heads, L, S): keep the kept heads' masks
                mask = mask.view(n, self.original_heads, length, source).index_select(1, self.heads)
            scores = scores + mask
        padding = self._mask(key_padding_mask, scores.dtype)
        if padding is not None:
            scores = scores + padding.view(n, 1, 1, source)
        weights = scores.softmax(-1)
        attended = F.dropout(weights, self.dropout) if self.training and self.dropout > 0 else weights
        out = self.out_proj((attended @ v).transpose(1, 2).reshape(n, length, h * d))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.mean(1) if average_attn_weights else weights
        return out, weights.squeeze(0) if not batched else weights


class LeafTracer(torch.fx.Tracer):
    """``torch.fx``'s tracer, with the rebuilt attention modules kept as single calls (their forwards branch on input
    shapes, which a symbolic trace cannot follow) so a model holding them still traces."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (HeadPrunedSelfAttention, HeadPrunedMultiheadAttention)) or super().is_leaf_module(m, module_qualified_name)


# ----------------------------------------------------------------------------- rebuilds (structure's surgery registry)
def _sliced(module: nn.Module, out_index: Tensor | None = None, in_index: Tensor | None = None) -> nn.Module:
    """A new Linear with the given output and input entries (the bias follows the outputs)."""
    weight, bias = module.weight.detach(), None if getattr(module, "bias", None) is None else module.bias.detach()
    if out_index is not None:
        weight = weight.index_select(0, out_index)
        bias = bias.index_select(0, out_index) if bias is not None else None
    if in_index is not None:
        weight = weight.index_select(1, in_index)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight = nn.Parameter(weight.clone().contiguous(), requires_grad=module.weight.requires_grad)
        if bias is not None:
            new.bias = nn.Parameter(bias.clone(), requires_grad=module.bias.requires_grad)
    return new


def _set(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _rebuild_fused(model: nn.Module, layer: GroupLayer, keep: list[int]) -> str:
    """Fused q|k|v blocks: sliced in place (Phi-3 ``qkv_proj``, GPT-2 ``c_attn`` Conv1D: their forwards read the head
    count the module states); a nanoGPT-style module (``c_attn`` Linear, whose forward splits by the input's width)
    becomes :class:`HeadPrunedSelfAttention`."""
    module = model.get_submodule(layer.module) if layer.module else model
    if getattr(module, "reorder_and_upcast_attn", False):
        raise KeptDense("reorder_and_upcast_attn is not rebuilt: heads kept")
    if not (isinstance(getattr(module, "c_attn", None), nn.Linear) and hasattr(module, "resid_dropout")):
        return slice_units(model, layer, keep)
    slice_units(model, layer, keep)  # c_attn rows and c_proj columns
    new = HeadPrunedSelfAttention(module.c_attn, module.c_proj, len(keep), layer.width, module.dropout, module.resid_dropout)
    _set(model, layer.module, new.train(module.training))
    return type(new).__name__


def _rebuild_mha(model: nn.Module, layer: GroupLayer, keep: list[int]) -> str:
    """``nn.MultiheadAttention`` cannot hold fewer heads of the same ``head_dim``: it becomes
    :class:`HeadPrunedMultiheadAttention`."""
    module = model.get_submodule(layer.module) if layer.module else model
    if module.bias_k is not None or module.add_zero_attn:
        raise KeptDense("add_bias_kv / add_zero_attn are not rebuilt: heads kept")
    device = module.out_proj.weight.device
    e, d = module.embed_dim, layer.width
    rows = torch.cat([torch.arange(g * d, (g + 1) * d, device=device) for g in keep])
    if module._qkv_same_embed_dim:
        weights = [module.in_proj_weight[o : o + e] for o in (0, e, 2 * e)]
    else:
        weights = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
    biases = [None] * 3 if module.in_proj_bias is None else [module.in_proj_bias[o : o + e] for o in (0, e, 2 * e)]
    projections = []
    for weight, bias in zip(weights, biases):
        linear = nn.Linear(weight.shape[1], len(rows), bias=bias is not None, device=device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.detach().index_select(0, rows))
            if bias is not None:
                linear.bias.copy_(bias.detach().index_select(0, rows))
        projections.append(linear)
    out = _sliced(module.out_proj, in_index=rows)
    new = HeadPrunedMultiheadAttention(*projections, out, keep, module.num_heads, d, module.dropout, module.batch_first)
    _set(model, layer.module, new.train(module.training))
    return type(new).__name__


register_rebuild("attention:multihead", _rebuild_mha)
register_rebuild("attention:fused-blocks", _rebuild_fused)


def _describe_member(member: Member, width: int) -> str:
    """``c_attn.weight axis 0: [0, 128, 256] + 32·g, 32 each`` (where group g's entries lie)."""
    starts, width = ", ".join(map(str, member.offsets)), member.span(width)
    return f"{member.param} axis {member.axis}: [{starts}] + {width}·g, {width} each ({member.role})"


def _planned_drops(model: nn.Module, plan: StructurePlan) -> dict[str, Tensor]:
    """Bool per unit of each of ``plan``'s layers: True where the plan drops it; refused where such a unit is not zero
    in ``model`` (the plan was not stored with these weights)."""
    plan.check(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    drops = {}
    for layer in plan.layers:
        zero = zero_groups(layer, params)
        drop = torch.ones(layer.count, dtype=torch.bool, device=zero.device)
        drop[plan.kept(layer)] = False
        nonzero = (drop & ~zero).nonzero().flatten().tolist()
        if nonzero:
            raise ValueError(f"`plan` does not describe `model`: it drops {layer.kind}s {nonzero} of {layer.module!r}, "
                             f"which are not zero in the model (the weights are not those the plan was stored with)")  # fmt: skip
        drops[layer.module + "/" + layer.kind] = drop
    return drops


@torch.no_grad()
def remove_zero_groups(model: nn.Module, notes: list[str] | None = None, plan: StructurePlan | None = None) -> list[GroupReport]:
    """Rebuild, in place, every attention module without its all-zero heads and every MLP without its all-zero neurons
    (at least one group is kept in each); return one :class:`GroupReport` per module found (removed or not).

    With a ``plan`` (:class:`lightning_sparse.structure.plan.StructurePlan`, stored by the pruning callback) its units
    are used as they are, without discovery, and the units it drops are removed (each must be zero in ``model``; a plan
    that does not describe ``model`` is refused). A Hugging Face model's config is then rewritten to describe the
    smaller model where it can (:func:`lightning_sparse.structure.hf_config.update_configs`); what it says is appended
    to ``notes``."""
    reports = []
    if plan is not None:
        layers = list(plan.layers)
        zero = _planned_drops(model, plan)
    else:
        layers = find_group_layers(model)
        params = dict(model.named_parameters())
        zero = {layer.module + "/" + layer.kind: zero_groups(layer, params) for layer in layers}
    for layer in layers:  # every zero test is made before any module changes (a Sequential's layers share tensors)
        row = GroupReport(layer.module, layer.kind, layer.module_type, layer.count,
                          members=[_describe_member(m, layer.width) for m in layer.members], params=layer.params,
                          query_heads=layer.query_heads, width=layer.width, kv_heads=layer.kv_heads)  # fmt: skip
        reports.append(row)
        dropped = zero[layer.module + "/" + layer.kind].nonzero().flatten().tolist()
        if not dropped:
            row.reason = f"no {layer.kind} has all its members zero"
            continue
        if len(dropped) == layer.count:
            dropped = dropped[1:]  # a module keeps one (zero) group rather than vanish
        keep = [g for g in range(layer.count) if g not in set(dropped)]
        try:
            row.rebuilt_as = remove_units(model, layer, keep)
        except KeptDense as reason:
            row.reason = str(reason)
            continue
        row.removed = dropped
        row.reason = f"{len(dropped)} of {layer.count} {layer.kind}s had every member zero: removed"
    # every layer, resized or not: a layer that kept all its units is one the config must describe too
    resized = [Resized(r.module, r.kind, r.before, r.after, r.query_heads, r.width, tuple(r.params), r.kv_heads)
               for r in reports]  # fmt: skip
    config_notes = update_configs(model, resized) if any(r.removed for r in reports) else []
    if notes is not None:
        notes += config_notes
    for module in model.modules():  # its nested-tensor path runs the layers' fused kernel on the packed projections
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(layer.self_attn, HeadPrunedMultiheadAttention) for layer in module.layers
        ):
            module.use_nested_tensor = False
    return reports


def has_zero_groups(model: nn.Module, plan: StructurePlan | None = None) -> bool:
    """True when some attention head or MLP neuron of ``model`` has all its members zero (with a ``plan``: when the
    plan drops a unit)."""
    if plan is not None:
        return any(len(plan.kept(layer)) < layer.count for layer in plan.layers)
    params = dict(model.named_parameters())
    return any(bool(zero_groups(layer, params).any()) for layer in find_group_layers(model))


def groups_table(rows: list[GroupReport]) -> Table:
    """Heads and neurons per module: before → after, the groups removed and the member tensors of every group."""
    table = Table(title="Deploy: attention heads and MLP neurons", show_lines=False)
    for column in ("module", "type", "groups", "before", "after", "removed", "members (each group's entries)", "why"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.module, row.rebuilt_as or row.module_type, row.kind, str(row.before), str(row.after),
                      ", ".join(map(str, row.removed)) or "-", "; ".join(row.members), row.reason)  # fmt: skip
    return table
