"""The public API documents itself: every name in ``dckpt.__all__`` is on the API reference
page (docs/api.md) and carries a full docstring (issue #12, item 5).

mkdocstrings renders only the names the page lists, so a name added to ``__all__`` but not
to the page would silently be missing from the site; ``mkdocs build --strict`` (in .ci/run)
catches broken references, not absent ones.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import dckpt

API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"
PUBLIC = [name for name in dckpt.__all__ if name != "__version__"]


def _listed() -> list[str]:
    """The top-level names the page renders (``::: dckpt.save``), not its subpackages."""
    text = API_PAGE.read_text(encoding="utf-8")
    names = re.findall(r"^::: dckpt\.(\w+)\s*$", text, flags=re.MULTILINE)
    return [n for n in names if not inspect.ismodule(getattr(dckpt, n, None))]


def test_api_page_lists_every_public_name_once() -> None:
    listed = _listed()
    assert sorted(listed) == sorted(set(listed)), "a name is listed twice"
    assert set(PUBLIC) - set(listed) == set(), "add these to docs/api.md"
    assert set(listed) - set(PUBLIC) == set(), "listed but not in dckpt.__all__"


def _is_error(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseException)


def _takes_arguments(obj: object) -> bool:
    try:
        params = inspect.signature(obj).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return any(name != "self" for name in params)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_full_docstring(name: str) -> None:
    obj = getattr(dckpt, name)
    doc = inspect.getdoc(obj) or ""
    summary = doc.split("\n", 1)[0]
    assert summary.strip(), f"dckpt.{name} has no docstring"
    assert "\nExample:\n" in doc and "```python" in doc, f"dckpt.{name}: no Example: section"
    # Errors are raised by dckpt, not built by users, and a protocol is never built: no Args.
    protocol = getattr(obj, "_is_protocol", False)
    if callable(obj) and not _is_error(obj) and not protocol and _takes_arguments(obj):
        assert "\nArgs:\n" in doc or "\nAttributes:\n" in doc, f"dckpt.{name}: no Args: section"


@pytest.mark.parametrize("name", [n for n in PUBLIC if inspect.isclass(getattr(dckpt, n))])
def test_public_methods_have_docstrings(name: str) -> None:
    cls = getattr(dckpt, name)
    undocumented = [
        attr
        for attr, member in vars(cls).items()
        if not attr.startswith("_")
        and (inspect.isfunction(member) or isinstance(member, property))
        and not (inspect.getdoc(member) or "").strip()
    ]
    assert undocumented == [], f"dckpt.{name}: methods without a docstring"
