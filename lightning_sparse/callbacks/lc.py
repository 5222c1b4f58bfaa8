"""Learning-Compression as a Lightning callback: L steps are the user's own training plus a penalty gradient,
C steps run in closed form at step boundaries (Carreira-Perpiñán 2017; Carreira-Perpiñán & Idelbayev 2018)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_sparse import report
from lightning_sparse.callbacks.base import (
    CompressionCallback,
    as_sparsity,
    check_bool,
    check_choice,
    check_finite,
    check_sparsity,
    check_steps,
    current_parameters,
    print_rank_zero,
    print_targets,
    refuse_several_manual_optimizers,
    warn_if_no_steps,
    whole_tensors,
)
from lightning_sparse.core import lc
from lightning_sparse.core.quantize import check_bits
from lightning_sparse.core.targets import each_setting, model_sparsity, per_layer, weight_matrices


def _finite_note(value: Any) -> str:
    return " (it must be finite)" if isinstance(value, float) and math.isinf(value) else ""


#: Largest μ factor per C step: beyond it μ reaches ``mu_max`` within a step or two (a typo, not a schedule).
MAX_MU_MULTIPLIER = 10.0


def _refuse_unused(compression: str, mode: str, **given: Any) -> None:
    """Arguments of ``mode`` (``prune`` or ``quantize``) given with a ``compression`` that does not do it."""
    unused = [name for name, value in given.items() if value is not None]
    if mode not in compression and unused:
        other = "prune" if mode == "quantize" else "quantize"
        raise ValueError(f"{', '.join(f'`{n}`' for n in unused)} do(es) nothing with compression={compression!r} (it "
                         f"only {other}s): drop {'it' if len(unused) == 1 else 'them'}, or use "
                         f"compression='prune+quantize'")  # fmt: skip


class LearningCompression(CompressionCallback):
    """Alternate L steps (training + ``μ/2 ||w - Δ(Θ) - λ/μ||²``) and C steps (``Θ = Π(w - λ/μ)``) inside ``fit``.

    Timeline in optimizer steps: ``first_l_steps`` of plain training (the reference model), then C step 0 (direct
    compression, λ = 0), then every ``steps_per_l`` steps an L step ends and C step k runs, ``lc_steps`` C steps
    in all; μ_k = ``mu_init`` · ``mu_multiplier``^k (at most ``mu_max``). The penalty reaches the optimizer as the
    extra gradient ``μ(w - Δ) - λ`` (after DDP all-reduce and accumulation), so the LightningModule is untouched;
    optimizer momentum is reset after every C step, as the published code does. From the last C step on, the
    model holds Δ(Θ): exact sparsity and at most K distinct values per layer; steps left after it still train what
    L-C does not compress (biases, normalisation), which costs nothing in feasibility.

    Learning rate: by default the user's optimizer and schedule are used as they are, so the L steps must still be
    able to move w when μ is large: end the μ schedule where the learning rate ends (many short L steps across one
    cosine schedule). With ``l_step_lr``, every L step runs like a fresh optimizer instead: from C step 0 on, L-C
    sets the learning rate of every parameter group to ``l_step_lr · l_step_lr_decay^k`` at the start of L step k
    (overriding any scheduler of the user's from then on), and ``l_step_schedule`` says what happens within the L
    step: ``"cosine"`` (default) anneals it to 0 by a half cosine at its end; ``"constant"`` holds it, as the
    published L-C code does (a new SGD at ``lr · 0.98^k`` per L step). That suits few long L steps with a slowly growing μ, and quantization to 1 or 2 bits in
    particular. Weight decay fights quantization: with K values per layer, ``||Δ(Θ)||²`` is a sum of N·c² over
    the codebook, so decay shrinks the whole codebook at once; give the compressed layers no decay there.

    Validation during L-C measures the compressed model: from C step 0 on, every validation run swaps Δ(Θ) of the
    latest C step into the model and restores w afterwards, so ``val_*`` metrics (and anything monitoring them) are
    those of the model you would get by stopping there; they are also logged as ``lc/val_*``. Validation runs at the
    Trainer's own cadence (``val_check_interval``, ``check_val_every_n_epoch``); with ``epochs_per_l`` and the
    default once-per-epoch validation, every C-step iterate is evaluated exactly once.

    Refused combinations (``ValueError`` at ``fit`` start, naming both callbacks and the layers): another pruning
    callback (GMP, RigL, SET) on the same parameters, since its masks and L-C's C steps would each overwrite the
    other's zeros (prune some layers with each through ``include``/``exclude``, or prune and quantize with
    ``compression="prune+quantize"``); ``QuantizationAwareTraining`` on the same parameters, since the forward pass
    would see QAT's q(w) while L-C pulls the latent w towards its own codebook and both rewrite the weights at the
    end (use ``compression="quantize"`` or ``"prune+quantize"``); a second ``LearningCompression`` on the same
    parameters. Disjoint layers compose freely, and the compressed export writes L-C's quantized layers as a
    codebook and codes.

    Args:
        compression: ``prune`` (top-κ magnitudes), ``quantize`` (a codebook per layer) or ``prune+quantize``.
            Arguments of the other mode are refused (``bits`` with ``prune``, ``sparsity`` with ``quantize``): they
            would do nothing.
        sparsity: fraction of zeros for pruning, in [0, 1), or ``{glob: sparsity}`` per layer (default 0.9).
        distribution: pruning allocation, ``global`` (one κ over all layers, the default) or ``uniform``.
        bits: codebook size K = 2**bits for quantization (1..8, default 2), or ``{glob: bits}``; ``codebook_size``
            overrides.
            K counts every value a layer may hold: with ``prune+quantize`` the zero is one of them (K - 1 non-zero
            values), so a layer never needs more than ``bits`` per weight.
        codebook_size: K directly (>= 2), for sizes that are not powers of two.
        codebook: ``kmeans`` (warm-started from the previous C step, the default), ``binary`` (±a) or ``ternary``
            ({-a, 0, a}).
        mu_init: μ_0 > 0. mu_multiplier: a in [1, 10]. mu_max: the cap on μ.
        lc_steps: number of C steps (>= 1).
        steps_per_l: optimizer steps per L step (default: the steps after ``first_l_steps`` shared evenly).
        epochs_per_l: training epochs per L step, instead of ``steps_per_l`` (not both).
        first_l_steps: optimizer steps of plain training before C step 0.
        keep_best: a validation metric name (e.g. ``val_acc``): end with the evaluated C-step iterate Δ(Θ) whose
            metric was best (Condensa's choice) instead of the last one. Iterates no validation run saw are not
            candidates.
        keep_best_mode: ``max`` or ``min`` for ``keep_best``; default ``min`` for names containing ``loss`` or
            ``err``, else ``max``.
        reset_momentum: zero the optimizer state (momentum, Adam moments) of the compressed parameters after every
            C step, as the published code does by starting each L step with a new optimizer.
        l_step_lr: learning rate at the start of every L step (see above), or None to keep the user's schedule.
        l_step_lr_decay: factor in (0, 1] applied to ``l_step_lr`` per L step (the published code uses 0.98).
        l_step_schedule: the learning rate within an L step with ``l_step_lr``: ``cosine`` (annealed to 0) or
            ``constant`` (held, as in the published code).
        include: glob patterns of parameter names to compress (default: every weight that does a matrix product).
        exclude: glob patterns of parameter names to leave uncompressed.
        verbose: print the per-layer table when fitting ends.
    """

    metric_prefix = "lc"
    _overlap_hint = (
        "; L-C's C steps own the values and the zeros of its layers: to prune and quantize them use "
        "compression='prune+quantize'"
    )

    def __init__(
        self,
        compression: str = "prune",
        sparsity: float | dict[str, float] | None = None,
        distribution: str | None = None,
        bits: int | dict[str, int] | None = None,
        codebook_size: int | None = None,
        codebook: str | None = None,
        mu_init: float = 1e-3,
        mu_multiplier: float = 1.1,
        mu_max: float = 1e4,
        lc_steps: int = 20,
        steps_per_l: int | None = None,
        first_l_steps: int = 0,
        epochs_per_l: int | None = None,
        keep_best: str | None = None,
        keep_best_mode: str | None = None,
        reset_momentum: bool = True,
        l_step_lr: float | None = None,
        l_step_lr_decay: float = 0.98,
        l_step_schedule: str = "cosine",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose)
        check_choice("compression", compression, lc.COMPRESSIONS)
        given = {"sparsity": sparsity, "distribution": distribution, "bits": bits, "codebook_size": codebook_size,
                 "codebook": codebook}  # fmt: skip
        sparsity = 0.9 if sparsity is None else sparsity
        distribution = "global" if distribution is None else distribution
        bits = 2 if bits is None else bits
        codebook = "kmeans" if codebook is None else codebook
        check_bool("reset_momentum", reset_momentum)
        check_sparsity("sparsity", sparsity)
        check_choice("distribution", distribution, ("global", "uniform"))
        check_choice("codebook", codebook, lc.CODEBOOKS)
        for label, value in each_setting("bits", bits):
            check_bits(label, value, low=1)
        if codebook_size is not None and (isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 2):
            raise ValueError(f"`codebook_size` must be an int >= 2, got {codebook_size!r}")
        if isinstance(mu_init, bool) or not isinstance(mu_init, (int, float)) or not 0 < mu_init < math.inf:
            raise ValueError(f"`mu_init` must be a number > 0, got {mu_init!r}{_finite_note(mu_init)}")
        if isinstance(mu_max, bool) or not isinstance(mu_max, (int, float)) or not mu_max > 0:  # inf: no cap
            raise ValueError(f"`mu_max` must be a number > 0 (inf for no cap), got {mu_max!r}")
        if mu_init > mu_max:
            raise ValueError(f"`mu_init`={mu_init} must not exceed `mu_max`={mu_max} (it would be capped silently)")
        if isinstance(mu_multiplier, bool) or not isinstance(mu_multiplier, (int, float)) or not 1 <= mu_multiplier < math.inf:
            raise ValueError(f"`mu_multiplier` must be a number >= 1, got {mu_multiplier!r}{_finite_note(mu_multiplier)}")
        if mu_multiplier > MAX_MU_MULTIPLIER:
            raise ValueError(f"`mu_multiplier` must be at most {MAX_MU_MULTIPLIER:g} (μ's factor per C step; published "
                             f"schedules use 1.1 to 1.25), got {mu_multiplier!r}")  # fmt: skip
        check_steps("lc_steps", lc_steps, unit="C steps")
        if steps_per_l is not None:
            check_steps("steps_per_l", steps_per_l)
        if epochs_per_l is not None:
            check_steps("epochs_per_l", epochs_per_l, unit="epochs")
            if steps_per_l is not None:
                raise ValueError(f"Give `steps_per_l` or `epochs_per_l`, not both (got {steps_per_l} and {epochs_per_l})")
        if keep_best is not None and (not isinstance(keep_best, str) or not keep_best):
            raise ValueError(f"`keep_best` must be a metric name such as 'val_acc', or None, got {keep_best!r}")
        if keep_best_mode is not None:
            check_choice("keep_best_mode", keep_best_mode, ("max", "min"))
        if l_step_lr is not None and (isinstance(l_step_lr, bool) or not isinstance(l_step_lr, (int, float)) or not 0 < l_step_lr < math.inf):
            raise ValueError(f"`l_step_lr` must be a number > 0 or None, got {l_step_lr!r}{_finite_note(l_step_lr)}")
        if isinstance(l_step_lr_decay, bool) or not isinstance(l_step_lr_decay, (int, float)) or not 0 < l_step_lr_decay <= 1:
            raise ValueError(f"`l_step_lr_decay` must be a number in (0, 1], got {l_step_lr_decay!r}")
        check_choice("l_step_schedule", l_step_schedule, lc.L_STEP_SCHEDULES)
        if isinstance(first_l_steps, bool) or not isinstance(first_l_steps, int) or first_l_steps < 0:
            raise ValueError(f"`first_l_steps` must be an int >= 0 (optimizer steps), got {first_l_steps!r}")
        _refuse_unused(compression, "prune", **{k: given[k] for k in ("sparsity", "distribution")})
        _refuse_unused(compression, "quantize", **{k: given[k] for k in ("bits", "codebook_size", "codebook")})
        self.compression, self.distribution, self.codebook = compression, distribution, codebook
        self.sparsity = as_sparsity(sparsity)
        self.bits = dict(bits) if isinstance(bits, Mapping) else bits
        self.codebook_size = codebook_size
        self.mu_init, self.mu_multiplier, self.mu_max = float(mu_init), float(mu_multiplier), float(mu_max)
        self.lc_steps, self.steps_per_l, self.first_l_steps = lc_steps, steps_per_l, first_l_steps
        self.epochs_per_l = epochs_per_l
        self.reset_momentum = reset_momentum
        self.l_step_lr = None if l_step_lr is None else float(l_step_lr)
        self.l_step_lr_decay = float(l_step_lr_decay)
        self.l_step_schedule = l_step_schedule
        self.keep_best = keep_best
        if keep_best_mode is None and keep_best is not None:
            keep_best_mode = "min" if any(word in keep_best.lower() for word in ("loss", "err")) else "max"
        self.keep_best_mode = keep_best_mode
        self.compressor: lc.LearningCompressor | None = None
        self._every: int | None = None  # resolved steps_per_l
        self._total = 0  # optimizer steps in the run
        self._matrices: dict[str, Tensor] = {}  # every weight matrix of the model, for `sparsity/model`

    @property
    def state_key(self) -> str:
        return self._generate_state_key(compression=self.compression, include=self.include, exclude=self.exclude)

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """The compressed parameters, by name (empty before ``setup``)."""
        return self.compressor.params if self.compressor is not None else {}

    @property
    def c_steps_done(self) -> int:
        return self.compressor.c_steps_done if self.compressor is not None else 0

    @property
    def delta(self) -> dict[str, Tensor]:
        """Δ(Θ) of the last C step."""
        return self.compressor.delta if self.compressor is not None else {}

    @property
    def lam(self) -> dict[str, Tensor]:
        """The Lagrange multipliers λ."""
        return self.compressor.lam if self.compressor is not None else {}

    @property
    def codebooks(self) -> dict[str, Tensor]:
        return self.compressor.codebooks if self.compressor is not None else {}

    @property
    def best(self) -> dict[str, Any] | None:
        """``keep_best``: ``{"score", "c_step", "delta"}`` of the best evaluated iterate."""
        return self.compressor.best if self.compressor is not None else None

    @property
    def mu(self) -> float:
        """μ of the current L step: μ_k after C step k."""
        return self.compressor.mu

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        targets = self._select(pl_module)
        names = targets
        if isinstance(self.sparsity, dict) and "prune" in self.compression:
            names = targets.subset(per_layer("sparsity", self.sparsity, names))
        if isinstance(self.bits, dict) and "quantize" in self.compression:
            names = targets.subset(per_layer("bits", self.bits, names))
        self._matrices = weight_matrices(pl_module)
        if self.verbose:
            print_targets(type(self).__name__, pl_module, names)
        layer_sparsity = per_layer("sparsity", self.sparsity, names) if isinstance(self.sparsity, dict) else self.sparsity
        sizes = {}
        if "quantize" in self.compression:
            sizes = {name: self.codebook_size or 2**bits for name, bits in per_layer("bits", self.bits, names).items()}
        self.compressor = lc.LearningCompressor(
            names, self.compression, layer_sparsity, self.distribution, sizes,
            self.codebook, self.mu_init, self.mu_multiplier, self.mu_max, self.reset_momentum,
        )  # fmt: skip
        self._every = None
        self.compressed = {name: frozenset({"zeros", "values"}) for name in names}
        self._refuse_overlaps(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.compressor.rebind(current_parameters(self, trainer, pl_module, list(self.compressor.params)))  # FSDP2 resharded them
        self._matrices = weight_matrices(pl_module)
        refuse_several_manual_optimizers(
            self, trainer, pl_module, "C steps and the penalty gradient would run once per optimizer step"
        )
        warn_if_no_steps(self, trainer)
        total = trainer.estimated_stepping_batches  # also sets up the train dataloader (num_training_batches)
        self._total = int(total) if math.isfinite(total) else 0
        if self._every is None:
            after = total - self.first_l_steps
            if self.epochs_per_l is not None:
                if math.isinf(trainer.num_training_batches):
                    raise ValueError("`epochs_per_l` needs a train dataloader with a length: give `steps_per_l` instead")
                self._every = self.epochs_per_l * math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
            else:
                self._every = self.steps_per_l or max(1, int(after // max(self.lc_steps - 1, 1)) if after > 0 else 1)
        needed = self.first_l_steps + (self.lc_steps - 1) * self._every
        if needed > total:
            given = f"`epochs_per_l`={self.epochs_per_l} ({self._every} steps)" if self.epochs_per_l else f"`steps_per_l`={self._every}"
            raise ValueError(
                f"{given} with `lc_steps`={self.lc_steps} and `first_l_steps`={self.first_l_steps} "
                f"needs {needed} optimizer steps, but the run has {int(total)}: lower `steps_per_l` or `lc_steps`"
            )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        check_finite(self, trainer, self.params, trainer.global_step)
        self.compressor.add_penalty_gradients()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._maybe_c_step(trainer)  # C step 0 before any optimizer step when `first_l_steps` is 0
        if self.l_step_lr is not None:
            self._set_learning_rate(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.c_steps_done == self.lc_steps:  # after the last C step the model stays at Δ(Θ) (and so do checkpoints)
            self.compressor.hold_compressed()
        self._maybe_c_step(trainer)  # at the end of the batch, so that a validation run right after sees it

    def _maybe_c_step(self, trainer: pl.Trainer) -> None:
        if self.c_steps_done < self.lc_steps and trainer.global_step == self.first_l_steps + self.c_steps_done * self._every:
            self._c_step(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compressor is not None and self.compressor.started and trainer.state.fn == TrainerFn.FITTING:
            self.compressor.swap_in()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compressor is None or not self.compressor.swapped_in:
            return
        self.compressor.restore()
        if not trainer.sanity_checking:
            self._record_validation(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compressor is not None and self.compressor.started:
            if self.best is None and self.keep_best is not None:
                rank_zero_warn("LearningCompression: no validation run saw a C-step iterate, so `keep_best` had no "
                               "candidates; the model ends with the last one")  # fmt: skip
            self.compressor.finish()
            if self.verbose:
                self._print_table()

    # ----------------------------------------------------------------- what
    def _set_learning_rate(self, trainer: pl.Trainer) -> None:
        """``l_step_lr``: the learning rate of this optimizer step in the fresh-optimizer-per-L-step schedule."""
        total = self._total or self.first_l_steps + self.lc_steps * self._every  # unknown length: one more L step
        lr = lc.l_step_lr(trainer.global_step, self.first_l_steps, self._every, self.lc_steps, total,
                          self.l_step_lr, self.l_step_lr_decay, self.l_step_schedule)  # fmt: skip
        if lr is not None:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr

    def _c_step(self, trainer: pl.Trainer) -> None:
        mu = self.compressor.c_step([optimizer.state for optimizer in trainer.optimizers])
        if self.c_steps_done == self.lc_steps:
            self.compressor.hold_compressed()
        metrics = self.compressor.metrics(mu)
        metrics["sparsity/model"] = model_sparsity({name: self.delta.get(name, matrix) for name, matrix in self._matrices.items()})
        self._log(trainer, metrics)

    def project(self, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Π: the closed-form C step for this callback's compression, applied to ``targets``."""
        return self.compressor.project(targets)

    def distances(self) -> dict[str, float]:
        """``||w - Δ(Θ)||`` per layer."""
        return self.compressor.distances()

    def _record_validation(self, trainer: pl.Trainer) -> None:
        """Log the compressed model's validation metrics as ``lc/val_*`` and track the best iterate for ``keep_best``."""
        found = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val")}
        metrics = {f"lc/{name}": value for name, value in found.items()}
        if self.keep_best is not None:
            if self.keep_best not in trainer.callback_metrics:
                raise ValueError(
                    f"`keep_best`={self.keep_best!r} is not among the logged metrics {sorted(trainer.callback_metrics)}: "
                    f"log it in `validation_step` or name another"
                )
            self.compressor.record(float(trainer.callback_metrics[self.keep_best]), self.keep_best_mode)
            metrics["lc/best_c_step"] = float(self.best["c_step"])
        metrics["lc/c_step"] = float(self.c_steps_done)
        self._log(trainer, metrics)

    def _print_table(self) -> None:
        stats = report.stats_from_tensors(whole_tensors(self.params))
        print_rank_zero(report.sparsity_table(stats, title=f"LearningCompression ({self.compression}): per layer"))

    # ----------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        if self.compressor is None:
            return {}
        return {"every": self._every, **self.compressor.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "c_steps_done" not in state_dict:
            return
        self.compressor.load_state_dict(state_dict)
        self._every = state_dict["every"]
