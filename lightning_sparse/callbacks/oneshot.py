"""One-shot pruning (SparseGPT, Wanda, magnitude, OWL, a model's own zeros) at one step of ``fit``, then recovery with
the masks held: the Lightning adapter over :func:`lightning_sparse.core.oneshot.prune_one_shot`."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_sparse.callbacks.base import SparsityCallback, as_sparsity, check_choice, check_sparsity, check_steps
from lightning_sparse.core.calibration import evaluation_mode, find_layers
from lightning_sparse.core.oneshot import METHODS, ONE_SHOT_DISTRIBUTIONS
from lightning_sparse.core.pruners import OneShotPruner
from lightning_sparse.core.shards import is_sharded
from lightning_sparse.core.structured import parse_granularity
from lightning_sparse.core.targets import each_setting

#: methods that read calibration inputs (``magnitude`` does too under ``distribution="owl"``)
CALIBRATED = ("sparsegpt", "wanda")


class OneShotPruning(SparsityCallback):
    """Prune in one shot from a few calibration batches at optimizer step ``step`` (fit start by default), then hold
    the masks for the rest of ``fit``: recovery training with pruned weights (and their gradients and optimizer state)
    exactly zero.

    Methods (:mod:`lightning_sparse.core.oneshot`, with the formulas and sources):

    - ``sparsegpt`` (Frantar & Alistarh 2023): masks by ``w² / [H⁻¹]_jj²`` with ``H = 2XᵀX/n`` and the pruned
      weights' error pushed onto the kept ones (the weights are updated);
    - ``wanda`` (Sun et al. 2023): ``|W_ij| · ‖X_j‖₂``, pruned per output row; no update;
    - ``magnitude``: ``|w|`` per layer, the one-shot baseline (no calibration unless ``distribution="owl"``);
    - ``zeros``: the zeros the weights already hold become the masks (a checkpoint pruned elsewhere: llm-compressor,
      SparseGPT's own code), held with the same exactness, logging and checkpointing.

    Blocks (the entries of the model's ``nn.ModuleList`` of decoder layers, or ``blocks``) are pruned in sequence, each
    calibrated on the outputs of the already pruned ones, as both references do
    (:mod:`lightning_sparse.core.calibration`). Calibration runs the LightningModule's own ``training_step`` on each
    batch (``eval`` mode, ``no_grad``, its ``self.log`` calls muted), so any model that trains can be calibrated;
    ``calibrate=fn(module, batch)`` replaces it (needed under manual optimization).

    **DDP**: each rank calibrates on its own batches (its shard of the train dataloader) and the statistics (Σx², XᵀX
    and token counts) are summed over the ranks before each block is pruned, so every rank computes the masks of the
    whole calibration set; rank 0's masks (and SparseGPT's updated weights) are then broadcast, which guards against
    nondeterministic kernels. **FSDP2**: whole weights are gathered for the decision and each rank writes its shard.

    Resuming: the checkpoint records the step pruning happened at; a resumed run holds the masks it restores and does
    not prune again. Logs ``sparsity/*`` and ``oneshot/target_sparsity`` (per layer too under OWL or a mapping) and
    ``oneshot/seconds`` (calibration and pruning wall time) when pruning happens.

    Args:
        sparsity: fraction of zeros in each selected layer, in [0, 1); or ``{glob: sparsity}`` per layer (unmatched
            layers stay dense). N:M layers take ``1 - N/M``.
        method: ``sparsegpt``, ``wanda``, ``magnitude`` or ``zeros``.
        granularity: ``unstructured`` or ``"N:M"`` (N kept of every M consecutive inputs, e.g. ``"2:4"``), or
            ``{glob: granularity}`` per layer.
        distribution: ``uniform`` (every layer at ``sparsity``) or ``owl`` (Yin et al. 2024: per-block sparsities from
            the outlier ratio of the dense model's Wanda scores, spanning ``2 × owl_spread`` and averaging
            ``sparsity``).
        calibration_batches: batches of the train dataloader (or ``dataloader``) to calibrate on, >= 1.
        step: the optimizer step at which to prune (0: before the first one).
        include: glob patterns of parameter names to prune (default: weights of Linear and Conv layers).
        exclude: glob patterns of parameter names to leave dense.
        blocks: glob of the module names that are the model's repeated blocks (default: the entries of the
            ``nn.ModuleList`` holding the most selected layers; other layers are blocks of their own).
        block_size: SparseGPT's column block (128 in the reference; a multiple of M for N:M).
        dampening: SparseGPT's damping, a fraction of H's mean diagonal added to it (0.01 in the reference).
        owl_threshold: OWL's M: a score above M × its block's mean score is an outlier (5 in the paper).
        owl_spread: OWL's λ (0.08 in the paper).
        dataloader: an iterable of batches to calibrate on instead of the train dataloader (Python API only).
        calibrate: ``fn(module, batch)`` running the model on one batch instead of ``training_step`` (Python only).
        verbose: print what is pruned at setup and the per-layer table when fitting ends.
    """

    def __init__(
        self,
        sparsity: float | dict[str, float] = 0.5,
        method: str = "sparsegpt",
        granularity: str | dict[str, str] = "unstructured",
        distribution: str = "uniform",
        calibration_batches: int = 32,
        step: int = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        blocks: str | None = None,
        block_size: int = 128,
        dampening: float = 0.01,
        owl_threshold: float = 5.0,
        owl_spread: float = 0.08,
        dataloader: Iterable[Any] | None = None,
        calibrate: Callable[[pl.LightningModule, Any], Any] | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose)
        check_choice("method", method, METHODS)
        check_choice("distribution", distribution, ONE_SHOT_DISTRIBUTIONS)
        check_sparsity("sparsity", sparsity)
        if isinstance(granularity, Mapping) and not granularity:
            raise ValueError("`granularity` as a per-layer mapping must name at least one layer glob")
        for label, value in each_setting("granularity", granularity):
            if parse_granularity(label, value).kind not in ("unstructured", "nm"):
                raise ValueError(
                    f"`{label}` of OneShotPruning must be 'unstructured' or an 'N:M' string such as '2:4', got {value!r}; "
                    f"channels, heads and neurons are pruned by GradualMagnitudePruning(granularity=...)"
                )
        if distribution == "owl":
            if isinstance(sparsity, Mapping):
                raise ValueError("`distribution`='owl' chooses the per-layer sparsities itself; give one `sparsity`, not a mapping")
            if method == "zeros":
                raise ValueError("`distribution`='owl' does not apply to method='zeros' (the zeros are taken as they are)")
            if isinstance(granularity, str) and granularity != "unstructured":
                raise ValueError(f"`distribution`='owl' needs unstructured layers: `granularity`={granularity!r} fixes every layer's sparsity")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"`calibration_batches` must be an int >= 1 (batches to calibrate on), got {calibration_batches!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be an int >= 0 (the optimizer step to prune at; 0: fit start), got {step!r}")
        check_steps("block_size", block_size, unit="columns")
        for name, value, low in (("dampening", dampening, 0.0), ("owl_threshold", owl_threshold, 0.0), ("owl_spread", owl_spread, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
                raise ValueError(f"`{name}` must be a number >= {low}, got {value!r}")
        if blocks is not None and not isinstance(blocks, str):
            raise ValueError(f"`blocks` must be a glob of module names (e.g. 'model.layers.*') or None, got {blocks!r}")
        self.sparsity = as_sparsity(sparsity)
        self.method, self.distribution = method, distribution
        self.granularity = dict(granularity) if isinstance(granularity, Mapping) else granularity
        self.calibration_batches, self.step = calibration_batches, step
        self.blocks, self.block_size, self.dampening = blocks, block_size, float(dampening)
        self.owl_threshold, self.owl_spread = float(owl_threshold), float(owl_spread)
        self.dataloader, self.calibrate = dataloader, calibrate

    @property
    def state_key(self) -> str:
        extra = {} if self.granularity == "unstructured" else {"granularity": self.granularity}
        return self._generate_state_key(sparsity=self.sparsity, method=self.method, include=self.include, exclude=self.exclude, **extra)

    @property
    def seconds(self) -> float | None:
        """Wall time of the calibration and pruning (``None`` until pruning happened in this process)."""
        return self.pruner.seconds if isinstance(self.pruner, OneShotPruner) else None

    def _calibrated(self) -> bool:
        return self.method in CALIBRATED or (self.method == "magnitude" and self.distribution == "owl")

    def make_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> OneShotPruner:
        pruner = OneShotPruner(
            pl_module, self.sparsity, method=self.method, granularity=self.granularity, distribution=self.distribution,
            step=self.step, include=self.include, exclude=self.exclude, name=type(self).__name__,
            options=dict(blocks=self.blocks, block_size=self.block_size, dampening=self.dampening,
                         owl_threshold=self.owl_threshold, owl_spread=self.owl_spread),
        )  # fmt: skip
        if self._calibrated():
            find_layers(pl_module, pruner.targets, pruner.targets.aliases)  # refuse a layer without (tokens, inputs) inputs now
            if self.calibrate is None and not pl_module.automatic_optimization:
                raise ValueError(
                    "OneShotPruning calibrates by running `training_step` under no_grad, which manual optimization "
                    "cannot (it steps optimizers there); give `calibrate=lambda module, batch: module(batch[0])` (a "
                    "function running the model's forward on one batch)"
                )
        return pruner

    # ----------------------------------------------------------------- hooks: when
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if isinstance(self.pruner, OneShotPruner) and self.pruner.due(trainer.global_step):
            self._prune(trainer, pl_module, self.pruner)

    # ----------------------------------------------------------------- what
    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pruner: OneShotPruner) -> None:
        """Calibration batches and the model runner from the Trainer, the pruning by the core pruner, then the masks
        (and SparseGPT's updated weights) made the same on every rank."""
        start = time.perf_counter()
        batches = self._batches(trainer) if self._calibrated() else []
        run = self._runner(pl_module)
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
        with evaluation_mode(pl_module), _muted_logging(pl_module):
            pruner.prune(pl_module, batches, run, trainer.global_step, reduce)
        self._sync_masks(trainer)
        if self.method == "sparsegpt":
            self._sync_weights(trainer)
        for optimizer in trainer.optimizers:  # the dense weights' momentum must not push pruned weights
            pruner.masks.mask_state_(optimizer.state)
        pruner.seconds = time.perf_counter() - start
        self._log_sparsity(trainer)

    def _batches(self, trainer: pl.Trainer) -> list[Any]:
        """The first ``calibration_batches`` batches of ``dataloader`` or the train dataloader, on the device."""
        loader = self.dataloader if self.dataloader is not None else trainer.train_dataloader
        if loader is None:
            raise ValueError("OneShotPruning: the Trainer has no train dataloader to calibrate on; give `dataloader`")
        try:
            length: int | None = len(loader)
        except TypeError:
            length = None
        batches = list(itertools.islice(iter(loader), self.calibration_batches))
        if (length is not None and length < self.calibration_batches) or len(batches) < self.calibration_batches:
            held = length if length is not None else len(batches)
            raise ValueError(
                f"`calibration_batches`={self.calibration_batches} is more than the {held} batches the calibration "
                f"dataloader holds; lower `calibration_batches` or give a longer `dataloader`"
            )
        return [trainer.strategy.batch_to_device(batch) for batch in batches]

    def _runner(self, pl_module: pl.LightningModule) -> Callable[[Any], Any]:
        if self.calibrate is not None:
            return lambda batch: self.calibrate(pl_module, batch)
        step = type(pl_module).training_step  # the class's own: not another callback's wrapper (Distillation's)
        return lambda batch: step(pl_module, batch, 0)

    def _sync_weights(self, trainer: pl.Trainer) -> None:
        """Make every rank hold rank 0's updated weights (DDP; FSDP2 shards were each written from the same whole)."""
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            for param in self.masks.params.values():
                if not is_sharded(param):
                    torch.distributed.broadcast(param.data, src=0)


@contextlib.contextmanager
def _muted_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log``/``self.log_dict`` as no-ops while calibration runs ``training_step`` outside the training loop."""
    saved = {name: vars(pl_module)[name] for name in ("log", "log_dict") if name in vars(pl_module)}
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                setattr(pl_module, name, saved[name])
            else:
                delattr(pl_module, name)
