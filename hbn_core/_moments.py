"""Exact per-channel moments and their exact pooling (the parallel merge of Chan et al.)."""

from __future__ import annotations

import functools
import math
import numbers
import operator
from typing import TYPE_CHECKING, NamedTuple

from hbn_core._namespace import concrete, namespace_of
from hbn_core._validation import check_floating, check_ndim, normalize_channel_axis

if TYPE_CHECKING:
    from collections.abc import Sequence

    from hbn_core._typing import Array, ArrayNamespace

__all__ = [
    "FLOAT32_MAX",
    "MAX_COUNT",
    "Moments",
    "check_moments",
    "merge_moments",
    "moments",
    "pool_moments",
    "variance",
]

MAX_COUNT = 2**53
"""The largest element count, of one set or pooled, that :func:`merge_moments` and
:func:`pool_moments` accept: float64, in which they weight the counts, holds every integer up to
:math:`2^{53}` exactly, and sums of such counts never wrap in int64."""

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32, :func:`check_moments`' default bound on means and variances."""

# Channels whose largest |mean| reaches this are pooled in units of that |mean| (see
# `_magnitude_scale`); below it nothing is rescaled, and the arithmetic is the plain one.
_RESCALE_FROM = 2.0**32
_UNITS = 4.0


class Moments(NamedTuple):
    r"""Exact per-channel moments of a set of samples: count, mean and sum of squared deviations.

    For the samples :math:`x_1, \dots, x_n` of one channel,

    .. math::

        \text{count} = n, \qquad
        \text{mean} = \frac{1}{n}\sum_{i=1}^{n} x_i, \qquad
        \text{m2} = \sum_{i=1}^{n} (x_i - \text{mean})^2 .

    ``m2`` is a sum, not a variance: :func:`variance` turns it into the population (biased,
    ``correction=0``) or the Bessel-corrected (``correction=1``) variance. Storing the sum keeps
    pooling exact (:func:`merge_moments`, :func:`pool_moments`).

    Attributes
    ----------
    count
        0-d integer array: the number of elements per channel (in an ``(N, C, H, W)`` batch,
        ``N * H * W``). It is the same for every channel.
    mean
        ``(C,)`` real floating array: the mean of each channel.
    m2
        ``(C,)`` real floating array, of the dtype of ``mean``: each channel's sum of squared
        deviations from ``mean``. An empty set has ``count == 0``, ``mean == 0`` and ``m2 == 0``.
    """

    count: Array
    mean: Array
    m2: Array


def moments(x: Array, /, *, channel_axis: int = 1, xp: ArrayNamespace | None = None) -> Moments:
    r"""Exact per-channel moments of ``x``, reduced over every axis but ``channel_axis``.

    Computed in two passes: the mean first, then the sum of squared deviations from it, never as
    :math:`\sum x^2 - n\,\bar x^2`.

    Parameters
    ----------
    x
        Real floating array with at least 2 dimensions, for example ``(N, C)`` or ``(N, C, H, W)``.
    channel_axis
        The axis of the channels: 1 for PyTorch layouts, -1 for Flax and Keras.
    xp
        The array namespace. By default it is inferred from ``x``.

    Returns
    -------
    Moments
        ``count`` is the number of elements reduced per channel, in the namespace's default
        integer dtype (int64, or int32 under JAX without x64). ``mean`` and ``m2`` have shape
        ``(C,)``. Their dtype, also that of the accumulators, is
        ``result_type(x.dtype, float32)``: float32 for float16, bfloat16 and float32 input,
        float64 for float64 input.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating array of a supported library, or ``channel_axis`` is no
        int.
    ValueError
        If ``x`` has fewer than 2 dimensions or ``channel_axis`` is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> m = moments(np.array([[1.0, 10.0], [3.0, 30.0]]))
    >>> int(m.count), m.mean.tolist(), m.m2.tolist()
    (2, [2.0, 20.0], [2.0, 200.0])
    """
    xp = namespace_of({"x": x}, xp)
    check_floating("x", x, xp)
    check_ndim("x", x, 2)
    axis = normalize_channel_axis(channel_axis, x.ndim)
    accumulate = xp.astype(x, xp.result_type(x.dtype, xp.float32), copy=False)
    count, mean, m2 = channel_moments(accumulate, axis, xp=xp)
    if isinstance(count, int):
        return Moments(xp.asarray(count), mean, m2)
    return Moments(xp.astype(count, xp.int64, copy=False), mean, m2)


