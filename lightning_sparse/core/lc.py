"""Learning-Compression (Carreira-Perpiñán 2017, arXiv 1707.01209): C steps, the penalty gradient, multipliers, μ.

The L-C algorithm alternates an L step, ``min_w loss(w) + μ/2 ||w - Δ(Θ) - λ/μ||²`` (ordinary training with an
extra gradient ``μ(w - Δ(Θ)) - λ``), and a C step, ``Θ = Π(w - λ/μ)``: the best compressed weights for the
current ones, in closed form here. Then ``λ ← λ - μ(w - Δ(Θ))`` and μ grows geometrically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sparse.core.allocation import zero_counts
from lightning_sparse.core.counting import global_sparsity
from lightning_sparse.core.criteria import exact_mask
from lightning_sparse.core.masks import param_state
from lightning_sparse.core.quantize import kmeans_1d, nearest_codes
from lightning_sparse.core.shards import full_tensor, sharded_like

COMPRESSIONS = ("prune", "quantize", "prune+quantize")
CODEBOOKS = ("kmeans", "binary", "ternary")


def mu_at(k: int, mu_init: float, multiplier: float, mu_max: float) -> float:
    """μ_k = μ_0 · a^k, capped at ``mu_max``."""
    return min(mu_init * multiplier**k, mu_max)


L_STEP_SCHEDULES = ("cosine", "constant")


def l_step_lr(
    step: int, first: int, every: int, lc_steps: int, total: int, base: float, decay: float, schedule: str = "cosine"
) -> float | None:
    """Learning rate at optimizer ``step`` when every L step runs like a fresh optimizer.

    L step k (after C step k at ``first + k·every``) starts at ``base · decay^k``. ``schedule="constant"`` holds
    that rate for the whole L step, as the published L-C code does (a new SGD per L step at ``lr · 0.98^k``);
    ``"cosine"`` anneals it to 0 by a half cosine over the L step's ``every`` steps. The steps after the last C step
    (where only parameters L-C does not compress still move) form one more such stretch up to ``total``. ``None``
    before C step 0: the user's own schedule applies.
    """
    if schedule not in L_STEP_SCHEDULES:
        raise ValueError(f"`l_step_schedule` must be one of {L_STEP_SCHEDULES}, got {schedule!r}")
    if step < first:
        return None
    k = min((step - first) // every, lc_steps - 1)
    if schedule == "constant":
        return base * decay**k
    start = first + k * every
    length = every if k < lc_steps - 1 else max(total - start, 1)
    progress = min((step - start) / length, 1.0)
    return base * decay**k * 0.5 * (1.0 + math.cos(math.pi * progress))


def prune_c_step(targets: Mapping[str, Tensor], sparsity: float | Mapping[str, float], distribution: str) -> dict[str, Tensor]:
    """Closed-form pruning C step: keep the top-κ magnitudes of ``targets`` (``global``: one κ over all layers)."""
    scores = {name: t.detach().abs() for name, t in targets.items()}
    counts = zero_counts(distribution, scores, sparsity)
    return {name: t.detach().masked_fill(~exact_mask(scores[name], counts[name]), 0) for name, t in targets.items()}


def binary_c_step(target: Tensor) -> tuple[Tensor, Tensor]:
    """Best ``{-a, +a}`` approximation: ``a = mean |w|``. Returns (Δ, codebook)."""
    a = target.detach().abs().mean()
    codebook = torch.stack([-a, a])
    return torch.where(target >= 0, a, -a), codebook


def ternary_c_step(target: Tensor) -> tuple[Tensor, Tensor]:
    """Best ``{-a, 0, +a}`` approximation: keep the j largest |w| with ``j = argmax (Σ_top-j |w|)² / j``, ``a`` their mean."""
    flat = target.detach().abs().reshape(-1)
    ordered = torch.sort(flat, descending=True, stable=True)
    sums = torch.cumsum(ordered.values, 0)
    counts = torch.arange(1, flat.numel() + 1, dtype=sums.dtype, device=sums.device)
    j = int(torch.argmax(sums * sums / counts)) + 1
    a = sums[j - 1] / j
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[ordered.indices[:j]] = True
    delta = torch.where(keep.view(target.shape), torch.sign(target.detach()) * a, torch.zeros_like(target))
    return delta, torch.stack([-a, torch.zeros_like(a), a])


def kmeans_c_step(target: Tensor, k: int, init: Tensor | None = None, skip_zeros: bool = False) -> tuple[Tensor, Tensor]:
    """k-means C step: a codebook of ``k`` values (warm-started from ``init``) and every weight at its nearest entry.

    With ``skip_zeros`` (prune+quantize), exact zeros stay zero and only the others are clustered.
    """
    w = target.detach()
    values = w[w != 0] if skip_zeros else w.reshape(-1)
    codebook = kmeans_1d(values, k, init)
    delta = codebook[nearest_codes(w, codebook)]
    if skip_zeros:
        delta = delta.masked_fill(w == 0, 0)
    return delta, codebook


def project(
    targets: Mapping[str, Tensor],
    compression: str,
    sparsity: float | Mapping[str, float] = 0.0,
    distribution: str = "global",
    codebook_sizes: Mapping[str, int] | None = None,
    codebook: str = "kmeans",
    codebooks: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Π, the closed-form C step: prune (top-κ), quantize (``codebook`` per layer), or prune then quantize the kept
    weights. ``codebooks`` warm-starts k-means and receives every layer's new codebook.

    ``codebook_sizes`` counts every value a layer may hold, so ``2**bits`` fits in ``bits``: with
    ``prune+quantize`` the zero of pruning is one of them and k-means fits ``size - 1`` non-zero values."""
    codebooks = {} if codebooks is None else codebooks
    delta = dict(targets)
    if "prune" in compression:
        delta = prune_c_step(delta, sparsity, distribution)
    if "quantize" in compression:
        for name, target in delta.items():
            if codebook == "binary":
                delta[name], codebooks[name] = binary_c_step(target)
            elif codebook == "ternary":
                delta[name], codebooks[name] = ternary_c_step(target)
            else:
                if codebook_sizes is None:
                    raise ValueError("`codebook_sizes` must give K per parameter for a k-means C step")
                pruned = compression == "prune+quantize"
                k = codebook_sizes[name] - 1 if pruned else codebook_sizes[name]
                delta[name], codebooks[name] = kmeans_c_step(target, k, codebooks.get(name), skip_zeros=pruned)
    return {name: t.clone() for name, t in delta.items()}


