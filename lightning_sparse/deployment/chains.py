"""Transposed chains: consecutive Linear layers (elementwise modules between them) run on transposed activations.

A Linear on PyTorch's sparse kernels computes ``(W @ xᵀ)ᵀ``: it transposes its input, and the next layer gets a
transposed tensor back. Found on the traced graph (Linear → elementwise* → Linear …, each value used only by the
next node), such a chain becomes one :class:`~lightning_sparse.deployment.modules.TransposedChain`: one transpose
in, one out, and for each layer the fastest of dense and sparse as timed in that layout on its real input. The
chain replaces the layers only when the whole of it is measured faster than the layers as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from lightning_sparse.deployment import kernels
from lightning_sparse.deployment.kernels import MARGIN, outputs_match, verdict
from lightning_sparse.deployment.modules import ELEMENTWISE, SparseLinear, TransposedChain


@dataclass(frozen=True)
class LayerChoice:
    """One layer of a chain: its form (dense, csr, bsr4..) and the times in the transposed layout."""

    name: str
    form: str
    dense_ms: float
    sparse_ms: float | None
    reason: str


@dataclass(frozen=True)
class ChainResult:
    """A chain that was built and timed against the layers as they were; ``used`` when it replaced them."""

    names: list[str]
    module: TransposedChain
    layers: list[LayerChoice]
    chain_ms: float
    layers_ms: float
    used: bool
    gather: str

    def describe(self) -> str:
        path = " → ".join(self.names)
        outcome = "used" if self.used else f"not used (not {1 / MARGIN:.2f}× faster)"
        return (
            f"transposed chain {path}: {self.chain_ms:.4f} ms vs {self.layers_ms:.4f} ms as separate layers "
            f"({self.layers_ms / self.chain_ms:.2f}×), {outcome}; input: {self.gather}; layers: "
            + ", ".join(f"{c.name} {c.form}" for c in self.layers)
        )


def is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or (type(module) is SparseLinear and module.weight.layout in (torch.sparse_csr, torch.sparse_bsr))


def find_chains(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Paths Linear → elementwise module* → Linear … (at least two Linear, one of them with a zero weight), each
    node's value used only by the next, with the ``Flatten(start_dim, -1)`` that feeds the first Linear if any.

    Every node on a path is a module called on the previous node's value alone; the path is cut before a node
    whose value anything else reads (a skip connection), so replacing it changes nothing else in the graph.
    """
    modules = dict(gm.named_modules())

    def module_of(node: fx.Node) -> nn.Module | None:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        return modules.get(str(node.target))

    chains, taken = [], set()
    for node in gm.graph.nodes:
        module = module_of(node)
        if node in taken or module is None or not is_linear(module):
            continue
        path, pending, current = [node], [], node
        while len(current.users) == 1:
            following = next(iter(current.users))
            module = module_of(following)
            if module is None or following.args[0] is not current:
                break
            if isinstance(module, ELEMENTWISE):
                pending.append(following)
            elif is_linear(module):
                path += pending + [following]
                pending = []
            else:
                break
            current = following
        linears = [modules[str(n.target)] for n in path if is_linear(modules[str(n.target)])]
        if len(linears) < 2 or not any(type(m) is SparseLinear or bool((m.weight == 0).any()) for m in linears):
            continue
        source = path[0].args[0]
        flatten = module_of(source) if isinstance(source, fx.Node) else None
        if type(flatten) is nn.Flatten and flatten.end_dim == -1 and len(source.users) == 1:
            path.insert(0, source)
        chains.append(path)
        taken.update(path)
    return chains