def channel_moments(
    x: Array, channel_axis: int, *, xp: ArrayNamespace
) -> tuple[int | Array, Array, Array]:
    """Return the element count, mean and m2 of each channel of ``x``, in ``x``'s dtype.

    See :func:`moments` and :func:`element_count`; ``channel_axis`` must be non-negative here.
    """
    axes = tuple(i for i in range(x.ndim) if i != channel_axis)
    count = element_count(x, axes, xp=xp)
    if isinstance(count, int):
        mean = xp.sum(x, axis=axes) / max(count, 1)
    else:
        mean = xp.sum(x, axis=axes) / xp.where(count > 0, count, xp.ones_like(count))
    centered = x - xp.reshape(mean, broadcast_shape(x.ndim, channel_axis, -1))
    return count, mean, xp.sum(centered * centered, axis=axes)


def element_count(x: Array, axes: tuple[int, ...], *, xp: ArrayNamespace) -> int | Array:
    """The number of elements of ``x`` along ``axes``, per index of the other axes.

    A Python int when those dimensions are static, as they always are in NumPy, PyTorch and JAX.
    TensorFlow leaves a dimension unknown (``None``) inside a ``tf.function`` traced with relaxed
    shapes (Keras' ``model.fit`` retraces so for a last, smaller batch): then the count is a
    0-d array of ``x``'s dtype, computed from the data.
    """
    sizes = [x.shape[i] for i in axes]
    if all(size is not None for size in sizes):
        return math.prod(sizes)
    other_sizes = math.prod(x.shape[i] for i in range(x.ndim) if i not in axes)
    return xp.sum(xp.ones_like(x)) / other_sizes


def broadcast_shape(ndim: int, channel_axis: int, num_channels: int) -> tuple[int, ...]:
    """The shape that broadcasts a ``(num_channels,)`` vector along ``channel_axis``."""
    return tuple(num_channels if i == channel_axis else 1 for i in range(ndim))


