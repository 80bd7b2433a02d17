"""The one timing rule of the benchmarks: the median wall time of a step, after warm-up runs."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

WARMUP = 5


def median_ms(step: Callable[[], object], repeats: int, warmup: int = WARMUP) -> float:
    """Median milliseconds of ``step()`` over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
