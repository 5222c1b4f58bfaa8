"""The sweep file: a base ``fit`` config, a search space over its compression settings, an objective and
outcome constraints. Everything is checked here, before any trial starts."""

from __future__ import annotations

import ast
import copy
import math
import operator
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
import subprocess
from pathlib import Path
from typing import Any

import yaml

from lightning_sparse.imports import import_object
from lightning_sparse.sweep.overrides import Key, get_value, set_value

STRATEGIES = ("bayesian", "random")
DEFAULT_OBJECTIVE = "-compressed_bytes"
DEFAULT_CONSTRAINTS = ("val_acc >= baseline - 0.005",)
_CONSTRAINT = re.compile(r"^\s*(?P<metric>[\w/.\-]+)\s*(?P<op>>=|<=)\s*(?P<bound>.+?)\s*$")
_MAX_BOUND_CHARS = 200
_MAX_LITERAL = 1e15  # no accuracy, loss or byte count needs more
#: Sweep numbers beyond these are mistakes, not plans: they are refused with their bound.
MAX_TRIALS = 10_000
MAX_TRIAL_TIMEOUT = 7 * 24 * 3600.0  # a week, in seconds
MAX_SEED = 2**32 - 1
#: Most YAML nodes a sweep or base fit file may expand to, aliases counted once per use ("billion laughs").
MAX_YAML_NODES = 100_000
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _parse_bound(text: str) -> ast.expr:
    """The bound's expression tree, allowing only numbers, ``baseline``, ``+ - * /``, unary minus and parentheses
    (no ``**``: ``9**9**9**9`` would never finish), at most 200 characters and literals up to 1e15."""
    if len(text) > _MAX_BOUND_CHARS:
        raise ValueError(f"the bound is longer than {_MAX_BOUND_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise ValueError(f"the bound is not an arithmetic expression ({type(error).__name__})") from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop)):
            if isinstance(node, ast.BinOp) and type(node.op) not in _BINARY:
                raise ValueError(f"`{ast.unparse(node)}`: only + - * / are allowed")
            if isinstance(node, ast.UnaryOp) and type(node.op) not in _UNARY:
                raise ValueError(f"`{ast.unparse(node)}`: only unary minus and plus are allowed")
            continue
        if isinstance(node, ast.Name) and node.id == "baseline" and isinstance(node.ctx, ast.Load):
            continue
        if isinstance(node, ast.Load):
            continue
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            if not math.isfinite(node.value) or abs(node.value) > _MAX_LITERAL:
                raise ValueError(f"the number {ast.unparse(node)} is not finite or larger than {_MAX_LITERAL:g}")
            continue
        raise ValueError(f"`{ast.unparse(node)}` is not a number, `baseline` or + - * / of them")
    return tree


def _evaluate(node: ast.expr, baseline: float) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return baseline
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, baseline))
    assert isinstance(node, ast.BinOp)
    return _BINARY[type(node.op)](_evaluate(node.left, baseline), _evaluate(node.right, baseline))


@dataclass(frozen=True)
class Parameter:
    """One Ax parameter: its ``name`` (tables, Ax, trials.csv) and the config ``key`` its value is written to."""

    name: str
    key: str
    bounds: tuple[float, float] | None = None
    values: tuple[Any, ...] | None = None
    kind: str = "float"  # float | int, for ranges
    log_scale: bool = False

    def bound_values(self) -> tuple[Any, ...]:
        """The extreme values a trial can get: both bounds of a range, every choice."""
        return tuple(self.bounds) if self.bounds is not None else tuple(self.values or ())


