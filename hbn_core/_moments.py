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

__all__ = ["Moments", "merge_moments", "moments", "pool_moments", "variance"]


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
        If the shapes are wrong, the channel counts differ, or a count is negative (checked when
        the values are concrete; skipped for JAX and TensorFlow arrays, which may be traced).

    Examples
    --------
    >>> import numpy as np
    >>> data = np.array([[1.0], [2.0], [4.0], [9.0]])
    >>> m = merge_moments(moments(data[:1]), moments(data[1:]))
    >>> int(m.count), m.mean.tolist(), m.m2.tolist()
    (4, [4.0], [38.0])
    """
    xp = namespace_of({**_named_arrays("a", a), **_named_arrays("b", b)}, xp)
    num_channels = check_moments("a", a, xp)
    _check_channels("b", b, num_channels, xp)
    dtype = xp.result_type(a.mean, a.m2, b.mean, b.m2)
    count_a, count_b = xp.astype(a.count, dtype, copy=False), xp.astype(b.count, dtype, copy=False)
    total = count_a + count_b
    safe_total = xp.where(total > 0, total, xp.ones_like(total))
    frac_a, frac_b = count_a / safe_total, count_b / safe_total
    mean_a, mean_b = xp.astype(a.mean, dtype, copy=False), xp.astype(b.mean, dtype, copy=False)
    delta = mean_b - mean_a
    # Anchor on the larger part, and take the midpoint on a tie: merge(a, b) == merge(b, a).
    mean = xp.where(
        frac_b > frac_a,
        mean_b - delta * frac_a,
        xp.where(frac_a > frac_b, mean_a + delta * frac_b, (mean_a + mean_b) / 2),
    )
    m2 = (
        xp.astype(a.m2, dtype, copy=False)
        + xp.astype(b.m2, dtype, copy=False)
        + delta * delta * (count_a * count_b / safe_total)
    )
    return Moments(a.count + b.count, mean, m2)


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
    the common offset of the data (never :math:`\sum x^2 - N\bar x^2`).

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
        part, or (when the values are concrete) a count or weight is negative or not finite, or
        the weights of the parts with a positive count sum to zero.

    Examples
    --------
    >>> import numpy as np
    >>> data = np.array([[1.0], [2.0], [4.0], [9.0]])
    >>> m = pool_moments([moments(data[:1]), moments(data[1:3]), moments(data[3:])])
    >>> int(m.count), m.mean.tolist(), m.m2.tolist()
    (4, [4.0], [38.0])
    """
    parts = tuple(parts)
    if not parts:
        msg = "`parts` must hold at least one Moments; got an empty sequence."
        raise ValueError(msg)
    named = {
        k: v for i, part in enumerate(parts) for k, v in _named_arrays(f"parts[{i}]", part).items()
    }
    xp = namespace_of(named, xp)
    num_channels = check_moments("parts[0]", parts[0], xp)
    for i, part in enumerate(parts[1:], start=1):
        _check_channels(f"parts[{i}]", part, num_channels, xp)

    dtype = xp.result_type(*(p.mean for p in parts), *(p.m2 for p in parts))
    counts = xp.stack([xp.astype(p.count, dtype, copy=False) for p in parts])
    means = xp.stack([xp.astype(p.mean, dtype, copy=False) for p in parts])
    m2s = xp.stack([xp.astype(p.m2, dtype, copy=False) for p in parts])
    total_count = functools.reduce(operator.add, (p.count for p in parts))

    if weights is None:
        part_counts, part_m2s = counts, m2s
    else:
        part_counts, part_m2s = _reweight(counts, m2s, weights, xp=xp)
    total = xp.sum(part_counts)
    column = xp.reshape(part_counts, (-1, 1))
    mean = xp.sum(column * means, axis=0) / xp.where(total > 0, total, xp.ones_like(total))
    deviations = means - xp.reshape(mean, (1, -1))
    between = xp.sum(column * deviations * deviations, axis=0)
    return Moments(total_count, mean, xp.sum(part_m2s, axis=0) + between)


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
    check_moments("m", m, xp)
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


def _named_arrays(name: str, m: Moments) -> dict[str, Array]:
    if not isinstance(m, Moments):
        msg = f"`{name}` must be a hbn_core.Moments; got {type(m).__name__}."
        raise TypeError(msg)
    return {f"{name}.count": m.count, f"{name}.mean": m.mean, f"{name}.m2": m.m2}


def check_moments(name: str, m: Moments, xp: ArrayNamespace) -> int:
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
    found = check_moments(name, m, xp)
    if found != num_channels:
        msg = f"`{name}` must have {num_channels} channels, as the first operand; got {found}."
        raise ValueError(msg)
