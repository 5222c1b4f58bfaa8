"""Movement pruning scores (Sanh, Wolf & Rush, NeurIPS 2020, arXiv 2005.07683): keep the weights moving away from 0.

Hard movement pruning ranks weights by ``S = -Σ_t w_t ⊙ ∂L/∂w_t`` (the paper's section 4: the scores of a top-k mask
trained with a straight-through estimator, with plain SGD on the scores): a weight whose gradient pushes it away from zero
(``w·g < 0``) gains score, one being pulled towards zero loses it, whatever its magnitude. Magnitude pruning keeps
large weights; movement pruning keeps the weights fine-tuning is *growing*, which is why it wins when a pretrained
model is pruned while it is fine-tuned (BERT on SQuAD at 10% of the weights: F1 84.3 against 80.1).

As in the paper the mask is the top-k of ``S`` recomputed at every update, so a pruned weight can come back: its
score keeps accumulating ``-w·g`` from the dense gradient (the gradient with respect to the masked weight, which
is non-zero at pruned positions) and its value ``w``, which :class:`MovementScores` keeps in ``latent`` while the
model holds an exact zero there. Revived weights return with that value. As in the paper's code, where the forward
uses ``W ⊙ M`` and the optimizer steps the whole dense ``W``, the optimizer steps pruned weights too: ``lend_`` puts
their values into the model for the step and ``take_back_`` returns them to ``latent`` after it. Pure torch, usable
from a plain loop (:class:`~lightning_sparse.core.pruners.MovementPruner` does these calls in ``step`` and
``after_optimizer_step``)::

    scores = MovementScores(masks.params)
    ...
    loss.backward()
    scores.accumulate_()            # dense gradients, before they are masked
    masks.mask_grads_()             # with the masks this forward used
    prune_by_movement(masks, scores, sparsity=0.9)
    scores.lend_()
    optimizer.step()
    scores.take_back_(masks)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_sparse.core.allocation import zero_counts
from lightning_sparse.core.criteria import exact_mask
from lightning_sparse.core.masks import MaskSet
from lightning_sparse.core.shards import from_local_like, full_tensor, local_part, local_tensor, sharded_like


#: Median over weights of ``|t| = |Σ w·g| / sqrt(Σ (w·g)²)`` when every ``w·g`` is minibatch noise (zero mean,
#: symmetric): ``t`` is then about N(0, 1), and the median of ``|N(0, 1)|`` is 0.674.
NOISE_MEDIAN_ABS_T = 0.674
#: Below this median ``|t|`` at the first mask update the scores are called noise (digits, lenet300, 20 SGD steps of
#: batch 64: 1.92 with the true labels, 0.67-0.71 with labels drawn at random for every batch).
SIGNAL_MEDIAN_ABS_T = 1.0
#: Fewer scored steps than this and ``|t|`` cannot tell signal from noise (after one step ``|t| = 1`` for every weight).
SIGNAL_MIN_STEPS = 10
#: Weights at most sampled (evenly strided over every layer) for the median.
SIGNAL_SAMPLE = 1 << 20

#: How scores take a step: ``sum`` adds ``-w·g`` (Sanh et al.'s section 4 with plain SGD on the scores), ``adam``
#: is the paper's code (scores trained by Adam at their own learning rate).
SCORE_RULES = ("sum", "adam")


def _score_dtype(param: Tensor) -> torch.dtype:
    """Scores sum many small products: at least fp32, whatever precision the weights are held in."""
    return torch.promote_types(param.dtype, torch.float32)


class MovementScores:
    """Accumulated movement scores ``S`` for a fixed set of parameters, and the values of their pruned weights.

    State, declared once: ``scores[name]`` (``S``, shaped like the parameter, fp32 or wider), ``latent[name]`` (the
    weights' values at pruned positions, zero where the weight is kept; absent until a weight is pruned) and
    ``steps[name]`` (how many gradients were accumulated). ``w + latent`` is the dense weight the paper scores.
    For a sharded parameter (FSDP2) scores and latent values are sharded like it; masks are decided on whole scores.
    """

    def __init__(
        self, params: Mapping[str, Tensor], rule: str = "sum", lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, track_signal: bool = False,
    ) -> None:  # fmt: skip
        if rule not in SCORE_RULES:
            raise ValueError(f"`rule` must be one of {SCORE_RULES}, got {rule!r}")
        self.params = dict(params)
        self.rule, self.lr, self.betas, self.eps = rule, float(lr), (float(betas[0]), float(betas[1])), float(eps)

        def zeros(p: Tensor) -> Tensor:
            return sharded_like(torch.zeros(p.shape, dtype=_score_dtype(p), device=p.device), p)

        self.scores = {name: zeros(p) for name, p in self.params.items()}
        # Adam's moments of the scores' gradient w·g (rule "adam" only): two more score-sized tensors
        self.moments = {name: (zeros(p), zeros(p)) for name, p in self.params.items()} if rule == "adam" else {}
        self.latent: dict[str, Tensor] = {}
        self.steps = {name: 0 for name in self.params}
        # Σ w·g and Σ (w·g)² per weight for :meth:`signal` (``track_signal``), until :meth:`release_signal`
        self.signal_sums: dict[str, tuple[Tensor, Tensor]] = (
            {name: (zeros(p), zeros(p)) for name, p in self.params.items()} if track_signal else {}
        )

    def rebind(self, params: Mapping[str, Tensor]) -> None:
        """Point the scores at new tensors for the same parameters (``fully_shard`` replaces every parameter by a
        ``DTensor``); scores and latent values are moved to the new sharding."""
        self.scores = {name: sharded_like(full_tensor(s), params[name]) for name, s in self.scores.items()}
        self.moments = {
            name: (sharded_like(full_tensor(first), params[name]), sharded_like(full_tensor(second), params[name]))
            for name, (first, second) in self.moments.items()
        }
        self.latent = {name: sharded_like(full_tensor(v), params[name]) for name, v in self.latent.items()}
        self.signal_sums = {
            name: (sharded_like(full_tensor(total), params[name]), sharded_like(full_tensor(squares), params[name]))
            for name, (total, squares) in self.signal_sums.items()
        }
        self.params = {name: params[name] for name in self.params}

    @torch.no_grad()
    def accumulate_(self, lr_factor: float = 1.0) -> None:
        """One step of the scores for every parameter with a gradient (``w`` including the latent value of pruned
        weights, ``g`` the gradient of the weight as the model uses it, pruned or not).

        ``rule="sum"``: ``S ← S - w ⊙ g``. ``rule="adam"`` (the paper's code): ``w ⊙ g`` is the gradient of ``S``
        through the straight-through top-k, and ``S`` takes an Adam step on it,
        ``S ← S - lr · lr_factor · m̂ / (sqrt(v̂) + eps)``; ``lr_factor`` is the weights' learning-rate schedule
        (current over initial learning rate), which the paper's scores follow.

        Call it on the dense gradient, before pruned gradients are zeroed, once per optimizer step (after DDP
        all-reduce and gradient accumulation). Parameters without a gradient this step are left as they are.
        """
        for name, param in self.params.items():
            grad = param.grad
            if grad is None:
                continue
            score, grad = local_tensor(self.scores[name]), local_tensor(grad)  # elementwise: shard by shard
            self.steps[name] += 1
            if name in self.signal_sums:
                weight = local_tensor(param)
                if name in self.latent:
                    weight = weight + local_tensor(self.latent[name])
                product = (weight * grad).to(score.dtype)
                total, squares = (local_tensor(t) for t in self.signal_sums[name])
                total.add_(product)
                squares.addcmul_(product, product)
            if self.rule == "sum":
                score.addcmul_(local_tensor(param), grad, value=-1)
                if name in self.latent:
                    score.addcmul_(local_tensor(self.latent[name]), grad, value=-1)
                continue
            weight = local_tensor(param)
            if name in self.latent:
                weight = weight + local_tensor(self.latent[name])
            update = (weight * grad).to(score.dtype)  # ∂L/∂S
            first, second = (local_tensor(m) for m in self.moments[name])
            beta1, beta2 = self.betas
            first.lerp_(update, 1 - beta1)
            second.mul_(beta2).addcmul_(update, update, value=1 - beta2)
            step = self.steps[name]
            denominator = (second / (1 - beta2**step)).sqrt_().add_(self.eps)
            score.addcdiv_(first, denominator, value=-self.lr * lr_factor / (1 - beta1**step))

    @torch.no_grad()
    def signal(self) -> float | None:
        """How far the scores stand above minibatch noise: the median over weights of ``|t|``,
        ``t = Σ_t w·g / sqrt(Σ_t (w·g)²)`` over the steps accumulated so far (with ``track_signal``).

        For a weight whose ``w·g`` has no consistent sign ``t`` is about N(0, 1), so the median is
        :data:`NOISE_MEDIAN_ABS_T` (0.674) when the scores are noise; where fine-tuning pushes weights the same way
        step after step it grows like ``sqrt(steps)``. Whatever the score rule (Adam-stepped scores follow the same
        ``w·g``). Weights that never had a non-zero ``w·g`` are left out; at most :data:`SIGNAL_SAMPLE` weights,
        evenly strided, this rank's shard of a sharded parameter. ``None`` when not tracked or nothing to measure.
        """
        if not self.signal_sums:
            return None
        count = sum(local_tensor(total).numel() for total, _ in self.signal_sums.values())
        stride = max(1, -(-count // SIGNAL_SAMPLE))
        values = []
        for total, squares in self.signal_sums.values():
            total, squares = local_tensor(total).flatten()[::stride], local_tensor(squares).flatten()[::stride]
            seen = squares > 0
            values.append((total[seen] / squares[seen].sqrt()).abs())
        values = [v for v in values if v.numel()]
        return float(torch.cat([v.cpu() for v in values]).median()) if values else None

    def release_signal(self) -> None:
        """Stop tracking :meth:`signal` and free its two weight-sized tensors."""
        self.signal_sums = {}

    def missing(self) -> list[str]:
        """Names whose scores never saw a gradient (frozen or unused parameters): they cannot be ranked."""
        return [name for name, steps in self.steps.items() if steps == 0]

    @torch.no_grad()
    def set_mask(self, masks: MaskSet, name: str, mask: Tensor) -> None:
        """Install ``mask`` for ``name``: weights it prunes move into ``latent``, weights it revives come back from it."""
        param = self.params[name]
        weight = local_tensor(param)  # this rank's shard (the whole weight when unsharded)
        kept = local_part(mask.to(param.device), param)
        dense = weight + local_tensor(self.latent[name]) if name in self.latent else weight.detach().clone()
        masks.set(name, mask)  # zeroes the newly pruned weights
        zero = torch.zeros((), dtype=param.dtype, device=param.device)
        weight.copy_(torch.where(kept, dense, zero))
        self.latent[name] = from_local_like(torch.where(kept, zero, dense), param)

    @torch.no_grad()
    def lend_(self) -> None:
        """Put the latent values into the model's pruned positions (which hold exact zeros, as ``latent`` does at kept
        ones): the model holds the dense ``w``, for an optimizer step to move all of it as the paper's ``W``."""
        for name, latent in self.latent.items():
            local_tensor(self.params[name]).add_(local_tensor(latent))

    @torch.no_grad()
    def take_back_(self, masks: MaskSet) -> None:
        """After :meth:`lend_` and an optimizer step: the pruned positions' values back into ``latent``, zeros in
        the model."""
        for name, latent in self.latent.items():
            weight, kept = local_tensor(self.params[name]), masks.local_mask(name)
            local_tensor(latent).copy_(weight).masked_fill_(kept, 0)
            weight.masked_fill_(~kept, 0)

    # ----------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, dict]:
        """Scores, latent values and step counts, whole (gathered if sharded) and on CPU."""
        return {
            "scores": {name: full_tensor(s).cpu().clone() for name, s in self.scores.items()},
            "latent": {name: full_tensor(v).cpu().clone() for name, v in self.latent.items()},
            "steps": dict(self.steps),
            **({"moments": {name: [full_tensor(m).cpu().clone() for m in pair] for name, pair in self.moments.items()}}
               if self.moments else {}),
        }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Mapping]) -> None:
        """Restore what :meth:`state_dict` saved; every tensor is checked against the parameters before any is loaded."""
        scores, latent, steps = state["scores"], state["latent"], state["steps"]
        if set(scores) != set(self.params) or not set(latent) <= set(self.params) or set(steps) != set(self.params):
            raise ValueError(
                f"Checkpoint movement scores do not fit the model: they cover {sorted(scores)} but the pruned "
                f"parameters here are {list(self.params)}"
            )
        for name, tensor in [*scores.items(), *latent.items()]:
            if tuple(tensor.shape) != tuple(self.params[name].shape):
                raise ValueError(
                    f"Checkpoint movement scores for {name!r} have shape {list(tensor.shape)} but the parameter has "
                    f"shape {list(self.params[name].shape)}"
                )
        for name, tensor in scores.items():
            local_tensor(self.scores[name]).copy_(local_part(tensor.to(self.params[name].device), self.params[name]))
        self.latent = {
            name: sharded_like(tensor.to(device=self.params[name].device, dtype=self.params[name].dtype), self.params[name])
            for name, tensor in latent.items()
        }
        self.steps = {name: int(value) for name, value in steps.items()}
        if any(self.steps.values()):
            self.release_signal()  # not checkpointed: Σ w·g over the steps before the checkpoint is not recoverable
        if self.moments:
            if set(state.get("moments", {})) != set(self.params):
                raise ValueError("Checkpoint movement scores hold no Adam moments, but these scores use rule='adam'")
            for name, pair in state["moments"].items():
                for mine, saved in zip(self.moments[name], pair):
                    local_tensor(mine).copy_(local_part(saved.to(self.params[name].device), self.params[name]))


