"""The documentation's code runs as written, and every public name has an API page.

Code blocks marked ``.. code-block:: python`` in ``docs/**/*.rst`` (or fenced ```` ```python ````
in ``docs/**/*.md``) run in order, one namespace per page, unless they carry
``:class: no-run`` (shown but not run: multi-process or data-dependent code). The gallery
scripts run too, as ``make docs`` runs them.
"""

from __future__ import annotations

import importlib
import re
import runpy
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GALLERY = ROOT / "examples" / "gallery"
PUBLIC_MODULES = (
    "implicitlayers",
    "implicitlayers.solvers",
    "implicitlayers.backward",
    "implicitlayers.imaging",
    "implicitlayers.linear",
    "implicitlayers.diagnostics",
    "implicitlayers.nn",
)

_RST_BLOCK = re.compile(r"^(?P<indent> *)\.\. code-block:: python\s*$")
_MD_FENCE = re.compile(r"^(?P<indent> *)```(?:python|\{code-block\} python)\s*$")


def rst_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every runnable ``code-block:: python`` in reStructuredText."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _RST_BLOCK.match(lines[i])
        i += 1
        if match is None:
            continue
        indent = len(match["indent"])
        options = []
        while i < len(lines) and lines[i].strip().startswith(":"):
            options.append(lines[i].strip())
            i += 1
        while i < len(lines) and not lines[i].strip():
            i += 1
        start = i
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            i += 1
        if ":class: no-run" not in options:
            code = textwrap.dedent("\n".join(lines[start:i])).strip("\n")
            blocks.append((start + 1, code))
    return blocks


def md_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every runnable fenced Python block in MyST Markdown."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _MD_FENCE.match(lines[i])
        i += 1
        if match is None:
            continue
        options = []
        while i < len(lines) and lines[i].strip().startswith(":"):
            options.append(lines[i].strip())
            i += 1
        start = i
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if ":class: no-run" not in options:
            blocks.append((start + 1, textwrap.dedent("\n".join(lines[start:i]))))
        i += 1
    return blocks


def page_blocks(page: Path) -> list[tuple[int, str]]:
    text = page.read_text(encoding="utf-8")
    return md_blocks(text) if page.suffix == ".md" else rst_blocks(text)


PAGES = sorted(
    p
    for p in [*DOCS.rglob("*.rst"), *DOCS.rglob("*.md")]
    if "_build" not in p.parts and "generated" not in p.parts and page_blocks(p)
)


def test_snippet_extraction_finds_the_quick_start():
    blocks = page_blocks(DOCS / "getting_started.rst")
    assert len(blocks) >= 4
    assert "il.DEQ(Cell(16)" in blocks[0][1]
    assert any("loss.backward()" in code for _, code in blocks)


def test_snippet_extraction_skips_no_run_blocks():
    text = (
        "Text\n\n.. code-block:: python\n   :class: no-run\n\n   raise SystemExit\n\n"
        ".. code-block:: python\n\n   x = 1\n\n   y = x + 1\n\nAfter.\n"
    )
    assert rst_blocks(text) == [(10, "x = 1\n\ny = x + 1")]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_docs_page_code_runs(page: Path, monkeypatch: pytest.MonkeyPatch):
    # A real module, so that dataclasses and pickling defined on the page can find it.
    module = types.ModuleType(f"docs_snippets_{page.stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for line, code in page_blocks(page):
        # Pad so that tracebacks give the page's own line numbers; don't inherit this file's
        # ``from __future__ import annotations``.
        source = "\n" * (line - 1) + code
        exec(compile(source, str(page), "exec", dont_inherit=True), module.__dict__)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(GALLERY.glob("plot_*.py")), ids=lambda p: p.name)
def test_gallery_script_runs(script: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)
    monkeypatch.setenv("IMPLICITLAYERS_GALLERY_QUICK", "1")  # scripts with a long run cut it short
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        plt.close("all")


def documented_names() -> dict[str, Any]:
    """Qualified name -> object for every entry of the API reference (``docs/api.rst``)."""
    module = "implicitlayers"
    names: dict[str, Any] = {}
    in_autosummary = False
    for line in (DOCS / "api.rst").read_text(encoding="utf-8").splitlines():
        directive = re.match(r"^\.\. (module|currentmodule|autosummary|data)::\s*(\S*)", line)
        if directive is not None:
            kind, argument = directive.groups()
            in_autosummary = kind == "autosummary"
            if kind in ("module", "currentmodule"):
                module = argument
            elif kind == "data":
                names[f"{module}.{argument}"] = None
            continue
        if in_autosummary:
            entry = line.strip()
            if entry and not line.startswith(" "):
                in_autosummary = False
            elif entry and not entry.startswith(":"):
                names[f"{module}.{entry}"] = None
    for qualified in names:
        owner, _, attribute = qualified.rpartition(".")
        names[qualified] = getattr(importlib.import_module(owner), attribute)
    return names


def test_api_reference_lists_existing_names():
    names = documented_names()  # raises AttributeError for a stale entry
    assert "implicitlayers.DEQ" in names
    assert "implicitlayers.solvers.SolverState" in names


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_an_api_entry(module_name: str):
    module = importlib.import_module(module_name)
    documented = documented_names()
    documented_ids = {id(obj) for obj in documented.values()}
    missing = [
        name
        for name in module.__all__
        if f"{module_name}.{name}" not in documented
        and id(getattr(module, name)) not in documented_ids
    ]
    assert not missing, f"add {missing} from {module_name}.__all__ to docs/api.rst"
