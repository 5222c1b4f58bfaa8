"""Import arrows point down: core ← callbacks ← cli. The engine, export and deploy load no Lightning, W&B or Ax, and
nothing imports the CLI."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses / several processes: `make test` runs it, `make test-fast` does not

HEAVY = ("pytorch_lightning", "lightning", "lightning_fabric", "wandb", "ax", "jsonargparse")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} | {{m for m in sys.modules if m.startswith('lightning_sparse')}})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(result.stdout.split())


@pytest.mark.parametrize("module", ["lightning_sparse.core", "lightning_sparse.export", "lightning_sparse.deployment"])
def test_engine_export_and_deployment_load_no_lightning_wandb_or_ax(module):
    loaded = _loaded_after(f"import {module}")
    assert module in loaded
    assert not loaded & set(HEAVY), f"{module} imports {sorted(loaded & set(HEAVY))}"


def test_the_sweep_does_not_import_the_cli():
    loaded = _loaded_after("import lightning_sparse.sweep.runner, lightning_sparse.sweep.config, lightning_sparse.sweep.trials")
    assert "lightning_sparse.sweep.runner" in loaded
    assert not {m for m in loaded if m.startswith("lightning_sparse.cli")}, sorted(m for m in loaded if "cli" in m)


@pytest.mark.parametrize(
    "module",
    ["lightning_sparse.sweep", "lightning_sparse.core", "lightning_sparse.export", "lightning_sparse.deployment",
     "lightning_sparse.callbacks"],
)  # fmt: skip
def test_nothing_below_the_cli_imports_it(module):
    loaded = _loaded_after(f"import {module}")
    assert module in loaded
    assert not {m for m in loaded if m.startswith("lightning_sparse.cli")}, sorted(m for m in loaded if "cli" in m)
