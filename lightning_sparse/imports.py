"""The one class-path helper: ``"package.module.Name"`` → the object, with an error that names the path."""

from __future__ import annotations

from importlib import import_module
from typing import Any


def import_object(class_path: str) -> Any:
    """The object a dotted ``class_path`` names; ``ImportError`` naming the path when the module or name is missing."""
    module, _, name = str(class_path).rpartition(".")
    if not module:
        raise ImportError(f"{class_path!r} is not a dotted path such as 'package.module.Name'")
    try:
        return getattr(import_module(module), name)
    except AttributeError as error:
        raise ImportError(f"module {module!r} has no {name!r}") from error