def merge_moments(a: Moments, b: Moments, /, *, xp: ArrayNamespace | None = None) -> Moments:
    r"""Pool the moments of two disjoint sets exactly (the parallel merge of Chan et al., 1979).

    With :math:`n = n_a + n_b` and :math:`\delta = \bar x_b - \bar x_a`,

    .. math::

        \bar x = \bar x_a + \delta\,\frac{n_b}{n}, \qquad
        M_2 = M_{2,a} + M_{2,b} + \delta^2\,\frac{n_a n_b}{n} .

    The result equals the moments of the concatenated data, up to rounding. Merging is
    commutative and associative, and zero-count safe: merging with an empty :class:`Moments`
    (count 0, mean 0, m2 0) returns the other operand exactly. The mean is anchored on the
    larger part (:math:`\bar x_b - \delta\,n_a/n` when :math:`n_b > n_a`), and is the midpoint
    of the two means when the counts tie, so that ``merge_moments(a, b)`` equals
    ``merge_moments(b, a)`` bit for bit.

    No input that :func:`check_moments` accepts can make an intermediate overflow: counts are
    summed exactly or refused (beyond :data:`MAX_COUNT`), and a channel whose means reach
    :math:`2^{32}` in magnitude is merged in units of its largest mean. For any finite input the
    mean is finite and m2 is not negative (it is :math:`+\infty` only where its true value lies
    beyond the dtype's range).

    Parameters
    ----------
    a, b
        Moments with the same number of channels, from one namespace.
    xp
        The array namespace. By default it is inferred from the arguments.

    Returns
    -------
    Moments
        ``count`` is ``a.count + b.count``; ``mean`` and ``m2`` are computed in
        ``result_type`` of the four floating arrays (pass float64 moments for float64 pooling).

    Raises
    ------
    TypeError
        If an argument is not a :class:`Moments` of arrays of one namespace, its count is not
        integral, or its mean or m2 is not real floating.
    ValueError
        If the shapes are wrong, the channel counts differ, or a count is negative or the
        pooled count exceeds :data:`MAX_COUNT` or the counts' dtype (checked when the values are
        concrete; skipped for JAX and TensorFlow arrays, which may be traced).

    Examples
    --------
    >>> import numpy as np
    >>> data = np.array([[1.0], [2.0], [4.0], [9.0]])
    >>> m = merge_moments(moments(data[:1]), moments(data[1:]))
    >>> int(m.count), m.mean.tolist(), m.m2.tolist()
    (4, [4.0], [38.0])
    """
    xp = namespace_of({**_named_arrays("a", a), **_named_arrays("b", b)}, xp)
    num_channels = _check_structure("a", a, xp)
    _check_channels("b", b, num_channels, xp)
    count = _sum_counts({"a.count": a.count, "b.count": b.count})
    dtype = xp.result_type(a.mean, a.m2, b.mean, b.m2)
    count_a, count_b = xp.astype(a.count, dtype, copy=False), xp.astype(b.count, dtype, copy=False)
    total = count_a + count_b
    safe_total = xp.where(total > 0, total, xp.ones_like(total))
    frac_a, frac_b = count_a / safe_total, count_b / safe_total
    mean_a, mean_b = xp.astype(a.mean, dtype, copy=False), xp.astype(b.mean, dtype, copy=False)
    big, scale = _magnitude_scale(_larger(_magnitude(mean_a, xp), _magnitude(mean_b, xp), xp), xp)
    mean_a, mean_b = mean_a / scale, mean_b / scale
    delta = mean_b - mean_a
    # Anchor on the larger part, and take the midpoint on a tie: merge(a, b) == merge(b, a).
    mean = xp.where(
        frac_b > frac_a,
        mean_b - delta * frac_a,
        xp.where(frac_a > frac_b, mean_a + delta * frac_b, (mean_a + mean_b) / 2),
    )
    between = delta * delta * (count_a * count_b / safe_total) * scale * scale
    m2 = xp.astype(a.m2, dtype, copy=False) + xp.astype(b.m2, dtype, copy=False) + between
    return Moments(count, _clamp_units(mean, big, xp) * scale, m2)


