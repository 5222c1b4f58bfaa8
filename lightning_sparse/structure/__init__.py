"""Structured units found once (attention heads, key/value groups, MLP neurons) by a registry of module layouts, and
removed by one surgery; see :mod:`.patterns` (finding), :mod:`.surgery` (removing) and :mod:`.hf_config` (the
Hugging Face config of the smaller model).

Teach it a module of your own with :func:`register_attention` / :func:`register_mlp` (or a whole
:func:`register_pattern`), as Torch-Pruning's ``register_customized_layer``::

    from lightning_sparse.structure import register_attention
    register_attention(MyAttention, q="wq", k="wk", v="wv", o="wo", heads="n_heads")
"""

from lightning_sparse.structure.patterns import (
    Match,
    register_attention,
    register_mlp,
    register_pattern,
    unregister_pattern,
)
from lightning_sparse.structure.plan import StructurePlan
from lightning_sparse.structure.surgery import register_resize, register_slicer

__all__ = [
    "Match",
    "StructurePlan",
    "register_attention",
    "register_mlp",
    "register_pattern",
    "register_resize",
    "register_slicer",
    "unregister_pattern",
]
