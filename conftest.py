"""Shared test set-up: one ``backend`` fixture over every array library, and session rules.

It also registers the Hypothesis profiles, sets JAX's strict settings, and enforces the rule that
a framework's own nox session fails, rather than skips, when its tests did not run.

``HBN_REQUIRE`` (comma-separated markers, set by the nox sessions) names what must have run:
a framework in it that fails to import fails the test instead of skipping it, and each marker
in it needs at least one passed test, or the session fails (counted by pytest-xdist's controller
when the tests run in workers).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from collections.abc import MutableMapping

# Read when a framework starts its thread pools: torch's OpenMP (and MKL's), TensorFlow's.
THREAD_COUNT_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def share_the_cores_among_the_workers(environment: MutableMapping[str, str]) -> None:
    """In a pytest-xdist worker, size the frameworks' thread pools to its share of the cores.

    Each of torch (OpenMP) and TensorFlow starts a pool of one thread per core in every process;
    ``n`` workers on ``c`` cores then run ``n c`` busy threads, and OpenMP's spinning waits make
    these tests' small operations several times slower. Each worker gets ``max(1, c // n)``
    threads (``PYTEST_XDIST_WORKER_COUNT`` workers), and the processes it starts inherit that.
    A thread count the user set is kept. Measured on 2 cores, 2 workers, the torch adapter's and
    poisoned reports' tests: 57.8 s with the frameworks' defaults, 21.6 s with one thread each.
    """
    workers = int(environment.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return
    threads = str(max(1, usable_cores() // workers))
    for variable in THREAD_COUNT_VARIABLES:
        environment.setdefault(variable, threads)


share_the_cores_among_the_workers(os.environ)

# Imported once the thread counts are set: it imports NumPy, whose BLAS reads them.
from tests.backends import BACKEND_PARAMS, make_backend  # noqa: E402

REQUIRED = frozenset(filter(None, os.environ.get("HBN_REQUIRE", "").split(",")))
_passed_per_marker: Counter[str] = Counter()

_COMMON_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}
settings.register_profile("ci", max_examples=40, derandomize=True, **_COMMON_SETTINGS)
settings.register_profile("dev", max_examples=200, **_COMMON_SETTINGS)
# tests-cross reruns the Keras tests on Keras' JAX and torch backends (tests/test_keras_backends.py)
# after tests-tf ran them on TensorFlow under "ci". JAX compiles each operation anew for every
# input shape drawn (about 60 ms each), so under "ci" the reruns use this profile: the same
# properties on fewer examples. "dev" reruns them with its own 200.
settings.register_profile("ci-rerun", max_examples=12, derandomize=True, **_COMMON_SETTINGS)
RERUN_PROFILE = {"ci": "ci-rerun"}
# The session's profile, read from the environment: a test module may load another profile of its
# own (tests/test_torch_module_harness.py does), so the current one is not always this.
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
settings.load_profile(PROFILE)

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")


def import_framework(module: str, marker: str) -> Any:
    """Import ``module``; skip the test if it is missing, unless ``marker`` is required."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if marker in REQUIRED:
            pytest.fail(f"{module} is required in this session (HBN_REQUIRE) but failed: {error}")
        pytest.skip(f"{module} is not installed")


@pytest.fixture
def backend_from_param() -> Any:
    """Turn a ``(name, module, marker)`` parameter into a Backend, importing its library."""

    def build(param: tuple[str, str | None, str]) -> Any:
        name, module, marker = param
        if module is not None:
            import_framework(module, marker)
        return make_backend(name)

    return build


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request: pytest.FixtureRequest, backend_from_param: Any) -> Any:
    """An array library: how to make its arrays, read them back, and call the core on them."""
    return backend_from_param(request.param)


DOCTEST_MARKERS = {
    ("hbn_core", "tf_namespace.py"): pytest.mark.tf,
    ("backends", "torch.py"): pytest.mark.torch,
    ("backends", "torch.md"): pytest.mark.torch,
    ("docs", "federation.md"): pytest.mark.torch,
    ("flax", "__init__.py"): pytest.mark.jax,
    ("flax", "linen.py"): pytest.mark.jax,
    ("backends", "flax.md"): pytest.mark.jax,
    ("backends", "keras.py"): pytest.mark.tf,
    ("backends", "keras.md"): pytest.mark.tf,
}


# Modules whose tests each run a pytest session or a deployment of their own, minutes long.
# Collected first, pytest-xdist starts them at once and spreads the short tests around them,
# rather than leaving one of them to run alone at the end.
LONGEST_FIRST = frozenset({"test_keras_backends.py", "test_flower_deployment.py"})


# Module-scoped fixtures that run a federation or a reproduction profile (up to a minute each).
# pytest-xdist computes a module fixture once in every worker that runs one of its tests, so
# the tests that use one are kept in one worker (an ``xdist_group`` per module and fixture).
SHARED_EXPENSIVE_FIXTURES = frozenset({"quick_results", "tiny_study", "written"})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order and group the tests for pytest-xdist; mark the doctests of framework modules.

    The longest tests go first, and the tests sharing an expensive module fixture share a worker.
    """
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: order kept
    for item in items:
        for fixture in SHARED_EXPENSIVE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group(f"{item.path.stem}.{fixture}"))
        if isinstance(item, pytest.DoctestItem):
            marker = DOCTEST_MARKERS.get((item.path.parent.name, item.path.name))
            if marker is not None:
                item.add_marker(marker)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count the passed tests of each required marker."""
    if report.when == "call" and report.passed:
        _passed_per_marker.update(m for m in REQUIRED if m in report.keywords)


def _required_without_a_pass() -> list[str]:
    return sorted(m for m in REQUIRED if _passed_per_marker[m] == 0)


def _is_xdist_worker(config: pytest.Config) -> bool:
    """Whether this process is a pytest-xdist worker, which sees only its share of the tests."""
    return hasattr(config, "workerinput")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session when a required marker has no passed test.

    Under pytest-xdist only the controller decides: it receives every worker's reports.
    """
    if _is_xdist_worker(session.config):
        return
    if _required_without_a_pass() and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say which required markers had no passed test."""
    missing = _required_without_a_pass()
    if missing:
        terminalreporter.section("HBN_REQUIRE", red=True)
        terminalreporter.write_line(f"no test marked {', '.join(missing)} passed in this session")
