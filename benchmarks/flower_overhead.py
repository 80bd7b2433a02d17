"""The same federation on the embedded simulation and on Flower's simulation, in one run.

10 torch clients train the HBN Simple-CNN on digits for 5 rounds, every client in every round,
first with :class:`federation.simulation.Simulation` in this process, then with
:mod:`federation.flower` on ``flwr.simulation.run_simulation`` (Ray, one CPU per node, as many
actors as cores). Both are timed end to end, from building the federation to the last
evaluation. Flower's fixed costs are measured apart: starting and stopping Ray, and the imports
each Ray actor pays before its first message, in a fresh interpreter.

    python benchmarks/flower_overhead.py
"""

from __future__ import annotations

import importlib.util
import logging
import os
import statistics
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from federation.config import parse_config
from federation.simulation import Simulation

JOB: dict[str, Any] = {
    "rounds": 5,
    "data": {"name": "digits", "num_clients": 10},
    "method": "hbn",
    "model": {"architecture": "simple-cnn"},
    "clients": {"frameworks": {"torch": 10}, "fraction": 1.0},
    "eval": {"statistics": "ema"},  # what Flower runs
}
CPUS = os.cpu_count() or 1
STEPS = ("statistics", "training", "evaluation")
# What a Ray actor imports before its first message: Flower's client side, then the torch model.
# Flower's Ray transport also imports TensorFlow when it is installed.
ACTOR_IMPORTS = {
    "Flower (client side)": "federation.flower.client_app",
    "torch and the torch model": "federation.models.torch_model",
    "TensorFlow (by flwr.simulation.ray_transport)": "tensorflow",
}


def embedded() -> dict[str, float]:
    """Wall seconds of the embedded run, of its first round, and medians of the later ones."""
    start = time.perf_counter()
    simulation = Simulation(parse_config(JOB))
    records = simulation.run()
    wall = time.perf_counter() - start
    later = records[1:]
    return {
        "wall": wall,
        "first_round": records[0].seconds["total"],
        "round": statistics.median(r.seconds["total"] for r in later),
        **{step: statistics.median(r.seconds[step] for r in later) for step in STEPS},
    }


def flower() -> dict[str, float]:
    """Wall seconds of the Flower run, of its first round, and medians of the later ones."""
    import ray
    from flwr.simulation import run_simulation

    from federation.flower import HBNFedAvg, make_client_app, make_server_app

    config = parse_config(JOB)
    strategies: list[HBNFedAvg] = []

    def strategy(config_: Any, layout: Any) -> HBNFedAvg:
        strategies.append(HBNFedAvg(config=config_, layout=layout))
        return strategies[-1]

    logging.getLogger("flwr").setLevel(logging.WARNING)
    start = time.perf_counter()
    try:
        run_simulation(
            make_server_app(config, strategy=strategy),
            make_client_app(config),
            num_supernodes=config.data.num_clients,
            backend_config={
                "client_resources": {"num_cpus": 1},
                "init_args": {"num_cpus": CPUS},
            },
        )
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    history = strategies[0].history
    later = history[1:]
    return {
        "wall": wall,
        "first_round": sum(history[0].seconds.values()),
        "round": statistics.median(sum(r.seconds.values()) for r in later),
        **{step: statistics.median(r.seconds[step] for r in later) for step in STEPS},
    }


def ray_start_stop() -> float:
    """Seconds to start Ray as Flower's simulation does, and to stop it."""
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=CPUS, include_dashboard=False, logging_level=logging.WARNING)
    ray.shutdown()
    return time.perf_counter() - start


def import_seconds(module: str) -> float | None:
    """Seconds a fresh interpreter takes to import ``module``; None if it is not installed."""
    if importlib.util.find_spec(module.partition(".")[0]) is None:
        return None
    code = (
        "import time; start = time.perf_counter(); "
        f"import {module}; print(time.perf_counter() - start)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return float(completed.stdout.split()[-1])


def section() -> list[str]:
    """The Markdown section for docs/benchmarks.md."""
    ours, theirs = embedded(), flower()
    ray_seconds = ray_start_stop()
    imports = {label: import_seconds(module) for label, module in ACTOR_IMPORTS.items()}
    fixed = theirs["wall"] - JOB["rounds"] * theirs["round"]
    lines = [
        "## Federation: the embedded simulation against Flower's simulation",
        "",
        "The same job in one run: 10 torch clients, HBN Simple-CNN, digits, 5 rounds, every",
        f"client in every round, on {CPUS} cores. Flower runs it through `federation.flower`",
        "on `flwr.simulation.run_simulation` (Ray, one CPU per node). A later round is the",
        "median of rounds 2-5. `tests/test_flower.py` checks that both compute the same global",
        "statistics.",
        "",
        "| | embedded | Flower | Flower / embedded |",
        "|---|---|---|---|",
        _row("whole run (s)", ours["wall"], theirs["wall"]),
        _row("first round (s)", ours["first_round"], theirs["first_round"]),
        _row("later round (s)", ours["round"], theirs["round"]),
        *(_row(f"later round: {step} step (s)", ours[step], theirs[step]) for step in STEPS),
        "",
        "A Flower step sends one message per node through the SuperLink and Ray, and its",
        "evaluation runs on every node (on its share of the test set) instead of once on the",
        "server.",
        "",
        "Where Flower's fixed cost goes (the whole run minus 5 later rounds). The actors import",
        "in parallel, so each import counts once:",
        "",
        "| cost | seconds |",
        "|---|---|",
        f"| Flower's fixed cost | {fixed:.1f} |",
        f"| Ray start and stop (measured alone) | {ray_seconds:.1f} |",
    ]
    for label, seconds in imports.items():
        shown = "not installed" if seconds is None else f"{seconds:.1f}"
        lines.append(f"| import in each actor: {label} | {shown} |")
    rest = fixed - ray_seconds - sum(v for v in imports.values() if v is not None)
    lines.append(f"| the rest: actor start, first model, first messages | {rest:.1f} |")
    return [*lines, ""]


def _row(label: str, ours: float, theirs: float) -> str:
    ratio = f"{theirs / ours:.1f}x" if ours > 0 else "-"
    return f"| {label} | {ours:.3f} | {theirs:.3f} | {ratio} |"


if __name__ == "__main__":
    print("\n".join(section()))
