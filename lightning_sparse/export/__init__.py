"""Whole-model compressed export, one module per job:

- :mod:`~lightning_sparse.export.format`: the file format (:func:`save_compressed`, :func:`load_compressed`,
  :func:`iter_compressed`), one file, bit-exact, readable a layer at a time, read as untrusted input.
- :mod:`~lightning_sparse.export.checkpoints`: safe checkpoint loading (:func:`load_checkpoint`, weights only unless
  trusted; distributed checkpoint folders).
- :mod:`~lightning_sparse.export.tables`: what a save wrote (:class:`ExportReport`) as a rich table.

Every public name is re-exported here: ``from lightning_sparse.export import save_compressed``.
"""

from lightning_sparse.export.checkpoints import (
    CHECKPOINT_EXPANSION,
    CHECKPOINT_MIN_BUDGET_BYTES,
    check_checkpoint_path,
    checkpoint_state_dict,
    load_checkpoint,
    load_distributed_checkpoint,
)
from lightning_sparse.export.format import (
    FORMAT_VERSION,
    MAGIC,
    MAX_DISTINCT,
    MAX_EXPANSION,
    MAX_HEADER_BYTES,
    MIN_BUDGET_BYTES,
    Source,
    iter_compressed,
    load_compressed,
    save_compressed,
)
from lightning_sparse.export.tables import ExportReport, LayerExport, export_table, print_report

__all__ = [
    "CHECKPOINT_EXPANSION",
    "CHECKPOINT_MIN_BUDGET_BYTES",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_DISTINCT",
    "MAX_EXPANSION",
    "MAX_HEADER_BYTES",
    "MIN_BUDGET_BYTES",
    "ExportReport",
    "LayerExport",
    "Source",
    "check_checkpoint_path",
    "checkpoint_state_dict",
    "export_table",
    "iter_compressed",
    "load_checkpoint",
    "load_compressed",
    "load_distributed_checkpoint",
    "print_report",
    "save_compressed",
]
