"""Poisoned statistics against each pool: test accuracy against the clean run.

Digits, 10 clients, all of them in every round. In the attacked runs, clients 0 (and 1) lie in
the statistics step: each HBN layer's honest report (count ``n``, mean ``mu``, biased variance
``s2``) becomes, per channel,

- ``scale``: the values scaled x1e3: ``mu * 1e3`` and ``s2 * 1e6``;
- ``shift``: the mean shifted by +100 sigma: ``mu + 100 s``;
- ``flip``: the deviation from the current global mean ``g`` sign-flipped and amplified
  tenfold: ``g - 10 (mu - g)``;
- ``subtle``: the mean shifted by +3 sigma: ``mu + 3 s``, inside the honest range.

Every lie passes :func:`federation.protocol.check_report` (right count, float32 range). Each
pool (``statistics.aggregator``: ``exact``, ``trimmed`` with ``trim = 2``,
``median-of-means`` with ``groups = 5``) runs clean and under each attack, over 3 seeds; the
table gives the mean of the last 3 rounds' test accuracy and its 95% CI over the seeds
(:func:`federation.repro.statistics.confidence_interval`), and the difference to the same
pool's clean run, in points.

    PYTHONPATH=. python benchmarks/attack.py [--rounds 15] [--seeds 3] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import TYPE_CHECKING

import numpy as np

from federation import protocol
from federation.client import Client
from federation.config import parse_config
from federation.repro.statistics import confidence_interval
from federation.simulation import Simulation
from hbn_core import Moments

if TYPE_CHECKING:
    from collections.abc import Callable


POOLS = {
    "exact": {"aggregator": "exact"},
    "trimmed (trim=2)": {"aggregator": "trimmed", "trim": 2},
    "median-of-means (groups=5)": {"aggregator": "median-of-means", "groups": 5},
}


def _with_mean_and_var(m: Moments, mean: np.ndarray, var: np.ndarray) -> Moments:
    return Moments(m.count, mean, var * m.count)


def _var(m: Moments) -> np.ndarray:
    return np.asarray(m.m2) / m.count


def _scale(m: Moments, _global_mean: np.ndarray) -> Moments:
    return _with_mean_and_var(m, m.mean * 1e3, _var(m) * 1e6)


def _shift(sigmas: float) -> Callable[[Moments, np.ndarray], Moments]:
    def lie(m: Moments, _global_mean: np.ndarray) -> Moments:
        return _with_mean_and_var(m, m.mean + sigmas * np.sqrt(_var(m)), _var(m))

    return lie


def _flip(m: Moments, global_mean: np.ndarray) -> Moments:
    return _with_mean_and_var(m, global_mean - 10 * (m.mean - global_mean), _var(m))


LIES: dict[str, Callable[[Moments, np.ndarray], Moments]] = {
    "scale x1e3": _scale,
    "shift +100 sigma": _shift(100),
    "flip deviations x10": _flip,
    "subtle +3 sigma": _shift(3),
}


class LyingClient(Client):
    """A client whose statistics report is ``lie(honest, global_mean)`` for each layer."""

    def __init__(self, honest: Client, lie: Callable[[Moments, np.ndarray], Moments]) -> None:
        super().__init__(honest.client_id, honest.framework, honest.indices)
        self.lie = lie

    def collect_statistics(self, model, state, data, settings, rng):  # type: ignore[no-untyped-def]  # noqa: D102
        report = super().collect_statistics(model, state, data, settings, rng)
        layers = protocol.hbn_layers(model.layout)
        moments = {
            name: self.lie(m, state[layers[name].global_mean].astype(np.float64))
            for name, m in report.moments.items()
        }
        return report._replace(moments=moments)


def run(pool: dict, lie: str | None, liars: int, seed: int, rounds: int) -> float:
    """The mean test accuracy of the last 3 rounds of one run."""
    config = parse_config(
        {
            "seed": seed,
            "rounds": rounds,
            "data": {"name": "digits", "num_clients": 10, "partition": "iid"},
            "model": {"architecture": "mlp", "hidden": 64},
            "clients": {"fraction": 1.0, "min_clients": 5},
            "train": {"lr": 0.05, "batch_size": 32},
            "statistics": pool,
            "eval": {"final_rounds": 3, "every": rounds},
        }
    )
    simulation = Simulation(config)
    if lie is not None:
        simulation.clients = tuple(
            LyingClient(c, LIES[lie]) if c.client_id < liars else c for c in simulation.clients
        )
    history = simulation.run()
    return float(np.mean([r.accuracy for r in history[-3:]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    seeds = range(args.seeds)
    start = time.perf_counter()
    lines = [
        "| pool | attack | poisoned of 10 | accuracy % (95% CI) | vs clean, points |",
        "|---|---|---|---|---|",
    ]
    clean_of: dict[str, float] = {}
    exact_clean = 0.0
    for name, pool in POOLS.items():
        clean = [run(pool, None, 0, s, args.rounds) for s in seeds]
        mean, half = confidence_interval([100 * a for a in clean])
        clean_of[name] = mean
        exact_clean = exact_clean or mean
        lines.append(
            f"| {name} | none | 0 | {mean:.1f} ± {half:.1f} | {mean - exact_clean:+.1f} vs exact |"
        )
        print(lines[-1], flush=True)
    for (lie, liars), (name, pool) in itertools.product(
        itertools.product(LIES, (1, 2)), POOLS.items()
    ):
        accuracies = [run(pool, lie, liars, s, args.rounds) for s in seeds]
        mean, half = confidence_interval([100 * a for a in accuracies])
        lines.append(
            f"| {name} | {lie} | {liars} | {mean:.1f} ± {half:.1f} | {mean - clean_of[name]:+.1f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    footer = f"\n{args.seeds} seeds, {args.rounds} rounds; {time.perf_counter() - start:.0f} s.\n"
    print(footer)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            file.write(table + footer)


if __name__ == "__main__":
    main()
