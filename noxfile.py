"""nox sessions; CI (``.ci/run``) runs the README's test command.

``nox -s tests-core tests-torch tests-jax tests-tf tests-cross tests-flower lint docs package``
is CI.

Each framework's session installs only that framework with the test dependencies, and fails,
rather than skips, if that framework's tests did not run (``HBN_REQUIRE``, see
``tests/conftest.py``). ``bench`` runs the benchmarks and writes ``docs/benchmarks.md``, and
``repro`` the reproduction grid (``docs/results.md``); CI runs neither (the quick profile of
``repro`` runs in tests-torch). ``docs`` builds the documentation site with ``--strict``, and
``package`` builds the sdist and wheel and tests the wheel installed outside the source
tree; CI runs both. Set ``HYPOTHESIS_PROFILE=dev`` for longer property searches than CI's
profile.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable

import nox

nox.options.sessions = ["tests-core", "lint"]
nox.options.error_on_external_run = True
# uv creates and fills the environments, several times faster than pip (``pip install
# 'nox[uv]'``); without uv, nox falls back to virtualenv and pip.
nox.options.default_venv_backend = "uv|virtualenv"

# Always pinned: this version is the machine's local CPU wheel; an unpinned torch pulls CUDA.
TORCH = "torch==2.13.0"
# glibc's malloc keeps freed blocks (up to 32 MiB each mapped from its heap, never trimmed), so a
# step's full-size temporaries reuse warm pages, as in a training loop's steady state. Without it,
# fresh pages made the large-shape times of the benchmarks vary twofold from run to run.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**34)}
FRAMEWORK_MARKERS = "torch or jax or tf or cross or flower or docs"
DOCTESTS = ("--doctest-modules", "--doctest-glob=*.md")
# pytest-xdist: one worker per core, at most four (each worker of tests-cross holds torch, JAX
# and TensorFlow: about 3 GB). Tests that must share one process carry
# ``pytest.mark.xdist_group``; ``-- -n 0`` after a session's name runs in one process.
PARALLEL = ("--numprocesses=auto", "--maxprocesses=4", "--dist=loadgroup")


# uv installs no bytecode unless asked. The sessions whose tests start many processes at once
# (Ray's workers, Flower's deployment, the command line, killed runs) then compile torch's and
# JAX's modules in each of them: tests-flower took 385 s without and 256 s with it, the
# compilation costing about 33 s of the install.
COMPILED_BYTECODE = {"UV_COMPILE_BYTECODE": "1"}


SessionFunction = Callable[[nox.Session], None]


def pip_find_links() -> list[str]:
    """The local wheel folders that pip is configured to search (its ``find-links``).

    uv reads neither pip's configuration nor its environment variables. On a machine whose pip
    finds the CPU build of torch in a local folder, uv would otherwise take PyPI's torch, a CUDA
    build of several GB.
    """
    if "PIP_FIND_LINKS" in os.environ:  # whitespace-separated, as pip reads it
        return os.environ["PIP_FIND_LINKS"].split()
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    # Lines such as ``global.find-links='/opt/wheels'``.
    found = re.findall(r"^[\w:.-]*\.find-links='(.*)'$", listed, flags=re.MULTILINE)
    return list(dict.fromkeys(link for value in found for link in value.split()))


if "UV_FIND_LINKS" not in os.environ and (FIND_LINKS := pip_find_links()):
    os.environ["UV_FIND_LINKS"] = ",".join(FIND_LINKS)  # comma-separated, as uv reads it


def removed_on_ci(run_session: SessionFunction) -> SessionFunction:
    """On CI, delete the session's environment when it ends, passed or failed.

    The environments of CI's sessions take about 10 GB together (tests-cross alone 3.2 GB,
    with torch, JAX and TensorFlow); deleting each one as it ends caps the run's disk at the
    largest. Locally environments stay, for ``nox -r``.
    """

    @functools.wraps(run_session)
    def run_then_remove(session: nox.Session) -> None:
        try:
            run_session(session)
        finally:
            if os.environ.get("CI") and isinstance(session.virtualenv.location, str):
                shutil.rmtree(session.virtualenv.location, ignore_errors=True)

    return run_then_remove


def jax_compilation_cache() -> dict[str, str]:
    """JAX's persistent compilation cache, shared by every session and process of this checkout.

    JAX compiles each operation anew for each shape it meets, about 60 ms each on CPU, and the
    property tests meet thousands. The cache keys each compiled program by JAX's version, the
    platform, the flags and the program itself, so a process reuses what another compiled
    (about a tenth of the Flax tests' time; a rerun of one test, two thirds).
    """
    folder = pathlib.Path(__file__).parent / ".nox" / "jax-compilation-cache"
    return {
        "JAX_COMPILATION_CACHE_DIR": str(folder),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def run_pytest(
    session: nox.Session, *args: str, require: str, env: dict[str, str] | None = None
) -> None:
    """Run pytest over the cores; ``require`` lists the markers that must pass at least one test."""
    environment = {**jax_compilation_cache(), "HBN_REQUIRE": require, **(env or {})}
    # The slowest tests are listed at the end: what to trim when CI's time grows.
    session.run("pytest", *PARALLEL, "--durations=10", *args, *session.posargs, env=environment)


def build_torch_operator(session: nox.Session) -> None:
    """Build HBN's C++ operator before the tests, so that no test worker waits for the build."""
    session.run("python", "-m", "backends.torch", "build")


@nox.session(name="tests-core")
@removed_on_ci
def tests_core(session: nox.Session) -> None:
    """NumPy and array-api-strict only: the core, its errors, docs and README examples."""
    session.install("-e", ".[federation,test]")
    run_pytest(
        session,
        "-m",
        f"not ({FRAMEWORK_MARKERS})",
        *DOCTESTS,
        "--ignore=hbn_core/tf_namespace.py",
        "tests",
        "hbn_core",
        "docs",
        "README.md",
        require="",
    )


@nox.session(name="tests-torch")
@removed_on_ci
def tests_torch(session: nox.Session) -> None:
    """The core on PyTorch tensors, and the torch adapter (backends.torch)."""
    session.install(TORCH, "-e", ".[torch,federation,test]", env=COMPILED_BYTECODE)
    build_torch_operator(session)
    run_pytest(
        session,
        "-m",
        "torch and not cross",
        *DOCTESTS,
        "tests",
        "backends/torch.py",
        "docs/backends/torch.md",
        "docs/federation.md",
        require="torch",
    )


@nox.session(name="tests-jax")
@removed_on_ci
def tests_jax(session: nox.Session) -> None:
    """The core on JAX arrays, and the Flax adapter (backends.flax)."""
    session.install("-e", ".[jax,federation,test]")
    run_pytest(
        session,
        "-m",
        "jax and not cross",
        *DOCTESTS,
        "tests",
        "backends/flax",
        "docs/backends/flax.md",
        require="jax",
    )


@nox.session(name="tests-tf")
@removed_on_ci
def tests_tf(session: nox.Session) -> None:
    """The core on TensorFlow tensors, and backends.keras on Keras' TensorFlow backend."""
    session.install("-e", ".[tf,federation,test]")
    run_pytest(
        session,
        "-m",
        "tf and not cross",
        *DOCTESTS,
        "tests",
        "hbn_core/tf_namespace.py",
        "backends/keras.py",
        "docs/backends/keras.md",
        require="tf,keras",
    )


@nox.session(name="tests-cross")
@removed_on_ci
def tests_cross(session: nox.Session) -> None:
    """Every framework in one environment: cross-framework agreement, Keras on JAX and torch."""
    session.install(TORCH, "-e", ".[all,test]", env=COMPILED_BYTECODE)
    build_torch_operator(session)
    run_pytest(session, "-m", "cross", "tests", require="cross,torch,jax,tf")


@nox.session(name="tests-flower")
@removed_on_ci
def tests_flower(session: nox.Session) -> None:
    """HBN on Flower: simulations of torch and Flax nodes, checked against the embedded one."""
    session.install(TORCH, "-e", ".[torch,jax,flower,federation,test]", env=COMPILED_BYTECODE)
    build_torch_operator(session)
    run_pytest(session, "-m", "flower", "tests", require="flower")


@nox.session
@removed_on_ci
def lint(session: nox.Session) -> None:
    """Ruff (lint and format) on the repository; mypy --strict on hbn_core and federation."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
@removed_on_ci
def docs(session: nox.Session) -> None:
    """The documentation site: ``mkdocs build --strict`` into site/, then the site's tests.

    A broken link or reference fails the build. The API pages are read from the source
    without importing it: this session installs no machine-learning framework, and the build
    fails if it imported one (tools/mkdocs_hooks.py).
    """
    session.install("-e", ".[docs,test]")
    started = time.perf_counter()
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", "site", env={"NO_MKDOCS_2_WARNING": "1"}
    )
    session.log(f"the site built in {time.perf_counter() - started:.1f} s")
    run_pytest(
        session,
        "-m",
        "docs",
        "tests/test_packaging.py",
        require="docs",
        env={"HBN_DOCS_SITE": "site"},
    )


# Tracked files that only CI and git use; everything else that git tracks is in the sdist.
NOT_IN_SDIST = frozenset({".ci/run", ".gitignore"})


@nox.session
@removed_on_ci
def package(session: nox.Session) -> None:
    """Build the sdist and the wheel, check them, and test the wheel installed elsewhere.

    ``python -m build`` builds the wheel from the sdist (so the sdist holds what building
    needs); ``twine check --strict`` checks the metadata and ``cffconvert`` CITATION.cff; the
    sdist is listed against the files git tracks. Then a fresh virtual environment (uv's, or
    the standard library's without uv) installs the wheel (not ``-e``) with the torch and
    federation extras, and tools/check_wheel.py runs there from a folder outside the source
    tree: the packages import, a HybridBatchNorm2d trains through the C++ operator built from
    the wheel's own source, and ``hbn-fed demo --set rounds=2`` writes results.json.
    """
    session.install("build", "twine>=6.1", "cffconvert>=2")
    source = pathlib.Path(__file__).parent.resolve()
    with tempfile.TemporaryDirectory(prefix="hbn-package-") as folder:  # outside the tree
        work = pathlib.Path(folder)
        dist = work / "dist"
        session.run("python", "-m", "build", "--outdir", str(dist))
        (sdist,) = dist.glob("*.tar.gz")
        (wheel,) = dist.glob("*.whl")
        session.run("twine", "check", "--strict", str(sdist), str(wheel))
        session.run("cffconvert", "--validate", "--infile", "CITATION.cff")
        _check_sdist_holds_tracked_files(session, sdist)

        started = time.perf_counter()
        environment = work / "venv"
        python = str(environment / "bin" / "python")
        if session.venv_backend == "uv":
            session.run("uv", "venv", "--quiet", str(environment), external=True)
            install = ("uv", "pip", "install", "--quiet", "--python", python)
        else:
            session.run("python", "-m", "venv", str(environment))
            install = (python, "-m", "pip", "install", "--quiet")
        session.run(*install, TORCH, f"{wheel}[torch,federation]", external=True)
        session.log(f"the wheel installed in {time.perf_counter() - started:.0f} s")
        started = time.perf_counter()
        outside = work / "outside"
        outside.mkdir()
        shutil.copy(source / "tools" / "check_wheel.py", outside)
        with session.chdir(outside):
            session.run(
                python, "check_wheel.py", str(source), str(outside),
                external=True,
                env={"TORCH_EXTENSIONS_DIR": str(work / "torch_extensions")},
            )  # fmt: skip
        session.log(f"the installed wheel's checks took {time.perf_counter() - started:.0f} s")


def _check_sdist_holds_tracked_files(session: nox.Session, sdist: pathlib.Path) -> None:
    """Fail unless every file git tracks, but CI's own, is in the sdist."""
    if shutil.which("git") is None or not pathlib.Path(".git").exists():
        session.warn("not a git checkout: the sdist's contents are not checked")
        return
    tracked = session.run("git", "ls-files", external=True, silent=True)
    assert isinstance(tracked, str)
    with tarfile.open(sdist) as archive:
        packed = {name.partition("/")[2] for name in archive.getnames()}
    missing = sorted(set(tracked.split()) - packed - NOT_IN_SDIST)
    if missing:
        session.error(f"the sdist lacks tracked files: {missing}")
    session.log(f"the sdist holds all {len(packed)} files it should")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (not run by CI); figures go to docs/benchmarks.md."""
    session.install(TORCH, "-e", ".[all,flower]")
    session.run(
        "python", "benchmarks/run.py", "--output", "docs/benchmarks.md", *session.posargs,
        env=STEADY_MALLOC,
    )  # fmt: skip


@nox.session
def attack(session: nox.Session) -> None:
    """Poisoned statistics against each pool (not run by CI; about 13 minutes on 2 cores).

    Writes the table of docs/robustness.md's Measured section to attack.md, to paste there.
    """
    session.install(TORCH, "-e", ".[torch,federation]")
    session.run(
        "python", "benchmarks/attack.py", "--rounds", "15", "--seeds", "3", "--out", "attack.md",
        *session.posargs, env={"PYTHONPATH": "."},
    )  # fmt: skip


@nox.session
def repro(session: nox.Session) -> None:
    """The reproduction grid on Fashion-MNIST (about 4 hours on 2 cores; not run by CI).

    ``--profile full`` (the default) writes docs/results.md and docs/results.png, ``--profile
    study`` docs/results-study.md (issue 18's study on held-out seeds) and ``--profile long``
    docs/results-long.md (250 rounds). Run results go to .repro/ (``-- --out DIR`` elsewhere)
    and an interrupted profile resumes there; ``-- --workers 1`` on a shared machine.
    ``tools/repro_issue18.sh`` runs each of issue 18's phases with one worker in a persistent
    store. Fashion-MNIST comes from Debian's ``dataset-fashion-mnist``, installed here when
    apt-get may be run. ``nox -s repro -- --profile quick`` is the smoke test.
    """
    _install_fashion_mnist(session)
    session.install(TORCH, "-e", ".[torch,federation]")
    arguments = session.posargs or ["--profile", "full"]
    profile = arguments[arguments.index("--profile") + 1] if "--profile" in arguments else "full"
    report = {"study": "docs/results-study.md", "long": "docs/results-long.md"}.get(
        profile, "docs/results.md"
    )
    session.run(
        "hbn-fed",
        "repro",
        "--out",
        ".repro",
        "--workers",
        "2",
        "--report",
        report,
        *arguments,
    )


def _install_fashion_mnist(session: nox.Session) -> None:
    """``apt-get install dataset-fashion-mnist`` if the files are missing and apt-get may run."""
    if pathlib.Path("/usr/share/datasets/fashion-mnist").is_dir():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        session.warn("Fashion-MNIST is missing: sudo apt-get install -y dataset-fashion-mnist")
        return
    session.run("apt-get", "install", "-y", "dataset-fashion-mnist", external=True)
