"""Movement pruning (Sanh, Wolf & Rush 2020) as a Lightning callback: GMP's schedule, movement scores instead of |w|."""

from __future__ import annotations

import math

import pytorch_lightning as pl

from lightning_sparse.callbacks.base import check_choice
from lightning_sparse.callbacks.gmp import GradualMagnitudePruning
from lightning_sparse.core.heads import GROUP_KINDS
from lightning_sparse.core.movement import SCORE_RULES, MovementScores
from lightning_sparse.core.pruners import MovementPruner
from lightning_sparse.core.targets import each_setting


class MovementPruning(GradualMagnitudePruning):
    """Hard movement pruning: prune the weights with the lowest movement score ``S`` (trained from ``w ⊙ ∂L/∂w``) on
    GMP's schedule.

    The choice for pruning a *pretrained* model while it is fine-tuned (Sanh, Wolf & Rush, NeurIPS 2020, arXiv
    2005.07683): magnitude pruning keeps the weights that were large before fine-tuning, movement pruning the ones
    fine-tuning moves away from zero (BERT on SQuAD at 10% of the weights: F1 84.3 against 80.1 for magnitude).

    Every optimizer step, in ``on_before_optimizer_step`` (gradients all-reduced under DDP and accumulated over
    ``accumulate_grad_batches``, not yet masked), the scores of every selected weight, pruned ones included (they
    score with their latent value; see :mod:`lightning_sparse.core.movement`), take a step on
    ``∂L/∂S = w ⊙ ∂L/∂w``: by default as the paper's code does (Hugging Face ``examples/research_projects/
    movement-pruning``, ``emmental``), an Adam step at ``score_lr`` that follows the weights' learning-rate schedule
    (``score_rule="adam"``); ``score_rule="sum"`` adds ``-w ⊙ ∂L/∂w`` instead. At each update step of the schedule
    the masks are recomputed as the top ``1 - s_t`` of ``S`` under ``distribution``, so a pruned weight whose score
    has risen comes back with its value, as in the paper. Until ``end`` pruned weights also move as the paper's dense
    ``W`` does (its forward uses ``W ⊙ M``, AdamW steps all of ``W``): their gradients are masked with the masks of
    the forward that took them, and the optimizer steps their values too (momentum, Adam moments, decoupled weight
    decay): they are lent to the model for the optimizer step alone (from ``on_before_optimizer_step`` to a one-shot
    step hook of the optimizer, or the end of the batch when the step is skipped) and taken back into the latent copy
    right after, so the model holds exact zeros at pruned positions everywhere else (the LightningModule's own
    ``on_before_optimizer_step`` and callbacks after this one see the dense values). After ``end`` the masks are
    frozen and scores stop.

    The masks decided at an update step ``t`` are those of step ``t + 1``'s forward, at the schedule's sparsity of
    ``t + 1``, as the paper's code sets its kept fraction before each forward.

    Measured in ``benchmarks/finetune.py`` against a port of the paper's code (a pretrained MiniLM fine-tuned on a
    2-class task, 90%): summed scores with masks held for 10 steps collapsed one or two layers to a constant predictor
    where the paper's code kept them (Adam-stepped scores and masks recomputed every step, the paper's choices, are
    the defaults since); pruned weights held at their pruned value collapsed the paper's own code on 6 layers at 600
    steps; with all of the above, runs follow the paper's step for step until rounding drifts them apart. Whether a
    run then collapses to a constant predictor depends on the seed for both, and can flip with those rounding-level
    differences (README, "Movement pruning").

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
        power: the exponent of the ``cubic`` schedule (3: Zhu & Gupta's cubic), as for :class:`GradualMagnitudePruning`.
        dense_first_layer: leave the first selected parameter dense, as for :class:`GradualMagnitudePruning`.
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
        power: float = 3.0,
        dense_first_layer: bool = False,
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
            power=power, dense_first_layer=dense_first_layer,
        )  # fmt: skip
        if not isinstance(check_signal, bool):
            raise ValueError(f"`check_signal` must be True or False, got {check_signal!r}")
        self.score_rule, self.score_lr, self.check_signal = score_rule, float(score_lr), check_signal

    @property
    def scores(self) -> MovementScores | None:
        """The pruner's movement scores (``None`` before ``setup``)."""
        return self.pruner.scores if isinstance(self.pruner, MovementPruner) else None

    def make_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> MovementPruner:
        return MovementPruner(
            pl_module, self.sparsity, self.step_schedule(), score_rule=self.score_rule, score_lr=self.score_lr,
            check_signal=self.check_signal, distribution=self.distribution, granularity=self.granularity,
            include=self.include, exclude=self.exclude,
            dense_first_layer=self.dense_first_layer, name=type(self).__name__,
        )  # fmt: skip


#: :class:`GradualMagnitudePruning`'s arguments that :class:`MovementPruning` does not take: it ranks heads and neurons
#: by their scores, not a norm, and prunes no channels. Every other GMP argument it takes, with GMP's meaning, type and
#: default (``tests/callbacks/test_arguments.py`` compares the signatures)
NOT_FROM_GMP = ("channel_norm", "channel_multiple")
#: the defaults it chooses differently from GMP's: the paper recomputes the top-k at every step
OWN_DEFAULTS = {"frequency": 1}
