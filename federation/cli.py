"""``hbn-fed``: run federations from a TOML file, or the mixed-framework demo.

    hbn-fed run CONFIG.toml [--set key=value ...] [--out DIR] [--resume] [--quiet]
    hbn-fed demo [--set key=value ...] [--out DIR] [--quiet]
    hbn-fed repro [--profile full|study|long|quick] [--out DIR] [--workers N]
        [--report FILE.md] [--quiet]
    hbn-fed --version

Also ``python -m federation``. A live progress display names the one-time costs of starting
(each framework's import, the build of HBN's C++ operator for torch, the first round's
compilation), then shows each round's clients and the latest accuracy and loss; ``DIR``
receives ``results.json``, ``accuracy.png`` and a checkpoint after every round. ``--quiet``
prints errors only. TensorFlow's, XLA's and absl's informational log lines are kept off the
screen (:func:`quiet_framework_logs`); the user's own settings of those variables win.

Exit status (also in ``--help``): 0 done; 1 a round failed; 2 bad input (a configuration
error, a missing file, data set or framework, a bad argument); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.resources
import logging
import os
import pathlib
import re
import sys
import tempfile
import time
import tomllib
from typing import TYPE_CHECKING

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from federation.checkpoint import CheckpointError
from federation.config import ConfigError, load_config, parse_config
from federation.data import DataError
from federation.protocol import RoundFailedError
from federation.repro import (
    PROFILES,
    StaleRunError,
    export_runs,
    import_runs,
    run_profile,
    write_report,
)
from federation.runner import run

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from rich.progress import TaskID

    from federation.client import Client
    from federation.config import Config
    from federation.protocol import RoundRecord
    from federation.repro import Run, RunResult
    from federation.runner import Result
    from federation.simulation import Simulation

__all__ = ["EXIT_STATUS", "main", "quiet_framework_logs"]

DEMO_OUT = "hbn-demo"
EXIT_OK, EXIT_ROUND_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_STATUS = {
    EXIT_OK: "done: results written",
    EXIT_ROUND_FAILED: (
        "a round failed (fewer valid clients than clients.min_clients); "
        "DIR keeps the checkpoint of the last good round"
    ),
    EXIT_BAD_INPUT: (
        "bad input: a configuration error, a missing file, data set or framework, or a bad argument"
    ),
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); `hbn-fed run ... --resume` continues a run",
}
# What TensorFlow, XLA, gRPC and glog read before they are imported; set only where the user
# has not. 2 keeps errors and drops INFO and WARNING lines.
FRAMEWORK_LOG_SETTINGS = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "GRPC_VERBOSITY": "ERROR",
    "GLOG_minloglevel": "2",
}
# TensorFlow >= 2.19 logs some notices (oneDNN) through absl's C++ logging while it is being
# imported, before any setting can reach it; these patterns are those INFO and WARNING lines.
_NATIVE_NOTICE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\] "
    r"|\d{4}-\d\d-\d\d [\d:.]+: [IW] [\w./-]+:\d+\] "
)
FRAMEWORK_LABELS = {"torch": "PyTorch", "jax": "JAX/Flax"}
# The frameworks whose clients compile their steps (jit, tf.function) in their first round.
COMPILED_FRAMEWORKS = {"jax": "JAX", "keras": "Keras"}
DEMO_EXTRA = "pip install 'hbn[all]'"
PLOT_EXTRA = "pip install matplotlib, or the federation extra: pip install 'hbn[federation]'"
EXIT_STATUS_HELP = "exit status:\n" + "\n".join(
    f"  {code:<4} {meaning}" for code, meaning in EXIT_STATUS.items()
)


def quiet_framework_logs() -> None:
    """Set the variables that keep TensorFlow's, XLA's and gRPC's log lines off the screen.

    Call it before those libraries are imported; a variable the user has set is left as it is.
    Python's :mod:`logging` configuration is not touched.
    """
    for name, value in FRAMEWORK_LOG_SETTINGS.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def _native_notices_dropped() -> Iterator[None]:
    """Drop the INFO and WARNING lines native code logs to stderr in the block; keep the rest.

    What native code writes to file descriptor 2 is held until the block ends; then every line
    that is not such a notice (an error, a Python warning) is written to ``sys.stderr``.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if not _NATIVE_NOTICE.match(line):
                    sys.stderr.write(line)


