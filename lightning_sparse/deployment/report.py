"""What :func:`~lightning_sparse.deploy` did, per layer and for the whole model, as data and as a rich table."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table


@dataclass
class LayerReport:
    """One Linear/Conv layer: its shape and sparsity before, what it became, the measured times, and why."""

    name: str
    kind: str
    shape: tuple[int, ...]
    sparsity: float
    pattern: str  # unstructured, channel, N:M, dense
    deployed_as: str = "dense"
    deployed_shape: tuple[int, ...] | None = None
    dense_ms: float | None = None
    sparse_ms: float | None = None
    reason: str = ""


@dataclass
class DeployReport:
    """The whole deployment: device, per-layer rows, notes (refusals, fallbacks) and before/after measurements."""

    device: str
    changed: bool = False
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    param_bytes: tuple[int, int] = (0, 0)
    peak_forward_bytes: tuple[int, int] = (0, 0)
    forward_ms: tuple[float, float] | None = None
    traced: bool = False
    memory_format: str = "contiguous"  # of the convolution weights: channels_last where deploy measured it faster
    chains: list[str] = field(default_factory=list)  # transposed chains tried: layers, times, used or not
    groups: list[str] = field(default_factory=list)  # coupled channel groups with zeros: members, consumers, outcome
    removed_groups: list = field(default_factory=list)  # attention heads / MLP neurons per module (groups.GroupReport)
    returned: str = "input"  # which variant deploy returned: input, dense layers or deployed (fallback.decide)
    decision: str = ""  # why, with the whole-model times
    variant_ms: dict[str, float] = field(default_factory=dict)  # median whole-model ms of each variant timed
    variant_runs: dict[str, list[float]] = field(default_factory=dict)  # every interleaved run (ms) behind them

    @property
    def speedup(self) -> float | None:
        """Dense forward time / deployed forward time on the example input."""
        return self.forward_ms[0] / self.forward_ms[1] if self.forward_ms else None

    def layer(self, name: str) -> LayerReport:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r} in the report; layers: {[row.name for row in self.layers]}")


def _shape(shape: tuple[int, ...] | None) -> str:
    return "×".join(map(str, shape)) if shape else "-"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def deploy_table(report: DeployReport) -> Table:
    """Per layer: shape before → after, sparsity, pattern, what it runs as, measured times, and the reason."""
    table = Table(title=f"Deploy on {report.device}: per layer", show_lines=False)
    for column in ("layer", "type", "shape", "deployed shape", "sparsity", "pattern", "runs as", "dense ms", "sparse ms", "why"):
        table.add_column(column, justify="right" if column in ("sparsity", "dense ms", "sparse ms") else "left",
                         overflow="fold", min_width=len(column) if column != "why" else 30)  # fmt: skip
    for row in report.layers:
        table.add_row(
            row.name, row.kind, _shape(row.shape), _shape(row.deployed_shape or row.shape), f"{row.sparsity:.1%}",
            row.pattern, row.deployed_as, _ms(row.dense_ms), _ms(row.sparse_ms), row.reason,
        )  # fmt: skip
    return table


def summary_lines(report: DeployReport) -> list[str]:
    """Parameter bytes, peak forward memory and forward time before → after, then the notes."""
    lines = []
    (p0, p1), (m0, m1) = report.param_bytes, report.peak_forward_bytes
    if p0:
        lines.append(f"parameter bytes: {p0:,} → {p1:,} ({p0 / max(p1, 1):.2f}× smaller)")
    if m0:
        lines.append(f"peak forward memory (parameters + inputs + live activations): {m0:,} → {m1:,} bytes ({m0 / max(m1, 1):.2f}× smaller)")
    if report.forward_ms:
        before, after = report.forward_ms
        lines.append(f"forward on the example input: {before:.4f} ms → {after:.4f} ms ({report.speedup:.2f}× faster; medians of interleaved runs)")
    if report.decision:
        lines.append(f"returned: {report.returned} ({report.decision})")
    lines += [f"{group}" for group in report.groups]
    lines += [f"{chain}" for chain in report.chains]
    lines += [f"note: {note}" for note in report.notes]
    return lines


def print_deploy_report(report: DeployReport, console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 180)
    if report.layers:
        console.print(deploy_table(report))
    if report.removed_groups:
        from lightning_sparse.deployment.groups import groups_table  # groups imports core; report stays light

        console.print(groups_table(report.removed_groups))
    for line in summary_lines(report):
        console.print(line, highlight=False)
