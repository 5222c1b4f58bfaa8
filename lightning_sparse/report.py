"""Per-layer sparsity tables (rich) and bar charts (matplotlib) for a model, a mask set or a checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from lightning_sparse.core.counting import count_zeros, tensor_key, zero_fraction
from lightning_sparse.core.layouts import WEIGHT_NAME
from lightning_sparse.core.masks import MaskSet


@dataclass(frozen=True)
class LayerSparsity:
    """Counts for one sparsified parameter."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    #: The name listed before this one for the same tensor (a tied weight): the global count skips it.
    tied_to: str | None = None

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


def stats_from_masks(masks: MaskSet, label: Callable[[str], str] | None = None) -> list[LayerSparsity]:
    """Per-layer counts according to the stored masks; ``label`` names a layer in the table (e.g. a tied tensor
    as ``"tok.weight (= head.weight)"``, :meth:`~lightning_sparse.core.targets.Targets.label`)."""
    label = label or str
    return [
        LayerSparsity(label(name), tuple(masks.params[name].shape), masks.numel(name), masks.numel(name) - masks.nonzeros(name))
        for name in masks
    ]


def stats_from_tensors(tensors: Mapping[str, Tensor]) -> list[LayerSparsity]:
    """Per-layer counts of exact zeros in the given tensors (:func:`~lightning_sparse.core.counting.count_zeros`;
    FSDP2 shards are counted whole: call on every rank); a second name of a tied tensor gets a row with ``tied_to``
    set to the first."""
    first: dict[tuple, str] = {}
    stats = []
    for name, t in tensors.items():
        tied_to = first.setdefault(tensor_key(t), name)
        stats.append(LayerSparsity(name, tuple(t.shape), t.numel(), count_zeros([t])[0], tied_to if tied_to != name else None))
    return stats


def global_counts(stats: Iterable[LayerSparsity]) -> tuple[int, int]:
    """``(zeros, total)`` over the counted layers, each tied tensor once: for rows of the same tensors, what
    :func:`~lightning_sparse.core.counting.count_zeros` gives (their global sparsity is
    :func:`~lightning_sparse.core.counting.zero_fraction` of it, equal to ``core.global_sparsity`` of the tensors)."""
    distinct = [s for s in stats if s.tied_to is None]
    return sum(s.zeros for s in distinct), sum(s.numel for s in distinct)


def sparsity_table(stats: list[LayerSparsity], title: str = "Sparsity per layer") -> Table:
    """A rich table: one row per layer, then the global total."""
    table = Table(title=title)
    for column, justify in (("layer", "left"), ("shape", "left"), ("params", "right"), ("non-zero", "right"), ("sparsity", "right")):
        table.add_column(column, justify=justify)
    for s in stats:
        name = s.name if s.tied_to is None else f"{s.name} (= {s.tied_to})"
        table.add_row(name, "×".join(map(str, s.shape)), f"{s.numel:,}", f"{s.numel - s.zeros:,}", f"{s.sparsity:.2%}")
    zeros, total = global_counts(stats)
    table.add_section()
    table.add_row("global", "", f"{total:,}", f"{total - zeros:,}", f"{zero_fraction(zeros, total):.2%}", style="bold")
    return table


def quantization_table(
    bits: Mapping[str, int], params: Mapping[str, Tensor], errors: Mapping[str, float], method: str
) -> Table:
    """A rich table of the quantized layers: bits, distinct values in use, sparsity and relative error."""
    table = Table(title=f"QuantizationAwareTraining ({method}): weights per layer")
    for column, justify in (("layer", "left"), ("shape", "left"), ("bits", "right"), ("distinct values", "right"),
                            ("sparsity", "right"), ("rel. error", "right")):  # fmt: skip
        table.add_column(column, justify=justify)
    for name, param in params.items():
        weight = param.detach()
        table.add_row(
            name, "×".join(map(str, weight.shape)), str(bits[name]), f"{torch.unique(weight).numel():,}",
            f"{float((weight == 0).float().mean()):.2%}", f"{errors[name]:.4f}",
        )  # fmt: skip
    return table


def print_table(table: Table) -> None:
    Console().print(table)


def checkpoint_stats(path: str | Path, *, trusted: bool = False) -> list[LayerSparsity]:
    """Per-layer zeros of a Lightning checkpoint (a file, or an FSDP2 distributed checkpoint folder, read whole), a
    plain state dict file or a compressed export (``.lsz``).

    The layers are those a sparsity callback masked, when its state is in the checkpoint; otherwise every
    floating-point tensor named ``*weight`` (or a recurrent ``*weight_ih_l0``, ``*weight_hh_l0``, …) with at least two
    dimensions (Linear/Conv/LSTM weights). A checkpoint is
    read with ``weights_only=True`` (:func:`lightning_sparse.export.load_checkpoint`): a pickle in it cannot run
    code unless ``trusted``. Anything that is not such a file is refused with a ``ValueError`` naming it.
    """
    from lightning_sparse import export

    path = export.check_checkpoint_path(path)  # nothing read from a FIFO or device, a directory named as such
    compressed = False
    if not path.is_dir():  # a distributed (sharded) checkpoint is a folder: load_checkpoint reads it whole
        with open(path, "rb") as f:
            compressed = f.read(len(export.MAGIC)) == export.MAGIC
    checkpoint = export.load_compressed(path) if compressed else export.load_checkpoint(path, trusted=trusted)
    state_dict = export.checkpoint_state_dict(checkpoint, path)
    names: list[str] = []
    callbacks = checkpoint.get("callbacks", {}) if isinstance(checkpoint, Mapping) and not compressed else {}
    for state in callbacks.values() if isinstance(callbacks, Mapping) else ():
        shapes = state.get("masks", {}).get("shapes") if isinstance(state, dict) and isinstance(state.get("masks"), dict) else None
        if isinstance(shapes, Mapping):
            names += [n for n in shapes if n not in names]
    if not names:
        names = [
            n for n, t in state_dict.items()
            if isinstance(t, Tensor) and t.is_floating_point() and t.ndim >= 2 and WEIGHT_NAME.search(str(n))
        ]
    if not names:
        raise ValueError(f"{path} holds no Linear/Conv weights to report on")
    missing = [n for n in names if not isinstance(state_dict.get(n), Tensor)]
    if missing:
        raise ValueError(f"{path}: the masked layers {missing} have no tensor in its state_dict")
    return stats_from_tensors({name: state_dict[name] for name in names})


def plot_sparsity(stats: list[LayerSparsity], path: str | Path, title: str = "Sparsity per layer") -> Path:
    """Save a bar chart of per-layer sparsity to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(stats) + 2), 3.5))
    ax.bar(range(len(stats)), [100 * s.sparsity for s in stats], color="tab:blue")
    ax.axhline(100 * zero_fraction(*global_counts(stats)), color="tab:red", linestyle="--", label="global")
    ax.set_xticks(range(len(stats)), [s.name for s in stats], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
