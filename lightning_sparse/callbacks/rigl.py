"""Dynamic sparse training as Lightning callbacks: RigL (gradient growth) and SET (random growth)."""

from __future__ import annotations

import math

import pytorch_lightning as pl

from lightning_sparse.callbacks.base import (
    SparsityCallback,
    as_sparsity,
    check_choice,
    check_sparsity,
    check_steps,
)
from lightning_sparse.core.dynamic import DECAYS, GROW_INITS
from lightning_sparse.core.pruners import RigLPruner, check_first_update
from lightning_sparse.core.schedules import StepSchedule, check_fraction_or_step

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
            check_first_update(start, end, frequency)
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

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, grow=self.grow, include=self.include, exclude=self.exclude)

    def make_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> RigLPruner:
        return RigLPruner(
            pl_module, self.sparsity, StepSchedule(self.start, self.end, self.frequency, updates="moves"),
            distribution=self.distribution, alpha=self.alpha, grow=self.grow, seed=self.seed, decay=self.decay,
            erk_power_scale=self.erk_power_scale, grow_init=self.grow_init, grow_scale=self.grow_scale,
            include=self.include, exclude=self.exclude, dense_first_layer=self.dense_first_layer, name=type(self).__name__,
        )  # fmt: skip


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


#: :class:`RigL`'s arguments that :class:`SET` does not take: its growth is random by definition. Every other RigL
#: argument it takes, with RigL's meaning, type and default (``tests/callbacks/test_arguments.py`` compares them)
NOT_FROM_RIGL = ("grow",)
