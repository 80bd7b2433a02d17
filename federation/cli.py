"""``hbn-fed``: run federations from a TOML file, or the mixed-framework demo.

    hbn-fed run CONFIG.toml [--set key=value ...] [--out DIR] [--resume]
    hbn-fed demo [--set key=value ...] [--out DIR]
    hbn-fed repro [--profile full|quick] [--out DIR] [--workers N] [--report FILE.md]

Also ``python -m federation``. A live progress bar shows each round's clients and the latest
accuracy and loss; ``DIR`` receives ``results.json``, ``accuracy.png`` and a checkpoint after
every round. Exit status: 0 done, 1 a round failed, 2 a bad configuration or missing data.
"""

from __future__ import annotations

import argparse
import importlib.resources
import logging
import pathlib
import sys
import tomllib
from typing import TYPE_CHECKING

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from federation.checkpoint import CheckpointError
from federation.config import ConfigError, load_config, parse_config
from federation.protocol import RoundFailedError
from federation.repro import (
    PROFILES,
    export_runs,
    import_runs,
    run_profile,
    write_report,
)
from federation.runner import run

if TYPE_CHECKING:
    from collections.abc import Sequence

    from federation.client import Client
    from federation.config import Config
    from federation.protocol import RoundRecord
    from federation.repro import Run, RunResult
    from federation.runner import Result
    from federation.simulation import Simulation

__all__ = ["main"]

DEMO_OUT = "hbn-demo"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hbn-fed", description="Federated learning with Hybrid Batch Normalisation."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_command = commands.add_parser("run", help="run the federation a TOML file describes")
    run_command.add_argument("config", help="the TOML configuration (see docs/federation.md)")
    run_command.add_argument("--resume", action="store_true", help="continue from DIR's checkpoint")
    demo = commands.add_parser("demo", help="a mixed torch + JAX + Keras HBN federation on digits")
    repro = commands.add_parser("repro", help="every method on every setting, with 95%% CIs")
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
    return parser


def _demo_table() -> dict[str, object]:
    text = importlib.resources.files("federation").joinpath("demo.toml").read_text()
    return tomllib.loads(text)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``hbn-fed`` command; returns the exit status."""
    arguments = _parser().parse_args(argv)
    console = Console()
    logging.basicConfig(
        level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=console)]
    )
    if arguments.command == "repro":
        return _repro(arguments, console, argv)
    try:
        if arguments.command == "demo":
            config = parse_config(_demo_table(), arguments.overrides)
        else:
            config = load_config(arguments.config, arguments.overrides)
    except (ConfigError, OSError) as error:
        console.print(f"[red]configuration error:[/red] {error}")
        return 2
    try:
        result = _run_with_progress(config, arguments, console)
    except (FileNotFoundError, ImportError) as error:
        console.print(f"[red]cannot start:[/red] {error}")
        return 2
    except CheckpointError as error:
        console.print(f"[red]cannot resume:[/red] {error}")
        return 2
    except RoundFailedError as error:
        console.print(f"[red]round failed:[/red] {error}")
        return 1
    console.print(_final_table(result))
    console.print(f"results: {arguments.out}/results.json, plot: {arguments.out}/accuracy.png")
    return 0


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


def _run_with_progress(config: Config, arguments: argparse.Namespace, console: Console) -> Result:
    progress = _progress(console, bar_width=16)
    rounds = progress.add_task("rounds", total=config.rounds, status="")
    steps = progress.add_task("clients", total=None, status="")

    def on_start(simulation: Simulation) -> None:
        progress.update(rounds, completed=simulation.rounds_done)
        sampled = len(simulation.sample_clients(simulation.rounds_done))
        per_round = sampled * (2 if simulation.hbn_layers else 1)
        progress.update(steps, total=per_round, completed=0)

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
        return run(
            config,
            out_dir=arguments.out,
            resume=getattr(arguments, "resume", False),
            on_start=on_start,
            on_client=on_client,
            on_round=on_round,
        )


def _repro(arguments: argparse.Namespace, console: Console, argv: Sequence[str] | None) -> int:
    """Run or resume a repro profile with a progress bar; write its report if asked."""
    if arguments.workers < 0:
        console.print(f"[red]--workers must be >= 0; got {arguments.workers}.[/red]")
        return 2
    profile = PROFILES[arguments.profile]
    out = pathlib.Path(arguments.out)
    if arguments.import_runs:
        try:
            added = import_runs(pathlib.Path(arguments.import_runs), out)
        except (OSError, ValueError) as error:
            console.print(f"[red]cannot import runs:[/red] {error}")
            return 2
        console.print(f"{added} runs imported from {arguments.import_runs}")
    progress = _progress(console, bar_width=24)
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
    except (FileNotFoundError, ImportError) as error:
        console.print(f"[red]cannot start:[/red] {error}")
        return 2
    if arguments.report:
        report = pathlib.Path(arguments.report)
        command = "hbn-fed " + " ".join(sys.argv[1:] if argv is None else argv)
        write_report(profile, results, report, report.with_suffix(".png"), command=command)
        console.print(f"report: {report}, plot: {report.with_suffix('.png')}")
    if arguments.export_runs:
        export_runs(
            [run for phase in results for run in phase], pathlib.Path(arguments.export_runs)
        )
        console.print(f"runs: {arguments.export_runs}")
    return 0


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
