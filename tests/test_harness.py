"""The test harness's own promise: pytest-xdist keeps together the tests that must share a worker.

The nox sessions run the tests on pytest-xdist with ``--dist=loadgroup``. Tests marked
``xdist_group`` and the tests sharing an expensive module fixture
(``SHARED_EXPENSIVE_FIXTURES`` in conftest.py) must run in one worker. pytest 9.2 with
pytest-xdist 3.8 dropped the groups silently (pytest-dev/pytest-xdist#1386); this runs a small
suite under the harness and checks where each test ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import (
    SHARED_EXPENSIVE_FIXTURES,
    THREAD_COUNT_VARIABLES,
    share_the_cores_among_the_workers,
    usable_cores,
)

pytest.importorskip("xdist")
ROOT = Path(__file__).resolve().parent.parent

SUITE = """
import os
from pathlib import Path

import pytest

LOG = Path(os.environ["HARNESS_LOG"])


def record(line):
    with LOG.open("a") as log:
        log.write(line + "\\n")


@pytest.fixture(scope="module")
def {fixture}():
    record("fixture computed in " + os.environ["PYTEST_XDIST_WORKER"])


@pytest.mark.parametrize("i", range(6))
def test_sharing_the_fixture({fixture}, i):
    pass


@pytest.mark.xdist_group("one process")
@pytest.mark.parametrize("i", range(6))
def test_in_a_group(i):
    record("group in " + os.environ["PYTEST_XDIST_WORKER"])


@pytest.mark.parametrize("i", range(12))
def test_free(i):
    record("threads " + os.environ["OMP_NUM_THREADS"])
"""


def test_grouped_tests_and_a_shared_expensive_fixture_stay_on_one_worker(tmp_path):
    """Each worker also gets its share of the cores (conftest.share_the_cores_among_the_workers)."""
    fixture = min(SHARED_EXPENSIVE_FIXTURES)
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(SUITE.format(fixture=fixture)))
    log = tmp_path / "log.txt"
    command = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider"]
    command += ["-n", "2", "--dist=loadgroup", "-q", "test_suite.py"]
    env = {name: value for name, value in os.environ.items() if name not in THREAD_COUNT_VARIABLES}
    env |= {"PYTHONPATH": str(ROOT), "HARNESS_LOG": str(log), "HBN_REQUIRE": ""}
    completed = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = log.read_text().splitlines()
    assert len([line for line in lines if line.startswith("fixture")]) == 1, lines
    assert len({line for line in lines if line.startswith("group")}) == 1, lines
    share = max(1, usable_cores() // 2)
    assert {line for line in lines if line.startswith("threads")} == {f"threads {share}"}, lines


@pytest.mark.parametrize(("cores", "workers", "threads"), [(2, 2, "1"), (8, 2, "4"), (2, 4, "1")])
def test_each_worker_gets_its_share_of_the_cores(monkeypatch, cores, workers, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)), raising=False)
    environment = {"PYTEST_XDIST_WORKER_COUNT": str(workers)}
    share_the_cores_among_the_workers(environment)
    assert {
        variable: environment[variable] for variable in THREAD_COUNT_VARIABLES
    } == dict.fromkeys(THREAD_COUNT_VARIABLES, threads)


def test_a_thread_count_the_user_set_is_kept_and_one_process_is_left_alone():
    chosen = {"PYTEST_XDIST_WORKER_COUNT": "2", "OMP_NUM_THREADS": "7"}
    share_the_cores_among_the_workers(chosen)
    assert chosen["OMP_NUM_THREADS"] == "7"
    assert chosen["TF_NUM_INTRAOP_THREADS"] != "7"
    alone: dict[str, str] = {}
    share_the_cores_among_the_workers(alone)
    assert alone == {}
