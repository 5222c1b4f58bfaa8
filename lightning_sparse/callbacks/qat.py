"""Quantization-aware training as a Lightning callback: fake-quantized weights with a straight-through estimator.

How the straight-through estimator is done without hooks or parametrizations: outside the optimizer step the
model's parameters hold the quantized weights q(w), so forward, backward, validation, checkpoints and the
final model all see what will be deployed; the full-precision latent weights w live in this callback. After
backward, w is written back into the parameters, so the gradient taken at q(w) updates w (the STE), and
after the optimizer step the parameters are quantized again. Pruning callbacks act only in between (on w),
and q(0) = 0, so GMP/RigL masks stay exact and the order of the callbacks does not matter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor, nn

from lightning_sparse import report
from lightning_sparse.callbacks.base import (
    SparsityCallback,
    check_choice,
    check_fraction_or_step,
    check_sparsity,
    check_steps,
    refuse_several_manual_optimizers,
    resolve_step,
    warn_if_no_steps,
)
from lightning_sparse.core.quantize import (
    GRANULARITIES,
    METHODS,
    check_bits,
    codebook_quantize,
    fit_codebook,
    interval_means_quantize,
    uniform_quantize,
    zero_smallest,
)
from lightning_sparse.core.masks import non_finite
from lightning_sparse.core.targets import each_setting, per_layer, select_targets


class QuantizationAwareTraining(Callback):
    """Train with weights (and optionally Linear/Conv inputs) fake-quantized, so the model learns to live with it.

    Args:
        bits: bits per weight, 2..8, or ``{glob: bits}`` per layer (layers no glob matches stay full precision).
        granularity: ``per_channel`` (one scale per output channel) or ``per_tensor``; uniform method only.
        symmetric: symmetric grid centred on 0 (``2**bits - 1`` levels) or an asymmetric one with a zero point.
        start: when fake quantization switches on: fraction of the optimizer steps (float) or a step (int).
        include: glob patterns of parameter names to quantize (default: weights of Linear and Conv layers).
        exclude: glob patterns of parameter names to keep in full precision.
        activations: bits for the inputs of the quantized layers (per-tensor, asymmetric, dynamic range), or None.
        method: ``uniform`` grid, or ``kmeans``: a codebook of ``2**bits`` values per layer (k-means on the
            non-zero weights, warm-started, re-fitted every ``codebook_frequency`` steps).
        codebook_frequency: optimizer steps between k-means re-fits (>= 1).
        prune: CLIP-Q mode (Tung & Mori 2018): fraction in [0, 1) of each layer's smallest latent weights
            zeroed in the quantized weights only, recomputed at every step, so pruned weights can come back;
            a float or ``{glob: fraction}``. 0 (default) prunes nothing. A CLIP-Q layer has exactly
            ``round(prune · N)`` zeros and its survivors in ``2**bits - 1`` non-zero levels: interval means over
            the layer's range with ``method="uniform"`` (``granularity``/``symmetric`` then do not apply to it),
            k-means codes with ``method="kmeans"``, so at most ``2**bits`` values per layer counting the zero.
        verbose: print the per-layer table when fitting ends.
    """

    def __init__(
        self,
        bits: int | dict[str, int] = 8,
        granularity: str = "per_channel",
        symmetric: bool = True,
        start: int | float = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        activations: int | None = None,
        method: str = "uniform",
        codebook_frequency: int = 100,
        prune: float | dict[str, float] = 0.0,
        verbose: bool = True,
    ) -> None:
        for label, value in each_setting("bits", bits):
            check_bits(label, value)
        if not isinstance(symmetric, bool):
            raise ValueError(f"`symmetric` must be a bool (true or false), got {symmetric!r}")
        check_choice("granularity", granularity, GRANULARITIES)
        check_choice("method", method, METHODS)
        check_fraction_or_step("start", start)
        if activations is not None:
            check_bits("activations", activations)
        check_steps("codebook_frequency", codebook_frequency)
        for label, value in each_setting("prune", prune):
            check_sparsity(label, value)
        self.bits = dict(bits) if isinstance(bits, Mapping) else bits
        self.granularity, self.symmetric, self.method = granularity, symmetric, method
        self.start, self.activations = start, activations
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self.codebook_frequency = codebook_frequency
        self.prune = dict(prune) if isinstance(prune, Mapping) else float(prune)
        self.verbose = verbose
        self.params: dict[str, nn.Parameter] = {}
        self.layer_bits: dict[str, int] = {}
        self.layer_prune: dict[str, float] = {}
        self.codebooks: dict[str, Tensor] = {}
        self._latent: dict[str, Tensor] = {}  # full-precision weights while the parameters hold q(w)
        self._quantized = False
        self._start_step: int | None = None
        self._codebook_step = -1
        self._stepped = -1
        self._hooks: list[Any] = []
        self._masks: list[Any] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(bits=self.bits, method=self.method, include=self.include, exclude=self.exclude)

    # ----------------------------------------------------------------- hooks: when
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        targets = select_targets(pl_module, self.include, self.exclude)
        self.layer_bits = per_layer("bits", self.bits, list(targets))
        self.params = {name: targets[name] for name in self.layer_bits}
        self.layer_prune = per_layer("prune", self.prune, list(self.params))
        self._masks = [cb.masks for cb in trainer.callbacks if isinstance(cb, SparsityCallback)]
        if self.activations is not None:
            self._hook_inputs(pl_module)
        if stage == "fit":
            self._latent, self.codebooks = {}, {}
            self._quantized, self._start_step, self._codebook_step, self._stepped = False, None, -1, -1

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruners = [cb for cb in trainer.callbacks if isinstance(cb, SparsityCallback)]
        self._masks = [cb.masks for cb in pruners]  # set in their setup
        clipq = {name for name, fraction in self.layer_prune.items() if fraction}
        for pruner in pruners:
            both = sorted(clipq & set(pruner.masks or ()))
            if both:
                raise ValueError(
                    f"QuantizationAwareTraining `prune` (CLIP-Q) and {type(pruner).__name__} both prune {both}: "
                    f"use one of them per layer (limit `prune` with a {{glob: fraction}} mapping, or the pruning "
                    f"callback with `exclude`)"
                )
        refuse_several_manual_optimizers(
            self, trainer, pl_module, "the latent weights of every layer are restored at the first `manual_backward`, "
            "so the other networks would not train on q(w)"
        )
        warn_if_no_steps(self, trainer)
        if self._start_step is None:
            self._start_step = resolve_step("start", self.start, trainer.estimated_stepping_batches)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._quantized and trainer.global_step >= self._start_step:
            self._quantize(trainer.global_step)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._quantized:  # gradients were taken at q(w); the optimizer must step the latent w
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(self._latent[name])
            self._quantized = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._quantized and trainer.global_step >= self._start_step:
            self._quantize(trainer.global_step)
            if trainer.global_step != self._stepped and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
                self._log(trainer)
        self._stepped = trainer.global_step

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._quantized and self._start_step is not None and trainer.global_step >= self._start_step:
            self._quantize(trainer.global_step)
        if self._quantized:
            self._log(trainer)
            if self.verbose:
                self._print_table()

    # ----------------------------------------------------------------- what
    @torch.no_grad()
    def _quantize(self, step: int) -> None:
        """Save the latent weights (pruned entries zeroed by any pruning callback) and put q(w) in the parameters."""
        refit = self.method == "kmeans" and (not self.codebooks or step - self._codebook_step >= self.codebook_frequency)
        for name, param in self.params.items():
            latent = self._latent.get(name)
            if latent is None:
                latent = self._latent[name] = torch.empty_like(param)
            latent.copy_(param)
            for masks in self._masks:
                if masks is not None:
                    masks.mask_tensor_(name, latent)
        bad = non_finite(self._latent)  # one fused check: a NaN weight must not become a code (it was -7.0)
        if bad:
            raise FloatingPointError(
                f"QuantizationAwareTraining: NaN or infinite latent weights in {bad} at optimizer step {step}; they "
                f"cannot be quantized (lower the learning rate, clip gradients with `gradient_clip_val`, or find the "
                f"first one with `Trainer(detect_anomaly=True)`)"
            )
        for name, param in self.params.items():
            param.copy_(self.quantize_layer(name, self._latent[name], refit))
        if refit:
            self._codebook_step = step
        self._quantized = True

    def quantize_layer(self, name: str, latent: Tensor, refit: bool = False) -> Tensor:
        """q(w) of one layer: CLIP-Q pruning (if any), then the uniform grid or the layer's codebook.

        With CLIP-Q pruning the layer has exactly ``round(prune · N)`` zeros and at most ``2**bits`` values: the
        survivors go to ``2**bits - 1`` non-zero levels, interval means (``uniform``, per layer as in Tung & Mori)
        or k-means codes (``kmeans``). A k-means layer that holds zeros (pruned by CLIP-Q or another callback) gets
        ``2**bits - 1`` codes plus the zero.
        """
        fraction = self.layer_prune.get(name, 0.0)
        weight = zero_smallest(latent, fraction) if fraction else latent
        bits = self.layer_bits[name]
        if self.method == "uniform":
            if fraction:
                return interval_means_quantize(weight, 2**bits - 1)
            return uniform_quantize(weight, bits, self.granularity, self.symmetric)
        if refit or name not in self.codebooks:
            pruned = bool(fraction) or any(m is not None and name in m.params for m in self._masks) or bool((weight == 0).any())
            self.codebooks[name] = fit_codebook(weight, bits, self.codebooks.get(name), reserve_zero=pruned)
        return codebook_quantize(weight, self.codebooks[name])

    def _hook_inputs(self, pl_module: pl.LightningModule) -> None:
        bits = self.activations

        def fake_quantize_input(module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            x = inputs[0]
            return (x + (uniform_quantize(x, bits, "per_tensor", symmetric=False) - x).detach(), *inputs[1:])

        for handle in self._hooks:
            handle.remove()
        owners = {name.rsplit(".", 1)[0] if "." in name else "" for name in self.params}
        self._hooks = [pl_module.get_submodule(owner).register_forward_pre_hook(fake_quantize_input) for owner in sorted(owners)]

    def errors(self) -> dict[str, float]:
        """Relative quantization error ``||q(w) - w|| / ||w||`` per layer (while the parameters hold q(w))."""
        result = {}
        for name, param in self.params.items():
            latent = self._latent[name]
            norm = float(latent.norm())
            result[name] = float((param.detach() - latent).norm()) / norm if norm else 0.0
        return result

    def _log(self, trainer: pl.Trainer) -> None:
        errors = self.errors()
        metrics = {f"quant/bits/{name}": float(bits) for name, bits in self.layer_bits.items()}
        metrics.update({f"quant/error/{name}": error for name, error in errors.items()})
        sizes = {name: self.params[name].numel() for name in errors}
        metrics["quant/error/global"] = sum(errors[n] * sizes[n] for n in errors) / max(sum(sizes.values()), 1)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    @rank_zero_only
    def _print_table(self) -> None:
        report.print_table(report.quantization_table(self.layer_bits, self.params, self.errors(), self.method))

    # ----------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"start_step": self._start_step, "codebook_step": self._codebook_step}
        state["codebooks"] = {name: codebook.cpu().clone() for name, codebook in self.codebooks.items()}
        if self._quantized:  # the parameters in the checkpoint hold q(w); resuming needs w
            state["latent"] = {name: latent.cpu().clone() for name, latent in self._latent.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        latent = state_dict.get("latent", {})
        for name, tensor in latent.items():
            if name not in self.params or tuple(tensor.shape) != tuple(self.params[name].shape):
                expected = tuple(self.params[name].shape) if name in self.params else "not quantized here"
                raise ValueError(
                    f"Checkpoint latent weights for {name!r} have shape {tuple(tensor.shape)} but the model's "
                    f"parameter is {expected} (quantized here: {list(self.params)})"
                )
        self._start_step = state_dict.get("start_step")
        self._codebook_step = state_dict.get("codebook_step", -1)
        self.codebooks = {n: c.to(self.params[n].device) for n, c in state_dict.get("codebooks", {}).items()}
        self._latent = {n: t.to(device=self.params[n].device, dtype=self.params[n].dtype) for n, t in latent.items()}
        self._quantized = bool(latent)
