"""The packaging promises: no framework on import, the README's CI command, the docs site.

Importing the core imports no framework; CI runs the README's command; the docs site documents
every public name and renders the math, offline.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

from conftest import import_framework

ROOT = pathlib.Path(__file__).resolve().parent.parent
FRAMEWORKS = ("torch", "jax", "jaxlib", "flax", "optax", "tensorflow", "keras")


@pytest.mark.parametrize(
    "environment",
    ["core", pytest.param("all-frameworks-installed", marks=pytest.mark.cross)],
)
@pytest.mark.parametrize(
    "package",
    [
        "hbn_core",
        "backends",
        "federation",
        "federation.simulation",
        "federation.runner",
        "federation.cli",
        "federation.models",
    ],
)
def test_importing_a_package_imports_no_framework(package, environment):
    """Run in a fresh interpreter; in tests-cross every framework is installed and importable."""
    if environment == "all-frameworks-installed":
        missing = [name for name in FRAMEWORKS if importlib.util.find_spec(name) is None]
        assert not missing, f"tests-cross must install every framework; missing {missing}"
    code = (
        f"import json, sys; import {package}; "
        f"print(json.dumps(sorted({{m.partition('.')[0] for m in sys.modules}})))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    imported = set(json.loads(completed.stdout))
    assert package.partition(".")[0] in imported
    assert imported.isdisjoint(FRAMEWORKS), sorted(imported & set(FRAMEWORKS))


def test_ci_runs_the_readme_test_command():
    ci_script = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    (ci_command,) = re.findall(r'^TEST_COMMAND="(.+)"$', ci_script, flags=re.MULTILINE)
    assert f"\n{ci_command}\n" in readme, f"README must show the command CI runs: {ci_command}"
    assert re.search(r'^bash -c "\$TEST_COMMAND"$', ci_script, flags=re.MULTILINE)


def _nox_sessions() -> set[str]:
    """The sessions noxfile.py defines, read from its decorators."""
    sessions = set()
    for node in ast.parse((ROOT / "noxfile.py").read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            call = decorator if isinstance(decorator, ast.Call) else None
            target = call.func if call else decorator
            if ast.unparse(target) == "nox.session":
                names = [k.value for k in (call.keywords if call else []) if k.arg == "name"]
                sessions.add(ast.literal_eval(names[0]) if names else node.name)
    return sessions


def test_ci_runs_every_test_session_and_the_docs_and_package_sessions():
    ci_script = (ROOT / ".ci" / "run").read_text()
    (ci_command,) = re.findall(r'^TEST_COMMAND="(.+)"$', ci_script, flags=re.MULTILINE)
    ci_sessions = set(ci_command.partition("nox -s ")[2].split())
    defined = _nox_sessions()
    assert ci_sessions <= defined, sorted(ci_sessions - defined)
    assert {"docs", "package", "lint"} <= ci_sessions
    assert {s for s in defined if s.startswith("tests-")} <= ci_sessions


# -- the documentation site (the docs session builds it, then runs these) -------------------

API_PAGES = ROOT / "docs" / "api"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The built site: the docs session's (``HBN_DOCS_SITE``), or one built here, strictly."""
    import_framework("mkdocs", "docs")
    built = os.environ.get("HBN_DOCS_SITE")
    if built:
        return (ROOT / built).resolve()
    path = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    return path


def _documented_modules() -> list[tuple[str, str]]:
    """``(page, module)`` for every ``::: module`` directive of the API pages."""
    return [
        (page.stem, match)
        for page in sorted(API_PAGES.glob("*.md"))
        for match in re.findall(r"^::: ([\w.]+)$", page.read_text(), flags=re.MULTILINE)
    ]


def _public_names(module: str) -> list[str]:
    """The names in ``module``'s ``__all__``, read from its source (nothing is imported)."""
    path = ROOT.joinpath(*module.split("."))
    source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    return []