def pool_moments(
    parts: Sequence[Moments],
    /,
    *,
    weights: Sequence[float] | Array | None = None,
    xp: ArrayNamespace | None = None,
) -> Moments:
    r"""Pool the moments of many disjoint sets at once.

    Without ``weights`` the result is exact pooling, the same as merging the parts pairwise
    with :func:`merge_moments` (up to rounding): with :math:`N = \sum_k n_k`,

    .. math::

        \bar x = \frac{1}{N}\sum_k n_k \bar x_k, \qquad
        M_2 = \sum_k M_{2,k} + \sum_k n_k (\bar x_k - \bar x)^2 .

    The between-part term uses deviations from the pooled mean, so pooling stays exact whatever
    the common offset of the data (never :math:`\sum x^2 - N\bar x^2`). It is overflow-safe as
    :func:`merge_moments` is: the pooled count is exact or refused, and for any finite input the
    mean is finite and m2 is not negative.

    With ``weights``, the pooled moments describe the **mixture** in which part :math:`k` has
    probability :math:`\pi_k = w_k / \sum_j w_j` (parts with count 0 get :math:`\pi_k = 0`),
    with :math:`v_k = M_{2,k}/n_k` the biased variance of part :math:`k`:

    .. math::

        \bar x = \sum_k \pi_k \bar x_k, \qquad
        M_2 = N \sum_k \pi_k \left(v_k + (\bar x_k - \bar x)^2\right),

    and the count stays :math:`N`, the number of elements observed, so that
    ``variance(result, correction=1)`` applies Bessel's correction to the real element count.
    Use it, for example, to weight clients by their dataset size although each reported the
    moments of a subset. ``weights`` proportional to the counts give exact pooling.

    Parameters
    ----------
    parts
        One or more :class:`Moments` with the same number of channels, from one namespace.
    weights
        Optional non-negative mixture weights, one per part, as a sequence of numbers or a 1-D
        array.
    xp
        The array namespace. By default it is inferred from the parts.

    Returns
    -------
    Moments
        ``count`` is the sum of the counts; ``mean`` and ``m2`` are computed in ``result_type``
        of the parts' floating arrays (pass float64 moments for float64 pooling).

    Raises
    ------
    TypeError
        As :func:`merge_moments`.
    ValueError
        If ``parts`` is empty, the channel counts differ, ``weights`` does not hold one entry per
        part, or (when the values are concrete) a count or weight is negative or not finite, the
        pooled count exceeds :data:`MAX_COUNT` or the counts' dtype, or the weights of the parts
        with a positive count sum to zero.

    Examples
    --------
    >>> import numpy as np
    >>> data = np.array([[1.0], [2.0], [4.0], [9.0]])
    >>> m = pool_moments([moments(data[:1]), moments(data[1:3]), moments(data[3:])])
    >>> int(m.count), m.mean.tolist(), m.m2.tolist()
    (4, [4.0], [38.0])
    """
    parts, xp = parts_and_namespace(parts, xp)
    total_count = checked_total_count(parts, xp)
    counts, means, m2s = stacked_parts(parts, xp=xp)
    if weights is not None:
        counts, m2s = _reweight(counts, m2s, weights, xp=xp)
    mean, m2 = pool_columns(xp.reshape(counts, (-1, 1)), means, m2s, xp=xp)
    return Moments(total_count, mean, m2)


def parts_and_namespace(
    parts: Sequence[Moments], xp: ArrayNamespace | None
) -> tuple[tuple[Moments, ...], ArrayNamespace]:
    """The parts as a tuple, and the namespace of all their arrays (``xp`` if given).

    Raises ``ValueError`` if ``parts`` is empty, and as :func:`namespace_of` if the arrays are
    of no one namespace.
    """
    parts = tuple(parts)
    if not parts:
        msg = "`parts` must hold at least one Moments; got an empty sequence."
        raise ValueError(msg)
    named = {
        k: v for i, part in enumerate(parts) for k, v in _named_arrays(f"parts[{i}]", part).items()
    }
    return parts, namespace_of(named, xp)


def checked_total_count(parts: Sequence[Moments], xp: ArrayNamespace) -> Array:
    """Check that every part is well formed with the first part's channels; their total count.

    Raises as :func:`merge_moments` for a malformed part, and ``ValueError`` if (when the
    counts are concrete) the total exceeds :data:`MAX_COUNT` or the counts' dtype.
    """
    num_channels = _check_structure("parts[0]", parts[0], xp)
    for i, part in enumerate(parts[1:], start=1):
        _check_channels(f"parts[{i}]", part, num_channels, xp)
    return _sum_counts({f"parts[{i}].count": p.count for i, p in enumerate(parts)})


