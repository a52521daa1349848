"""Griffe extension (mkdocstrings `extensions:`): Sphinx roles in docstrings become cross-references.

The sources keep reStructuredText roles (``:func:`merge_partials```, ``:class:`~retrokv.wave.WaveIndex```,
``:meth:`WaveBuffer.gather```...), which Markdown would print literally. At build time each role becomes an
optional autorefs link: a link where the target has an API entry in the site, plain code text where it has
none (never a broken-link warning). Names resolve the way Python would in the docstring's scope (members,
parents, imports), then through ``retrokv``'s lazily exported names; ``retrokv.reference.*`` and
``retrokv.fast.*`` map to the ``reference``/``fast`` source folders, which is where the API pages load them.

Also: a dataclass field with no docstring takes its trailing ``# comment`` as its docstring, so the
configs' API entries list each field with its meaning; a method without a docstring that overrides a
documented one (``StreamingLLM.append``) shows the base class's docstring.
"""
from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(?:py:)?(func|class|mod|meth|attr|data|obj|exc|const):`(~?)([^`<>]+)`")
_PREFIXES = {"retrokv.reference.": "reference.", "retrokv.fast.": "fast.",
             "retrokv.reference": "reference", "retrokv.fast": "fast"}


def _lazy_exports() -> dict[str, str]:
    """``retrokv``'s lazily exported names -> their defining module (read from the package, so renames follow)."""
    try:
        import retrokv
        return dict(getattr(retrokv, "_LAZY", {}))
    except Exception:  # noqa: BLE001 - the docs still build, just with fewer links
        return {}


def _normalize(path: str) -> str:
    for a, b in _PREFIXES.items():
        if path == a or path.startswith(a) and a.endswith("."):
            return b + path[len(a):]
    return path


class SphinxRoles(griffe.Extension):
    def __init__(self) -> None:
        super().__init__()
        self._lazy = _lazy_exports()

    def _resolve(self, obj: griffe.Object, target: str) -> str | None:
        target = target.strip().lstrip(".")
        if target.endswith("()"):
            target = target[:-2]
        head, _, rest = target.partition(".")
        if head == "retrokv" and rest in self._lazy:                  # retrokv.WaveIndex
            return f"{self._lazy[rest]}.{rest}"
        if head in ("retrokv", "reference", "fast"):                  # fully qualified
            return self._canonical(obj, _normalize(target))
        try:
            base = obj.resolve(head)
        except Exception:  # noqa: BLE001 - griffe.NameResolutionError and alias errors
            base = f"{self._lazy[head]}.{head}" if head in self._lazy else None
        if base is None:
            return None
        return _normalize(f"{base}.{rest}" if rest else base)

    @staticmethod
    def _canonical(obj: griffe.Object, path: str) -> str:
        """Follow an import (``retrokv.get_backend`` -> ``retrokv.backend.get_backend``) when griffe knows it."""
        try:
            found = obj.modules_collection[path]
            return found.target_path if found.is_alias else found.path
        except Exception:  # noqa: BLE001 - not loaded (yet) or not there: keep the path as written
            return path

    def _rewrite(self, obj: griffe.Object, text: str) -> str:
        def sub(m: re.Match) -> str:
            _, tilde, target = m.groups()
            shown = target.strip().split(".")[-1] if tilde else target.strip()
            path = self._resolve(obj, target)
            code = f"<code>{html.escape(shown)}</code>"
            if path is None:
                return code
            return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

        return ROLE.sub(sub, text)

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.is_alias:
            return
        if obj.docstring is None and obj.is_attribute:
            self._comment_docstring(obj)
        elif obj.docstring is None and obj.is_function:
            self._inherit_docstring(obj)
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = self._rewrite(obj, obj.docstring.value)

    @staticmethod
    def _inherit_docstring(func: griffe.Object) -> None:
        """A method that overrides a documented one (``StreamingLLM.append``) shows the base's docstring."""
        cls = func.parent
        if cls is None or not cls.is_class:
            return
        try:
            bases = cls.mro()
        except Exception:  # noqa: BLE001 - unresolvable bases: leave it undocumented
            return
        for base in bases:
            member = base.members.get(func.name)
            if member is not None and not member.is_alias and member.docstring is not None:
                func.docstring = griffe.Docstring(member.docstring.value, lineno=member.docstring.lineno,
                                                  endlineno=member.docstring.endlineno, parent=func)
                return

    @staticmethod
    def _comment_docstring(attr: griffe.Object) -> None:
        parent = attr.parent
        if parent is None or not parent.is_class or "dataclass" not in {d.callable_path.split(".")[-1]
                                                                          for d in parent.decorators}:
            return
        if not attr.lineno or not attr.lines_collection or attr.filepath not in attr.lines_collection:
            return
        lines = attr.lines_collection[attr.filepath]
        m = re.search(r"#\s*(.+?)\s*$", lines[attr.lineno - 1]) if attr.lineno <= len(lines) else None
        if m:
            attr.docstring = griffe.Docstring(m.group(1), lineno=attr.lineno, endlineno=attr.lineno, parent=attr)
