"""The structure plan: the units found once at set-up (attention heads, key/value groups, MLP and expert neurons) and
which of them are kept, as plain data a checkpoint holds and :func:`lightning_sparse.deploy` reuses.

A plan is what the pattern registry (:mod:`.patterns`) found in the model — for each group layer its module, its
kind, the member tensors with the axis and offsets its units occupy — plus the indices of the units the masks keep.
The pruning callback stores it in its checkpoint state (``"structure_plan"``); ``deploy(model, x, plan=...)`` removes
the units it drops without looking at the model's layout again (so a model whose pattern was registered only while it
trained still deploys), after checking that every module and tensor it names is in the model with the shape it says
and that every unit it drops is zero there. A plan that does not describe the model is refused, naming what differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from lightning_sparse.core.heads import GROUP_KINDS, GroupLayer, GroupSet, Member, pruned_groups
from lightning_sparse.core.masks import MaskSet

#: The version of the plain-data form :meth:`StructurePlan.state_dict` writes.
PLAN_VERSION = 1


def _key(layer: GroupLayer) -> str:
    return f"{layer.module}/{layer.kind}"


@dataclass(frozen=True)
class StructurePlan:
    """Group layers (:class:`~lightning_sparse.core.heads.GroupLayer`) and, per layer, the unit indices kept."""

    layers: tuple[GroupLayer, ...] = ()
    keep: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # "module/kind" -> kept unit indices

    def __bool__(self) -> bool:
        return bool(self.layers)

    def kept(self, layer: GroupLayer) -> list[int]:
        """The indices of ``layer``'s units the plan keeps."""
        return list(self.keep[_key(layer)])

    @classmethod
    def from_masks(cls, groups: GroupSet, masks: MaskSet) -> StructurePlan:
        """The plan of the group layers a callback prunes: a unit is kept unless its entries are all masked."""
        keep = {_key(layer): tuple(int(g) for g in (~pruned_groups(layer, masks)).nonzero().flatten().tolist())
                for layer in groups.layers}  # fmt: skip
        return cls(tuple(groups.layers), keep)

    # ----------------------------------------------------------------- plain data (checkpoints)
    def state_dict(self) -> dict[str, Any]:
        """The plan as plain ``dict``/``list``/``str``/``int`` values (a weights-only checkpoint loads them)."""
        layers = []
        for layer in self.layers:
            layers.append({
                "kind": layer.kind, "module": layer.module, "module_type": layer.module_type, "count": layer.count,
                "width": layer.width, "pattern": layer.pattern, "query_heads": layer.query_heads,
                "kv_heads": layer.kv_heads, "shared": list(layer.shared), "keep": list(self.keep[_key(layer)]),
                "members": [{"param": m.param, "axis": m.axis, "offsets": list(m.offsets), "role": m.role,
                             "width": m.width} for m in layer.members],
            })  # fmt: skip
        return {"version": PLAN_VERSION, "layers": layers}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> StructurePlan:
        """The plan :meth:`state_dict` wrote; a ``ValueError`` saying what is malformed otherwise."""
        if not isinstance(state, Mapping) or state.get("version") != PLAN_VERSION or not isinstance(state.get("layers"), list):
            raise ValueError(f"`plan` must be a StructurePlan or the dict its state_dict() gives (version {PLAN_VERSION} "
                             f"with a 'layers' list), got {_short(state)}")  # fmt: skip
        layers, keep = [], {}
        for index, item in enumerate(state["layers"]):
            try:
                members = tuple(Member(str(m["param"]), _int(m["axis"]), tuple(_int(o) for o in m["offsets"]), str(m["role"]),
                                       _int(m["width"])) for m in item["members"])  # fmt: skip
                layer = GroupLayer(str(item["kind"]), str(item["module"]), str(item["module_type"]), _int(item["count"]),
                                   _int(item["width"]), members, str(item["pattern"]), _int(item["query_heads"]),
                                   _int(item["kv_heads"]), tuple(str(s) for s in item["shared"]))  # fmt: skip
                kept = tuple(_int(g) for g in item["keep"])
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"`plan` layer {index} is malformed ({type(error).__name__}: {error}): give the "
                                 f"plan a pruning callback stored") from None  # fmt: skip
            if layer.kind not in GROUP_KINDS or layer.count < 1 or not members:
                raise ValueError(f"`plan` layer {index} ({layer.module!r}) has kind {layer.kind!r} and {layer.count} units: "
                                 f"the kind must be one of {GROUP_KINDS} with at least one unit")  # fmt: skip
            if not kept or len(set(kept)) != len(kept) or not all(0 <= g < layer.count for g in kept):
                raise ValueError(f"`plan` keeps units {list(kept)} of {layer.module!r}, which has {layer.count}: they must "
                                 f"be distinct indices in [0, {layer.count}), at least one")  # fmt: skip
            layers.append(layer)
            keep[_key(layer)] = kept
        return cls(tuple(layers), keep)

    # ----------------------------------------------------------------- the model it describes
    def relative_to(self, prefix: str) -> StructurePlan:
        """The plan with ``prefix.`` taken off every name: the plan a callback stored for a LightningModule, for the
        model it holds as ``prefix`` (``plan.relative_to("model")``)."""
        if not prefix:
            return self
        cut = len(prefix) + 1

        def strip(name: str) -> str:
            if not name.startswith(prefix + "."):
                raise ValueError(f"`plan` names {name!r}, which is not inside {prefix!r}")
            return name[cut:]

        layers = tuple(replace(layer, module=strip(layer.module), shared=tuple(strip(s) for s in layer.shared),
                               members=tuple(replace(m, param=strip(m.param)) for m in layer.members))
                       for layer in self.layers)  # fmt: skip
        return StructurePlan(layers, {_key(new): self.keep[_key(old)] for new, old in zip(layers, self.layers)})

    def for_model(self, model: nn.Module) -> StructurePlan:
        """The plan checked against ``model`` (:meth:`check`), relative to it: a plan stored for a LightningModule also
        fits the module it holds (``lightning_module.model``), its names taken off the prefix that leads there."""
        if not self.layers:
            return self
        first = self.layers[0].module.split(".")
        refusal = None  # the reason under the prefix where the plan's first module is in the model, else as given
        for depth in range(len(first)):
            try:
                plan = self.relative_to(".".join(first[:depth]))
                plan.check(model)
                return plan
            except ValueError as error:
                if refusal is None or _has_module(model, ".".join(first[depth:])):
                    refusal = error
        assert refusal is not None
        raise refusal

    def check(self, model: nn.Module) -> None:
        """Refuse (``ValueError``, naming the first difference) a plan whose modules, classes or member tensors are
        not ``model``'s, or whose units do not fit a tensor's shape."""
        params = dict(model.named_parameters(remove_duplicate=False))
        for layer in self.layers:
            where = f"the plan's {layer.kind}s of {layer.module!r} ({layer.module_type})"
            try:
                module = model.get_submodule(layer.module) if layer.module else model
            except AttributeError:
                raise ValueError(f"`plan` does not describe `model`: {where}: the model has no module {layer.module!r} "
                                 f"(deploy a model with the plan its own training stored, or no plan)") from None  # fmt: skip
            if type(module).__name__ != layer.module_type:
                raise ValueError(f"`plan` does not describe `model`: {where}: the model's {layer.module!r} is a "
                                 f"{type(module).__name__}")  # fmt: skip
            for name in [*(m.param for m in layer.members), *layer.shared]:
                if name not in params:
                    raise ValueError(f"`plan` does not describe `model`: {where}: the model has no parameter {name!r}")
            for member in layer.members:
                shape = params[member.param].shape
                span = member.span(layer.width)
                needed = max(member.offsets) + layer.count * span
                exact = len(member.offsets) == 1 and sum(m.param == member.param for m in layer.members) == 1
                if len(shape) <= member.axis or shape[member.axis] < needed or (exact and shape[member.axis] != needed):
                    raise ValueError(f"`plan` does not describe `model`: {where}: {member.param!r} has shape {list(shape)}, "
                                     f"but {layer.count} units of {span} along axis {member.axis} need {needed} entries "
                                     f"there")  # fmt: skip


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def as_plan(plan: StructurePlan | Mapping[str, Any]) -> StructurePlan:
    """``plan`` as a :class:`StructurePlan` (a plan, or the plain dict of its ``state_dict()``)."""
    return plan if isinstance(plan, StructurePlan) else StructurePlan.from_state(plan)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, got {value!r}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__}"