def stacked_parts(parts: Sequence[Moments], *, xp: ArrayNamespace) -> tuple[Array, Array, Array]:
    """The parts' counts ``(K,)``, means ``(K, C)`` and m2s ``(K, C)``, in one floating dtype.

    The dtype is ``result_type`` of the parts' means and m2s. The parts must have been checked.
    """
    dtype = xp.result_type(*(p.mean for p in parts), *(p.m2 for p in parts))
    return (
        xp.stack([xp.astype(p.count, dtype, copy=False) for p in parts]),
        xp.stack([xp.astype(p.mean, dtype, copy=False) for p in parts]),
        xp.stack([xp.astype(p.m2, dtype, copy=False) for p in parts]),
    )


def pool_columns(
    counts: Array, means: Array, m2s: Array, *, xp: ArrayNamespace
) -> tuple[Array, Array]:
    r"""Pool ``(K, C)`` means and m2s exactly, channel by channel: the pooled mean and m2.

    ``counts`` is ``(K, 1)``, one count per part, or ``(K, C)``, a count per part and channel
    (0 leaves a part out of a channel; its m2 must then be 0 too). With
    :math:`N_c = \sum_k n_{kc}`,

    .. math::

        \bar x_c = \frac{1}{N_c}\sum_k n_{kc} \bar x_{kc}, \qquad
        M_{2,c} = \sum_k M_{2,kc} + \sum_k n_{kc} (\bar x_{kc} - \bar x_c)^2,

    computed in units of the largest mean where that is huge (:func:`_magnitude_scale`), so
    that no intermediate overflows. A channel with :math:`N_c = 0` gets mean 0.
    """
    magnitudes = _magnitude(means, xp)
    largest = functools.reduce(
        lambda a, b: _larger(a, b, xp), (magnitudes[k, ...] for k in range(int(means.shape[0])))
    )
    big, scale = _magnitude_scale(largest, xp)
    means = means / xp.reshape(scale, (1, -1))
    counts = counts * xp.ones_like(means)  # (K, C) either way: one computation, to the bit
    total = xp.sum(counts, axis=0)
    mean = xp.sum(counts * means, axis=0) / xp.where(total > 0, total, xp.ones_like(total))
    deviations = means - xp.reshape(mean, (1, -1))
    between = xp.sum(counts * deviations * deviations, axis=0) * scale * scale
    return _clamp_units(mean, big, xp) * scale, xp.sum(m2s, axis=0) + between


def _sum_counts(counts: dict[str, Array]) -> Array:
    """The sum of the named 0-d integer ``counts``, refused when it would not be exact.

    When the counts are concrete, the exact sum is taken in Python integers first: beyond
    :data:`MAX_COUNT`, or beyond the range of the counts' dtype (where the array sum wraps, as
    two int64 counts of :math:`2^{62}` do), it raises instead of returning a wrapped count.
    """
    total = functools.reduce(operator.add, counts.values())
    if not all(concrete(c) for c in counts.values()):
        return total
    exact = sum(int(c) for c in counts.values())
    if exact > MAX_COUNT or int(total) != exact:
        given = ", ".join(f"{name} = {int(c)}" for name, c in counts.items())
        msg = (
            f"the pooled count must be at most MAX_COUNT = 2**53 ({MAX_COUNT}), the largest "
            f"count pooled exactly in float64, and fit the counts' dtype ({total.dtype}); "
            f"got {exact} from {given}."
        )
        raise ValueError(msg)
    return total


def _magnitude(x: Array, xp: ArrayNamespace) -> Array:
    """:math:`|x|`, elementwise, with the functions every supported namespace has."""
    return xp.where(x < 0, -x, x)


def _larger(a: Array, b: Array, xp: ArrayNamespace) -> Array:
    """The elementwise maximum of ``a`` and ``b``."""
    return xp.where(a > b, a, b)