def _version() -> str:
    try:
        return importlib.metadata.version("hbn")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown: the hbn package is not installed; running from a source tree)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hbn-fed",
        description="Federated learning with Hybrid Batch Normalisation.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hbn-fed {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_command = commands.add_parser(
        "run",
        help="run the federation a TOML file describes",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_command.add_argument("config", help="the TOML configuration (see docs/federation.md)")
    run_command.add_argument("--resume", action="store_true", help="continue from DIR's checkpoint")
    demo = commands.add_parser(
        "demo",
        help="a mixed torch + JAX + Keras HBN federation on digits",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    repro = commands.add_parser(
        "repro",
        help="every method on every setting, with 95%% CIs",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    repro.add_argument("--profile", choices=sorted(PROFILES), default="full")
    repro.add_argument("--out", default="hbn-repro", help="run results (default hbn-repro)")
    repro.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes (default 1); 0 runs nothing and reports the runs stored so far",
    )
    repro.add_argument(
        "--report", default="", help="the Markdown report; the plot is written beside it as .png"
    )
    repro.add_argument(
        "--import-runs", default="", metavar="FILE", help="store a JSON-lines file's runs first"
    )
    repro.add_argument(
        "--export-runs", default="", metavar="FILE", help="write every run as JSON lines at the end"
    )
    for command, default_out in ((run_command, "hbn-run"), (demo, DEMO_OUT)):
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a key, e.g. --set train.lr=0.1 (TOML values; repeatable)",
        )
        command.add_argument(
            "--out", default=default_out, help=f"output folder (default {default_out})"
        )
    for command in (run_command, demo, repro):
        command.add_argument(
            "--quiet", action="store_true", help="print errors only: no progress, no table"
        )
    return parser


def _demo_table() -> dict[str, object]:
    text = importlib.resources.files("federation").joinpath("demo.toml").read_text()
    return tomllib.loads(text)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``hbn-fed`` command; returns the exit status (:data:`EXIT_STATUS`)."""
    quiet_framework_logs()
    arguments = _parser().parse_args(argv)
    console = Console(soft_wrap=True)  # errors, one line each: printed even with --quiet
    display = Console(quiet=arguments.quiet)
    logging.basicConfig(
        level=logging.ERROR if arguments.quiet else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console)],
    )
    try:
        if arguments.command == "repro":
            return _repro(arguments, console, display, argv)
        return _federation(arguments, console, display)
    except KeyboardInterrupt:
        _error(console, "interrupted", EXIT_STATUS[EXIT_INTERRUPTED])
        return EXIT_INTERRUPTED


def _federation(arguments: argparse.Namespace, console: Console, display: Console) -> int:
    """``run`` or ``demo``: check the configuration, run it with progress, report."""
    try:
        if arguments.command == "demo":
            config = parse_config(_demo_table(), arguments.overrides)
        else:
            config = load_config(arguments.config, arguments.overrides)
    except (ConfigError, OSError) as error:
        _error(console, "configuration error", error)
        return EXIT_BAD_INPUT
    out = pathlib.Path(arguments.out)
    if out.exists() and not out.is_dir():
        _error(console, "cannot start", f"--out must be a folder; {out} is an existing file.")
        return EXIT_BAD_INPUT
    try:
        result = _run_with_progress(config, arguments, display)
    except ModuleNotFoundError as error:
        if _is_matplotlib(error) and (out / "results.json").is_file():
            display.print(
                f"results written to {out / 'results.json'}; plot skipped: matplotlib is not "
                f"installed ({PLOT_EXTRA})",
                soft_wrap=True,
                markup=False,
            )
            return EXIT_OK
        _error(console, "cannot start", error)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, ImportError, ConfigError) as error:
        _error(console, "cannot start", error)
        return EXIT_BAD_INPUT
    except DataError as error:
        _error(console, "data error", error)
        return EXIT_BAD_INPUT
    except CheckpointError as error:
        _error(console, "cannot resume", error)
        return EXIT_BAD_INPUT
    except RoundFailedError as error:
        _error(console, "round failed", error)
        return EXIT_ROUND_FAILED
    display.print(_final_table(result))
    display.print(f"results: {out / 'results.json'}, plot: {out / 'accuracy.png'}", markup=False)
    return EXIT_OK


def _error(console: Console, label: str, message: object) -> None:
    """One line: ``label`` in red, then ``message`` as it is (brackets are not markup)."""
    console.print(Text.assemble((f"{label}:", "red"), " ", str(message)))


def _is_matplotlib(error: ModuleNotFoundError) -> bool:
    """Whether the missing module is matplotlib or one of its submodules."""
    return (error.name or "").partition(".")[0] == "matplotlib"


def _progress(console: Console, *, bar_width: int) -> Progress:
    """A progress display: description, bar, done/total, elapsed time and a status field."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=bar_width),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )


