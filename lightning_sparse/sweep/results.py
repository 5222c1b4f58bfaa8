"""What a sweep produced: one record per trial, feasibility, the best trial, the Pareto front, the table, the plot."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from lightning_sparse.files import write_text_atomic
from lightning_sparse.sweep.config import Objective, SweepConfig


@dataclass
class TrialRecord:
    """One trial as the sweep saw it; ``log`` is relative to the sweep folder."""

    index: int
    parameters: dict[str, Any]
    status: str = "running"  # running | completed | failed | lost (left running by a sweeper, not checkable)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    log: str = ""
    seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_feasible(record: TrialRecord, sweep: SweepConfig, baseline: float | None) -> bool:
    """Completed and every outcome constraint holds on the measured metrics."""
    if record.status != "completed":
        return False
    return all(c.metric in record.metrics and c.holds(record.metrics[c.metric], baseline) for c in sweep.constraints)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and better somewhere (larger is better)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(records: Sequence[TrialRecord], objectives: Sequence[Objective]) -> list[TrialRecord]:
    """The records no other record dominates on ``objectives`` (each turned to larger-is-better)."""
    points = {r.index: [-r.metrics[o.metric] if o.minimize else r.metrics[o.metric] for o in objectives] for r in records}
    front = [r for r in records if not any(dominates(points[o.index], points[r.index]) for o in records)]
    return sorted(front, key=lambda r: points[r.index][0], reverse=True)


def best_trial(records: Sequence[TrialRecord], sweep: SweepConfig, baseline: float | None) -> TrialRecord | None:
    """The feasible trial with the best first objective (on the Pareto front when there are several objectives)."""
    feasible = [r for r in records if is_feasible(r, sweep, baseline)]
    if not feasible:
        return None
    first = sweep.objective[0]
    best = feasible[0]
    for record in feasible[1:]:
        if first.better(record.metrics[first.metric], best.metrics[first.metric]):
            best = record
    return best


def write_csv(path: Path, records: Sequence[TrialRecord], sweep: SweepConfig, baseline: float | None) -> None:
    """``trials.csv``, one row per trial: index, status, feasible, ``param/<name>`` for each parameter, the metrics,
    seconds, error and log path."""
    metric_names = sorted({name for r in records for name in r.metrics})
    columns = ["index", "status", "feasible", *[f"param/{p.name}" for p in sweep.parameters], *metric_names, "seconds",
               "error", "log"]  # fmt: skip
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for r in sorted(records, key=lambda r: r.index):
        writer.writerow({
            "index": r.index, "status": r.status, "feasible": is_feasible(r, sweep, baseline),
            **{f"param/{name}": value for name, value in r.parameters.items()}, **r.metrics,
            "seconds": "" if r.seconds is None else f"{r.seconds:.1f}", "error": r.error or "", "log": r.log,
        })  # fmt: skip
    write_text_atomic(path, text.getvalue())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def results_table(records: Sequence[TrialRecord], sweep: SweepConfig, baseline: float | None) -> Table:
    """Every trial, its parameters, the sweep's metrics and whether it meets the constraints; the best one in bold."""
    best = best_trial(records, sweep, baseline)
    constraints = ", ".join(str(c) for c in sweep.constraints) or "none"
    base = "" if baseline is None else f", baseline {sweep.baseline_metric} = {baseline:.4f}"
    table = Table(title=f"Sweep {sweep.name}: objective {', '.join(map(str, sweep.objective))}; constraints {constraints}{base}")
    parameters = [p.name for p in sweep.parameters]
    metrics = [f"{m} (measured)" if m in parameters else m for m in sweep.metrics]
    for column in ("trial", "status", *parameters, *metrics, "feasible", "seconds"):
        table.add_column(column, justify="left" if column in ("trial", "status") else "right")
    for r in sorted(records, key=lambda r: r.index):
        status = r.status if r.status not in ("failed", "lost") else f"[red]{r.status}[/red]: {r.error} (log: {r.log})"
        cells = [_fmt(r.parameters.get(p.name, "")) for p in sweep.parameters]
        cells += [_fmt(r.metrics[m]) if m in r.metrics else "" for m in sweep.metrics]
        feasible = "yes" if is_feasible(r, sweep, baseline) else ("no" if r.status == "completed" else "")
        seconds = "" if r.seconds is None else f"{r.seconds:.0f}"
        style = "bold green" if best is not None and r.index == best.index else None
        table.add_row(str(r.index), status, *cells, feasible, seconds, style=style)
    table.caption = f"best feasible: trial {best.index}" if best else "no feasible trial yet"
    return table


def plot_sweep(path: Path, records: Sequence[TrialRecord], sweep: SweepConfig, baseline: float | None) -> Path | None:
    """Objective vs the first constraint metric: trials (feasible or not), the feasible region, the Pareto front
    of the two and the best trial. None when no trial completed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r.status == "completed"]
    x_objective = sweep.objective[0]
    if sweep.constraints:
        constraint = sweep.constraints[0]
        y_name, y_objective = constraint.metric, Objective(constraint.metric, minimize=constraint.op == "<=")
    elif len(sweep.objective) > 1:
        constraint, y_objective = None, sweep.objective[1]
        y_name = y_objective.metric
    else:
        constraint, y_name, y_objective = None, None, None
    done = [r for r in done if x_objective.metric in r.metrics and (y_name is None or y_name in r.metrics)]
    if not done:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r.metrics[x_objective.metric] for r in done]
    ys = [r.metrics[y_name] if y_name else r.index for r in done]
    feasible = [is_feasible(r, sweep, baseline) for r in done]
    ax.scatter([x for x, f in zip(xs, feasible) if f], [y for y, f in zip(ys, feasible) if f], c="tab:green", label="feasible")
    ax.scatter([x for x, f in zip(xs, feasible) if not f], [y for y, f in zip(ys, feasible) if not f], c="tab:red",
               marker="x", label="infeasible")  # fmt: skip
    for r, x, y in zip(done, xs, ys):
        ax.annotate(str(r.index), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if constraint is not None:
        limit = constraint.threshold(baseline)
        low, high = ax.get_ylim()
        span = (limit, max(high, limit)) if constraint.op == ">=" else (min(low, limit), limit)
        ax.axhspan(*span, color="tab:green", alpha=0.08, label=f"feasible: {constraint.metric} {constraint.op} {limit:.4g}")
        ax.axhline(limit, color="tab:green", linestyle=":")
    if y_objective is not None:
        front = pareto_front(done, [x_objective, y_objective])
        front.sort(key=lambda r: r.metrics[x_objective.metric])
        ax.plot([r.metrics[x_objective.metric] for r in front], [r.metrics[y_name] for r in front], "k--", lw=1,
                label="Pareto front")  # fmt: skip
    best = best_trial(records, sweep, baseline)
    if best is not None and best in done:
        ax.scatter([best.metrics[x_objective.metric]], [best.metrics[y_name] if y_name else best.index], s=250,
                   facecolors="none", edgecolors="black", label=f"best: trial {best.index}")  # fmt: skip
    ax.set_xlabel(f"{x_objective.metric} ({'minimise' if x_objective.minimize else 'maximise'})")
    ax.set_ylabel(y_name or "trial")
    ax.set_title(f"Sweep {sweep.name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
