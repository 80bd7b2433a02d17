"""The one timing rule of the benchmarks: interleaved medians after warm-up runs.

The steps that a ratio compares run in turn, one call each per round, so that a change in the
machine's speed during the run (a noisy neighbour, frequency scaling) reaches all of them alike.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

WARMUP = 5


def median_ms(
    steps: Mapping[str, Callable[[], object]], repeats: int, warmup: int = WARMUP
) -> dict[str, float]:
    """Median milliseconds of each step over ``repeats`` interleaved rounds, after warm-up."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}
