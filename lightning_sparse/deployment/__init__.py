"""Deploy sparse models for real speed: remove pruned channels, run sparse Linear layers on PyTorch's sparse
kernels where they are measured faster, and report time and memory before and after.

Pure torch (no Lightning import). ``lightning_sparse.deploy`` is :func:`deploy`.
"""

from lightning_sparse.deployment.api import Deployment, check_input, deploy, deploy_model, load_deployed, save_deployed
from lightning_sparse.deployment.channels_last import MEMORY_FORMATS
from lightning_sparse.deployment.kernels import KERNELS, nm_pattern
from lightning_sparse.deployment.modules import (
    FoldedConv,
    SemiStructuredLinear,
    SparseLinear,
    TransposedChain,
    semi_structured_supported,
)
from lightning_sparse.deployment.report import DeployReport, LayerReport, deploy_table, print_deploy_report

__all__ = [
    "KERNELS",
    "MEMORY_FORMATS",
    "DeployReport",
    "Deployment",
    "FoldedConv",
    "LayerReport",
    "SemiStructuredLinear",
    "SparseLinear",
    "TransposedChain",
    "check_input",
    "deploy",
    "deploy_model",
    "deploy_table",
    "load_deployed",
    "nm_pattern",
    "print_deploy_report",
    "save_deployed",
    "semi_structured_supported",
]
