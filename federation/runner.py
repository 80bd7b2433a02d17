"""Run a whole federation from Python: rounds, checkpoints, ``results.json`` and the plot.

>>> from federation import parse_config, run  # doctest: +SKIP
>>> result = run(parse_config({"rounds": 5}), out_dir="runs/first")  # doctest: +SKIP
>>> result.summary.final_accuracy  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import pathlib
import platform
import time
from typing import TYPE_CHECKING

from federation import protocol
from federation.checkpoint import load_checkpoint, remove_stale_files, save_checkpoint
from federation.simulation import Simulation

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Sequence

    from federation.client import Client
    from federation.config import Config
    from federation.data import Dataset
    from federation.protocol import RoundRecord
    from federation.repro.statistics import Summary

__all__ = ["Result", "run", "write_results"]

CHECKPOINT = "checkpoint.npz"
logger = logging.getLogger("federation")


@dataclasses.dataclass(frozen=True)
class Result:
    """A finished run: its simulation (whose ``state`` is the final state), records, summary."""

    simulation: Simulation
    history: tuple[RoundRecord, ...]
    summary: Summary


def run(
    config: Config,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    dataset: Dataset | None = None,
    on_start: Callable[[Simulation], None] | None = None,
    on_client: Callable[[str, Client], None] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> Result:
    """Run ``config`` to its last round.

    With ``out_dir``, a checkpoint is written atomically after every round, and
    ``results.json`` and ``accuracy.png`` at the end. ``resume=True`` continues from
    ``out_dir``'s checkpoint, if there is one, and reaches the same final state as an
    uninterrupted run. ``on_start(simulation)`` runs once before the first round,
    ``on_client(step, client)`` after each client step and ``on_round(record)`` after each round.

    Raises
    ------
    ValueError
        If ``resume`` is set without ``out_dir``.
    federation.checkpoint.CheckpointError
        If the checkpoint to resume from cannot be read or is not of this run.
    federation.protocol.RoundFailedError
        If a round has fewer than ``min_clients`` valid clients (the checkpoint of the last
        good round stays).
    """
    if resume and out_dir is None:
        msg = "`resume` needs `out_dir`, the folder of the checkpoint to resume from."
        raise ValueError(msg)
    simulation = Simulation(config, dataset=dataset)
    checkpoint = None if out_dir is None else pathlib.Path(out_dir) / CHECKPOINT
    if checkpoint is not None:
        remove_stale_files(checkpoint)
        if resume and checkpoint.is_file():
            simulation.state = load_checkpoint(
                checkpoint, config=config, initial=simulation.state, layout=simulation.layout
            )
        elif resume:
            logger.warning("--resume: no checkpoint at %s; starting from round 1.", checkpoint)
    if on_start is not None:
        on_start(simulation)
    while simulation.rounds_done < config.rounds:
        record = simulation.run_round(progress=on_client)
        if checkpoint is not None:
            save_checkpoint(simulation.state, config, checkpoint)
        if on_round is not None:
            on_round(record)
    result = Result(simulation, simulation.history, simulation.summary())
    if out_dir is not None:
        write_results(result, pathlib.Path(out_dir))
    return result


def write_results(result: Result, out_dir: pathlib.Path) -> None:
    """Write ``results.json`` (config, per-round metrics, timings, faults) and ``accuracy.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    simulation = result.simulation
    document = {
        "config": simulation.config.to_dict(),
        "summary": result.summary.to_json(),
        "rounds": [dataclasses.asdict(r) for r in result.history],
        "clients": [
            {"id": c.client_id, "framework": c.framework, "examples": len(c.indices)}
            for c in simulation.clients
        ],
        "environment": {
            "python": platform.python_version(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    text = json.dumps(protocol.json_safe(document), indent=2, allow_nan=False)
    (out_dir / "results.json").write_text(text + "\n")
    plot_accuracy(result.history, out_dir / "accuracy.png", title=_title(simulation))


def _title(simulation: Simulation) -> str:
    config = simulation.config
    counts = collections.Counter(config.client_frameworks)
    frameworks = ", ".join(f"{n} {name}" for name, n in counts.items())
    return (
        f"{config.method}, {config.model.architecture} on {config.data.name}, "
        f"{config.data.partition}, {frameworks} clients"
    )


def plot_accuracy(history: Sequence[RoundRecord], path: pathlib.Path, *, title: str) -> None:
    """Test accuracy per evaluated round, as a PNG (matplotlib, no display needed)."""
    from matplotlib.figure import Figure  # a Figure, not pyplot: no global backend change

    rounds = [r.round for r in history if r.accuracy is not None]
    accuracies = [r.accuracy for r in history if r.accuracy is not None]
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    axis.plot(rounds, accuracies, marker="o")
    axis.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1))
    axis.set_title(title, fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