def penalty_gradient(weight: Tensor, delta: Tensor, lam: Tensor, mu: float) -> Tensor:
    """Gradient of ``μ/2 ||w - Δ - λ/μ||²`` with respect to w: ``μ(w - Δ) - λ``."""
    return mu * (weight.detach() - delta) - lam


def update_multiplier(lam: Tensor, weight: Tensor, delta: Tensor, mu: float) -> None:
    """λ ← λ - μ(w - Δ(Θ)), in place."""
    lam.sub_(mu * (weight.detach() - delta))


class LearningCompressor:
    """The state of one Learning-Compression run over a set of parameters: Δ(Θ), λ, the codebooks, μ_k, keep-best.

    Verbs, as a training loop calls them (the Lightning callback calls the same ones from its hooks):

    - :meth:`c_step` at each C step: ``Θ = Π(w - λ/μ)`` (λ = 0 at C step 0, direct compression), then
      ``λ ← λ - μ(w - Δ(Θ))``, and optionally the optimizer state of the compressed parameters reset.
    - :meth:`add_penalty_gradients` before every optimizer step of an L step: ``grad += μ(w - Δ) - λ``.
    - :meth:`hold_compressed` to put Δ(Θ) into the parameters (after the last C step the model stays there);
      :meth:`swap_in` / :meth:`restore` around an evaluation of the compressed model; :meth:`record` a metric
      of that evaluation for ``keep_best``; :meth:`finish` ends on the best (or the last) iterate.

    Sharded parameters (FSDP2 ``DTensor``): Π runs on whole tensors (gathered), Δ(Θ) and λ are kept sharded like
    their parameter, so the penalty gradient and the multiplier update are shard-local; :meth:`state_dict` is whole.

    Args:
        params: ``{name: parameter}`` to compress.
        compression: ``prune``, ``quantize`` or ``prune+quantize``.
        sparsity: fraction of zeros (pruning), one for all or ``{name: sparsity}``.
        distribution: ``global`` (one κ over all layers) or ``uniform``.
        codebook_sizes: K per parameter (quantization).
        codebook: ``kmeans``, ``binary`` or ``ternary``.
        mu_init: μ_0. mu_multiplier: a. mu_max: the cap on μ_k = μ_0 a^k.
        reset_momentum: zero the optimizer state of the compressed parameters after every C step.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        compression: str = "prune",
        sparsity: float | Mapping[str, float] = 0.9,
        distribution: str = "global",
        codebook_sizes: Mapping[str, int] | None = None,
        codebook: str = "kmeans",
        mu_init: float = 1e-3,
        mu_multiplier: float = 1.1,
        mu_max: float = 1e4,
        reset_momentum: bool = True,
    ) -> None:
        self.params = dict(params)
        self.compression, self.sparsity, self.distribution = compression, sparsity, distribution
        self.codebook_sizes = dict(codebook_sizes or {})
        self.codebook = codebook
        self.mu_init, self.mu_multiplier, self.mu_max = mu_init, mu_multiplier, mu_max
        self.reset_momentum = reset_momentum
        self.delta: dict[str, Tensor] = {}  # Δ(Θ) of the last C step
        self.lam: dict[str, Tensor] = {}  # Lagrange multipliers λ
        self.codebooks: dict[str, Tensor] = {}
        self.c_steps_done = 0
        self.best: dict[str, Any] | None = None  # {"score", "c_step", "delta"} of the best evaluated iterate
        self._held: dict[str, Tensor] | None = None  # w while an evaluation runs on Δ(Θ)

    @property
    def mu(self) -> float:
        """μ of the current L step: μ_k after C step k."""
        return mu_at(max(self.c_steps_done - 1, 0), self.mu_init, self.mu_multiplier, self.mu_max)

    @property
    def started(self) -> bool:
        """True once C step 0 has run."""
        return bool(self.delta)

    def project(self, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Π: the closed-form C step for this compression, applied to ``targets``."""
        return project(targets, self.compression, self.sparsity, self.distribution, self.codebook_sizes,
                       self.codebook, self.codebooks)  # fmt: skip

    @torch.no_grad()
    def c_step(self, optimizer_states: Sequence[Mapping[Tensor, Mapping[str, Any]]] = ()) -> float:
        """One C step and the multiplier update; returns the μ it used. ``optimizer_states`` (``optimizer.state``)
        have the compressed parameters' per-weight state zeroed when ``reset_momentum``."""
        first = not self.delta
        mu = self.mu
        shifted = {n: full_tensor(p.detach() - (0 if first else self.lam[n] / mu)) for n, p in self.params.items()}  # w - λ/μ
        # Π decides on whole tensors (gathered when sharded); Δ is kept sharded like its parameter
        self.delta = {n: sharded_like(d, self.params[n]) for n, d in self.project(shifted).items()}
        if first:
            self.lam = {name: torch.zeros_like(param) for name, param in self.params.items()}
        else:
            for name, param in self.params.items():
                update_multiplier(self.lam[name], param, self.delta[name], mu)
        if self.reset_momentum:  # as the reference L-C code does after each C step (a new optimizer per L step)
            for state in optimizer_states:
                for param in self.params.values():
                    for value in param_state(state, param):
                        value.zero_()
        self.c_steps_done += 1
        return mu

    @torch.no_grad()
    def add_penalty_gradients(self) -> None:
        """``grad += μ(w - Δ(Θ)) - λ`` for every compressed parameter (a no-op before C step 0)."""
        if not self.delta:
            return
        mu = self.mu
        for name, param in self.params.items():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad.add_(penalty_gradient(param, self.delta[name], self.lam[name], mu))

    @torch.no_grad()
    def hold_compressed(self) -> None:
        """Write Δ(Θ) into the parameters."""
        for name, param in self.params.items():
            param.copy_(self.delta[name])

    @torch.no_grad()
    def swap_in(self) -> None:
        """Keep w aside and put Δ(Θ) into the parameters (to evaluate the compressed model)."""
        self._held = {name: param.detach().clone() for name, param in self.params.items()}
        self.hold_compressed()

    @property
    def swapped_in(self) -> bool:
        return self._held is not None

    @torch.no_grad()
    def restore(self) -> None:
        """Put w back after :meth:`swap_in`."""
        if self._held is None:
            raise RuntimeError("restore() without a swap_in() before it")
        for name, param in self.params.items():
            param.copy_(self._held[name])
        self._held = None

    def record(self, score: float, mode: str = "max") -> bool:
        """Note an evaluation of the latest Δ(Θ); keep it if ``score`` is the best so far (``max``/``min``)."""
        better = self.best is None or (score > self.best["score"] if mode == "max" else score < self.best["score"])
        if better:
            self.best = {"score": score, "c_step": self.c_steps_done, "delta": {n: t.clone() for n, t in self.delta.items()}}
        return better

    def finish(self) -> None:
        """End on the best recorded iterate (if any), else the last one, held in the parameters."""
        if self.best is not None:
            self.delta = {name: t.clone() for name, t in self.best["delta"].items()}
        self.hold_compressed()

    def rebind(self, params: Mapping[str, Tensor]) -> None:
        """Point the compressor at new tensors for the same parameters (``fully_shard`` replaces every parameter by
        a ``DTensor``); Δ, λ and the best iterate are moved to the new sharding."""
        def moved(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return {n: sharded_like(full_tensor(t), params[n]) for n, t in tensors.items()}

        self.delta, self.lam = moved(self.delta), moved(self.lam)
        if self.best is not None:
            self.best = {**self.best, "delta": moved(self.best["delta"])}
        self.params = {name: params[name] for name in self.params}

    def distances(self) -> dict[str, float]:
        """``||w - Δ(Θ)||`` per layer (of the whole tensors)."""
        return {name: float(full_tensor(param.detach() - self.delta[name]).norm()) for name, param in self.params.items()}

    def metrics(self, mu: float) -> dict[str, float]:
        """What a C step logs: ``lc/mu``, ``lc/c_step``, ``lc/distance`` (and per layer), ``sparsity/*`` of Δ(Θ) and
        ``lc/distinct/<name>`` (codebook values in use)."""
        distances = self.distances()
        delta = {name: full_tensor(d) for name, d in self.delta.items()}
        metrics = {"lc/mu": mu, "lc/c_step": float(self.c_steps_done), "lc/distance": sum(d * d for d in distances.values()) ** 0.5}
        metrics.update({f"lc/distance/{name}": d for name, d in distances.items()})
        metrics["sparsity/global"] = global_sparsity(delta)
        metrics.update({f"sparsity/{name}": global_sparsity([d]) for name, d in delta.items()})
        metrics.update({f"lc/distinct/{name}": float(torch.unique(d).numel()) for name, d in delta.items()})
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """C steps done, Δ, λ, codebooks and the best iterate, whole (gathered if sharded) and on CPU."""
        def whole(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return {name: full_tensor(t).cpu().clone() for name, t in tensors.items()}

        return {
            "c_steps_done": self.c_steps_done,
            "delta": whole(self.delta),
            "lambda": whole(self.lam),
            "codebooks": whole(self.codebooks),
            "best": None if self.best is None else {
                "score": self.best["score"], "c_step": self.best["c_step"], "delta": whole(self.best["delta"]),
            },
        }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; every tensor is checked against its parameter before any is loaded."""
        for key in ("delta", "lambda"):
            for name, tensor in state.get(key, {}).items():
                if name not in self.params or tuple(tensor.shape) != tuple(self.params[name].shape):
                    raise ValueError(
                        f"Checkpoint L-C state {key!r} for {name!r} has shape {tuple(tensor.shape)}, which does not fit "
                        f"the model (compressed here: {list(self.params)})"
                    )
        device = {name: param.device for name, param in self.params.items()}

        def placed(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:  # whole in the checkpoint, sharded here
            return {n: sharded_like(t.to(device[n]), self.params[n]) for n, t in tensors.items()}

        self.c_steps_done = state["c_steps_done"]
        self.delta = placed(state["delta"])
        self.lam = placed(state["lambda"])
        self.codebooks = {n: t.to(device[n]) for n, t in state["codebooks"].items()}
        best = state.get("best")
        self.best = None if best is None else {**best, "delta": placed(best["delta"])}