@dataclass(frozen=True)
class Constraint:
    """``metric >= bound`` or ``metric <= bound``; ``bound`` may use ``baseline`` (the dense run's value)."""

    metric: str
    op: str
    bound: str

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """``METRIC >= BOUND`` or ``METRIC <= BOUND``; BOUND is checked against the grammar of :func:`_parse_bound`
        and evaluated once (with ``baseline`` = 1) here, so a bad bound is refused before any trial runs."""
        usage = (f"constraint {text!r} is not `METRIC >= BOUND` or `METRIC <= BOUND`, where BOUND is a number or an "
                 f"expression of `baseline` such as `baseline - 0.005`")  # fmt: skip
        match = _CONSTRAINT.match(text)
        if not match:
            raise ValueError(usage)
        try:
            if not math.isfinite(_evaluate(_parse_bound(match["bound"]), 1.0)):
                raise ValueError("it is not finite")
        except ZeroDivisionError:
            raise ValueError(f"{usage}: it divides by zero") from None
        except (ValueError, OverflowError) as error:
            raise ValueError(f"{usage}: {error}") from None
        return cls(match["metric"], match["op"], match["bound"])

    @property
    def uses_baseline(self) -> bool:
        return any(isinstance(node, ast.Name) for node in ast.walk(_parse_bound(self.bound)))

    def threshold(self, baseline: float | None) -> float:
        if self.uses_baseline and baseline is None:
            raise ValueError(f"constraint `{self}` needs the baseline value")
        try:
            value = _evaluate(_parse_bound(self.bound), 0.0 if baseline is None else float(baseline))
        except (ZeroDivisionError, OverflowError) as error:
            raise ValueError(f"constraint `{self}` cannot be evaluated with baseline {baseline}: {error}") from None
        if not math.isfinite(value):
            raise ValueError(f"constraint `{self}` gives {value} with baseline {baseline}")
        return value

    def holds(self, value: float, baseline: float | None) -> bool:
        limit = self.threshold(baseline)
        return value >= limit if self.op == ">=" else value <= limit

    def for_ax(self, baseline: float | None) -> str:
        return f"{self.metric} {self.op} {self.threshold(baseline):.10g}"

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound}"


@dataclass(frozen=True)
class Objective:
    """One objective metric and its direction (``-name`` in the sweep file minimises)."""

    metric: str
    minimize: bool

    @classmethod
    def parse_all(cls, text: str) -> tuple[Objective, ...]:
        names = [part.strip() for part in str(text).split(",") if part.strip()]
        if not names:
            raise ValueError("`objective` is empty: name a metric, e.g. `-compressed_bytes` (minimise) or `sparsity`")
        return tuple(cls(name.lstrip("-").strip(), name.startswith("-")) for name in names)

    def better(self, a: float, b: float) -> bool:
        return a < b if self.minimize else a > b

    def __str__(self) -> str:
        return ("-" if self.minimize else "") + self.metric


@dataclass
class SweepConfig:
    """What ``lightning-sparse sweep --config FILE`` reads; see ``examples/sweep_digits.yaml``."""

    name: str
    fit_config: Path
    parameters: list[Parameter]
    overrides: dict[str, Any] = field(default_factory=dict)
    objective: tuple[Objective, ...] = field(default_factory=lambda: Objective.parse_all(DEFAULT_OBJECTIVE))
    constraints: tuple[Constraint, ...] = field(default_factory=lambda: tuple(map(Constraint.parse, DEFAULT_CONSTRAINTS)))
    baseline: float | None = None
    max_trials: int = 10
    parallel: int = 1
    force_parallel: bool = False
    trial_timeout: float = 3600.0
    initial_trials: int | None = None
    strategy: str = "bayesian"
    seed: int = 0
    project: str = "lightning-sparse"

    @property
    def metrics(self) -> list[str]:
        """Every metric Ax sees: objectives first, then constraint metrics."""
        names = [o.metric for o in self.objective]
        return names + [c.metric for c in self.constraints if c.metric not in names]

    @property
    def baseline_metric(self) -> str | None:
        """The metric a dense run measures for ``baseline`` (the first constraint that uses it)."""
        return next((c.metric for c in self.constraints if c.uses_baseline), None)

    def base(self) -> dict[str, Any]:
        """The ``fit`` config with this sweep's fixed ``overrides`` applied (a fresh copy)."""
        config = load_yaml(self.fit_config.read_text(), f"fit_config {self.fit_config}") or {}
        for key, value in self.overrides.items():
            set_value(config, key, copy.deepcopy(value))
        return config


