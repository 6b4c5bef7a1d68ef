"""Sphinx configuration for the implicitlayers documentation.

Build with ``make docs`` (``python -m sphinx -W --keep-going -n -b html docs docs/_build/html``).
The build is offline by default: set ``IMPLICITLAYERS_DOCS_ONLINE=1`` to link Python, PyTorch
and NumPy names through intersphinx (or put their ``objects.inv`` in ``docs/_intersphinx/``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")  # the gallery runs headless

import implicitlayers

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

# -- Project -------------------------------------------------------------------------------------

project = "implicitlayers"
author = "The implicitlayers developers"
copyright = "2026, The implicitlayers developers"
release = implicitlayers.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax 3 bundled into _static (sphinx-mathjax-offline, from PyPI): the math renders
    # without a network (a laptop offline, a cluster behind a firewall), not as raw TeX.
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_intersphinx", "_templates", "generated/backreferences"]
templates_path = ["_templates"]
nitpicky = True

# -- API reference -------------------------------------------------------------------------------

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_inherit_docstrings = False  # no torch docstrings on overridden forward/extra_repr
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
python_use_unqualified_type_names = True

# Names outside this project that annotations and bases mention. Offline there is no inventory to
# resolve them against; keep this list short and explicit.
nitpick_ignore = [
    ("py:class", "torch.Tensor"),
    ("py:class", "torch.dtype"),
    ("py:class", "torch.device"),
    ("py:class", "torch._C.Generator"),
    ("py:func", "torch.nn.utils.parametrizations.spectral_norm"),
    ("py:class", "torch.nn.modules.module.Module"),
    ("py:class", "nn.Module"),  # a class's string annotations are shown as written
    ("py:class", "abc.ABC"),
    ("py:class", "enum.IntEnum"),
    ("py:class", "collections.abc.Callable"),
    ("py:class", "collections.abc.Sequence"),
    ("py:class", "collections.abc.Mapping"),
    ("py:func", "torch.no_grad"),
    ("py:func", "torch.nn.utils.parametrize.cached"),
    ("py:func", "torch.nn.utils.parametrize.register_parametrization"),
    ("py:mod", "torch.nn.utils.parametrizations"),
    ("py:func", "torch.utils.checkpoint.checkpoint"),
    ("py:class", "implicitlayers.nn._dropout._VariationalDropoutBase"),
    # Private bases that hold what their public subclasses share.
    ("py:class", "implicitlayers.nn._splitting._SplittingSolver"),
    ("py:class", "implicitlayers.nn._monotone.DenseMonotoneCell"),
    ("py:class", "Eviction"),  # FixedPointCache's eviction Literal, spelled out in its docs
]

# -- Intersphinx: only with network access or local inventories ----------------------------------

_INVENTORIES = {
    "python": "https://docs.python.org/3",
    "torch": "https://docs.pytorch.org/docs/stable",
    "numpy": "https://numpy.org/doc/stable",
}
_ONLINE = os.environ.get("IMPLICITLAYERS_DOCS_ONLINE") == "1"
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
for _name, _url in _INVENTORIES.items():
    _local = DOCS / "_intersphinx" / f"{_name}.inv"
    if _local.is_file():
        intersphinx_mapping[_name] = (_url, str(_local))
    elif _ONLINE:
        intersphinx_mapping[_name] = (_url, None)

# -- Markdown (CHANGELOG.md, benchmark and example results) --------------------------------------

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
# Results files are written for GitHub, where links to repository files (``../README.md``)
# work; on this site they cannot resolve, and render as plain text instead of failing -W.
suppress_warnings = ["myst.xref_missing"]

# -- Gallery -------------------------------------------------------------------------------------

sphinx_gallery_conf = {
    "examples_dirs": [str(ROOT / "examples" / "gallery")],
    "gallery_dirs": ["auto_examples"],
    "filename_pattern": r"/plot_",
    "abort_on_example_error": True,
    "write_computation_times": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "doc_module": ("implicitlayers",),
    "reference_url": {"implicitlayers": None},
    "backreferences_dir": "generated/backreferences",
    "image_scrapers": ("matplotlib",),
}

# -- HTML ----------------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"implicitlayers {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "source_repository": "https://github.com/implicitlayers/implicitlayers/",
    "source_branch": "main",
    "source_directory": "docs/",
}

# -- Hooks ---------------------------------------------------------------------------------------

_OPTIONAL_INCLUDE = re.compile(
    r"^:::\{optional-include\} (?P<path>\S+)\n"
    r"(?P<options>(?::[\w-]+:[^\n]*\n)*)(?P<fallback>.*?)^:::$",
    re.MULTILINE | re.DOTALL,
)


def _expand_optional_includes(app: Any, docname: str, source: list[str]) -> None:
    """Expand ``:::{optional-include} path`` blocks in Markdown pages.

    Option lines right after the opening line (``:heading-offset: 1``) go to MyST's ``include``.
    Results files (``benchmarks/RESULTS.md``, the example's results) are written by runs that a
    fresh clone has not made yet: include the file when it exists, else show the block's text.
    """

    def expand(match: re.Match[str]) -> str:
        path = (DOCS / docname).parent / match["path"]
        if not path.is_file():
            return match["fallback"]
        app.env.note_dependency(str(path))
        options = ":relative-images:\n" + match["options"]
        return f"```{{include}} {match['path']}\n{options}```\n"

    source[0] = _OPTIONAL_INCLUDE.sub(expand, source[0])


def setup(app: Any) -> None:
    app.connect("source-read", _expand_optional_includes)
