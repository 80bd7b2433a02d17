r"""Robust pools of many clients' moments: a trimmed pool and a median-of-means pool.

Exact pooling (:func:`hbn_core.pool_moments`) has a breakdown point of zero: one part that
reports an absurd mean or variance moves the pooled statistics as far as it likes. The pools here
bound the influence of up to ``f`` **Byzantine** parts, parts whose moments may be anything that
:func:`hbn_core.check_moments` accepts, at a cost in statistical efficiency when every part is
honest. Both follow the robust-aggregation rules of Byzantine-robust federated learning: the
coordinate-wise trimmed mean and median of Yin et al. (ICML 2018, "Byzantine-robust distributed
learning: towards optimal statistical rates"), here per channel, over the parts' statistics. The
robust variant of Federated BatchNorm (Guerraoui et al., arXiv 2405.14670) aggregates the clients'
statistics with such a robust rule in place of the average.

Both pools read counts and sort values eagerly: they run on concrete NumPy, array-api-strict,
PyTorch or JAX arrays, outside ``jax.jit``. The result is a :class:`~hbn_core.Moments` whose
``count`` is the total count of the parts and whose ``m2`` is the robust (biased) variance times
that count, so that :func:`hbn_core.variance` of it is the robust variance, as for an exact pool.
Parts with count 0 hold no statistics and are left out.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Protocol, cast

from hbn_core._moments import (
    Moments,
    checked_total_count,
    parts_and_namespace,
    pool_columns,
    pool_moments,
    stacked_parts,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from hbn_core._typing import Array, ArrayNamespace

__all__ = ["median_of_means_pool", "trimmed_pool"]


class _RobustNamespace(Protocol):
    """The functions of the Array API that the robust pools call beyond the core's."""

    def sort(self, x: Array, /, *, axis: int = -1) -> Array: ...
    def argsort(self, x: Array, /, *, axis: int = -1, stable: bool = True) -> Array: ...
    def max(self, x: Array, /, *, axis: int | None = None) -> Array: ...