def _magnitude_scale(largest: Array, xp: ArrayNamespace) -> tuple[Array, Array]:
    r"""Per channel, whether the largest :math:`|\bar x_k|` is huge, and the unit to pool in.

    Where the largest magnitude :math:`M` of a channel's means reaches :math:`2^{32}`, the
    means are measured in units of :math:`u = M/4` before the products :math:`n_k \bar x_k` and
    :math:`n_k (\bar x_k - \bar x)^2` are formed, and the mean and the between-part term are
    multiplied back by :math:`u` and :math:`u^2`. No intermediate can then overflow (with counts
    up to :data:`MAX_COUNT`, the products stay below :math:`2^{53} \cdot 2^{66}`); only a result
    beyond the dtype's range rounds, to :math:`+\infty` for m2. (A quarter of :math:`M`, not
    :math:`M`: XLA divides by multiplying with the reciprocal and flushes subnormals, and
    :math:`1/M` is subnormal for :math:`M` near the largest float.) Elsewhere the unit is 1 and
    the arithmetic is exactly the plain one.
    """
    big = largest * (1 / _RESCALE_FROM) >= 1
    return big, xp.where(big, largest * (1 / _UNITS), xp.ones_like(largest))


def _clamp_units(mean: Array, big: Array, xp: ArrayNamespace) -> Array:
    """Where ``big``, clamp a mean measured in units of a quarter of the largest |mean|.

    A mean of means lies between the smallest and the largest of them, within [-4, 4] units;
    rounding could move it beyond, and so past the dtype's largest finite value once
    multiplied back.
    """
    bound = xp.ones_like(mean) * _UNITS
    clamped = xp.where(mean > bound, bound, xp.where(mean < -bound, -bound, mean))
    return xp.where(big, clamped, mean)


def _reweight(
    counts: Array, m2s: Array, weights: Sequence[float] | Array, *, xp: ArrayNamespace
) -> tuple[Array, Array]:
    r"""Effective counts :math:`N\pi_k` and the m2 of each part rescaled to them."""
    w = xp.asarray(weights, dtype=counts.dtype)
    if tuple(w.shape) != tuple(counts.shape):
        msg = (
            f"`weights` must hold one weight per part, shape {tuple(counts.shape)}; "
            f"got shape {tuple(w.shape)}."
        )
        raise ValueError(msg)
    if concrete(w) and (not bool(xp.all(xp.isfinite(w))) or bool(xp.any(w < 0))):
        msg = f"`weights` must be finite and >= 0; got {weights!r}."
        raise ValueError(msg)
    w = w * xp.astype(counts > 0, w.dtype, copy=False)
    if concrete(w) and not bool(xp.any(w > 0)):
        msg = f"`weights` must give a positive total to the parts with count > 0; got {weights!r}."
        raise ValueError(msg)
    total_count = xp.sum(counts)
    part_counts = total_count * w / xp.sum(w)
    scale = part_counts / xp.where(counts > 0, counts, xp.ones_like(counts))
    return part_counts, m2s * xp.reshape(scale, (-1, 1))


def variance(m: Moments, /, *, correction: float = 0, xp: ArrayNamespace | None = None) -> Array:
    r"""Per-channel variance from :class:`Moments`: :math:`\text{m2} / (\text{count} - c)`.

    Parameters
    ----------
    m
        The moments.
    correction
        :math:`c`, the degrees-of-freedom correction, named as in the Array API's ``var``:
        0 gives the population (biased) variance, the one batch normalisation divides by;
        1 gives the Bessel-corrected (unbiased) sample variance, the one ``torch`` keeps in
        ``running_var``.
    xp
        The array namespace. By default it is inferred from ``m``.

    Returns
    -------
    Array
        ``(C,)`` array of the dtype of ``m.m2``; NaN where ``count - correction <= 0``.

    Raises
    ------
    TypeError
        If ``m`` is not a valid :class:`Moments` or ``correction`` is not a real number.
    ValueError
        If ``correction`` is negative or not finite.

    Examples
    --------
    >>> import numpy as np
    >>> m = moments(np.array([[1.0], [2.0], [4.0], [9.0]]))
    >>> variance(m).tolist(), variance(m, correction=1).tolist()
    ([9.5], [12.666666666666666])
    """
    xp = namespace_of(_named_arrays("m", m), xp)
    _check_structure("m", m, xp)
    if isinstance(correction, bool) or not isinstance(correction, numbers.Real):
        msg = f"`correction` must be a real number; got {type(correction).__name__} {correction!r}."
        raise TypeError(msg)
    if not (math.isfinite(correction) and correction >= 0):
        msg = (
            f"`correction` must be finite and >= 0 (0: population, 1: Bessel); got {correction!r}."
        )
        raise ValueError(msg)
    dof = xp.astype(m.count, m.m2.dtype, copy=False) - correction
    positive = dof > 0
    ratio = m.m2 / xp.where(positive, dof, xp.ones_like(dof))
    return xp.where(positive, ratio, xp.asarray(math.nan, dtype=m.m2.dtype))


