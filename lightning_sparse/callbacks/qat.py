"""Quantization-aware training as a Lightning callback over :class:`~lightning_sparse.core.quantize.FakeQuantizer`.

The quantizer holds the latent weights and the codebooks; this callback only says when: q(w) goes into the
parameters before the forward pass and again after the optimizer step, the latent weights come back after
backward (the straight-through estimator). Pruning callbacks act only in between (on w), and q(0) = 0, so
GMP/RigL masks stay exact and the order of the callbacks does not matter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl

from torch import Tensor, nn

from lightning_sparse import report
from lightning_sparse.callbacks.base import (
    CompressionCallback,
    SparsityCallback,
    check_choice,
    check_sparsity,
    check_steps,
    current_parameters,
    print_rank_zero,
    print_targets,
    refuse_several_manual_optimizers,
    warn_if_no_steps,
    whole_tensors,
)
from lightning_sparse.core.schedules import check_fraction_or_step, resolve_step
from lightning_sparse.core.quantize import METHODS, SCALES, FakeQuantizer, check_bits, uniform_quantize
from lightning_sparse.core.targets import each_setting, per_layer


class QuantizationAwareTraining(CompressionCallback):
    """Train with weights (and optionally Linear/Conv inputs) fake-quantized, so the model learns to live with it.

    Args:
        bits: bits per weight, 2..8, or ``{glob: bits}`` per layer (layers no glob matches stay full precision).
        scale: ``per_channel`` (one scale per output channel) or ``per_tensor``; uniform method only.
        symmetric: symmetric grid centred on 0 (``2**bits - 1`` levels) or an asymmetric one with a zero point.
        start: when fake quantization switches on: fraction of the optimizer steps (float) or a step (int).
        include: glob patterns of parameter names to quantize (default: every weight that does a matrix product).
        exclude: glob patterns of parameter names to keep in full precision.
        activations: bits for the inputs of the quantized layers (per-tensor, asymmetric, dynamic range), or None.
        method: ``uniform`` grid, or ``kmeans``: a codebook of ``2**bits`` values per layer (k-means on the
            non-zero weights, warm-started, re-fitted every ``frequency`` steps).
        frequency: optimizer steps between k-means re-fits (>= 1).
        sparsity: CLIP-Q mode (Tung & Mori 2018): fraction in [0, 1) of each layer's smallest latent weights
            zeroed in the quantized weights only, recomputed at every step, so pruned weights can come back;
            a float or ``{glob: fraction}``. 0 (default) prunes nothing. A CLIP-Q layer has exactly
            ``round(sparsity · N)`` zeros and its survivors in ``2**bits - 1`` non-zero levels: interval means over
            the layer's range with ``method="uniform"`` (``scale``/``symmetric`` then do not apply to it),
            k-means codes with ``method="kmeans"``, so at most ``2**bits`` values per layer counting the zero.
        verbose: print the per-layer table when fitting ends.
    """

    metric_prefix = "qat"
    _overlap_hint = (
        "; for CLIP-Q pruning and quantization of the same layers use `sparsity` here alone, for masks that stay "
        "use a pruning callback and QuantizationAwareTraining without `sparsity`"
    )

    def __init__(
        self,
        bits: int | dict[str, int] = 8,
        scale: str = "per_channel",
        symmetric: bool = True,
        start: int | float = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        activations: int | None = None,
        method: str = "uniform",
        frequency: int = 100,
        sparsity: float | dict[str, float] = 0.0,
        verbose: bool = True,
    ) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose)
        for label, value in each_setting("bits", bits):
            check_bits(label, value)
        if not isinstance(symmetric, bool):
            raise ValueError(f"`symmetric` must be a bool (true or false), got {symmetric!r}")
        check_choice("scale", scale, SCALES)
        check_choice("method", method, METHODS)
        check_fraction_or_step("start", start)
        if activations is not None:
            check_bits("activations", activations)
        check_steps("frequency", frequency)
        for label, value in each_setting("sparsity", sparsity):
            check_sparsity(label, value)
        self.bits = dict(bits) if isinstance(bits, Mapping) else bits
        self.scale, self.symmetric, self.method = scale, symmetric, method
        self.start, self.activations = start, activations
        self.frequency = frequency
        self.sparsity = dict(sparsity) if isinstance(sparsity, Mapping) else float(sparsity)
        self.quantizer: FakeQuantizer | None = None
        self._start_step: int | None = None
        self._stepped = -1
        self._hooks: list[Any] = []
        self._masks: list[Any] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(bits=self.bits, method=self.method, include=self.include, exclude=self.exclude)

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """The quantized parameters, by name (empty before ``setup``)."""
        return self.quantizer.params if self.quantizer is not None else {}

    @property
    def codebooks(self) -> dict[str, Tensor]:
        """The k-means codebook of each layer (``method="kmeans"``)."""
        return self.quantizer.codebooks if self.quantizer is not None else {}

    # ----------------------------------------------------------------- hooks: when
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        targets = self._select(pl_module)
        layer_bits = per_layer("bits", self.bits, targets)
        params = targets.subset(layer_bits)
        layer_sparsity = per_layer("sparsity", self.sparsity, params)
        if stage == "fit" and self.verbose:
            print_targets(type(self).__name__, pl_module, params)
        if stage == "fit" or self.quantizer is None:
            self.quantizer = FakeQuantizer(params, layer_bits, self.method, self.scale, self.symmetric, layer_sparsity,
                                           self.frequency, getattr(params, "output_axis", None),
                                           getattr(params, "layouts", None))  # fmt: skip
            self._start_step, self._stepped = None, -1
        self.compressed = {name: frozenset({"values", "zeros"} if layer_sparsity.get(name) else {"values"}) for name in params}
        self._refuse_overlaps(trainer)
        if self.activations is not None:
            self._hook_inputs(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.quantizer.rebind(current_parameters(self, trainer, pl_module, list(self.quantizer.params)))  # FSDP2 resharded them
        self._masks = [cb.masks for cb in trainer.callbacks if isinstance(cb, SparsityCallback) and cb.masks is not None]
        refuse_several_manual_optimizers(
            self, trainer, pl_module, "the latent weights of every layer are restored at the first `manual_backward`, "
            "so the other networks would not train on q(w)"
        )
        warn_if_no_steps(self, trainer)
        if self._start_step is None:
            self._start_step = resolve_step("start", self.start, trainer.estimated_stepping_batches)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self.quantizer.quantized and trainer.global_step >= self._start_step:
            self.quantizer.quantize(trainer.global_step, self._masks)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.quantizer.restore()  # gradients were taken at q(w); the optimizer must step the latent w

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self.quantizer.quantized and trainer.global_step >= self._start_step:
            self.quantizer.quantize(trainer.global_step, self._masks)
            if trainer.global_step != self._stepped and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
                self._log(trainer, self.quantizer.metrics(self.metric_prefix))
        self._stepped = trainer.global_step

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.quantizer.quantized and self._start_step is not None and trainer.global_step >= self._start_step:
            self.quantizer.quantize(trainer.global_step, self._masks)
        if self.quantizer.quantized:
            self._log(trainer, self.quantizer.metrics(self.metric_prefix))
            if self.verbose:
                self._print_table()

    # ----------------------------------------------------------------- what
    def quantize_layer(self, name: str, latent: Tensor, refit: bool = False) -> Tensor:
        """q(w) of one layer (see :meth:`FakeQuantizer.quantize_layer`)."""
        return self.quantizer.quantize_layer(name, latent, refit)

    def errors(self) -> dict[str, float]:
        """Relative quantization error ``||q(w) - w|| / ||w||`` per layer (while the parameters hold q(w))."""
        return self.quantizer.errors()

    def _hook_inputs(self, pl_module: pl.LightningModule) -> None:
        bits = self.activations

        def fake_quantize_input(module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            x = inputs[0]
            return (x + (uniform_quantize(x, bits, "per_tensor", symmetric=False) - x).detach(), *inputs[1:])

        for handle in self._hooks:
            handle.remove()
        owners = {name.rsplit(".", 1)[0] if "." in name else "" for name in self.params}
        self._hooks = [pl_module.get_submodule(owner).register_forward_pre_hook(fake_quantize_input) for owner in sorted(owners)]

    def _print_table(self) -> None:
        table = report.quantization_table(self.quantizer.bits, whole_tensors(self.params), self.errors(), self.method)
        print_rank_zero(table)

    # ----------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        state = self.quantizer.state_dict() if self.quantizer is not None else {}
        return {"start_step": self._start_step, **state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.quantizer.load_state_dict(state_dict)
        self._start_step = state_dict.get("start_step")
