"""Weights & Biases around a sweep: a W&B sweep config for agents, and the sweep summary as a W&B run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_sparse.sweep.config import Parameter, SweepConfig
from lightning_sparse.sweep.results import TrialRecord, best_trial, is_feasible
from lightning_sparse.sweep.trials import METRICS_CALLBACK, point_config, wandb_logger, write_yaml


def _wandb_parameter(parameter: Parameter) -> dict[str, Any]:
    if parameter.values is not None:
        return {"values": list(parameter.values)}
    low, high = parameter.bounds or (0, 0)
    if parameter.kind == "int":
        return {"min": int(low), "max": int(high), "distribution": "int_uniform"}
    distribution = "log_uniform_values" if parameter.log_scale else "uniform"
    return {"min": float(low), "max": float(high), "distribution": distribution}


def export_wandb_sweep(sweep: SweepConfig, path: str | Path) -> Path:
    """Write a W&B sweep config whose agents run ``lightning-sparse fit`` over the same search space.

    Beside it goes ``<stem>.fit.yaml``: the base config logging to W&B and reporting ``compressed_bytes``,
    ``sparsity`` and ``compression_ratio``. W&B parameters are named by their config keys, so the agent's
    ``--key=value`` arguments are understood by ``lightning-sparse fit`` as they are.
    """
    path = Path(path)
    middle = {p.name: (p.bound_values()[0] if p.values is not None else sum(p.bounds or (0, 0)) / 2) for p in sweep.parameters}
    base = point_config(sweep, middle)
    base["trainer"]["logger"] = wandb_logger(sweep, base, None, job_type="trial")
    callbacks = base["trainer"].get("callbacks") or []
    base["trainer"]["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]), {"class_path": METRICS_CALLBACK}]
    fit_config = write_yaml(path.with_name(f"{path.stem}.fit.yaml"), base, f"# Base config of the W&B sweep {path.name}.\n")
    objective = sweep.objective[0]
    spec = {
        "name": sweep.name,
        "project": sweep.project,
        "method": "random" if sweep.strategy == "random" else "bayes",
        "metric": {"name": objective.metric, "goal": "minimize" if objective.minimize else "maximize"},
        "parameters": {p.key: _wandb_parameter(p) for p in sweep.parameters},
        "command": ["${env}", "lightning-sparse", "fit", "--config", str(fit_config.resolve()), "${args}"],
    }
    unmatched = [str(c) for c in sweep.constraints]
    header = (
        f"# W&B sweep for {sweep.name}: `wandb sweep {path.name}`, then `wandb agent <sweep id>` on any machine.\n"
        + (f"# W&B sweeps have no outcome constraints: filter the runs by {unmatched} yourself\n"
           "# (`lightning-sparse sweep` enforces them through Ax).\n" if unmatched else "")
    )  # fmt: skip
    return write_yaml(path, spec, header)


def log_summary(sweep: SweepConfig, folder: Path, records: Sequence[TrialRecord], baseline: float | None,
                plot: Path | None) -> str | None:  # fmt: skip
    """One W&B run in the sweep's group holding the trials table, the plot and the best trial; its folder."""
    import wandb

    parameters = [p.name for p in sweep.parameters]
    metrics = sorted({name for r in records for name in r.metrics})
    table = wandb.Table(columns=["trial", "status", "feasible", *parameters, *metrics, "error"])
    for r in sorted(records, key=lambda r: r.index):
        table.add_data(r.index, r.status, is_feasible(r, sweep, baseline), *[r.parameters.get(p) for p in parameters],
                       *[r.metrics.get(m) for m in metrics], r.error or "")  # fmt: skip
    run = wandb.init(project=sweep.project, group=sweep.name, name=f"{sweep.name}-summary", job_type="sweep-summary",
                     dir=str(folder), config={"objective": [str(o) for o in sweep.objective], "baseline": baseline,
                     "constraints": [str(c) for c in sweep.constraints], "parameters": parameters}, reinit="create_new")  # fmt: skip
    payload: dict[str, Any] = {"trials": table}
    if plot is not None:
        payload["sweep"] = wandb.Image(str(plot))
    run.log(payload)
    best = best_trial(records, sweep, baseline)
    if best is not None:
        run.summary.update({"best/trial": best.index, **{f"best/{k}": v for k, v in {**best.parameters, **best.metrics}.items()}})
    run_dir = str(Path(run.dir).parent)
    run.finish()
    return run_dir