def check_moments(
    m: Moments,
    /,
    *,
    name: str = "moments",
    expected_count: int | None = None,
    max_abs: float | None = FLOAT32_MAX,
    xp: ArrayNamespace | None = None,
) -> Moments:
    r"""Check that ``m`` describes a real set of values, before anyone pools it.

    :func:`merge_moments` and :func:`pool_moments` check only structure and counts; this checks
    the values too, as a server does with the moments a client reports. Valid moments have:

    - a 0-d **integer** count (a float count such as 2.7 is refused, never truncated) with
      :math:`0 \le n \le` :data:`MAX_COUNT`, equal to ``expected_count`` when it is given;
    - ``(C,)`` real floating ``mean`` and ``m2``, every entry finite, and :math:`M_2 \ge 0`;
    - :math:`|\bar x| \le` ``max_abs`` and :math:`M_2 / n \le` ``max_abs`` (the biased variance),
      by default the largest float32: statistics that a float32 model cannot hold (a finite
      1e39 or 1e300) are refused here rather than rounded to infinity where they are used.
      ``max_abs=None`` checks finiteness only;
    - for an empty set (:math:`n = 0`), ``mean == 0`` and ``m2 == 0``, as :func:`moments`
      returns it: an empty part must not add to a pool's m2.

    The values are read eagerly: call it outside ``jax.jit`` and ``tf.function``.

    Parameters
    ----------
    m
        The moments to check.
    name
        How error messages name ``m``, for example ``"client 3's report of norm1"``.
    expected_count
        The count ``m`` must have, when the caller knows it (examples forwarded times elements
        per example of the layer).
    max_abs
        The bound on every mean's magnitude and every variance, or ``None``.
    xp
        The array namespace. By default it is inferred from ``m``.

    Returns
    -------
    Moments
        ``m`` itself, unchanged.

    Raises
    ------
    TypeError
        If ``m`` is not a :class:`Moments` of arrays of one namespace, its count is not integral
        or its mean or m2 is not real floating; or ``expected_count`` or ``max_abs`` has the
        wrong type.
    ValueError
        If a shape or a value breaks a rule above. The message names the field, the first
        offending channel, the rule and the value received.

    Examples
    --------
    >>> import numpy as np
    >>> m = moments(np.array([[1.0], [3.0]]))
    >>> check_moments(m, expected_count=2).count.tolist()
    2
    >>> check_moments(m._replace(mean=np.array([1e39])))
    Traceback (most recent call last):
    ...
    ValueError: `moments.mean` must have every |value| <= 3.4028234663852886e+38; got 1e+39 in channel 0.
    """  # noqa: E501
    xp = namespace_of(_named_arrays(name, m), xp)
    _check_structure(name, m, xp)
    if expected_count is not None and (
        isinstance(expected_count, bool) or not isinstance(expected_count, numbers.Integral)
    ):
        msg = f"`expected_count` must be an int or None; got {type(expected_count).__name__}."
        raise TypeError(msg)
    if max_abs is not None:
        if isinstance(max_abs, bool) or not isinstance(max_abs, numbers.Real):
            msg = f"`max_abs` must be a real number or None; got {type(max_abs).__name__}."
            raise TypeError(msg)
        if not max_abs > 0:  # NaN too
            msg = f"`max_abs` must be positive; got {max_abs!r}."
            raise ValueError(msg)
    count = int(m.count)
    if not 0 <= count <= MAX_COUNT:
        msg = f"`{name}.count` must be in [0, MAX_COUNT = 2**53]; got {count}."
        raise ValueError(msg)
    if expected_count is not None and count != expected_count:
        msg = f"`{name}.count` must be {expected_count}; got {count}."
        raise ValueError(msg)
    _check_values(f"{name}.mean", m.mean, "be finite", xp.isfinite(m.mean), xp)
    _check_values(f"{name}.m2", m.m2, "be finite", xp.isfinite(m.m2), xp)
    _check_values(f"{name}.m2", m.m2, "be >= 0", m.m2 >= 0, xp)
    if count == 0:
        _check_values(f"{name}.mean", m.mean, "be 0 for count 0", m.mean == 0, xp)
        _check_values(f"{name}.m2", m.m2, "be 0 for count 0", m.m2 == 0, xp)
    elif max_abs is not None:
        within = f"have every |value| <= {max_abs!r}"
        _check_values(f"{name}.mean", m.mean, within, _magnitude(m.mean, xp) <= max_abs, xp)
        var = m.m2 / count
        _check_values(f"{name}.m2 / count", var, f"be <= {max_abs!r}", var <= max_abs, xp)
    return m


