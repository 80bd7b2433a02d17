"""What the robust pools cost when every client is honest: their statistical efficiency.

K equal clients each hold n examples of one normal law N(0, 1) (one channel). Their reports are
drawn from the exact sampling distribution of normal data: mean ~ N(0, 1/n) and
m2 ~ chi-squared(n - 1). For each pool, the relative efficiency of its estimate of the mean and
of the biased variance is the Monte Carlo variance of the exact pool's estimate divided by that
of the pool's (1 for the exact pool; 0.5 means the pool needs twice the data for the same error).

    python benchmarks/robust_pools.py [--clients 10] [--examples 500] [--draws 20000]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from hbn_core import Moments, median_of_means_pool, pool_moments, trimmed_pool, variance

Pool = Callable[[list[Moments]], Moments]


def pools(clients: int) -> dict[str, Pool]:
    """The exact pool, then each robust pool at the settings a federation would use."""
    cases: dict[str, Pool] = {"exact": pool_moments}
    for trim in range(1, (clients - 1) // 2 + 1):
        cases[f"trimmed, trim={trim}"] = lambda parts, t=trim: trimmed_pool(parts, trim=t)
    for groups in sorted({3, 5, clients}):
        if groups <= clients:
            cases[f"median of means, groups={groups}"] = lambda parts, g=groups: (
                median_of_means_pool(parts, groups=g)
            )
    return cases


def reports(rng: np.random.Generator, clients: int, examples: int) -> list[Moments]:
    means = rng.normal(0.0, 1.0 / np.sqrt(examples), clients)
    m2s = rng.chisquare(examples - 1, clients)
    count = np.asarray(examples, np.int64)
    return [Moments(count, np.array([m]), np.array([v])) for m, v in zip(means, m2s, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--draws", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    rng = np.random.default_rng(arguments.seed)
    cases = pools(arguments.clients)
    estimates: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(arguments.draws):
        parts = reports(rng, arguments.clients, arguments.examples)
        for name, pool in cases.items():
            pooled = pool(parts)
            estimates[name].append((float(pooled.mean[0]), float(variance(pooled)[0])))
    exact = np.var(np.asarray(estimates["exact"]), axis=0)
    print(
        f"{arguments.clients} honest clients of {arguments.examples} examples, "
        f"{arguments.draws} draws (seed {arguments.seed})\n"
    )
    print("| pool | efficiency, mean | efficiency, variance |")
    print("|---|---|---|")
    for name, values in estimates.items():
        efficiency = exact / np.var(np.asarray(values), axis=0)
        print(f"| {name} | {efficiency[0]:.3f} | {efficiency[1]:.3f} |")


if __name__ == "__main__":
    main()
