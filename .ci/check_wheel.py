"""Run inside a clean venv that holds only the built wheel (base install, no extras): every module of the package
imports, every name in an ``__all__`` resolves, the contract names exist, and the command answers ``--help``.

Modules that need an extra (``[sweep]``: Ax; ``[wandb]``; ``[ray]``; ``[hf]``: transformers) may fail to import only
with a ``ModuleNotFoundError`` naming that extra's package; anything else fails the check.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

EXTRAS = {"ax", "wandb", "ray", "transformers"}
CONTRACT = {
    "lightning_sparse": ["GradualMagnitudePruning", "MovementPruning", "RigL", "SET", "QuantizationAwareTraining",
                         "LearningCompression", "deploy"],
    "lightning_sparse.export": ["save_compressed", "load_compressed", "iter_compressed"],
    "lightning_sparse.deployment": ["deploy", "save_deployed", "load_deployed"],
    "lightning_sparse.core": ["FakeQuantizer"],
    "lightning_sparse.cli": ["main"],
}  # fmt: skip


def main() -> int:
    import lightning_sparse

    where = Path(lightning_sparse.__file__).parent
    if "site-packages" not in where.parts:
        print(f"lightning_sparse imported from {where}, not from the installed wheel", file=sys.stderr)
        return 1
    if not (where / "py.typed").is_file():
        print("the wheel has no py.typed", file=sys.stderr)
        return 1
    failures, needs_extra, names = [], [], 0
    modules = ["lightning_sparse"] + [m.name for m in pkgutil.walk_packages([str(where)], "lightning_sparse.")]
    for name in modules:
        if name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] in EXTRAS:
                needs_extra.append(f"{name} ({error.name})")
                continue
            failures.append(f"{name}: {error!r}")
            continue
        except Exception as error:  # noqa: BLE001 - report every broken module, not the first
            failures.append(f"{name}: {error!r}")
            continue
        for public in [*getattr(module, "__all__", ()), *CONTRACT.get(name, ())]:
            names += 1
            try:
                getattr(module, public)
            except Exception as error:  # noqa: BLE001
                failures.append(f"{name}.{public}: {error!r}")
    help_run = subprocess.run([str(Path(sys.executable).with_name("lightning-sparse")), "--help"], capture_output=True, text=True)
    if help_run.returncode != 0 or "deploy" not in help_run.stdout:
        failures.append(f"`lightning-sparse --help` exited {help_run.returncode}: {help_run.stderr.strip()[-300:]}")
    print(f"{len(modules)} modules, {names} public names checked; modules needing an extra: {needs_extra or 'none'}")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