def _check_values(name: str, x: Array, rule: str, ok: Array, xp: ArrayNamespace) -> None:
    """Raise :class:`ValueError` naming the first channel of ``x`` where ``ok`` is false."""
    if bool(xp.all(ok)):
        return
    channel = next(i for i in range(int(ok.shape[0])) if not bool(ok[i]))
    msg = f"`{name}` must {rule}; got {float(x[channel])!r} in channel {channel}."
    raise ValueError(msg)


def _named_arrays(name: str, m: Moments) -> dict[str, Array]:
    if not isinstance(m, Moments):
        msg = f"`{name}` must be a hbn_core.Moments; got {type(m).__name__}."
        raise TypeError(msg)
    return {f"{name}.count": m.count, f"{name}.mean": m.mean, f"{name}.m2": m.m2}


def _check_structure(name: str, m: Moments, xp: ArrayNamespace) -> int:
    """Check the dtypes, shapes and (when concrete) count of ``m``; return its channel count."""
    if tuple(m.count.shape) != ():
        msg = f"`{name}.count` must be a 0-d array; got shape {tuple(m.count.shape)}."
        raise ValueError(msg)
    if not xp.isdtype(m.count.dtype, "integral"):
        msg = f"`{name}.count` must have an integer dtype; got dtype {m.count.dtype}."
        raise TypeError(msg)
    check_floating(f"{name}.mean", m.mean, xp)
    check_floating(f"{name}.m2", m.m2, xp)
    if m.mean.ndim != 1:
        msg = f"`{name}.mean` must have shape (C,); got shape {tuple(m.mean.shape)}."
        raise ValueError(msg)
    if tuple(m.m2.shape) != tuple(m.mean.shape):
        msg = (
            f"`{name}.m2` must have the shape of `{name}.mean` {tuple(m.mean.shape)}; "
            f"got shape {tuple(m.m2.shape)}."
        )
        raise ValueError(msg)
    if concrete(m.count) and bool(m.count < 0):
        msg = f"`{name}.count` must be >= 0; got {m.count!r}."
        raise ValueError(msg)
    return int(m.mean.shape[0])


def _check_channels(name: str, m: Moments, num_channels: int, xp: ArrayNamespace) -> None:
    found = _check_structure(name, m, xp)
    if found != num_channels:
        msg = f"`{name}` must have {num_channels} channels, as the first operand; got {found}."
        raise ValueError(msg)
