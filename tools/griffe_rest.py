r"""A griffe extension: the reST markup of the code's docstrings, as the docs site's Markdown.

The docstrings are numpy-style and use Sphinx's roles and the ``math`` directive, which
mkdocstrings would show as literal text. Before rendering, this extension rewrites

- ``:math:`x``` as the inline math ``\(x\)`` and a ``.. math::`` block as display math
  ``$$ ... $$`` (``aligned`` where it has ``&`` or ``\\``), both for ``pymdownx.arithmatex``;
- ``:func:`name```, ``:class:`name``` and the other Python roles as code that links to the
  object's API entry where the site has one (an optional autorefs reference: a name the site
  does not document, such as ``torch.nn.BatchNorm2d``, stays plain code, without a warning).

It reads the docstrings griffe parsed statically; nothing is imported. mkdocs.yml loads it with
``extensions: [tools/griffe_rest.py:RestToMarkdown]``.
"""

from __future__ import annotations

import re
import textwrap
from typing import TYPE_CHECKING, Any

import griffe

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["RestToMarkdown", "markdown_from_rest"]

_PYTHON_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n", flags=re.MULTILINE)


def markdown_from_rest(text: str, resolve: Callable[[str], str | None]) -> str:
    """``text`` with its math and Python roles in the site's Markdown.

    ``resolve(name)`` returns the identifier to link a role's target to, or None for code
    without a link.
    """
    text = _display_math(text)
    text = _MATH_ROLE.sub(lambda match: rf"\({match[1]}\)", text)
    return _PYTHON_ROLE.sub(lambda match: _reference(match[1], resolve), text)


def _display_math(text: str) -> str:
    """Each ``.. math::`` directive and its indented block as a ``$$`` block."""
    while match := _MATH_DIRECTIVE.search(text):
        indent = match["indent"]
        lines = text[match.end() :].split("\n")
        body: list[str] = []
        for line in lines:
            if line.strip() and not line.startswith(indent + " ") and body:
                break
            body.append(line)
        while body and not body[-1].strip():
            body.pop()
        consumed = "\n".join(body)
        formula = textwrap.dedent(consumed).strip()
        if "&" in formula or r"\\" in formula:
            formula = f"\\begin{{aligned}}\n{formula}\n\\end{{aligned}}"
        block = f"{indent}$$\n" + textwrap.indent(formula, indent) + f"\n{indent}$$\n"
        text = text[: match.start()] + block + text[match.end() + len(consumed) + 1 :]
    return text


def _reference(target: str, resolve: Callable[[str], str | None]) -> str:
    """A role's target as code, linked where ``resolve`` finds it (``~`` shows the last name)."""
    short = target.startswith("~")
    name = target.lstrip("~").removesuffix("()")
    title = f"<code>{name.rpartition('.')[2] if short else name}</code>"
    identifier = resolve(name)
    if identifier is None:
        return title
    return f'<autoref identifier="{identifier}" optional>{title}</autoref>'


class RestToMarkdown(griffe.Extension):
    """Rewrite every docstring of a loaded package with :func:`markdown_from_rest`."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite every docstring of the loaded package (names resolve), its own included."""
        del loader, kwargs
        _rewrite(pkg)


def _rewrite(obj: griffe.Object | griffe.Alias) -> None:
    """Rewrite the docstrings of ``obj`` and of the members it defines (not imported ones)."""
    if obj.is_alias:
        return
    if obj.docstring is not None:
        obj.docstring.value = markdown_from_rest(
            obj.docstring.value, lambda name: _identifier(obj, name)
        )
    for member in obj.members.values():
        _rewrite(member)


def _identifier(obj: griffe.Object, name: str) -> str | None:
    """The path a role's ``name`` means where ``obj`` is documented; dotted names as written.

    A bare name is looked up as Sphinx would: among ``obj``'s members, then its parent's, its
    module's and its package's; a name found nowhere gets no link.
    """
    if "." in name:
        return name
    for scope in (obj, obj.parent, obj.module, obj.package):
        member = None if scope is None else scope.members.get(name)
        if member is not None:
            try:
                return member.canonical_path if member.is_alias else member.path
            except griffe.AliasResolutionError:
                return member.path
    return None