def trimmed_pool(
    parts: Sequence[Moments], /, *, trim: int, xp: ArrayNamespace | None = None
) -> Moments:
    r"""Per channel, drop the ``trim`` parts farthest from the median part, then pool exactly.

    In each channel :math:`c`, part :math:`k` (mean :math:`\bar x_k`, biased standard deviation
    :math:`s_k = \sqrt{M_{2,k}/n_k}`) is scored by its squared 2-Wasserstein distance to the
    normal law of the median mean and median standard deviation of the parts,

    .. math::

        d_k = (\bar x_k - \operatorname{med}_j \bar x_j)^2 + (s_k - \operatorname{med}_j s_j)^2,

    medians taken over parts, unweighted (so a part cannot buy influence on them with its
    count). The ``trim`` parts with the largest :math:`d_k` are dropped (ties: the later part),
    and the others are pooled exactly, as :func:`~hbn_core.pool_moments` does, with their
    counts. ``trim = 0`` is the exact pool.

    **What it tolerates.** Up to ``f <= trim`` Byzantine parts among :math:`K > 2\,` ``trim``.
    With fewer than half of the parts Byzantine, each median lies within the honest parts'
    range, and a kept Byzantine part scores no more than the worst honest part (otherwise every
    honest part would rank below it, and it would be among the ``trim`` dropped). So, with
    :math:`D_\mu` and :math:`D_s` the ranges of the honest parts' means and standard deviations
    and :math:`R = \sqrt{D_\mu^2 + D_s^2}`, every kept part has
    :math:`|\bar x_k - \operatorname{med}\bar x| \le R` and
    :math:`|s_k - \operatorname{med} s| \le R`, whatever the Byzantine parts report (count
    included). The pooled mean is then within :math:`2R` of the honest parts' exact pooled mean,
    and the pooled variance lies in
    :math:`[\max(0, s_{\min} - R)^2,\ (s_{\max} + R)^2 + 4R^2]`, :math:`s_{\min}, s_{\max}` the
    honest extremes. Byzantine parts can still shift the result within that honest envelope:
    a subtle shift, inside the honest spread, is not detectable.

    **Cost when all are honest.** Each channel pools :math:`K -` ``trim`` parts, dropped on
    one side only. For 10 parts of equal size and one normal law, the efficiency relative to
    the exact pool (the ratio of the variances of the estimates) is measured at 0.72 for the
    mean and 0.81 for the variance with ``trim = 1``, and 0.61 and 0.69 with ``trim = 2``
    (``benchmarks/robust_pools.py``). Under non-IID data the dropped parts are the atypical
    ones, so the pooled statistics lean toward the typical part: the between-part spread is
    underestimated.

    Parameters
    ----------
    parts
        :class:`~hbn_core.Moments` with the same number of channels, from one namespace;
        parts with count 0 are left out.
    trim
        The number of parts to drop per channel, the number of Byzantine parts tolerated:
        ``0 <= 2 * trim < K``, ``K`` the parts with a positive count.
    xp
        The array namespace. By default it is inferred from the parts.

    Returns
    -------
    Moments
        ``count``: the total count of the parts; ``mean``: the trimmed pool's mean;
        ``m2``: its biased variance times ``count``.

    Raises
    ------
    TypeError
        As :func:`~hbn_core.pool_moments`; also if ``trim`` is no int, or the namespace cannot
        sort (TensorFlow tensors: pass NumPy arrays).
    ValueError
        As :func:`~hbn_core.pool_moments`; also if ``trim`` is negative or not below half of
        the parts with a positive count.

    Examples
    --------
    >>> import numpy as np
    >>> from hbn_core import moments, variance
    >>> parts = [moments(np.array([[0.0, 5.0], [2.0, 7.0]]) + k / 10) for k in range(4)]
    >>> parts.append(moments(np.array([[1e6, 5.0], [1e6 + 2, 7.0]])))  # lies in channel 0
    >>> pooled = trimmed_pool(parts, trim=1)  # channel 1 drops the part of mean 6.3 instead
    >>> pooled.mean.round(6).tolist(), variance(pooled).round(6).tolist()
    ([1.15, 6.075], [1.0125, 1.006875])
    """
    xp, total_count, present = _prepare(parts, xp)
    size = len(present)
    _check_int_within("trim", trim, f"0 <= 2 * trim < {size}", lambda t: 0 <= 2 * t < size)
    counts, means, m2s = stacked_parts(present, xp=xp)
    stds = xp.sqrt(m2s / xp.reshape(counts, (-1, 1)))
    # Ranks are the same in any unit; in units of the largest |mean| or deviation, no square
    # overflows.
    unit = _largest_magnitude(xp.stack([means, stds]), xp)
    unit = xp.reshape(xp.where(unit > 0, unit, xp.ones_like(unit)), (1, -1))
    means_in_units, stds_in_units = means / unit, stds / unit
    scores = _squared_distance(means_in_units, _median(means_in_units, xp), xp) + _squared_distance(
        stds_in_units, _median(stds_in_units, xp), xp
    )
    sorter = cast("_RobustNamespace", xp)
    ranks = sorter.argsort(sorter.argsort(scores, axis=0, stable=True), axis=0, stable=True)
    kept = ranks < size - trim
    zeros = xp.ones_like(means) * 0
    kept_counts = xp.where(kept, xp.reshape(counts, (-1, 1)) * xp.ones_like(means), zeros)
    # Dropped parts leave no trace: not in the sums, nor in the unit of huge means.
    mean, m2 = pool_columns(
        kept_counts, xp.where(kept, means, zeros), xp.where(kept, m2s, zeros), xp=xp
    )
    total = xp.sum(counts)
    return Moments(total_count, mean, m2 * (total / xp.sum(kept_counts, axis=0)))


