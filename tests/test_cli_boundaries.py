"""Inputs refused at the boundary: one line naming the key or file, exit status 2, no round run.

Each case of issue 17's third part, through ``hbn-fed run`` (:func:`federation.cli.main`, and
one through ``python -m federation`` for the real process's status and output). The
configuration cases stop before any framework is imported; the data and run cases stop after
the data set is read and before round 1, which leaves no ``results.json``.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from federation.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent


def refused(argv: list[str], capsys) -> str:
    """Run ``hbn-fed`` with ``argv``; assert status 2 and one line of output; return it."""
    status = main([*argv, "--quiet"])
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert status == 2, captured
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


@pytest.fixture
def config_file(tmp_path) -> pathlib.Path:
    path = tmp_path / "run.toml"
    path.write_text("rounds = 1\n")
    return path


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=inf", "`train.lr` must be a finite number; got inf."),
        ("train.lr=1e400", "`train.lr` must be a finite number; got inf."),
        ("train.weight_decay=inf", "`train.weight_decay` must be a finite number; got inf."),
        ("train.weight_decay=1e400", "`train.weight_decay` must be a finite number; got inf."),
        ("data.beta=inf", "`data.beta` must be a finite number; got inf."),
        ("data.beta=1e400", "`data.beta` must be a finite number; got inf."),
        ("clients.frameworks={torch=true}", "`clients.frameworks.torch` must be a int; got True"),
        ("seed=-1", "`seed` must be in [0, 4294967295]; got -1."),
        ("data.num_clients=1e9", "`data.num_clients` must be a int; got 1000000000.0"),
        ("data.num_clients=1000000000", "`data.num_clients` must be <= 1000000; got 1000000000."),
        ("statistics.aggregator=mean", "`statistics.aggregator` must be one of"),
        (
            "statistics.aggregator=trimmed",  # trim = 1 and min_clients = 2
            "`statistics.trim` must be below half of clients.min_clients = 2",
        ),
    ],
)
def test_bad_configuration_values_are_refused_naming_the_key(
    override, expected, config_file, capsys, tmp_path
):
    line = refused(
        ["run", str(config_file), "--set", override, "--out", str(tmp_path / "o")], capsys
    )
    assert expected in line
    assert not (tmp_path / "o").exists()


def test_a_toml_file_that_is_not_utf8_is_refused_naming_the_file(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes("rounds = 1\n# café\n".encode("latin-1"))
    line = refused(["run", str(path)], capsys)
    assert f"{path} must be UTF-8 TOML" in line


def test_the_process_exits_2_with_one_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("seed = -1\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "federation", "run", str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2
    output = (done.stdout + done.stderr).strip().splitlines()
    assert len(output) == 1, output
    assert "`seed` must be in [0, 4294967295]; got -1." in output[0]


# -- data and runs: refused before round 1 -------------------------------------------------------


def npz(path: pathlib.Path, side: int = 8, **changes: np.ndarray) -> pathlib.Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.random((40, 1, side, side), dtype=np.float32),
        "y_train": np.arange(40) % 2,
        "x_test": rng.random((10, 1, side, side), dtype=np.float32),
        "y_test": np.arange(10) % 2,
    }
    np.savez(path, **(arrays | changes))
    return path


def run_refused(config_file, tmp_path, capsys, *overrides: str) -> str:
    out = tmp_path / "out"
    sets = [item for o in overrides for item in ("--set", o)]
    line = refused(["run", str(config_file), *sets, "--out", str(out)], capsys)
    assert not (out / "results.json").exists()
    return line


@pytest.mark.torch
@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"y_train": np.full(40, 10**12)}, "data error: "),
        ({"y_train": -(np.arange(40) % 2)}, "data error: "),
        ({"x_train": np.full((40, 1, 8, 8), np.nan, np.float32)}, "data error: "),
    ],
    ids=["huge-label", "negative-label", "nan-pixel"],
)
def test_bad_data_is_a_data_error(arrays, expected, config_file, tmp_path, capsys):
    pytest.importorskip("torch")
    path = npz(tmp_path / "d.npz", **arrays)
    line = run_refused(config_file, tmp_path, capsys, "data.name=npz", f"data.path={path}")
    assert line.startswith(expected)
    assert "d.npz" in line or "data.path" in line


@pytest.mark.torch
def test_a_file_that_is_not_npz_is_a_data_error(config_file, tmp_path, capsys):
    pytest.importorskip("torch")
    line = run_refused(config_file, tmp_path, capsys, "data.name=npz", f"data.path={config_file}")
    assert line.startswith("data error: ")
    assert "not a zip file" in line
    assert "pickled" not in line


@pytest.mark.torch
def test_more_clients_than_examples_is_a_data_error(config_file, tmp_path, capsys):
    pytest.importorskip("torch")
    line = run_refused(config_file, tmp_path, capsys, "data.num_clients=5000")
    assert line.startswith("data error: ")
    assert "data.num_clients" in line
    assert "got 5000" in line


@pytest.mark.torch
def test_simple_cnn_on_4x4_images_is_refused_naming_the_architecture(config_file, tmp_path, capsys):
    pytest.importorskip("torch")
    path = npz(tmp_path / "tiny.npz", side=4)
    line = run_refused(
        config_file,
        tmp_path,
        capsys,
        "data.name=npz",
        f"data.path={path}",
        "data.num_clients=2",
        "model.architecture=simple-cnn",
    )
    assert "`model.architecture` = 'simple-cnn' cannot take" in line
    assert "(1, 4, 4)" in line


@pytest.mark.torch
def test_fewer_clients_with_data_than_min_clients_is_a_data_error(config_file, tmp_path, capsys):
    pytest.importorskip("torch")
    line = run_refused(
        config_file,
        tmp_path,
        capsys,
        "data.beta=0.001",
        "data.num_clients=20",
        "clients.min_clients=20",
    )
    assert line.startswith("data error: ")
    assert "clients.min_clients = 20" in line


def test_out_pointing_to_an_existing_file_is_refused_before_any_work(config_file, tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.write_text("mine\n")
    line = refused(["run", str(config_file), "--out", str(existing)], capsys)
    assert f"--out must be a folder; {existing} is an existing file." in line
    assert existing.read_text() == "mine\n"
