"""The server's math, as pure functions over NumPy: FedAvg, pooled statistics and their EMA.

Nothing here mutates its inputs or keeps state; :mod:`federation.simulation` orchestrates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

import hbn_core
from backends._global_statistics import checked_global_statistics
from hbn_core import Moments

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from federation.config import StatisticsConfig
    from federation.layout import State

__all__ = [
    "GlobalStatistics",
    "StatisticsReport",
    "blend_statistics",
    "check_statistics_report",
    "fedavg",
    "pool_statistics",
]

# Each HBN layer's (global_mean, global_var), float64, the variance biased unless configured.
GlobalStatistics = dict[str, tuple[np.ndarray, np.ndarray]]


class StatisticsReport(NamedTuple):
    """One client's statistics step.

    Attributes
    ----------
    moments
        Each HBN layer's exact input moments: count of elements per channel, mean and m2.
    examples
        How many examples the client forwarded.
    dataset_size
        How many examples the client holds (the weight of ``weighting = "dataset"``).
    """

    moments: dict[str, Moments]
    examples: int
    dataset_size: int


def check_statistics_report(report: StatisticsReport, num_features: Mapping[str, int]) -> None:
    """Check a report against the model's HBN layers (name to channels) before it is pooled.

    Raises
    ------
    ValueError
        If the layer names differ, a count is not positive, a shape is wrong, a value is not
        finite, or ``examples``/``dataset_size`` is not a positive integer.
    """
    for name in ("examples", "dataset_size"):
        value = getattr(report, name)
        if not isinstance(value, int | np.integer) or value <= 0:
            msg = f"the report's `{name}` must be a positive integer; got {value!r}."
            raise ValueError(msg)
    checked_global_statistics(report.moments, num_features)


def fedavg(states: Sequence[State], weights: Sequence[int]) -> State:
    r"""The weighted average :math:`\sum_k n_k w_k / \sum_k n_k` of each tensor, in float64.

    Each tensor keeps its dtype. ``states`` must share keys, shapes and dtypes (checked upstream).

    Raises
    ------
    ValueError
        If there is no state, the lengths differ, or the total weight is not positive.
    """
    if not states or len(states) != len(weights):
        msg = (
            "`states` and `weights` must be non-empty and of one length; "
            f"got {len(states)} and {len(weights)}."
        )
        raise ValueError(msg)
    total = float(sum(weights))
    if not total > 0:
        msg = f"`weights` must have a positive sum; got {list(weights)}."
        raise ValueError(msg)
    fractions = np.asarray(weights, np.float64) / total
    return {
        name: np.tensordot(
            fractions, np.stack([s[name] for s in states]).astype(np.float64), 1
        ).astype(states[0][name].dtype)
        for name in states[0]
    }


def pool_statistics(
    reports: Sequence[StatisticsReport], settings: StatisticsConfig
) -> GlobalStatistics:
    """Pool the clients' moments per HBN layer into global ``(mean, var)``, in float64.

    With ``weighting = "elements"`` the pool is exact: the moments of all forwarded elements
    together (:func:`hbn_core.pool_moments`). With ``"dataset"`` each client's moments are a
    mixture component of weight proportional to its data-set size. The variance is
    ``m2 / count`` (``"population"``), or the authors' ``m2 / (count - count / examples)``,
    their Bessel correction over examples (``"bessel-examples"``, D5).
    """
    weights = None
    if settings.weighting == "dataset":
        weights = np.asarray([r.dataset_size for r in reports], np.float64)
    examples = sum(r.examples for r in reports)
    pooled: GlobalStatistics = {}
    for name in reports[0].moments:
        parts = [_float64(r.moments[name]) for r in reports]
        total = hbn_core.pool_moments(parts, weights=weights)
        count = float(total.count)
        if settings.variance == "bessel-examples":
            denominator = count - count / examples if examples > 1 else count
        else:
            denominator = count
        pooled[name] = (np.asarray(total.mean), np.asarray(total.m2) / denominator)
    return pooled


def _float64(moments: Moments) -> Moments:
    count, mean, m2 = moments
    return Moments(
        np.asarray(count, np.int64), np.asarray(mean, np.float64), np.asarray(m2, np.float64)
    )


def blend_statistics(
    previous: GlobalStatistics, pooled: GlobalStatistics, momentum: float
) -> GlobalStatistics:
    r"""The EMA :math:`g \leftarrow (1 - m)\,g + m\,p` of mean and variance, layer by layer."""
    return {
        name: (
            (1 - momentum) * previous[name][0] + momentum * mean,
            (1 - momentum) * previous[name][1] + momentum * var,
        )
        for name, (mean, var) in pooled.items()
    }
