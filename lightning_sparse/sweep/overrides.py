"""Keys that address one value in a ``fit`` config: ``trainer.callbacks.0.init_args.sparsity[fc1.*]``.

A key is a dotted path through the config; a number picks an item of a list (the callbacks, by position);
``init_args`` may be left out; an optional ``[glob]`` suffix sets one entry of a per-layer ``{glob: value}``
setting. The sweeper writes trial configs with these keys and ``lightning-sparse fit`` accepts them as
``--key=value`` arguments, which is what a W&B sweep agent passes.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import yaml

_GLOB = r"(?:[^\[\]]|\[[^\[\]]*\])+"  # any text, with fnmatch character classes such as [!=] inside
_KEY = re.compile(rf"^(?P<path>[A-Za-z_][\w]*(?:\.\w+)*)(?:\[(?P<glob>{_GLOB})\])?$")
# ``--KEY=value``: the key ends at its glob's closing bracket, so a glob may itself contain ``=``
_ARGUMENT = re.compile(rf"^--(?P<key>[A-Za-z_]\w*(?:\.\w+)*(?:\[{_GLOB}\])?)=(?P<value>.*)$", re.DOTALL)


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with the 1.2 core schema's plain scalars, which is what a command-line value means: ``2:4`` and
    ``1_000`` stay strings (YAML 1.1 reads them as base-60 and underscored integers), ``yes``/``on`` stay strings,
    ``1e-3`` is a float. Quoted strings, lists and mappings are read as usual."""


_Yaml12Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     "-+.0123456789"),
):  # fmt: skip
    _Yaml12Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def parse_value(text: str) -> Any:
    """A ``--KEY=value`` value as a command line means it (YAML 1.2 core scalars; see :class:`_Yaml12Loader`)."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError:
        return text  # not YAML (an unbalanced bracket in a glob-like string): the string itself


@dataclass(frozen=True)
class Key:
    """A parsed key: ``path`` through the config and the per-layer ``glob`` (or None)."""

    path: tuple[str, ...]
    glob: str | None = None

    @classmethod
    def parse(cls, text: str) -> Key:
        match = _KEY.match(text)
        if not match:
            raise ValueError(
                f"{text!r} is not a config key: use a dotted path such as `trainer.callbacks.0.init_args.sparsity` "
                f"or `model.init_args.lr`, optionally with a per-layer `[glob]` suffix"
            )
        return cls(tuple(match["path"].split(".")), match["glob"])

    def __str__(self) -> str:
        return ".".join(self.path) + (f"[{self.glob}]" if self.glob else "")

    @property
    def needs_help(self) -> bool:
        """True where jsonargparse cannot parse ``--key=value`` by itself (list positions, per-layer globs)."""
        return self.glob is not None or any(part.isdigit() for part in self.path)


def _step(node: Any, part: str, key: Key, create: bool) -> Any:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise KeyError(f"key `{key}`: `{part}` is not a position in a list of {len(node)}")
        return node[int(part)]
    if not isinstance(node, MutableMapping):
        raise KeyError(f"key `{key}`: cannot go into `{part}` of a {type(node).__name__}")
    if part not in node and isinstance(node.get("init_args"), MutableMapping):
        node = node["init_args"]  # `trainer.callbacks.0.sparsity` means `...0.init_args.sparsity`
    if part not in node:
        if not create:
            raise KeyError(f"key `{key}`: `{part}` is not in the config (it has {sorted(node)})")
        node[part] = {}
    return node[part]


def get_value(config: Any, key: Key | str) -> Any:
    """The value at ``key`` (the whole per-layer setting for a glob key)."""
    key = Key.parse(key) if isinstance(key, str) else key
    node = config
    for part in key.path:
        node = _step(node, part, key, create=False)
    if key.glob is not None and isinstance(node, MutableMapping):
        return node.get(key.glob)
    return node


def set_value(config: MutableMapping[str, Any], key: Key | str, value: Any) -> None:
    """Write ``value`` at ``key`` in a ``fit`` config (a nested dict), creating missing mapping entries."""
    key = Key.parse(key) if isinstance(key, str) else key
    *parents, last = key.path
    node: Any = config
    for part in parents:
        node = _step(node, part, key, create=True)
    if isinstance(node, list):
        raise KeyError(f"key `{key}`: a value replaces a whole list item; address one of its arguments")
    if last not in node and isinstance(node.get("init_args"), MutableMapping):
        node = node["init_args"]
    if key.glob is None:
        node[last] = value
        return
    setting = node.get(last)
    node[last] = {**setting, key.glob: value} if isinstance(setting, MutableMapping) else {key.glob: value}


def split_arguments(args: list[str]) -> tuple[list[str], list[tuple[Key, Any]]]:
    """Separate ``--key=value`` arguments that need :func:`set_value` from those jsonargparse parses itself."""
    plain: list[str] = []
    overrides: list[tuple[Key, Any]] = []
    for arg in args:
        match = _ARGUMENT.match(arg)
        if match:
            key = Key.parse(match["key"])
            if key.needs_help:
                overrides.append((key, parse_value(match["value"])))
                continue
        plain.append(arg)
    return plain, overrides