@pytest.mark.docs
def test_the_api_reference_covers_the_required_modules():
    modules = {module for _, module in _documented_modules()}
    required = {
        "hbn_core",
        "backends.torch",
        "backends.flax",
        "backends.keras",
        "federation",
        "federation.flower",
    }
    assert required <= modules, sorted(required - modules)


@pytest.mark.docs
@pytest.mark.parametrize(("page", "module"), _documented_modules())
def test_every_public_name_has_an_entry_in_the_api_reference(site, page, module):
    html = (site / "api" / page / "index.html").read_text()
    names = _public_names(module)
    missing = [name for name in names if f'id="{module}.{name}"' not in html]
    assert not missing, f"{page}: no entry for {missing}"


@pytest.mark.docs
def test_the_docstrings_math_and_roles_are_rendered_not_shown_as_markup(site):
    for page, _ in _documented_modules():
        html = (site / "api" / page / "index.html").read_text()
        shown = re.findall(r":(?:math|class|func|meth|mod|attr|data|exc|obj):|\.\. math::", html)
        assert not shown, f"{page} shows the reST markup {shown}"
    torch_page = (site / "api" / "backends.torch" / "index.html").read_text()
    assert torch_page.count('class="arithmatex"') > 10
    assert 'href="../hbn_core/#hbn_core.hbn_forward"' in torch_page


@pytest.mark.docs
def test_math_is_rendered_by_mathjax_served_from_the_site(site):
    math_page = (site / "math" / "index.html").read_text()
    assert math_page.count('class="arithmatex"') > 20
    scripts = re.findall(r'<script src="([^"]+)"', math_page)
    mathjax = [s for s in scripts if "mathjax" in s.lower()]
    assert mathjax, scripts
    assert all("://" not in s for s in mathjax), f"MathJax must not come from a CDN: {mathjax}"
    assert (site / "mathjax" / "tex-chtml.js").stat().st_size > 100_000
    assert any((site / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))


@pytest.mark.docs
def test_the_build_fails_if_it_imported_a_framework(monkeypatch):
    mkdocs_exceptions = import_framework("mkdocs.exceptions", "docs")
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "tools/mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    for name in hooks.FRAMEWORKS:  # as if this process imported no framework
        monkeypatch.delitem(sys.modules, name, raising=False)
    hooks.on_post_build(None)
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    with pytest.raises(mkdocs_exceptions.PluginError, match="tensorflow"):
        hooks.on_post_build(None)


@pytest.mark.docs
@pytest.mark.parametrize(
    ("rest", "markdown"),
    [
        (r"with :math:`w = \sigma(\alpha)` per", r"with \(w = \sigma(\alpha)\) per"),
        (
            "Pooled:\n\n    .. math::\n\n        a = b, \\qquad c = d .\n\n    Then.",
            "Pooled:\n\n    $$\n    a = b, \\qquad c = d .\n    $$\n\n    Then.",
        ),
        (
            ".. math::\n\n    a &= b, \\\\\n    c &= d\n\nafter",
            "$$\n\\begin{aligned}\na &= b, \\\\\nc &= d\n\\end{aligned}\n$$\n\nafter",
        ),
        (
            "see :func:`hbn_core.moments`",
            'see <autoref identifier="hbn_core.moments" optional><code>hbn_core.moments</code>'
            "</autoref>",
        ),
        (
            "see :class:`~torch.nn.BatchNorm2d`",
            'see <autoref identifier="torch.nn.BatchNorm2d" optional><code>BatchNorm2d</code>'
            "</autoref>",
        ),
        ("see :meth:`unknown`.", "see <code>unknown</code>."),
        ("plain ``code`` and $x$ stay", "plain ``code`` and $x$ stay"),
    ],
)
def test_rest_markup_becomes_the_sites_markdown(rest, markdown):
    import_framework("griffe", "docs")
    spec = importlib.util.spec_from_file_location("griffe_rest", ROOT / "tools/griffe_rest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    resolve = {"unknown": None}.get
    assert module.markdown_from_rest(rest, lambda name: resolve(name, name)) == markdown