def median_of_means_pool(
    parts: Sequence[Moments], /, *, groups: int, xp: ArrayNamespace | None = None
) -> Moments:
    r"""Pool the parts in ``groups`` groups exactly, then take the median of the groups.

    Part :math:`k` (of those with a positive count, in order) joins group :math:`k \bmod B`,
    :math:`B` = ``groups``. Each group is pooled exactly (:func:`~hbn_core.pool_moments`), and
    the result's mean and biased variance are, per channel, the medians of the :math:`B` group
    means and group variances (unweighted; the mean of the two middle values when :math:`B` is
    even). ``groups = 1`` is the exact pool; ``groups = K`` is the coordinate-wise median of
    the parts' means and variances (Yin et al., 2018). This is the median-of-means estimator
    (Nemirovski and Yudin; Lugosi and Mendelson, 2019) with the parts as its blocks.

    **What it tolerates.** ``f`` Byzantine parts when :math:`2f < B`: each corrupts one group
    at most, so most groups are honest, and each median lies within the honest groups' range.
    The pooled mean is then within the honest parts' range of means :math:`[\mu_{\min},
    \mu_{\max}]`, as the honest parts' exact pooled mean is, so the two differ by at most
    :math:`D_\mu = \mu_{\max} - \mu_{\min}`; the pooled variance lies in
    :math:`[s^2_{\min},\ s^2_{\max} + D_\mu^2]`, :math:`s_{\min}, s_{\max}` the extreme honest
    biased standard deviations, whatever the Byzantine parts report (count included). A subtle
    shift inside that range is not detectable.

    **Cost when all are honest.** The median of :math:`B` equal normal group means has
    efficiency :math:`2/\pi \approx 0.64` relative to their average for large :math:`B`, and
    about 0.74 for :math:`B = 3`. For 10 parts of equal size and one normal law it is measured
    at 0.74 (mean) and 0.74 (variance) with ``groups = 3``, 0.69 and 0.70 with ``groups = 5``,
    and 0.72 and 0.73 with ``groups = 10`` (``benchmarks/robust_pools.py``). Under non-IID
    data the median leans toward the typical group.

    Parameters
    ----------
    parts
        :class:`~hbn_core.Moments` with the same number of channels, from one namespace;
        parts with count 0 are left out.
    groups
        :math:`B`, with ``1 <= groups <= K``, ``K`` the parts with a positive count. Use
        :math:`2f + 1` to tolerate ``f`` Byzantine parts.
    xp
        The array namespace. By default it is inferred from the parts.

    Returns
    -------
    Moments
        ``count``: the total count of the parts; ``mean``: the median of the group means;
        ``m2``: the median of the group variances times ``count``.

    Raises
    ------
    TypeError
        As :func:`~hbn_core.pool_moments`; also if ``groups`` is no int, or the namespace
        cannot sort (TensorFlow tensors: pass NumPy arrays).
    ValueError
        As :func:`~hbn_core.pool_moments`; also if ``groups`` is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> from hbn_core import moments, variance
    >>> honest = [moments(np.array([[0.0], [2.0]]) + k / 10) for k in range(4)]
    >>> liar = moments(np.array([[1e6], [1e6 + 2]]))
    >>> exact = median_of_means_pool([*honest, liar], groups=1)  # one group: the exact pool
    >>> robust = median_of_means_pool([*honest, liar], groups=3)
    >>> exact.mean.round(2).tolist(), robust.mean.round(6).tolist(), variance(robust).tolist()
    ([200001.12], [1.2], [1.0225])
    """
    xp, total_count, present = _prepare(parts, xp)
    size = len(present)
    _check_int_within("groups", groups, f"1 <= groups <= {size}", lambda g: 1 <= g <= size)
    pooled = [pool_moments(present[g::groups], xp=xp) for g in range(groups)]
    counts, means, m2s = stacked_parts(pooled, xp=xp)
    variances = m2s / xp.reshape(counts, (-1, 1))
    total = xp.sum(counts)
    return Moments(total_count, _median(means, xp), _median(variances, xp) * total)


def _prepare(
    parts: Sequence[Moments], xp: ArrayNamespace | None
) -> tuple[ArrayNamespace, Array, list[Moments]]:
    """Check the parts; return the namespace, their total count and those with a count."""
    parts, xp = parts_and_namespace(parts, xp)
    if not (hasattr(xp, "sort") and hasattr(xp, "argsort")):
        msg = (
            "robust pools sort values: they need NumPy, array-api-strict, PyTorch or JAX "
            f"arrays; got arrays of {getattr(xp, '__name__', xp)} (convert them to NumPy)."
        )
        raise TypeError(msg)
    total_count = checked_total_count(parts, xp)
    return xp, total_count, [p for p in parts if int(p.count) > 0]


def _check_int_within(name: str, value: int, rule: str, within: Callable[[int], bool]) -> None:
    """Raise unless ``value`` is an int (not a bool) for which ``within`` holds (see ``rule``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"`{name}` must be an int; got {type(value).__name__} {value!r}."
        raise TypeError(msg)
    if not within(int(value)):
        msg = f"`{name}` must satisfy {rule} (the parts with a positive count); got {value}."
        raise ValueError(msg)


def _largest_magnitude(values: Array, xp: ArrayNamespace) -> Array:
    """The largest :math:`|v|` of ``(S, K, C)`` values, per channel: ``(C,)``."""
    magnitudes = xp.where(values < 0, -values, values)
    flat = xp.reshape(magnitudes, (-1, int(values.shape[-1])))
    return cast("_RobustNamespace", xp).max(flat, axis=0)


def _median(values: Array, xp: ArrayNamespace) -> Array:
    """The median of ``(K, C)`` values along axis 0; the mean of the two middle ones for even K."""
    ordered = cast("_RobustNamespace", xp).sort(values, axis=0)
    count = int(values.shape[0])
    upper = ordered[count // 2, ...]
    if count % 2:
        return upper
    return ordered[count // 2 - 1, ...] / 2 + upper / 2


def _squared_distance(values: Array, center: Array, xp: ArrayNamespace) -> Array:
    """:math:`(v_{kc} - c_c)^2` for ``(K, C)`` values and a ``(C,)`` center."""
    deviations = values - xp.reshape(center, (1, -1))
    return deviations * deviations
