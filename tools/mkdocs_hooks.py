"""MkDocs hooks of the docs site: MathJax served from the site itself, and no framework imported.

- ``on_files`` adds MathJax 3 (the ``tex-chtml`` component, its TeX extensions and its fonts)
  from the ``django-static-mathjax`` package of the ``docs`` extra, so that the site builds and
  renders its math offline, with no CDN.
- ``on_post_build`` fails the build if it imported a machine-learning framework: the API pages
  come from griffe's static reading of the source, and importing torch, JAX or TensorFlow would
  only make the build slow.

mkdocs.yml loads this file with ``hooks: [tools/mkdocs_hooks.py]``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from typing import TYPE_CHECKING

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig

# The files of the MathJax distribution the site loads: the component named in mkdocs.yml, the
# TeX extensions it loads on demand (autoload), and the CommonHTML fonts.
MATHJAX_FILES = ("tex-chtml.js", "input/tex/extensions", "output/chtml/fonts/woff-v2")
MATHJAX_SITE_DIR = "mathjax"
FRAMEWORKS = ("torch", "jax", "jaxlib", "flax", "tensorflow", "keras", "flwr")


def mathjax_root() -> pathlib.Path:
    """The ``es5`` folder of the installed MathJax distribution.

    Raises
    ------
    mkdocs.exceptions.PluginError
        If ``django-static-mathjax`` (the ``docs`` extra) is not installed.
    """
    spec = importlib.util.find_spec("mathjax")
    if spec is None or spec.origin is None:
        msg = 'MathJax is missing: pip install -e ".[docs]" (it brings django-static-mathjax)'
        raise PluginError(msg)
    return pathlib.Path(spec.origin).parent / "static" / "mathjax" / "es5"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add MathJax's files to the site, under ``mathjax/``."""
    root = mathjax_root()
    for entry in MATHJAX_FILES:
        path = root / entry
        for source in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if source.is_file():
                uri = f"{MATHJAX_SITE_DIR}/{source.relative_to(root).as_posix()}"
                files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files


def on_post_build(config: MkDocsConfig) -> None:
    """Fail if building the site imported a machine-learning framework."""
    del config
    imported = sorted(name for name in FRAMEWORKS if name in sys.modules)
    if imported:
        msg = f"building the docs imported {imported}; the API pages must be read statically"
        raise PluginError(msg)
