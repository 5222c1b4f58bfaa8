"""Import arrows point down: core ← callbacks ← cli. The engine, export and deploy load no Lightning, W&B or Ax,
nothing imports the CLI, and nothing in the library imports the demo zoo (``lightning_sparse.models``, ``.data``)."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_sparse

# The tests that start a Python subprocess are `slow`: `make test` runs them, `make test-fast` does not.
PACKAGE = Path(lightning_sparse.__file__).parent
DEMO = ("lightning_sparse.models", "lightning_sparse.data")

HEAVY = ("pytorch_lightning", "lightning", "lightning_fabric", "wandb", "ax", "jsonargparse")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} | {{m for m in sys.modules if m.startswith('lightning_sparse')}})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(result.stdout.split())


@pytest.mark.slow
@pytest.mark.parametrize("module", ["lightning_sparse.core", "lightning_sparse.export", "lightning_sparse.deployment"])
def test_engine_export_and_deployment_load_no_lightning_wandb_or_ax(module):
    loaded = _loaded_after(f"import {module}")
    assert module in loaded
    assert not loaded & set(HEAVY), f"{module} imports {sorted(loaded & set(HEAVY))}"


@pytest.mark.slow
def test_the_sweep_does_not_import_the_cli():
    loaded = _loaded_after("import lightning_sparse.sweep.runner, lightning_sparse.sweep.config, lightning_sparse.sweep.trials")
    assert "lightning_sparse.sweep.runner" in loaded
    assert not {m for m in loaded if m.startswith("lightning_sparse.cli")}, sorted(m for m in loaded if "cli" in m)


@pytest.mark.slow
@pytest.mark.parametrize(
    "module",
    ["lightning_sparse.sweep", "lightning_sparse.core", "lightning_sparse.export", "lightning_sparse.deployment",
     "lightning_sparse.callbacks"],
)  # fmt: skip
def test_nothing_below_the_cli_imports_it(module):
    loaded = _loaded_after(f"import {module}")
    assert module in loaded
    assert not {m for m in loaded if m.startswith("lightning_sparse.cli")}, sorted(m for m in loaded if "cli" in m)


def _is_demo(name: str) -> bool:
    return any(name == demo or name.startswith(demo + ".") for demo in DEMO)


def _library_files() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py")) if path.relative_to(PACKAGE).parts[0] not in ("models", "data")]


def test_no_library_source_imports_the_demo_models_or_data():
    """Every import statement in the library (module level or inside a function) names neither ``models`` nor ``data``;
    the CLI names a default model only as a class-path string."""
    found = []
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}" for name in names if _is_demo(name)]
    assert len(_library_files()) > 50 and not found, found


@pytest.mark.slow
def test_importing_every_library_module_loads_no_demo_models_or_data():
    modules = [
        m.name for m in pkgutil.walk_packages([str(PACKAGE)], "lightning_sparse.")
        if not _is_demo(m.name) and not m.name.endswith("__main__")
    ]  # fmt: skip
    loaded = _loaded_after("; ".join(f"import {m}" for m in modules))
    assert set(modules) <= loaded
    assert not {m for m in loaded if _is_demo(m)}, sorted(m for m in loaded if _is_demo(m))
