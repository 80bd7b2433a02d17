"""The packaging promises: importing the core imports no framework; CI runs the README command."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest

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
