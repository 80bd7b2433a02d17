"""tests-cross: the Keras layer tests again, on Keras' JAX and torch backends.

Keras fixes its backend when it is imported, from ``KERAS_BACKEND``, so each backend runs the
tests marked ``keras`` of ``tests/test_keras_adapter.py`` (the layer's own tests),
``tests/test_keras_harness.py`` (Keras' own BatchNormalization tests, adapted) and
``tests/test_cross_backends.py`` (agreement with torch) in a pytest process of its own. The
child session requires them to pass (``HBN_REQUIRE=keras``): a missing framework fails, rather
than skips, and a run in which no test passed fails too. Under Hypothesis' ``ci`` profile the
child runs ``ci-rerun`` (fewer examples, see conftest.py); under any other, the same profile.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROFILE, RERUN_PROFILE

pytestmark = pytest.mark.cross
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_keras_layer_tests_pass_on_another_keras_backend(backend):
    pytest.importorskip("keras")
    pytest.importorskip(backend)
    env = {**os.environ, "KERAS_BACKEND": backend, "HBN_REQUIRE": "keras"}
    env["HYPOTHESIS_PROFILE"] = RERUN_PROFILE.get(PROFILE, PROFILE)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_keras_adapter.py",
        "tests/test_keras_harness.py",
        "tests/test_cross_backends.py",
        "-m",
        "keras",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False
    )
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert re.search(r"\b[1-9]\d* passed\b", result.stdout), report
