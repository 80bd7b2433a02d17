"""The C++ operator's build never hangs a process: stale locks, concurrent builds, ahead of time.

Each scenario runs real processes (``subprocess`` with a timeout, so that a hang fails the test
rather than blocking it) in a fresh ``TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
hbn_torch = pytest.importorskip("backends.torch")
filelock = pytest.importorskip("filelock")

pytestmark = pytest.mark.torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One training step of an HBN layer; prints whether the C++ operator served it, the
# RuntimeWarnings raised, and whether the step produced gradients.
TRAIN_ONE_STEP = """
import json, warnings
import torch
from backends import torch as hbn_torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    layer = hbn_torch.HybridBatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    layer(x).square().sum().backward()
print(json.dumps({
    "compiled": hbn_torch.compiled_kernel_available(),
    "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
    "trained": bool(torch.isfinite(x.grad).all()) and layer.alpha.grad is not None,
}))
"""
# Holds the operator's OS build lock, as a process in the middle of a build does.
HOLD_BUILD_LOCK = """
import sys, time, filelock
with filelock.FileLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def environment(extensions_dir: pathlib.Path, timeout: float | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
    env.pop(hbn_torch.BUILD_TIMEOUT_VARIABLE, None)
    if timeout is not None:
        env[hbn_torch.BUILD_TIMEOUT_VARIABLE] = str(timeout)
    return env


def python(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def trained_step(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["trained"]
    return report


def build_directory(monkeypatch: pytest.MonkeyPatch, extensions_dir: pathlib.Path) -> pathlib.Path:
    """The directory a subprocess of this interpreter builds in, with ``extensions_dir``."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions_dir))
    return hbn_torch.compiled_kernel_directory()


@pytest.mark.parametrize("age_s", [3600.0, 0.0])
def test_a_lock_left_by_a_killed_build_never_hangs_training(tmp_path, monkeypatch, age_s):
    """An old lock is refused at once; a fresh one after HBN_TORCH_BUILD_TIMEOUT seconds."""
    directory = build_directory(monkeypatch, tmp_path)
    directory.mkdir(parents=True)
    lock = directory / "lock"
    lock.touch()
    written = time.time() - age_s
    os.utime(lock, (written, written))
    report = trained_step(
        python("-c", TRAIN_ONE_STEP, env=environment(tmp_path, timeout=3), timeout=300)
    )
    assert not report["compiled"]
    (warning,) = report["warnings"]
    expected = rf"could not be built \(torch's build lock {re.escape(str(lock))} has been held"
    assert re.search(expected, warning)
    assert "delete it if no build is running" in warning
    assert "python -m backends.torch build" in warning
    assert lock.exists()  # another process's lock is never removed


def test_a_build_that_holds_the_lock_too_long_is_waited_for_a_bounded_time(tmp_path, monkeypatch):
    directory = build_directory(monkeypatch, tmp_path)
    directory.mkdir(parents=True)
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_BUILD_LOCK, str(directory / "hbn-build.lock")],
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout.readline().strip() == "held"
            env = environment(tmp_path, timeout=2)
            result = python("-c", TRAIN_ONE_STEP, env=env, timeout=300)
        finally:
            holder.kill()
    report = trained_step(result)
    assert not report["compiled"]
    (warning,) = report["warnings"]
    assert re.search(r"another process has been building it in .* for more than 2 s", warning)


def test_two_processes_starting_together_both_train_on_the_operator(tmp_path, monkeypatch):
    """Two training processes start together on an empty build directory; then the CLI."""
    env = environment(tmp_path, timeout=1200)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", TRAIN_ONE_STEP],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=1500) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        report = trained_step(result)
        assert report["compiled"], report
        assert report["warnings"] == []
    built = python("-m", "backends.torch", "build", env=env, timeout=600)
    assert built.returncode == 0, built.stderr
    directory = build_directory(monkeypatch, tmp_path)
    assert built.stdout.strip() == f"hbn::hybrid_batch_norm is built and loads from {directory}"
    assert not (directory / "lock").exists()


def test_the_build_command_says_why_in_one_line(tmp_path, monkeypatch):
    env = environment(tmp_path, timeout=1)
    usage = python("-m", "backends.torch", "compile", env=env, timeout=300)
    assert usage.returncode == 2
    assert usage.stderr.strip().splitlines() == [
        "usage: python -m backends.torch build (got compile)"
    ]
    directory = build_directory(monkeypatch, tmp_path)
    directory.mkdir(parents=True)
    (directory / "lock").touch()
    failed = python("-m", "backends.torch", "build", env=env, timeout=300)
    assert failed.returncode == 1
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith("error: HBN's C++ operator could not be built: torch's build lock")


def test_the_build_directory_is_private_to_the_interpreter_and_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = hbn_torch.compiled_kernel_directory()
    assert directory.parent == tmp_path
    assert directory.name.startswith("hbn_torch_kernels-")
    monkeypatch.setattr(sys, "executable", "/elsewhere/bin/python")
    other_interpreter = hbn_torch.compiled_kernel_directory()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    other_torch = hbn_torch.compiled_kernel_directory()
    assert len({directory, other_interpreter, other_torch}) == 3
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    from torch.utils import cpp_extension

    default_root = pathlib.Path(cpp_extension.get_default_build_root())
    assert hbn_torch.compiled_kernel_directory().parent == default_root


def test_the_names_of_one_interpreter_share_one_build(tmp_path, monkeypatch):
    """``bin/python`` and ``bin/python3`` of one environment are one interpreter: one build."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    directories = set()
    for name in ("python", "python3"):
        link = tmp_path / name
        link.symlink_to(pathlib.Path(sys.executable).resolve())
        monkeypatch.setattr(sys, "executable", str(link))
        directories.add(hbn_torch.compiled_kernel_directory())
    assert len(directories) == 1


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_build_timeout_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv(hbn_torch.BUILD_TIMEOUT_VARIABLE, value)
    pattern = rf"HBN_TORCH_BUILD_TIMEOUT must be a non-negative number of seconds; got '{value}'"
    with pytest.raises(ValueError, match=pattern):
        hbn_torch.build_compiled_kernel()