def signal_warning(median_abs_t: float | None, steps: int, step: int | None, rule: str) -> str | None:
    """The message when movement scores at the first mask update (optimizer ``step``, ``steps`` scored steps) are
    still noise: fewer than :data:`SIGNAL_MIN_STEPS` scored steps, or a median ``|t|`` (:meth:`MovementScores.signal`)
    below :data:`SIGNAL_MEDIAN_ABS_T`; ``None`` otherwise (or when nothing was measured)."""
    if median_abs_t is None:
        return None
    advice = (
        "Masks chosen from such scores are close to random, and on a pretrained model they can do worse than random "
        "ones (README, 'Movement pruning'). What to try: score for more steps before the first mask update (a later "
        "`start`, or more training steps), a larger batch (`accumulate_grad_batches`) so each step's w*g is less "
        "noisy, or magnitude pruning (GradualMagnitudePruning) if the fine-tuning signal stays this weak."
    )
    if rule == "adam":
        advice += (
            " A higher `score_lr` scales every Adam-stepped score by the same factor (scores start at 0), so alone it"
            " does not change which weights are kept."
        )
    if steps < SIGNAL_MIN_STEPS:
        return (
            f"MovementPruning: the first mask update (optimizer step {step}) ranks weights by movement scores from "
            f"only {steps} scored step(s); below {SIGNAL_MIN_STEPS} steps scores cannot be told from minibatch noise. "
            + advice
        )
    if median_abs_t >= SIGNAL_MEDIAN_ABS_T:
        return None
    return (
        f"MovementPruning: at the first mask update (optimizer step {step}, {steps} scored steps) the movement scores "
        f"are still mostly minibatch noise: median |t| = {median_abs_t:.2f} over the weights, t = sum(w*g) / "
        f"sqrt(sum((w*g)^2)), where pure noise gives {NOISE_MEDIAN_ABS_T} and a consistent signal grows like "
        f"sqrt(steps) (warned below {SIGNAL_MEDIAN_ABS_T}). " + advice
    )


