"""Movement pruning (Sanh, Wolf & Rush 2020) as a Lightning callback: GMP's schedule, movement scores instead of |w|."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from torch.optim import Optimizer

from lightning_sparse.callbacks.gmp import GradualMagnitudePruning
from lightning_sparse.core.heads import GROUP_KINDS, prune_groups_by_scores
from lightning_sparse.callbacks.base import check_choice
from lightning_sparse.core.movement import SCORE_RULES, MovementScores, prune_by_movement, signal_warning
from lightning_sparse.core.targets import each_setting


class MovementPruning(GradualMagnitudePruning):
    """Hard movement pruning: prune the weights with the lowest movement score ``S`` (trained from ``w ⊙ ∂L/∂w``) on
    GMP's schedule.

    The choice for pruning a *pretrained* model while it is fine-tuned (Sanh, Wolf & Rush, NeurIPS 2020, arXiv
    2005.07683): magnitude pruning keeps the weights that were large before fine-tuning, movement pruning the ones
    fine-tuning moves away from zero (BERT on SQuAD at 10% of the weights: F1 84.3 against 80.1 for magnitude).

    Every optimizer step, in ``on_before_optimizer_step`` (gradients all-reduced under DDP and accumulated over
    ``accumulate_grad_batches``, not yet masked), the scores of every selected weight, pruned ones included (they
    score with the value they had when pruned; see :mod:`lightning_sparse.core.movement`), take a step on
    ``∂L/∂S = w ⊙ ∂L/∂w``: by default as the paper's code does (Hugging Face ``examples/research_projects/
    movement-pruning``, ``emmental``), an Adam step at ``score_lr`` that follows the weights' learning-rate schedule
    (``score_rule="adam"``); ``score_rule="sum"`` adds ``-w ⊙ ∂L/∂w`` instead. At each update step of the schedule
    the masks are recomputed as the top ``1 - s_t`` of ``S`` under ``distribution``, so a pruned weight whose score
    has risen comes back with its old value, as in the paper. After ``end`` the masks are frozen and scores stop.

    Measured in ``benchmarks/finetune.py`` (a pretrained MiniLM fine-tuned on a 2-class task, 90%): on its first one
    or two layers, summed scores with masks held for 10 steps collapsed the model to a constant predictor where the
    paper's code kept it; Adam-stepped scores and masks recomputed at every step (the paper's two choices, now the
    defaults) keep it there. On four layers, holding pruned weights at their pruned value *and* resetting their
    optimizer state collapses the paper's code too (either alone does not); this callback therefore keeps the
    optimizer state (momentum, Adam moments) of pruned weights, as the paper's dense ``W`` does, and re-masks the
    weights after every optimizer step so they stay exactly zero (4 layers, 90%: 96.25% where it was a constant
    predictor; the paper's code 98.75%). On six layers both collapse (README, "Movement pruning").

    Memory: ``S`` and the pruned weights' values (two fp32 weight-sized tensors) and, with ``score_rule="adam"``, the
    scores' two Adam moments (two more): four weight-sized tensors beside the one-bit masks, where the paper's code
    holds three (scores and their Adam moments). All are checkpointed with the masks (exact resume).

    Args:
        sparsity: final fraction of zeros in the selected weights, in [0, 1); or ``{glob: sparsity}`` per layer.
        start: when the ramp begins: fraction of the total optimizer steps (float in [0, 1]) or a step (int).
        end: when the final sparsity is reached, same convention; must not come before ``start``.
        frequency: optimizer steps between mask updates (>= 1); the paper recomputes the top-k every step (1, the
            default); each update costs a top-k per layer.
        schedule: ``cubic`` (Zhu & Gupta's ramp, as in the paper), ``linear`` or ``constant``.
        distribution: ``uniform`` (same sparsity per layer), ``global`` (one threshold on ``S``) or ``erk``.
        include: glob patterns of parameter names to prune (default: weights of Linear and Conv layers).
        exclude: glob patterns of parameter names to leave dense.
        initial_sparsity: sparsity at ``start``, in [0, ``sparsity``].
        verbose: print the per-layer table when fitting ends.
        granularity: ``unstructured`` (default), ``head`` or ``neuron`` (whole attention heads / MLP hidden units,
            ranked by the sum of ``S`` over all their members' entries, biases included; the sparsity is the fraction
            of heads or neurons removed per module), or ``{glob: granularity}`` per layer, as for
            :class:`GradualMagnitudePruning`.
        score_rule: ``adam`` (the paper's code: scores trained by Adam, betas (0.9, 0.999), eps 1e-8, no weight
            decay) or ``sum`` (``S = -Σ_t w_t ⊙ ∂L/∂w_t``, the paper's section 4 with plain SGD on the scores).
        score_lr: the scores' Adam learning rate with ``score_rule="adam"`` (the paper's
            ``mask_scores_learning_rate``, 1e-2), scaled by the weights' schedule (current over initial learning rate
            of the optimizer's first parameter group).
        check_signal: at the first mask update that prunes, warn once (rank zero) when the scores are still
            minibatch noise (:func:`lightning_sparse.core.movement.signal_warning`: fewer than 10 scored steps, or a
            median ``|t| = |Σ w·g| / sqrt(Σ (w·g)²)`` below 1.0, 0.674 for pure noise), saying what to try. Costs two
            more weight-sized fp32 tensors until that update (then freed; not checkpointed, so a run resumed after
            it does not check again).
    """

    metric_prefix = "movement"  # its own method: `movement/target_sparsity`, not GMP's `gmp/`
    reset_pruned_state = False  # a pruned weight keeps its optimizer state, as the paper's dense W does (see above)

    def __init__(
        self,
        sparsity: float | dict[str, float] = 0.9,
        start: int | float = 0.0,
        end: int | float = 0.75,
        frequency: int = 1,
        schedule: str = "cubic",
        distribution: str = "uniform",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        initial_sparsity: float = 0.0,
        verbose: bool = True,
        granularity: str | dict[str, str] = "unstructured",
        score_rule: str = "adam",
        score_lr: float = 1e-2,
        check_signal: bool = True,
    ) -> None:
        for label, value in each_setting("granularity", granularity):
            if value not in ("unstructured", *GROUP_KINDS):
                raise ValueError(f"`{label}` of MovementPruning must be one of ('unstructured', 'head', 'neuron'), got {value!r}")
        check_choice("score_rule", score_rule, SCORE_RULES)
        if isinstance(score_lr, bool) or not isinstance(score_lr, (int, float)) or not 0 < score_lr < math.inf:
            raise ValueError(f"`score_lr` must be a finite number > 0, got {score_lr!r}")
        super().__init__(
            sparsity=sparsity, start=start, end=end, frequency=frequency, schedule=schedule, distribution=distribution,
            include=include, exclude=exclude, initial_sparsity=initial_sparsity, verbose=verbose, granularity=granularity,
        )  # fmt: skip
        if not isinstance(check_signal, bool):
            raise ValueError(f"`check_signal` must be True or False, got {check_signal!r}")
        self.score_rule, self.score_lr, self.check_signal = score_rule, float(score_lr), check_signal
        self.scores: MovementScores | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.scores = MovementScores(self.masks.params, rule=self.score_rule, lr=self.score_lr, track_signal=self.check_signal)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        if self.masks is not None and trainer.global_step != self._decided_step and self._scoring(trainer.global_step):
            self.scores.accumulate_(lr_factor(optimizer))  # dense gradients: the base masks them below, after deciding
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _follow_parameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super()._follow_parameters(trainer, pl_module)
        self.scores.rebind(self.masks.params)  # FSDP2 replaced the parameters after setup

    def _scoring(self, step: int) -> bool:
        """Scores matter until the last mask update (``end``); after it they would be computed for nothing."""
        return self._end_step is None or step <= self._end_step

    def _prune(self, target: float | dict[str, float]) -> None:
        missing = self.scores.missing()
        if missing:
            raise ValueError(
                f"MovementPruning: no gradient has reached parameter {missing[0]!r} by optimizer step "
                f"{self._decided_step}, so its movement scores (S = -sum of w * dL/dw over the steps) were never "
                f"accumulated and cannot rank its weights (frozen or unused in forward?). Leave it out with "
                f"`exclude`, or begin later with `start`. Without scores: {missing}"
            )
        if self.scores.signal_sums and max(target.values() if isinstance(target, dict) else [target]) > 0:
            steps = max(self.scores.steps.values())
            message = signal_warning(self.scores.signal(), steps, self._decided_step, self.score_rule)
            self.scores.release_signal()  # once: the first mask update that prunes
            if message:
                rank_zero_warn(message)
        grouped = set(self._heads.params)
        prune_by_movement(self.masks, self.scores, target, self.distribution, [n for n in self.masks if n not in grouped])
        if self._heads:  # whole heads / neurons by their summed scores; a pruned one may come back, as a weight may
            masks, _ = prune_groups_by_scores(self._heads, self.scores.scores, target, self.masks.params)
            for name, mask in masks.items():
                self.scores.set_mask(self.masks, name, mask)

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "movement": self.scores.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        if "movement" in state:
            self.scores.load_state_dict(state["movement"])


def lr_factor(optimizer: Optimizer) -> float:
    """Where the weights' learning-rate schedule stands: the first group's learning rate over its initial one (1 without
    a scheduler). The paper's scores follow the weights' warm-up and decay."""
    group = optimizer.param_groups[0]
    initial = group.get("initial_lr")
    return float(group["lr"]) / float(initial) if initial else 1.0
