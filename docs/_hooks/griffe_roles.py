"""Griffe extension: render the reST habits of msight_core's docstrings as Markdown.

The docstrings are Google style but name other objects with Sphinx roles
(``:class:`~msight_core.errors.ClosedError```, ``:meth:`flush```) and introduce
literal blocks with ``::``, which Markdown would show verbatim. On load this
extension rewrites each docstring:

- a role becomes a cross-reference to the object it names, resolved the way
  Python would from the documented object (its members, its module, its
  imports); the link is *optional*: a name that is not on the site (a private
  module, a builtin) renders as plain code instead of failing the strict build;
- ``text::`` before an indented block becomes ``text:`` (the block is already
  a Markdown code block).

Loaded by mkdocstrings through ``extensions:`` in mkdocs.yml.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?P<role>class|meth|func|mod|attr|data|exc|obj|const):`(?P<tilde>~?)(?P<name>[^`]+)`"
)
_LITERAL = re.compile(r"(?m)^(?P<head>[^\n]*\S)::[ \t]*$")
_BARE_LITERAL = re.compile(r"(?m)^[ \t]*::[ \t]*\n")


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)  # type: ignore[arg-type]


def _module(obj: griffe.Object) -> griffe.Object:
    while not obj.is_module and obj.parent is not None:
        obj = obj.parent
    return obj


def _target(name: str, obj: griffe.Object) -> str:
    """The full path ``name`` refers to, seen from ``obj`` (best effort)."""
    if name.startswith("."):
        module = _module(obj)
        parts = module.path.split(".")
        if not module.is_package:
            parts = parts[:-1]
        rest = name.lstrip(".")
        up = len(name) - len(rest) - 1
        return ".".join(parts[: len(parts) - up] + [rest])
    head, _, tail = name.partition(".")
    if head == obj.package.name:
        return name
    try:
        resolved = obj.resolve(head)
    except griffe.NameResolutionError:  # builtins land here: left unlinked
        return name
    return f"{resolved}.{tail}" if tail else resolved


def _link(match: re.Match[str], obj: griffe.Object) -> str:
    name = match["name"].strip().removesuffix("()")
    shown = name.lstrip(".").rsplit(".", 1)[-1] if match["tilde"] else name.lstrip(".")
    if match["role"] in ("meth", "func"):
        shown += "()"
    target = html.escape(_target(name, obj), quote=True)
    return f'<autoref identifier="{target}" optional><code>{html.escape(shown)}</code></autoref>'


def rewrite(text: str, obj: Any) -> str:
    """Return ``text`` (a docstring of ``obj``) with roles and ``::`` rewritten."""
    text = _ROLE.sub(lambda m: _link(m, obj), text)
    text = _BARE_LITERAL.sub("", text)
    return _LITERAL.sub(lambda m: m["head"] + ":", text)


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring of a package once it is fully loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj.docstring.value, obj)
