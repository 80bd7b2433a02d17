"""The simulation's own overhead per round, beyond the clients' compute and the evaluation.

Each round records its wall time, the time spent inside the clients' steps (loading state,
batching, the framework's forward/backward, exporting state) and the evaluation. What is left
is the simulation's own work: sampling, checking reports, FedAvg, pooling, bookkeeping. The
first round is dropped (it includes the frameworks' compilation); the median of the others is
reported.

    python benchmarks/federation_overhead.py
"""

from __future__ import annotations

import statistics
import tomllib
from importlib import resources
from typing import Any

from federation.config import parse_config
from federation.data import FASHION_MNIST_DIR
from federation.simulation import Simulation

TARGET = 0.02
# Fashion-MNIST gives clients a realistic 600 examples each; digits (18 each) is the fallback.
HUNDRED_CLIENTS_DATA = "fashion-mnist" if FASHION_MNIST_DIR.is_dir() else "digits"
CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "demo (10 clients: 4 torch, 3 JAX, 3 Keras; all per round)": (
        tomllib.loads(resources.files("federation").joinpath("demo.toml").read_text()),
        ["rounds=6"],
    ),
    f"100 torch clients, 10 per round, {HUNDRED_CLIENTS_DATA}": (
        {},
        [
            "rounds=6",
            f"data.name={HUNDRED_CLIENTS_DATA}",
            "data.num_clients=100",
            "clients.fraction=0.1",
            "train.batch_size=32",
        ],
    ),
}


def measure(table: dict[str, Any], overrides: list[str]) -> dict[str, float]:
    """Median seconds per round of the whole round, the clients, the evaluation and the rest."""
    simulation = Simulation(parse_config(table, overrides))
    records = simulation.run()[1:]
    parts = {
        key: statistics.median(r.seconds[key] for r in records)
        for key in ("total", "client_compute", "evaluation")
    }
    overheads = [
        r.seconds["total"] - r.seconds["client_compute"] - r.seconds["evaluation"] for r in records
    ]
    parts["overhead"] = statistics.median(overheads)
    parts["overhead_fraction"] = statistics.median(
        o / r.seconds["total"] for o, r in zip(overheads, records, strict=True)
    )
    return parts


def section() -> list[str]:
    """The Markdown section for docs/benchmarks.md."""
    lines = [
        "## Federation: the simulation's own overhead per round",
        "",
        "Median over rounds 2-6 (round 1 includes compilation). *Clients* is the time inside",
        "the clients' steps, *evaluation* the server's test pass (with the demo's synchronous",
        "statistics pass); *overhead* is the rest of the",
        f"round: sampling, report checks, FedAvg, pooling, bookkeeping. Target: < {TARGET:.0%}.",
        "",
        "| configuration | round (s) | clients (s) | evaluation (s) | overhead (ms) | share |",
        "|---|---|---|---|---|---|",
    ]
    for name, (table, overrides) in CASES.items():
        m = measure(table, overrides)
        lines.append(
            f"| {name} | {m['total']:.3f} | {m['client_compute']:.3f} | {m['evaluation']:.3f} "
            f"| {1e3 * m['overhead']:.2f} | {m['overhead_fraction']:.2%} |"
        )
    return [*lines, ""]


if __name__ == "__main__":
    print("\n".join(section()))
