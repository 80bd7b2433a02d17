"""``hbn-fed``: version, help, exit statuses, ``--quiet``, quiet frameworks, the setup display.

The tests without a marker run in tests-core (no framework); those that train run a tiny
federation of torch clients (tests-torch) or the demo on whatever frameworks the session has
(tests-tf, where only Keras on TensorFlow is installed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest

from federation import cli
from federation.config import parse_config
from federation.simulation import RoundFailedError

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What TensorFlow, XLA and absl print when nothing keeps them quiet (see federation.cli).
FRAMEWORK_NOISE = re.compile(
    r"oneDNN|absl::|TF_ENABLE_ONEDNN_OPTS|cpu_feature_guard|external/local_xla|^[IWE]\d{4} "
)
TINY = """
seed = 0
rounds = 1
method = "hbn"

[data]
name = "digits"
num_clients = 2
partition = "iid"

[model]
architecture = "mlp"
hidden = 16

[clients]
frameworks = { torch = 2 }
min_clients = 2
"""


def hbn_fed(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m federation ARGUMENTS`` in a fresh interpreter, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "federation", *arguments],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=900,
    )


# -- framework-free: arguments, help, exit statuses ------------------------------------------


def test_version_names_the_installed_package(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out.strip()
    try:
        assert printed == f"hbn-fed {importlib.metadata.version('hbn')}"
    except importlib.metadata.PackageNotFoundError:
        assert printed.startswith("hbn-fed (version unknown: the hbn package is not installed")


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["repro"]])
def test_help_documents_every_exit_status(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse may wrap lines
    assert "exit status:" in text
    for code, meaning in cli.EXIT_STATUS.items():
        assert f"{code} {' '.join(meaning.split())}" in text
    assert set(cli.EXIT_STATUS) == {0, 1, 2, 130}


def test_a_bad_argument_exits_2_without_a_traceback():
    completed = hbn_fed("run")
    assert completed.returncode == 2
    assert "the following arguments are required: config" in completed.stderr
    assert "Traceback" not in completed.stdout + completed.stderr


def test_a_missing_configuration_file_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "missing.toml"), "--quiet"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("configuration error:")
    assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("raised", "status", "message"),
    [
        (RoundFailedError("round 3: 1 valid client, fewer than 2"), 1, "round failed: round 3"),
        (KeyboardInterrupt(), 130, "interrupted: interrupted (Ctrl-C)"),
        (
            ImportError("the jax clients need their framework: pip install 'hbn[jax]'"),
            2,
            "cannot start: the jax clients need their framework: pip install 'hbn[jax]'\n",
        ),
        (FileNotFoundError("no such data set"), 2, "cannot start: no such data set"),
    ],
)
def test_each_outcome_has_its_documented_exit_status(
    monkeypatch, tmp_path, capsys, raised, status, message
):
    def failing_run(*_: object, **__: object) -> None:
        raise raised

    monkeypatch.setattr(cli, "_run_with_progress", failing_run)
    assert cli.main(["demo", "--out", str(tmp_path), "--quiet"]) == status
    assert capsys.readouterr().out.startswith(message)  # errors print even with --quiet
    assert status in cli.EXIT_STATUS


def test_framework_log_settings_respect_the_users_and_leave_logging_alone(monkeypatch):
    for name in cli.FRAMEWORK_LOG_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # the user wants TensorFlow's INFO lines
    handlers, level = list(logging.getLogger().handlers), logging.getLogger().level
    cli.quiet_framework_logs()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    assert os.environ["GRPC_VERBOSITY"] == "ERROR"
    assert os.environ["GLOG_minloglevel"] == "2"  # noqa: SIM112 - glog's own spelling
    assert logging.getLogger().handlers == handlers
    assert logging.getLogger().level == level


def test_native_notices_are_dropped_and_everything_else_is_kept(capfd):
    notices = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1795959596.276577   19831 port.cc:153] oneDNN custom operations are on.",
        "W0000 00:00:1795959596.276577   19831 cpu_feature_guard.cc:12] AVX512F available.",
        "2025-09-17 14:44:05.157831: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] x",
    ]
    kept = [
        "E0000 00:00:1758131045.203198 3722035 cuda_dnn.cc:8579] Unable to register cuDNN",
        "a library's own message",
    ]
    with cli._native_notices_dropped():
        os.write(2, "".join(f"{line}\n" for line in [*notices, *kept]).encode())
    assert capfd.readouterr().err.splitlines() == kept


def demo_config(overrides: list[str]) -> object:
    return parse_config(cli._demo_table(), overrides)


def test_the_demo_moves_the_clients_of_missing_frameworks_to_an_installed_one():
    missing = {"jax": ImportError("no jax"), "keras": ImportError("no keras")}
    config, note = cli._demo_on_installed(demo_config(["rounds=2"]), ["rounds=2"], missing)
    assert config.clients.frameworks == {"torch": 10}
    assert config.rounds == 2
    assert note.startswith("JAX/Flax and Keras (")
    assert "their 6 clients run on PyTorch in this demo (pip install 'hbn[all]' mixes" in note

    only_keras = {"torch": ImportError("no torch"), "jax": ImportError("no jax")}
    config, note = cli._demo_on_installed(demo_config([]), [], only_keras)
    assert config.clients.frameworks == {"keras": 10}
    assert "their 7 clients run on Keras" in note


@pytest.mark.parametrize(
    ("overrides", "missing"),
    [
        ([], {}),  # everything installed
        (["clients.frameworks={torch=5, jax=5}"], {"jax": ImportError("no jax")}),  # chosen
        ([], {name: ImportError(name) for name in ("torch", "jax", "keras")}),  # none installed
    ],
)
def test_the_demo_is_left_as_asked_otherwise(overrides, missing):
    config = demo_config(overrides)
    assert cli._demo_on_installed(config, overrides, missing) == (config, "")


# -- runs with torch clients (tests-torch) ---------------------------------------------------


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.mark.torch
def test_quiet_prints_nothing_and_still_writes_the_results(tiny_config, tmp_path):
    out = tmp_path / "out"
    completed = hbn_fed("run", str(tiny_config), "--out", str(out), "--quiet")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout == ""
    assert completed.stderr == ""
    assert json.loads((out / "results.json").read_text())["rounds"][0]["round"] == 1
    assert (out / "accuracy.png").stat().st_size > 0


@pytest.mark.torch
def test_a_missing_matplotlib_skips_the_plot_and_says_so(tiny_config, tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys; sys.modules['matplotlib'] = None; from federation.cli import main; "
        f"sys.exit(main(['run', {str(tiny_config)!r}, '--out', {str(out)!r}]))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=900
    )
    printed = " ".join(completed.stdout.split())  # rich wraps long lines
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert (
        f"results written to {out / 'results.json'}; plot skipped: matplotlib is not installed "
        "(pip install matplotlib, or the federation extra: pip install 'hbn[federation]')"
        in printed
    )
    assert "cannot start" not in printed
    assert json.loads((out / "results.json").read_text())["rounds"]
    assert not (out / "accuracy.png").exists()


@pytest.mark.torch
def test_the_display_names_the_one_time_costs_before_the_first_round(tiny_config, tmp_path):
    completed = hbn_fed(
        "run",
        str(tiny_config),
        "--out",
        str(tmp_path / "out"),
        env={"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "160"},
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", completed.stdout)
    assert "setup (once): importing PyTorch" in screen
    assert "setup (once): building HBN's C++ operator for torch" in screen
    assert re.search(r"setup: PyTorch \d+\.\d s, C\+\+ operator \d+\.\d s", screen)


# -- the demo on the session's frameworks (tests-tf: Keras on TensorFlow alone) --------------


@pytest.mark.tf
def test_the_demo_prints_no_framework_log_lines(tmp_path):
    missing = [
        label
        for label, module in (("PyTorch", "torch"), ("JAX/Flax", "flax"))
        if importlib.util.find_spec(module) is None
    ]
    out = tmp_path / "demo"
    completed = hbn_fed(
        "demo", "--set", "rounds=1", "--set", "train.epochs=1", "--set", "train.batch_size=64",
        "--out", str(out),
    )  # fmt: skip
    printed = completed.stdout + completed.stderr
    assert completed.returncode == 0, printed
    assert json.loads((out / "results.json").read_text())["rounds"][0]["round"] == 1
    noise = [line for line in printed.splitlines() if FRAMEWORK_NOISE.search(line)]
    assert not noise, noise
    if missing:  # the clients of missing frameworks ran on Keras, and the command said so
        said = " ".join(printed.split())
        assert f"{' and '.join(missing)} not installed" in said
        assert "(pip install 'hbn[all]' mixes all three)" in said