def prune_by_movement(
    masks: MaskSet, scores: MovementScores, sparsity: float | Mapping[str, float], distribution: str = "uniform",
    names: Sequence[str] | None = None,
) -> dict[str, int]:
    """Prune the ``round(sparsity × N)`` lowest-scoring weights (``sparsity`` one number or ``{name: sparsity}``).

    ``distribution`` allocates a single ``sparsity`` across layers as for magnitude pruning: ``uniform``, ``global``
    (one threshold on ``S`` over all layers) or ``erk`` (by shape). Masks are recomputed from ``S`` alone, so pruned
    weights whose score has risen come back (hard movement pruning). ``names``: only these parameters (default all;
    heads/neurons are pruned as groups by :func:`lightning_sparse.core.heads.prune_groups_by_scores`). Returns the zeros
    written per parameter.
    """
    missing = scores.missing()
    if missing:
        raise ValueError(f"movement scores of {missing} were never accumulated (no gradient reached them)")
    names = list(masks) if names is None else list(names)
    if not names:
        return {}
    whole = {name: full_tensor(scores.scores[name]) for name in names}  # gathered when sharded: decided as unsharded
    counts = zero_counts(distribution, whole, sparsity)
    for name in names:
        scores.set_mask(masks, name, exact_mask(whole[name], counts[name]))
    return counts
