"""Dynamic sparse training as Lightning callbacks: RigL (gradient growth) and SET (random growth)."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from lightning_sparse.callbacks.base import (
    RESETTABLE_OPTIMIZERS,
    SparsityCallback,
    as_sparsity,
    check_choice,
    check_fraction_or_step,
    check_sparsity,
    check_steps,
)
from lightning_sparse.core.allocation import zero_counts
from lightning_sparse.core.dynamic import DECAYS, GROW_INITS, is_dynamic_update_step, move_connections, random_masks, update_fraction
from lightning_sparse.core.masks import pack, unpack
from lightning_sparse.core.pruning import prune_by_magnitude

GROWTH = ("gradient", "random")
DISTRIBUTIONS = ("erk", "uniform", "er")

class RigL(SparsityCallback):
    """Train a sparse network at constant sparsity while moving its connections (Evci et al. 2020, Alg. 1).

    From ``start`` the selected weights are sparse: a random mask with each layer's exact number of zeros
    when ``start`` is 0, the largest magnitudes otherwise. Every ``frequency`` optimizer steps until
    ``end``, each layer drops the ``f(t) · n_active`` smallest-magnitude active weights and grows as many
    inactive ones with the largest dense-gradient magnitude (``grow="gradient"``) or at random
    (``grow="random"``, SET), with ``f(t) = alpha/2 · (1 + cos(π (t - start) / (end - start)))`` (the paper's
    ``cos(π t / T_end)`` when ``start`` is 0; with a later ``start`` the cosine is stretched over ``[start, end]``).
    The dense gradient is the one Lightning hands to the optimizer: after DDP all-reduce and gradient
    accumulation, before masking. Grown weights start at exactly 0 with their optimizer state (momentum, Adam
    moments) reset. Per-layer non-zero counts never change.

    Differences from the reference code (google-research/rigl) worth knowing: there is no update at step 0 (the
    first is at ``start + frequency``), and on an update step the optimizer step is still taken, with the
    new mask, so grown weights receive their first gradient step at once (the references skip the optimizer step
    on update iterations). Frozen parameters (``requires_grad=False``) are refused; a layer with no gradient at
    an update step keeps its mask.

    Args:
        sparsity: fraction of zeros in the selected weights, in [0, 1); or ``{glob: sparsity}`` per layer (each
            matched layer at its own sparsity, ``distribution`` unused; unmatched layers stay dense).
        distribution: per-layer sparsity: ``erk`` (Erdős–Rényi-Kernel), ``uniform`` or ``er`` (Erdős–Rényi: the
            ERK formula without the kernel dimensions).
        frequency: optimizer steps between connection updates (ΔT, >= 1).
        alpha: fraction of active weights moved at the first update, in (0, 1]; decays by a cosine to 0 at ``end``.
        end: last update before this point (T_end): fraction of the optimizer steps (float) or a step (int).
        grow: ``gradient`` (RigL) or ``random`` (SET).
        start: when the network becomes sparse, same convention as ``end`` (default 0: from the first step).
        include: glob patterns of parameter names to sparsify (default: every weight that does a matrix product).
        exclude: glob patterns of parameter names to leave dense.
        seed: seed of the random start mask and of random growth (the same on every rank, so masks agree).
        verbose: print the per-layer table when fitting ends.
        decay: how the moved fraction falls from ``alpha`` to 0 at ``end``: ``cosine`` (RigL), ``linear``, or
            ``constant`` (``alpha`` at every update).
        erk_power_scale: exponent of the ERK/ER density formula in [0, 1] (the reference's ``erk_power_scale``;
            1 is ERK, 0 uniform).
        dense_first_layer: leave the first selected parameter dense (as RigL's experiments keep the first layer).
        grow_init: the value grown weights start at: ``zeros`` (the paper) or ``gradient``
            (``w = -grow_scale · ∂L/∂w``, a descent step along the dense gradient that chose them; the reference's
            ``grad_scale`` option, with the sign pointing downhill).
        grow_scale: the factor of ``grow_init="gradient"`` (> 0; unused with ``zeros``).
    """

    def __init__(
        self,
        sparsity: float | dict[str, float] = 0.9,
        distribution: str = "erk",
        frequency: int = 100,
        alpha: float = 0.3,
        end: int | float = 0.75,
        grow: str = "gradient",
        start: int | float = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        seed: int = 0,
        verbose: bool = True,
        decay: str = "cosine",
        erk_power_scale: float = 1.0,
        dense_first_layer: bool = False,
        grow_init: str = "zeros",
        grow_scale: float = 1.0,
    ) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose)
        check_sparsity("sparsity", sparsity)
        check_choice("distribution", distribution, DISTRIBUTIONS)
        check_choice("decay", decay, DECAYS)
        if isinstance(erk_power_scale, bool) or not isinstance(erk_power_scale, (int, float)) or not 0 <= erk_power_scale <= 1:
            raise ValueError(f"`erk_power_scale` must be a number in [0, 1], got {erk_power_scale!r}")
        if not isinstance(dense_first_layer, bool):
            raise ValueError(f"`dense_first_layer` must be a bool (true or false), got {dense_first_layer!r}")
        check_steps("frequency", frequency)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
            raise ValueError(f"`alpha` must be a number in (0, 1], got {alpha!r}")
        check_fraction_or_step("end", end)
        check_fraction_or_step("start", start)
        check_choice("grow", grow, GROWTH)
        check_choice("grow_init", grow_init, GROW_INITS)
        if isinstance(grow_scale, bool) or not isinstance(grow_scale, (int, float)) or not 0 < grow_scale < math.inf:
            raise ValueError(f"`grow_scale` must be a finite number > 0, got {grow_scale!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int, got {seed!r}")
        if isinstance(start, int) and isinstance(end, int):
            _check_first_update(start, end, frequency)
        self.sparsity = as_sparsity(sparsity)
        self.distribution = distribution
        self.frequency = frequency
        self.alpha = float(alpha)
        self.start, self.end = start, end
        self.grow = grow
        self.seed = seed
        self.decay = decay
        self.erk_power_scale = float(erk_power_scale)
        self.dense_first_layer = dense_first_layer
        self.grow_init, self.grow_scale = grow_init, float(grow_scale)
        self._start_step: int | None = None
        self._end_step: int | None = None
        self._planned_steps: int | None = None  # run length the fractional start/end were resolved for
        self._initial: dict[str, torch.Tensor] = {}  # packed masks at the sparse start, for the churn metric
        self._moved: dict[str, int] = {}
        self._warned_no_grad = False

    @property
    def metric_prefix(self) -> str:  # type: ignore[override]
        """``rigl`` for gradient growth, ``set`` for random growth (SET)."""
        return "rigl" if self.grow == "gradient" else "set"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, grow=self.grow, include=self.include, exclude=self.exclude)

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._start_step = self._end_step = None  # resolved in on_fit_start, or restored from a checkpoint
        self._planned_steps = None
        self._initial, self._moved = {}, {}
        frozen = [name for name, param in self.masks.params.items() if not param.requires_grad]
        if frozen:
            raise ValueError(
                f"{type(self).__name__} cannot train the connections it grows in frozen parameters {frozen} "
                f"(requires_grad=False): leave them out with `exclude`, or prune them with GradualMagnitudePruning"
            )
        counts = zero_counts(self.distribution, self.masks.params, self._target(), power_scale=self.erk_power_scale)
        if not any(counts.values()):
            raise ValueError(
                f"`sparsity`={self.sparsity} with distribution {self.distribution!r} leaves every layer dense "
                f"({list(counts)}): there is nothing for {type(self).__name__} to move; raise `sparsity`"
            )
        if self.start == 0:  # sparse from the first forward pass; a checkpoint being resumed replaces these masks
            random_masks(self.masks, self._target(), self.distribution, self.seed, self.erk_power_scale)
            self._record_initial()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._resolve_schedule(trainer) is not None:
            _check_first_update(self._start_step, self._end_step, self.frequency)
        for optimizer in trainer.optimizers:
            if type(optimizer) not in RESETTABLE_OPTIMIZERS:
                rank_zero_warn(
                    f"{type(self).__name__}: cannot reset the state of optimizer {type(optimizer).__name__} for grown "
                    f"weights: only its tensors shaped like a weight are zeroed at grown positions; any other state "
                    f"it keeps is not reset. Fully reset: {[cls.__name__ for cls in RESETTABLE_OPTIMIZERS]}"
                )

    # ----------------------------------------------------------------- what
    def _decides(self, step: int) -> bool:
        if self.masks.is_empty:  # dense until `start`, then keep the largest magnitudes
            return step >= self._start_step
        return is_dynamic_update_step(step, self._start_step, self._end_step, self.frequency)

    def _update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> bool:
        if not self._decides(step):
            return False
        if self.masks.is_empty:
            prune_by_magnitude(self.masks, self._target(), self.distribution, power_scale=self.erk_power_scale)
            self._record_initial()
            return True
        if self.grow == "gradient":
            missing = [name for name, param in self.masks.params.items() if param.grad is None]
            if missing and not self._warned_no_grad:
                self._warned_no_grad = True
                rank_zero_warn(
                    f"{type(self).__name__}: {missing} have no gradient at step {step} (frozen, or unused in the "
                    f"forward pass); their connections do not move while that lasts"
                )
        fraction = update_fraction(step, self._start_step, self._end_step, self.alpha, self.decay)
        states = [optimizer.state for optimizer in trainer.optimizers]
        self._moved = move_connections(
            self.masks, fraction, self.grow, states, self.seed, step, self.grow_init, self.grow_scale
        )
        return True

    def _record_initial(self) -> None:
        self._initial = {name: pack(self.masks.mask(name)) for name in self.masks}

    def _update_metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        new_total = active_total = 0
        for name in self.masks:
            mask = self.masks.mask(name)
            new = int((mask & ~unpack(self._initial[name], mask.shape)).sum())
            active = int(mask.sum())
            metrics[f"{self.metric_prefix}/churn/{name}"] = new / active if active else 0.0
            new_total, active_total = new_total + new, active_total + active
        metrics[f"{self.metric_prefix}/churn/global"] = new_total / active_total if active_total else 0.0
        if self._moved:
            metrics.update({f"{self.metric_prefix}/moved/{name}": float(count) for name, count in self._moved.items()})
            metrics[f"{self.metric_prefix}/moved/global"] = float(sum(self._moved.values()))
        return metrics

    # ----------------------------------------------------------------- checkpoint state
    def _extra_state(self) -> dict[str, Any]:
        return {
            "start_step": self._start_step,
            "end_step": self._end_step,
            "planned_steps": self._planned_steps,
            "initial": {name: packed.cpu().clone() for name, packed in self._initial.items()},
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._start_step, self._end_step = state.get("start_step"), state.get("end_step")
        self._planned_steps = state.get("planned_steps")
        self._initial = {name: packed.to(self.masks.params[name].device) for name, packed in state.get("initial", {}).items()}


class SET(RigL):
    """Sparse Evolutionary Training (Mocanu et al. 2018): :class:`RigL` with random growth; logs under ``set/``.

    Takes every argument of :class:`RigL` except ``grow`` (always ``random``), with the same meaning and defaults.
    """

    def __init__(
        self,
        sparsity: float | dict[str, float] = 0.9,
        distribution: str = "erk",
        frequency: int = 100,
        alpha: float = 0.3,
        end: int | float = 0.75,
        start: int | float = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        seed: int = 0,
        verbose: bool = True,
        decay: str = "cosine",
        erk_power_scale: float = 1.0,
        dense_first_layer: bool = False,
        grow_init: str = "zeros",
        grow_scale: float = 1.0,
    ) -> None:
        super().__init__(
            sparsity=sparsity, distribution=distribution, frequency=frequency, alpha=alpha, end=end, grow="random",
            start=start, include=include, exclude=exclude, seed=seed, verbose=verbose, decay=decay,
            erk_power_scale=erk_power_scale, dense_first_layer=dense_first_layer, grow_init=grow_init,
            grow_scale=grow_scale,
        )  # fmt: skip


def _check_first_update(start: int, end: int, frequency: int) -> None:
    first = start + frequency
    if end <= first:
        raise ValueError(
            f"`end` (step {end}) must come after the first connection update at step {first} "
            f"(`start` {start} + `frequency` {frequency}); allowed: end > {first}"
        )
