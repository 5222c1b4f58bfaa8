"""What :func:`~lightning_sparse.export.format.save_compressed` wrote, as rows and a rich table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

__all__ = ["ExportReport", "LayerExport", "export_table", "print_report"]


@dataclass(frozen=True)
class LayerExport:
    """How one state-dict entry was stored; ``fp32_bytes`` is 0 for non-floating tensors."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    detail: str
    sparsity: float | None
    distinct: int | None
    stored_bytes: int
    fp32_bytes: int


@dataclass(frozen=True)
class ExportReport:
    """What :func:`save_compressed` wrote: per-layer rows and the whole file's size."""

    path: Path
    layers: list[LayerExport]
    file_bytes: int

    @property
    def fp32_bytes(self) -> int:
        """Size of every floating tensor as dense fp32 (a tensor reached by two names, such as tied weights,
        counted once: it is stored once)."""
        return sum(layer.fp32_bytes for layer in self.layers)

    @property
    def ratio(self) -> float:
        """fp32 dense bytes of the floating tensors / file size (the header included)."""
        return self.fp32_bytes / self.file_bytes

    @property
    def compressed_layers(self) -> list[LayerExport]:
        return [layer for layer in self.layers if layer.encoding not in ("raw", "alias")]


def print_report(report: ExportReport) -> None:
    """Print the per-layer size table, and say so when no layer is compressed."""
    console = Console()
    if not console.is_terminal:  # logs and pipes: room for all eight columns rather than rich's default 80
        console.width = max(console.width, 132)
    console.print(export_table(report))
    if not report.compressed_layers:
        console.print("The model has no compressed layers: every tensor is stored as it is (raw).", soft_wrap=True)
    # one line however long the path: what a log or a grep reads
    console.print(f"Saved {report.path}: {report.file_bytes:,} bytes, {report.ratio:.1f}× smaller than fp32 dense.", soft_wrap=True)


def export_table(report: ExportReport) -> Table:
    """A rich table: one row per state-dict entry, then the whole file against fp32 dense."""
    table = Table(title=f"Compressed export: {report.path}")
    table.add_column("layer", min_width=max(len(layer.name) for layer in report.layers))  # never cut a name
    for column in ("shape", "encoding"):
        table.add_column(column)
    for column in ("sparsity", "distinct", "bytes", "fp32 bytes", "ratio"):
        table.add_column(column, justify="right")
    for layer in report.layers:
        table.add_row(
            layer.name,
            "×".join(map(str, layer.shape)) or "scalar",
            f"{layer.encoding} ({layer.detail})" if layer.detail else layer.encoding,
            "-" if layer.sparsity is None else f"{layer.sparsity:.2%}",
            "-" if layer.distinct is None else f"{layer.distinct:,}",
            f"{layer.stored_bytes:,}",
            f"{layer.fp32_bytes:,}" if layer.fp32_bytes else "-",
            f"{layer.fp32_bytes / layer.stored_bytes:.1f}×" if layer.fp32_bytes and layer.stored_bytes else "-",
        )
    table.add_section()
    table.add_row(
        "whole file", "", "", "", "", f"{report.file_bytes:,}", f"{report.fp32_bytes:,}", f"{report.ratio:.1f}×",
        style="bold",
    )  # fmt: skip
    return table
