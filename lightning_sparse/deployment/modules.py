"""Inference-only modules a deployed model is built from (besides ``torch.nn``'s own).

They hold plain tensors (sparse CSR/BSR ones included), so a deployed model pickles with ``torch.save`` and loads
with ``torch.load`` wherever ``torch`` and ``lightning_sparse`` are installed, without the code that trained it.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from lightning_sparse.structure import ops as op_table

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class SparseLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` held as a sparse CSR or BSR tensor (PyTorch's own sparse kernels).

    ``W`` and ``b`` are buffers, fixed: the layer runs with autograd on and passes gradients to its input (the
    product's backward is ``Wᵀ @ grad``), but has no parameters to train.

    Computed as ``(W @ xᵀ)ᵀ``: the sparse matrix on the left is the form PyTorch's CPU (MKL) and CUDA (cuSPARSE)
    kernels run fast. The result is returned as a transposed view of a contiguous ``(out, batch)`` tensor, so a
    following ``SparseLinear`` (elementwise activations keep the layout) gets a contiguous ``xᵀ`` without a copy.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, layout: str = "csr", blocksize: int | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.layout = layout
        # plain tensors even when built under inference mode (deploy times its layers there): an inference tensor in
        # a module fails the first call with autograd on ("Inference tensors cannot be saved for backward")
        with torch.inference_mode(False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # said once per layer otherwise
            dense = weight.detach().clone()
            sparse = dense.to_sparse_csr() if layout == "csr" else dense.to_sparse_bsr((blocksize, blocksize))
            self.register_buffer("weight", int32_indices(sparse))
            self.register_buffer("bias", None if bias is None else bias.detach().reshape(-1, 1).clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: str = "csr", blocksize: int | None = None) -> SparseLinear:
        return cls(linear.weight, linear.bias, layout, blocksize)

    def forward(self, x: Tensor) -> Tensor:
        leading = x.shape[:-1]
        xt = x.reshape(-1, self.in_features).t()
        if not xt.is_contiguous():
            xt = xt.contiguous()
        return sparse_product(self.weight, self.bias, xt).t().reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().count_nonzero().item()
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, nnz={nnz}"


def sparse_product(weight: Tensor, bias: Tensor | None, h: Tensor) -> Tensor:
    """``weight @ h + bias`` (``bias`` a column) for a fixed weight, dense or sparse; differentiable in ``h``.

    PyTorch differentiates the CSR product itself (its backward multiplies by the CSR transpose); a BSR weight's
    transpose is BSC, which PyTorch's CPU kernels cannot multiply, so its backward goes through :class:`_BlockProduct`.
    """
    if torch.is_grad_enabled() and h.requires_grad and weight.layout == torch.sparse_bsr:
        return _BlockProduct.apply(weight, bias, h)
    return torch.mm(weight, h) if bias is None else torch.addmm(bias, weight, h)


class _BlockProduct(torch.autograd.Function):
    """``W h + b`` with a fixed BSR ``W``: forward on the sparse kernel, backward ``∂h = Wᵀ g`` with ``W`` densified
    (a deployed model's backward is for input gradients, not its speed)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, bias: Tensor | None, h: Tensor) -> Tensor:
        ctx.weight = weight
        return torch.mm(weight, h) if bias is None else torch.addmm(bias, weight, h)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, Tensor]:
        return None, None, torch.mm(ctx.weight.to_dense().t(), grad)


def int32_indices(sparse: Tensor) -> Tensor:
    """``sparse`` (CSR/BSR) with 32-bit indices where they fit: PyTorch's MKL (LP64) and cuSPARSE calls convert 64-bit
    indices to 32-bit on every product otherwise (measured 0.0567 → 0.0522 ms for a 243×480 CSR weight at 96%
    sparsity times a 480×64 input on one CPU thread)."""
    if sparse.layout not in (torch.sparse_csr, torch.sparse_bsr) or sparse.crow_indices().dtype == torch.int32:
        return sparse
    if max(sparse.values().shape[0], *sparse.shape) >= 2**31 - 1:
        return sparse
    make = torch.sparse_csr_tensor if sparse.layout == torch.sparse_csr else torch.sparse_bsr_tensor
    return make(sparse.crow_indices().int(), sparse.col_indices().int(), sparse.values(), sparse.shape, check_invariants=True)