def _dense(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The weight and bias (1-D) of a Linear or SparseLinear, dense."""
    if type(module) is nn.Linear:
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    return module.weight.to_dense(), None if module.bias is None else module.bias.reshape(-1)


def _product(weight: Tensor, bias: Tensor | None, h: Tensor) -> Tensor:
    return torch.mm(weight, h) if bias is None else torch.addmm(bias, weight, h)


@torch.inference_mode()
def build(gm: fx.GraphModule, path: list[fx.Node], x: Tensor, kernel: str, repeats: int) -> ChainResult:
    """Choose each layer's form in the transposed layout on its real input (``x``: the chain's input), build the
    chain, check it against the layers as they are, and time both."""
    modules = [gm.get_submodule(str(node.target)) for node in path]
    device = x.device
    start_dim = modules[0].start_dim if type(modules[0]) is nn.Flatten else None
    groups: list[tuple[str, nn.Module, list[nn.Module]]] = []
    for node, module in zip(path, modules):
        if type(module) is nn.Flatten:
            continue
        if is_linear(module):
            groups.append((str(node.target), module, []))
        else:
            groups[-1][2].append(module)

    def original() -> Tensor:
        h = x
        for module in modules:
            h = module(h)
        return h

    want = original()
    first_weight, _ = _dense(groups[0][1])
    flat = (modules[0](x) if start_dim is not None else x).reshape(-1, first_weight.shape[1])
    read = (first_weight != 0).any(0)
    keep = read.nonzero().flatten() if not bool(read.all()) else None
    gather = "transposed whole"
    if keep is not None:
        times = kernels.median_ms({"gather": lambda: flat.t()[keep], "transpose": lambda: flat.t().contiguous()}, repeats, device,
                                  settled=lambda t: verdict(t["gather"], t["transpose"], 1.0) is not None)
        if times["gather"] < times["transpose"]:
            gather = (f"only the {keep.numel()} of {flat.shape[1]} columns the first weight reads, gathered "
                      f"({times['gather']:.4f} ms vs {times['transpose']:.4f} ms to transpose all)")  # fmt: skip
        else:
            gather = f"transposed whole ({times['transpose']:.4f} ms vs {times['gather']:.4f} ms to gather the read columns)"
            keep = None
    h = flat.t()[keep] if keep is not None else flat.t().contiguous()

    # 1. each layer alone, on its real transposed input: which sparse form is fastest, and is it faster than dense
    layers: list[dict[str, Any]] = []
    for index, (name, module, ops) in enumerate(groups):
        weight, bias = _dense(module)
        if index == 0 and keep is not None:
            weight = weight[:, keep]
        column = None if bias is None else bias.reshape(-1, 1).clone()
        dense_out = _product(weight, column, h)
        layer: dict[str, Any] = {"name": name, "dense": weight, "bias": bias, "notes": [], "sparse": None}
        forms: dict[str, Tensor] = {}
        if bool((weight == 0).any()):
            candidates, _ = kernels._candidates(_as_linear(weight, bias), device)
            for form, make in candidates.items():
                if form == "semi-structured":
                    continue
                try:
                    sparse = make().weight
                    if outputs_match(_product(sparse, column, h), dense_out):
                        forms[form] = sparse
                    else:
                        layer["notes"].append(f"{form} output differs from dense: not used")
                except Exception as error:  # noqa: BLE001 - a kernel missing for this dtype/device/shape
                    layer["notes"].append(f"{form} unavailable: {str(error).splitlines()[0][:120]}")
        functions = {"dense": lambda w=weight, c=column, h=h: _product(w, c, h)}
        functions.update({f: (lambda s=s, c=column, h=h: _product(s, c, h)) for f, s in forms.items()})
        times = kernels.median_ms(functions, repeats, device, settled=lambda t, forms=forms: all(verdict(t[f], t["dense"], MARGIN) is not None for f in forms))
        layer["alone"] = times
        if forms:
            best = min(forms, key=lambda f: times[f])
            layer["sparse"] = (best, forms[best])
            layer["use_sparse"] = times[best] < MARGIN * times["dense"] or kernel == "sparse"
        layers.append(layer)
        h = dense_out
        for op in ops:
            h = op(h)

    def make(use_sparse: list[bool]) -> TransposedChain:
        weights = [layer["sparse"][1] if sparse else layer["dense"] for layer, sparse in zip(layers, use_sparse)]
        forms = [layer["sparse"][0] if sparse else "dense" for layer, sparse in zip(layers, use_sparse)]
        with torch.inference_mode(False):  # plain tensors (clones): the chain's weights work outside inference mode too
            return TransposedChain([w.clone() for w in weights], [None if l["bias"] is None else l["bias"].clone() for l in layers],
                                   [ops for _, _, ops in groups], forms, [l["name"] for l in layers], first_weight.shape[1],
                                   None if keep is None else keep.clone(), start_dim).to(device).eval()  # fmt: skip

    # 2. each layer with a sparse form again, inside the whole chain (the others as chosen so far): what is fast
    # alone need not be in the chain, where the layers before it have just evicted its weight from the caches
    use = [bool(layer.get("use_sparse")) for layer in layers]
    choices = []
    for index, layer in enumerate(layers):
        alone = layer["alone"]
        notes = "; ".join(layer["notes"])
        if layer["sparse"] is None:
            why = notes or "no zero in the weight"
            choices.append(LayerChoice(layer["name"], "dense", alone["dense"], None, f"dense in the transposed chain ({why})"))
            continue
        form = layer["sparse"][0]
        with_dense, with_sparse = make([u if i != index else False for i, u in enumerate(use)]), make([u if i != index else True for i, u in enumerate(use)])
        times = kernels.median_ms({"dense": lambda c=with_dense: c(x), form: lambda c=with_sparse: c(x)}, repeats, device,
                                  settled=lambda t, form=form: verdict(t[form], t["dense"], MARGIN) is not None)
        faster = times[form] < MARGIN * times["dense"]
        use[index] = faster or kernel == "sparse"
        measured = (f"whole chain with it {form} {times[form]:.4f} ms vs dense {times['dense']:.4f} ms "
                    f"({times['dense'] / times[form]:.2f}×; the layer alone: {form} {alone[form]:.4f} ms vs dense {alone['dense']:.4f} ms)")  # fmt: skip
        why = ("faster" if faster else "kernel='sparse'") if use[index] else "dense is faster"
        reason = f"{why} in the transposed chain: {measured}" + (f"; {notes}" if notes else "")
        choices.append(LayerChoice(layer["name"], form if use[index] else "dense", times["dense"], times[form], reason))

    chain = make(use)
    names = [c.name for c in choices]
    if not outputs_match(chain(x), want):
        return ChainResult(names, chain, choices, float("nan"), float("nan"), False, gather)
    times = kernels.median_ms({"chain": lambda: chain(x), "layers": original}, repeats, device,
                              settled=lambda t: verdict(t["chain"], t["layers"], MARGIN) is not None)
    used = times["chain"] < MARGIN * times["layers"]
    return ChainResult(names, chain, choices, times["chain"], times["layers"], used, gather)


def _as_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def replace(gm: fx.GraphModule, path: list[fx.Node], chain: TransposedChain) -> str:
    """Put ``chain`` in the graph in place of the nodes of ``path``; returns its attribute name."""
    name = "chain_" + "_".join(str(n.target).replace(".", "_") for n, m in ((n, gm.get_submodule(str(n.target))) for n in path) if is_linear(m))
    while hasattr(gm, name):
        name += "_"
    gm.add_submodule(name, chain)
    with gm.graph.inserting_before(path[0]):
        node = gm.graph.call_module(name, (path[0].args[0],))
    path[-1].replace_all_uses_with(node)
    for old in reversed(path):
        gm.graph.erase_node(old)
    gm.recompile()
    return name