def _number(name: str, value: Any, low: float, integer: bool = False, high: float = math.inf) -> Any:
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float)) and low <= value <= high
    if not ok:
        within = f">= {low}" if high == math.inf else f"in [{low}, {high:g}]"
        raise ValueError(f"`{name}` must be {'an int' if integer else 'a number'} {within}, got {value!r}")
    return value


def check_parallel(parallel: int, force: bool = False) -> int:
    """``parallel`` if it is at most this machine's cores (each trial needs one at least), or ``force``d (a Ray
    cluster has more); a ``ValueError`` naming the bound otherwise."""
    cores = os.cpu_count() or 1
    _number("parallel", parallel, 1, integer=True)
    if parallel > cores and not force:
        raise ValueError(f"`parallel` is {parallel} but this machine has {cores} cores: trials would only slow each "
                         f"other down; use at most {cores}, or set `force_parallel: true` (`--force_parallel`) for a "
                         f"launcher with more")  # fmt: skip
    return parallel


def load_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` that refuses a document whose aliases expand it beyond :data:`MAX_YAML_NODES` nodes (a
    few hundred bytes of nested anchors, "billion laughs", expand to billions when the config is copied or written
    out), before anything is built from it."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None:
        return None
    sizes: dict[int, int] = {}

    def expanded(n: yaml.Node) -> int:  # nodes once every alias is replaced by what it names (memoised)
        if id(n) not in sizes:
            sizes[id(n)] = 0  # a recursive alias counts as itself: its expansion is refused below anyway
            children = n.value if isinstance(n, yaml.SequenceNode) else [x for pair in n.value for x in pair] if isinstance(n, yaml.MappingNode) else []
            sizes[id(n)] = min(1 + sum(expanded(c) for c in children), MAX_YAML_NODES + 1)
        return sizes[id(n)] or MAX_YAML_NODES + 1

    if expanded(node) > MAX_YAML_NODES:
        raise ValueError(f"{what}: its aliases (*name) expand it to more than {MAX_YAML_NODES:,} YAML nodes; write the "
                         f"values out, or use fewer nested anchors")  # fmt: skip
    return yaml.safe_load(text)


def _parameters(spec: Any) -> list[Parameter]:
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(
            "the search space has no parameters: give `parameters:` a mapping such as "
            "`sparsity: {key: trainer.callbacks.0.init_args.sparsity, bounds: [0.5, 0.995]}`"
        )
    parameters = []
    for name, entry in spec.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"parameter {name!r} must be a mapping with `bounds` or `values` (and `key`), got {entry!r}")
        unknown = set(entry) - {"key", "bounds", "values", "type", "log_scale"}
        if unknown:
            raise ValueError(f"parameter {name!r}: unknown fields {sorted(unknown)} (allowed: key, bounds, values, type, log_scale)")
        key = str(entry.get("key", name))
        Key.parse(key)
        if ("bounds" in entry) == ("values" in entry):
            raise ValueError(f"parameter {name!r} needs exactly one of `bounds: [low, high]` or `values: [...]`")
        if "values" in entry:
            per_layer = entry["values"].items() if isinstance(entry["values"], Mapping) else [(None, entry["values"])]
            for glob, values in per_layer:
                label = f"{name}[{glob}]" if glob else str(name)
                if not isinstance(values, list) or len(values) < 2:
                    raise ValueError(f"parameter {label!r}: `values` must be a list of at least 2 choices, got {values!r}")
                parameters.append(Parameter(label, f"{key}[{glob}]" if glob else key, values=tuple(values)))
            continue
        bounds = entry["bounds"]
        per_layer = bounds.items() if isinstance(bounds, Mapping) else [(None, bounds)]
        for glob, pair in per_layer:
            label = f"{name}[{glob}]" if glob else str(name)
            parameters.append(_range(label, f"{key}[{glob}]" if glob else key, pair, entry.get("type"), entry.get("log_scale", False)))
    return parameters


def _range(name: str, key: str, pair: Any, kind: Any, log_scale: Any) -> Parameter:
    numeric = isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
    if not numeric:
        raise ValueError(f"parameter {name!r}: `bounds` must be [low, high] (numbers) or {{glob: [low, high]}}, got {pair!r}")
    low, high = pair
    if not low < high:
        raise ValueError(f"parameter {name!r}: bounds [{low}, {high}] are reversed or empty; the low bound must come first")
    kind = kind or ("int" if all(isinstance(v, int) for v in pair) else "float")
    if kind not in ("float", "int"):
        raise ValueError(f"parameter {name!r}: `type` must be 'float' or 'int', got {kind!r}")
    if log_scale and low <= 0:
        raise ValueError(f"parameter {name!r}: `log_scale` needs bounds > 0, got [{low}, {high}]")
    return Parameter(name, key, bounds=(low, high), kind=kind, log_scale=bool(log_scale))


_CONTROL = frozenset(map(chr, [*range(32), 127]))


def is_plain_name(name: str) -> bool:
    """True for one plain, visible file name: no folder separators, not ``.`` or ``..``, no control characters."""
    separators = ("/", "\\", os.sep, os.altsep or "/")
    return (
        bool(name) and not name.startswith(".") and not any(sep in name for sep in separators)
        and not any(ch in _CONTROL for ch in name) and not Path(name).is_absolute()
    )  # fmt: skip


def load_sweep(path: str | Path, *, instantiate: bool = True) -> SweepConfig:
    """Read and check a sweep file; ``fit_config`` is resolved relative to it.

    With ``instantiate`` (the default), each bound of a callback argument is checked by building that callback
    (only once its ``class_path`` resolves to a Lightning ``Callback`` subclass); ``instantiate=False`` (the W&B
    export) builds nothing and imports nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        spec = load_yaml(path.read_text(), f"sweep file {path}") or {}
    except yaml.YAMLError as error:
        raise ValueError(f"sweep file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise ValueError(f"sweep file {path} is nested too deeply to read") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"sweep file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not isinstance(spec, Mapping):
        raise ValueError(f"sweep file {path} must hold a mapping, got {type(spec).__name__}")
    allowed = {"name", "fit_config", "parameters", "overrides", "objective", "constraints", "baseline", "max_trials",
               "parallel", "force_parallel", "trial_timeout", "initial_trials", "strategy", "seed", "project"}  # fmt: skip
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"sweep file {path}: unknown fields {sorted(unknown)} (allowed: {sorted(allowed)})")
    if "fit_config" not in spec:
        raise ValueError(f"sweep file {path}: `fit_config` (the base `lightning-sparse fit` config) is required")
    fit_config = (path.parent / spec["fit_config"]).resolve()
    if not fit_config.is_file():
        raise FileNotFoundError(f"sweep file {path}: `fit_config` {fit_config} does not exist")
    constraints = spec.get("constraints", list(DEFAULT_CONSTRAINTS))
    if not isinstance(constraints, list):
        raise ValueError(f"`constraints` must be a list of strings such as 'val_acc >= baseline - 0.005', got {constraints!r}")
    strategy = spec.get("strategy", "bayesian")
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}")
    overrides = spec.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"`overrides` must map config keys to values, e.g. {{trainer.max_epochs: 5}}, got {overrides!r}")
    baseline = spec.get("baseline")
    force_parallel = spec.get("force_parallel", False)
    if type(force_parallel) is not bool:
        raise ValueError(f"`force_parallel` must be true or false, got {force_parallel!r}")
    name = spec.get("name") or path.stem
    if not isinstance(name, (str, int)) or any(ch in str(name) for ch in _CONTROL):
        raise ValueError(f"sweep file {path}: `name` must be a string without control characters, got {name!r}")
    sweep = SweepConfig(
        name=str(name),
        fit_config=fit_config,
        parameters=_parameters(spec.get("parameters")),
        overrides=dict(overrides),
        objective=Objective.parse_all(spec.get("objective", DEFAULT_OBJECTIVE)),
        constraints=tuple(Constraint.parse(str(c)) for c in constraints),
        baseline=None if baseline is None else float(_number("baseline", baseline, -_MAX_LITERAL, high=_MAX_LITERAL)),
        max_trials=_number("max_trials", spec.get("max_trials", 10), 1, integer=True, high=MAX_TRIALS),
        parallel=check_parallel(spec.get("parallel", 1), force_parallel),
        force_parallel=force_parallel,
        trial_timeout=float(_number("trial_timeout", spec.get("trial_timeout", 3600.0), 1, high=MAX_TRIAL_TIMEOUT)),
        initial_trials=None if spec.get("initial_trials") is None
        else _number("initial_trials", spec["initial_trials"], 1, integer=True, high=MAX_TRIALS),
        strategy=strategy,
        seed=_number("seed", spec.get("seed", 0), 0, integer=True, high=MAX_SEED),
        project=str(spec.get("project", "lightning-sparse")),
    )
    check_space(sweep, instantiate=instantiate)
    return sweep


def check_space(sweep: SweepConfig, *, instantiate: bool = True) -> None:
    """Every key exists in the base config and (with ``instantiate``) every bound is a value the target
    callback accepts."""
    names = [p.name for p in sweep.parameters]
    if len(set(names)) != len(names):
        raise ValueError(f"parameter names must be unique, got {names}")
    base = sweep.base()
    for parameter in sweep.parameters:
        for value in parameter.bound_values():
            config = copy.deepcopy(base)
            try:
                set_value(config, parameter.key, value)
            except KeyError as error:
                raise ValueError(f"parameter {parameter.name!r}: {error.args[0]} (in {sweep.fit_config})") from None
            if instantiate:
                _check_owner(parameter, config, value)


def _check_owner(parameter: Parameter, config: dict[str, Any], value: Any) -> None:
    """Build the callback that ``parameter`` configures with ``value``: its own argument checks decide the range."""
    path = Key.parse(parameter.key).path
    if len(path) < 3 or path[:2] != ("trainer", "callbacks"):
        return
    owner = get_value(config, ".".join(path[:3]))
    class_path = owner.get("class_path") if isinstance(owner, Mapping) else None
    if not class_path:
        return
    cls = _callback_class(parameter, class_path)
    init_args = owner.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ValueError(f"parameter {parameter.name!r}: `init_args` of {class_path} must be a mapping, got {init_args!r}")
    name = cls.__name__
    try:
        cls(**init_args)
    except (TypeError, ValueError) as error:
        raise ValueError(f"parameter {parameter.name!r}: the value {value!r} is outside what {name} accepts: {error}") from None


def _callback_class(parameter: Parameter, class_path: Any) -> type:
    """The class at ``class_path``, refused unless it is a Lightning ``Callback`` (checked before it is called:
    ``class_path: subprocess.run`` must not run)."""
    from pytorch_lightning import Callback

    try:
        cls = import_object(class_path)
    except ImportError as error:
        raise ValueError(f"parameter {parameter.name!r}: callback `{class_path}` cannot be imported: {error}") from None
    bases: list[type] = [Callback]
    if "lightning.pytorch" in sys.modules:  # the unified package's Callback, where the class comes from there
        bases.append(sys.modules["lightning.pytorch"].Callback)
    if not (isinstance(cls, type) and issubclass(cls, tuple(bases))):
        raise ValueError(f"parameter {parameter.name!r}: `{class_path}` is not a Lightning Callback class, so it is "
                         "not called to check the bounds (a trainer callback must subclass Callback)")  # fmt: skip
    return cls


def check_fit_config(path: Path) -> None:
    """Parse a ``fit`` config the way ``lightning-sparse fit`` does: ``--print_config`` in a subprocess (nothing is
    trained, and the sweep does not import the CLI)."""
    command = [sys.executable, "-m", "lightning_sparse.cli", "fit", "--config", str(path), "--print_config"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise ValueError(f"the base fit config fails validation ({path}):\n{result.stderr.strip()[-4000:]}")