def _framework_label(framework: str) -> str:
    """The libraries a framework's clients import, as the display names them."""
    if framework == "keras":
        return f"Keras ({os.environ.get('KERAS_BACKEND', 'tensorflow')} backend)"
    return FRAMEWORK_LABELS.get(framework, framework)


def _import_frameworks(
    frameworks: Sequence[str], stage: Callable[[str], None]
) -> tuple[dict[str, float], dict[str, ImportError]]:
    """Import each framework's reference model module, the slow part of starting.

    ``stage(text)`` names each import before it starts. Returns the seconds each import took
    and the frameworks that failed to import, with their errors.
    """
    seconds: dict[str, float] = {}
    missing: dict[str, ImportError] = {}
    for framework in dict.fromkeys(frameworks):
        stage(f"importing {_framework_label(framework)}")
        start = time.perf_counter()
        try:
            with _native_notices_dropped():
                importlib.import_module(f"federation.models.{framework}_model")
        except ImportError as error:
            missing[framework] = error
        else:
            seconds[_framework_label(framework)] = time.perf_counter() - start
    return seconds, missing


def _demo_on_installed(
    config: Config, overrides: Sequence[str], missing: dict[str, ImportError]
) -> tuple[Config, str]:
    """The demo with the clients of missing frameworks moved to an installed one, and a note.

    Unchanged (and no note) when nothing is missing, or when the user chose the clients'
    frameworks (``--set clients.frameworks=...``): then the run itself reports what is missing.
    """
    counts = dict(config.clients.frameworks)
    chosen = any(
        o.partition("=")[0].strip() in ("clients", "clients.frameworks") for o in overrides
    )
    installed = [name for name in counts if name not in missing]
    if not missing or chosen or not installed:
        return config, ""
    moved = sum(counts.pop(name) for name in missing)
    counts[installed[0]] += moved
    table = ", ".join(f"{name} = {count}" for name, count in counts.items())
    config = parse_config(_demo_table(), [*overrides, f"clients.frameworks={{{table}}}"])
    names = " and ".join(_framework_label(name) for name in missing)
    note = (
        f"{names} not installed: their {moved} clients run on {_framework_label(installed[0])} "
        f"in this demo ({DEMO_EXTRA} mixes all three)"
    )
    return config, note


def _run_with_progress(config: Config, arguments: argparse.Namespace, display: Console) -> Result:
    progress = _progress(display, bar_width=16)
    rounds = progress.add_task("rounds", total=config.rounds, status="")
    steps = progress.add_task("clients", total=None, status="", visible=False)
    setup: dict[str, float] = {}  # seconds of each one-time cost, by what it was

    def stage(text: str) -> None:
        progress.update(rounds, status=f"[cyan]setup (once): {escape(text)}[/cyan]")
        progress.refresh()

    def on_start(simulation: Simulation) -> None:
        setup.update(_build_operator(simulation, stage))
        if setup:
            parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in setup.items())
            progress.console.print(f"setup: {parts}", markup=False)
        progress.update(
            rounds, completed=simulation.rounds_done, status=_first_round_status(simulation)
        )
        _show_round_clients(progress, steps, simulation)

    def on_client(step: str, client: Client) -> None:
        progress.update(
            steps, advance=1, description=f"{step}: {client.framework} client {client.client_id}"
        )

    def on_round(record: RoundRecord) -> None:
        metrics = f"train loss {record.train_loss:.3f}"
        if record.accuracy is not None:
            metrics = f"acc {record.accuracy:.3f} loss {record.loss:.3f}"
        elif record.evaluation_error is not None:
            metrics += ", evaluation failed"
        progress.update(rounds, advance=1, status=metrics)
        progress.update(steps, completed=0, visible=record.round < config.rounds)

    with progress:
        imported, missing = _import_frameworks(
            [config.eval_framework, *config.client_frameworks], stage
        )
        setup.update(imported)
        if arguments.command == "demo":
            config, note = _demo_on_installed(config, arguments.overrides, missing)
            if note:
                progress.console.print(note, style="yellow", markup=False)
        return run(
            config,
            out_dir=arguments.out,
            resume=getattr(arguments, "resume", False),
            on_start=on_start,
            on_client=on_client,
            on_round=on_round,
        )


def _build_operator(simulation: Simulation, stage: Callable[[str], None]) -> dict[str, float]:
    """Build and load HBN's C++ operator now if torch clients will train HBN layers.

    The first training step would build it anyway (about 10 s to a minute, once per machine
    and torch version; cached after); here the display says so. Returns its seconds by name.
    """
    if not simulation.hbn_layers or "torch" not in simulation.config.client_frameworks:
        return {}
    stage("building HBN's C++ operator for torch (cached after the first time)")
    start = time.perf_counter()
    # By name: torch only here, and mypy's environment (nox -s lint) has no torch to read.
    importlib.import_module("backends.torch").compiled_kernel_available()
    return {"C++ operator": time.perf_counter() - start}


