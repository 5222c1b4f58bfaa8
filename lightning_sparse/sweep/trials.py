"""Trial configs: the base ``fit`` config with one point of the search space written in, logging to W&B in the
sweep's group and reporting through :class:`~lightning_sparse.sweep.metrics.SweepMetrics`."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lightning_sparse.callbacks import dropped_for_dense_baseline
from lightning_sparse.files import write_text_atomic
from lightning_sparse.sweep.config import SweepConfig
from lightning_sparse.sweep.overrides import set_value

METRICS_CALLBACK = "lightning_sparse.sweep.SweepMetrics"
WANDB_LOGGER = "pytorch_lightning.loggers.WandbLogger"


def _callbacks(config: dict[str, Any]) -> list[Any]:
    trainer = config.setdefault("trainer", {})
    callbacks = trainer.get("callbacks") or []
    trainer["callbacks"] = callbacks if isinstance(callbacks, list) else [callbacks]
    return trainer["callbacks"]


def wandb_logger(sweep: SweepConfig, fit_config: dict[str, Any], save_dir: Path | None, **init_args: Any) -> dict[str, Any]:
    """A WandbLogger in the sweep's group (keeping the base config's W&B settings, such as ``project``)."""
    logger = fit_config.get("trainer", {}).get("logger")
    kept = dict(logger.get("init_args") or {}) if isinstance(logger, Mapping) and logger.get("class_path") == WANDB_LOGGER else {}
    kept.pop("name", None)
    kept.setdefault("project", sweep.project)
    kept.update(group=sweep.name, **init_args)
    if save_dir is not None:
        kept["save_dir"] = str(save_dir)
    return {"class_path": WANDB_LOGGER, "init_args": kept}


def point_config(sweep: SweepConfig, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The base config with ``parameters`` (by name) written at their keys."""
    config = sweep.base()
    for parameter in sweep.parameters:
        set_value(config, parameter.key, copy.deepcopy(parameters[parameter.name]))
    config["compare_dense"] = False  # a trial is one run; the sweep's baseline is measured once
    return config


def trial_config(sweep: SweepConfig, parameters: Mapping[str, Any], label: str, folder: Path) -> dict[str, Any]:
    """What trial ``label`` runs: the point, logging to W&B as ``<sweep>-<label>`` with its W&B files, checkpoints
    and saved config in ``folder``, and writing ``folder/metrics.json``."""
    config = point_config(sweep, parameters)
    return _instrument(sweep, config, label, folder, dict(parameters))


def baseline_config(sweep: SweepConfig, folder: Path, smoke: bool = False) -> dict[str, Any]:
    """The dense run: the base config without compression callbacks (nor checkpointing). ``smoke``: one batch of
    training and validation only (``fast_dev_run``), to learn the metric names when the baseline is given."""
    config = sweep.base()
    config["compare_dense"] = False
    callbacks = _callbacks(config)
    callbacks[:] = [c for c in callbacks if not dropped_for_dense_baseline(c)]
    config["trainer"]["enable_checkpointing"] = False
    if smoke:
        config["trainer"].update(fast_dev_run=True, logger=False)
        config["trainer"]["callbacks"].append({"class_path": METRICS_CALLBACK, "init_args": {"path": str(folder / "metrics.json")}})
        return config
    return _instrument(sweep, config, "baseline", folder, {})


def _instrument(sweep: SweepConfig, config: dict[str, Any], label: str, folder: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    trainer = config.setdefault("trainer", {})
    trainer["logger"] = wandb_logger(sweep, config, folder, name=f"{sweep.name}-{label}", job_type="trial", config=parameters)
    trainer.setdefault("default_root_dir", str(folder))
    trainer["enable_progress_bar"] = False  # the log file is read by people, not a terminal
    _callbacks(config).append({"class_path": METRICS_CALLBACK, "init_args": {"path": str(folder / "metrics.json")}})
    return config


def best_config(sweep: SweepConfig, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The best point as a plain ``fit`` config (W&B run ``<sweep>-best``), runnable as is."""
    config = point_config(sweep, parameters)
    config.setdefault("trainer", {})["logger"] = wandb_logger(sweep, config, None, name=f"{sweep.name}-best")
    return config


def write_yaml(path: Path, config: dict[str, Any], header: str = "") -> Path:
    return write_text_atomic(path, header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False))
