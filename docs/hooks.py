"""MkDocs hook: docstrings are Markdown, but some still hold Sphinx roles (``:class:`~pkg.mod.Name```), which
Markdown renders as a stray ``:class:`` before the code. Render them as the code they name (the short name when the
target starts with ``~``, as Sphinx would)."""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:mod|class|func|meth|data|attr|exc|obj):<code>(~?)([^<]*)</code>")


def _code(match: re.Match) -> str:
    target = match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if match.group(1) else target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return ROLE.sub(_code, html)