class SemiStructuredLinear(nn.Module):
    """A Linear layer whose 2:4-sparse weight runs on NVIDIA's sparse tensor cores (``to_sparse_semi_structured``).

    The compressed weight cannot be pickled, so the dense (2:4-patterned) weight is what is saved; it is
    compressed again when the module is loaded on a capable GPU, and used dense (same outputs) anywhere else.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.inference_mode(False):  # plain tensors, as in SparseLinear: the layer also runs with autograd on
            self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.compressed = False
        self.compress()

    def compress(self) -> None:
        """Swap the weight for its semi-structured form where the device supports it; keep it dense elsewhere."""
        if self.compressed or not semi_structured_supported(self.weight.device)[0]:
            return
        from torch.sparse import to_sparse_semi_structured

        with torch.inference_mode(False):
            self.weight = nn.Parameter(to_sparse_semi_structured(self.weight.detach()), requires_grad=False)
        self.compressed = True

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.compressed:  # pickle the dense weight: the semi-structured subclass does not serialise
            params = dict(state["_parameters"])
            params["weight"] = nn.Parameter(self.weight.detach().to_dense(), requires_grad=False)
            state["_parameters"], state["compressed"] = params, False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        try:
            self.compress()
        except (RuntimeError, NotImplementedError):  # this GPU/dtype has no kernel for it: the dense weight is exact
            self.compressed = False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compressed={self.compressed}"


class FoldedConv(nn.Module):
    """A convolution whose removed input channels were constant: adds their exact contribution back.

    A pruned producer channel carries a constant (its bias, through BN and activations). With zero padding the
    contribution of a constant channel is not uniform: border outputs see fewer kernel taps. It equals
    ``conv(ones, K)`` with ``K = Σ_c v_c · W[:, c]``, computed once per input size and cached.
    """

    def __init__(self, conv: nn.Module, folded: Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("folded", folded.detach().clone())  # (out_channels, 1, *kernel_size)
        self._cache: dict[tuple[Any, ...], Tensor] = {}

    def constant(self, x: Tensor) -> Tensor:
        """The removed channels' contribution for inputs of ``x``'s spatial size, device and dtype."""
        key = (tuple(x.shape[2:]), x.device, x.dtype)
        if key not in self._cache:
            with torch.inference_mode(False):  # a plain tensor: the cache outlives the (inference-mode) call filling it
                ones = torch.ones((1, 1, *x.shape[2:]), device=x.device, dtype=x.dtype)
                conv = self.conv
                self._cache[key] = _CONV[ones.dim() - 2](ones, self.folded.to(x.dtype), None, conv.stride, conv.padding, conv.dilation)
        return self._cache[key]

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.constant(x)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}


def semi_structured_supported(device: torch.device) -> tuple[bool, str]:
    """Whether ``torch.sparse.to_sparse_semi_structured`` kernels can run on ``device``, and why not."""
    if device.type != "cuda":
        return False, f"semi-structured (N:M) kernels need a CUDA GPU; the device is {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        return False, f"semi-structured kernels need compute capability >= 8.0; {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
    return True, f"CUDA compute capability {capability[0]}.{capability[1]}"


class DeployedGraphModule(fx.GraphModule):
    """The deployed model: a ``torch.fx`` GraphModule whose layers are direct attributes (``net.1`` → ``net_1``)
    and whose calls skip fx's error-reporting wrapper, so the graph adds no Python overhead over the original
    model (it matters at batch 1). It stays a GraphModule: ``torch.save`` / ``torch.load`` work as for any."""

    def recompile(self) -> Any:
        code = super().recompile()
        if "__call__" in vars(type(self)):  # fx installs a per-instance-class wrapper; nn.Module.__call__ suffices
            delattr(type(self), "__call__")
        return code

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild, args = super().__reduce__()
        return _rebuild_deployed, (rebuild, args)


def _rebuild_deployed(rebuild: Any, args: tuple[Any, ...]) -> DeployedGraphModule:
    """Unpickle: fx rebuilds a plain GraphModule from the saved code; take over its graph and modules."""
    plain = rebuild(*args)
    return DeployedGraphModule(plain, plain.graph, class_name=type(plain).__name__)


def flat_graph_module(gm: fx.GraphModule) -> DeployedGraphModule:
    """``gm`` with every called module and fetched attribute at the top level, named with ``_`` for ``.``."""
    root: dict[str, Any] = {}
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            value = functools.reduce(getattr, node.target.split("."), gm)
            flat = node.target.replace(".", "_")
            while flat in root and root[flat] is not value:
                flat += "_"
            root[flat] = value
            node.target = flat
    return DeployedGraphModule(root, graph, class_name=type(gm).__name__)


#: Modules that act on each element alone (dropout: nothing in eval), so they give the same result on a transposed
#: activation: the op table's elementwise modules (:data:`lightning_sparse.structure.ops.ELEMENTWISE_MODULES`).
#: PReLU (a weight per channel) and channel dropout are not: a chain stops there.
ELEMENTWISE = op_table.ELEMENTWISE_MODULES


class TransposedChain(nn.Module):
    """Consecutive Linear layers, with elementwise modules between them, run on transposed activations.

    PyTorch's fast sparse products take the sparse matrix on the left (``W @ xᵀ``) and a contiguous ``xᵀ``; one
    Linear alone must transpose its input (and its output back) on every call. Here the input is transposed once
    (only the columns the first weight reads, where gathering them is faster), every layer computes
    ``hᵀ = W hᵀ + b`` with ``W`` dense or sparse (CSR/BSR) as measured fastest in this layout, the elementwise
    modules run unchanged (in place: each ``hᵀ`` is the chain's own; their ``forward`` is called directly, so
    hooks on them do not run), and the result is transposed back once. ``start_dim``: the chain also does a
    ``Flatten(start_dim, -1)`` that fed its first layer.
    """

    def __init__(self, weights: list[Tensor], biases: list[Tensor | None], ops: list[list[nn.Module]], forms: list[str],
                 names: list[str], in_features: int, keep: Tensor | None = None, start_dim: int | None = None) -> None:  # fmt: skip
        super().__init__()
        if not (len(weights) == len(biases) == len(ops) == len(forms) == len(names)) or len(weights) < 1:
            raise ValueError("TransposedChain needs one weight, bias, op list, form and name per layer")
        self.in_features, self.out_features = in_features, weights[-1].shape[0]
        self.forms, self.names, self.start_dim = list(forms), list(names), start_dim
        self.register_buffer("keep", keep)
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            self.register_buffer(f"weight{i}", weight)
            self.register_buffer(f"bias{i}", None if bias is None else bias.detach().reshape(-1, 1).clone())
        self.ops = nn.ModuleList(nn.ModuleList(_in_place(op) for op in layer_ops) for layer_ops in ops)
        self._plan: tuple[Tensor | None, list[tuple[Tensor, Tensor | None, tuple[Any, ...]]]] | None = None

    def plan(self) -> tuple[Tensor | None, list[tuple[Tensor, Tensor | None, tuple[Any, ...]]]]:
        """The input columns to gather, and per layer the weight, bias and elementwise ``forward``s: looked up
        once, not on every call (attribute lookups cost as much as a small product at batch 1)."""
        if self._plan is None:
            buffers = self._buffers
            steps = [(buffers[f"weight{i}"], buffers[f"bias{i}"], tuple(op.forward for op in ops)) for i, ops in enumerate(self.ops)]
            self._plan = (buffers["keep"], steps)
        return self._plan

    def forward(self, x: Tensor) -> Tensor:
        keep, steps = self._plan or self.plan()
        leading = x.shape[: self.start_dim] if self.start_dim is not None else x.shape[:-1]
        h = x.reshape(-1, self.in_features).t()
        h = h[keep] if keep is not None else h.contiguous()
        for weight, bias, ops in steps:
            h = sparse_product(weight, bias, h)
            for op in ops:
                h = op(h)
        return h.t().contiguous().reshape(*leading, self.out_features)

    def _apply(self, fn: Any, recurse: bool = True) -> TransposedChain:
        self._plan = None  # .to() / .cuda() / .half() replace the buffers
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_plan": None}

    def extra_repr(self) -> str:
        kept = "all" if self.keep is None else f"{self.keep.numel()} (the columns the first weight reads)"
        flatten = f", flatten from dim {self.start_dim}" if self.start_dim is not None else ""
        layers = ", ".join(f"{name}: {form}" for name, form in zip(self.names, self.forms))
        return f"in_features={self.in_features}, out_features={self.out_features}, inputs={kept}{flatten}, layers=[{layers}]"


def _in_place(op: nn.Module) -> nn.Module:
    """A copy of ``op`` computing in place where it can: the chain's activations are its own intermediates."""
    op = copy.deepcopy(op)
    if hasattr(op, "inplace") and isinstance(op.inplace, bool):
        op.inplace = True
    return op