def _first_round_status(simulation: Simulation) -> str:
    """The first round's note: the frameworks that compile their steps in it, if any."""
    compiled = [
        COMPILED_FRAMEWORKS[name]
        for name in dict.fromkeys(simulation.config.client_frameworks)
        if name in COMPILED_FRAMEWORKS
    ]
    if simulation.rounds_done or not compiled:
        return ""
    return f"[cyan]round 1 compiles the {escape(' and '.join(compiled))} steps, once[/cyan]"


def _show_round_clients(progress: Progress, steps: TaskID, simulation: Simulation) -> None:
    """Size the clients bar to a round: each sampled client, once per client step."""
    sampled = len(simulation.sample_clients(simulation.rounds_done))
    per_round = sampled * (2 if simulation.hbn_layers else 1)
    progress.update(steps, total=per_round, completed=0, visible=True)


def _repro(
    arguments: argparse.Namespace,
    console: Console,
    display: Console,
    argv: Sequence[str] | None,
) -> int:
    """Run or resume a repro profile with a progress bar; write its report if asked."""
    if arguments.workers < 0:
        _error(console, "bad argument", f"--workers must be >= 0; got {arguments.workers}.")
        return EXIT_BAD_INPUT
    profile = PROFILES[arguments.profile]
    out = pathlib.Path(arguments.out)
    if arguments.import_runs:
        try:
            added = import_runs(pathlib.Path(arguments.import_runs), out)
        except (OSError, ValueError) as error:
            _error(console, "cannot import runs", error)
            return EXIT_BAD_INPUT
        display.print(f"{added} runs imported from {arguments.import_runs}", markup=False)
    progress = _progress(display, bar_width=24)
    task = progress.add_task("repro runs", total=profile.run_count, status="")
    done = len(list((out / "runs").glob("*.json"))) if (out / "runs").exists() else 0
    progress.update(task, completed=done)

    def on_done(run: Run, result: RunResult) -> None:
        accuracy = result.summary.last10_mean_accuracy
        shown = "-" if accuracy is None else f"{accuracy:.3f}"
        progress.update(task, advance=1, status=f"{run.run_id}: {shown}")

    try:
        with progress:
            results = run_profile(profile, out, workers=arguments.workers, on_done=on_done)
    except (FileNotFoundError, ImportError, StaleRunError) as error:
        _error(console, "cannot start", error)
        return EXIT_BAD_INPUT
    if arguments.report:
        report = pathlib.Path(arguments.report)
        command = "hbn-fed " + " ".join(sys.argv[1:] if argv is None else argv)
        try:
            write_report(profile, results, report, report.with_suffix(".png"), command=command)
        except ModuleNotFoundError as error:
            if not _is_matplotlib(error) or not report.is_file():
                raise
            display.print(
                f"report written to {report}; plot skipped: matplotlib is not installed "
                f"({PLOT_EXTRA})",
                soft_wrap=True,
                markup=False,
            )
        else:
            display.print(f"report: {report}, plot: {report.with_suffix('.png')}", markup=False)
    if arguments.export_runs:
        export_runs(
            [run for phase in results for run in phase], pathlib.Path(arguments.export_runs)
        )
        display.print(f"runs: {arguments.export_runs}", markup=False)
    return EXIT_OK


def _final_table(result: Result) -> Table:
    config = result.simulation.config
    frameworks = ", ".join(sorted(set(config.client_frameworks)))
    model = f"{config.method}, {config.model.architecture}"
    table = Table(title=f"HBN federation: {model}, {frameworks} clients")
    for column in ("round", "test accuracy", "test loss", "train loss", "faults", "seconds"):
        table.add_column(column, justify="right")
    for record in result.history:
        if record.accuracy is None:
            continue
        table.add_row(
            str(record.round),
            f"{record.accuracy:.3f}",
            f"{record.loss:.3f}",
            f"{record.train_loss:.3f}",
            str(len(record.faults)),
            f"{record.seconds['total']:.2f}",
        )
    summary = result.summary
    if summary.last10_mean_accuracy is not None:
        ci = "" if summary.last10_ci95 is None else f" ± {summary.last10_ci95:.3f} (95% CI)"
        table.caption = (
            f"mean accuracy of the last {min(10, len(result.history))} evaluated rounds: "
            f"{summary.last10_mean_accuracy:.3f}{ci}"
        )
    return table


if __name__ == "__main__":
    sys.exit(main())
