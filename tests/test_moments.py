"""Properties of moments, merge_moments, pool_moments and variance, on every array library."""

from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hbn_core import (
    MAX_COUNT,
    Moments,
    check_moments,
    merge_moments,
    moments,
    pool_moments,
    variance,
)
from tests.backends import assert_close
from tests.strategies import chunks, floats, shapes_and_axis


def moments_of(backend, data: np.ndarray, channel_axis: int = 1) -> Moments:
    return moments(backend.asarray(data), channel_axis=channel_axis, **backend.kwargs)


def assert_moments_close(
    backend, actual: Moments, data: np.ndarray, *, rtol: float, atol: float = 0.0
):
    """``actual`` holds the moments of the (n, C) float64 array ``data``."""
    assert int(backend.to_numpy(actual.count)) == data.shape[0]
    mean = data.mean(axis=0) if data.shape[0] else np.zeros(data.shape[1])
    m2 = ((data - mean) ** 2).sum(axis=0)
    assert_close(backend, actual.mean, mean, rtol=rtol, atol=atol)
    assert_close(backend, actual.m2, m2, rtol=rtol, atol=atol * max(1, data.shape[0]))


@given(layout=shapes_and_axis(), data=st.data())
def test_moments_equal_numpy_mean_and_sum_of_squares(backend, layout, data):
    shape, channel_axis = layout
    x = data.draw(hnp.arrays(np.float64, shape, elements=floats(-1e3, 1e3)))
    result = moments_of(backend, x, channel_axis)
    axes = tuple(i for i in range(x.ndim) if i != channel_axis % x.ndim)
    mean = x.mean(axis=axes)
    assert int(backend.to_numpy(result.count)) == x.size // x.shape[channel_axis]
    assert_close(backend, result.mean, mean, rtol=1e-12, atol=1e-12, dtype="float64")
    m2 = ((x - np.expand_dims(mean, axes)) ** 2).sum(axis=axes)
    assert_close(backend, result.m2, m2, rtol=1e-10, atol=1e-9, dtype="float64")


@given(parts=chunks(min_size=2, max_size=2))
def test_merge_equals_moments_of_concatenation(backend, parts):
    a, b = parts
    merged = merge_moments(moments_of(backend, a), moments_of(backend, b), **backend.kwargs)
    assert_moments_close(backend, merged, np.concatenate(parts), rtol=1e-10, atol=1e-9)


@given(parts=chunks(min_size=3, max_size=3))
def test_merge_is_associative(backend, parts):
    a, b, c = (moments_of(backend, p) for p in parts)
    left = merge_moments(merge_moments(a, b, **backend.kwargs), c, **backend.kwargs)
    right = merge_moments(a, merge_moments(b, c, **backend.kwargs), **backend.kwargs)
    assert int(backend.to_numpy(left.count)) == int(backend.to_numpy(right.count))
    assert_close(backend, left.mean, backend.to_numpy(right.mean), rtol=1e-12, atol=1e-10)
    assert_close(backend, left.m2, backend.to_numpy(right.m2), rtol=1e-10, atol=1e-8)


@given(parts=chunks(min_size=2, max_size=2))
def test_merge_is_commutative(backend, parts):
    a, b = (moments_of(backend, p) for p in parts)
    ab = merge_moments(a, b, **backend.kwargs)
    ba = merge_moments(b, a, **backend.kwargs)
    assert_close(backend, ab.m2, backend.to_numpy(ba.m2), rtol=0)
    assert_close(backend, ab.mean, backend.to_numpy(ba.mean), rtol=0)


@given(parts=chunks(min_size=1, max_size=1), empty_first=st.booleans())
def test_merging_an_empty_set_returns_the_other_exactly(backend, parts, empty_first):
    (data,) = parts
    full = moments_of(backend, data)
    empty = moments_of(backend, data[:0])
    merged = (
        merge_moments(empty, full, **backend.kwargs)
        if empty_first
        else merge_moments(full, empty, **backend.kwargs)
    )
    assert int(backend.to_numpy(merged.count)) == data.shape[0]
    assert_close(backend, merged.mean, backend.to_numpy(full.mean), rtol=0)
    assert_close(backend, merged.m2, backend.to_numpy(full.m2), rtol=0)


@given(parts=chunks(min_size=1, max_size=6))
def test_pool_equals_pairwise_merge_and_concatenation(backend, parts):
    pieces = [moments_of(backend, p) for p in parts]
    pooled = pool_moments(pieces, **backend.kwargs)
    pairwise = functools.reduce(functools.partial(merge_moments, **backend.kwargs), pieces)
    assert_moments_close(backend, pooled, np.concatenate(parts), rtol=1e-10, atol=1e-9)
    assert_close(backend, pooled.mean, backend.to_numpy(pairwise.mean), rtol=1e-12, atol=1e-10)
    assert_close(backend, pooled.m2, backend.to_numpy(pairwise.m2), rtol=1e-10, atol=1e-8)


@given(parts=chunks(min_size=1, max_size=5), data=st.data())
def test_weighted_pool_describes_the_weighted_mixture(backend, parts, data):
    """Oracle: every element of part k weighs w_k / n_k in np.average over the concatenation."""
    weights = data.draw(st.lists(floats(0, 10), min_size=len(parts), max_size=len(parts)))
    sizes = np.array([p.shape[0] for p in parts])
    effective = np.where(sizes > 0, weights, 0.0)
    assume(effective.sum() > 0)  # zero total weight is an error, tested in test_errors.py
    pooled = pool_moments(
        [moments_of(backend, p) for p in parts], weights=weights, **backend.kwargs
    )
    concatenated = np.concatenate(parts)
    element_weights = np.repeat(effective / np.maximum(sizes, 1), sizes)
    mean = np.average(concatenated, axis=0, weights=element_weights)
    mixture_var = np.average((concatenated - mean) ** 2, axis=0, weights=element_weights)
    assert int(backend.to_numpy(pooled.count)) == sizes.sum()
    assert_close(backend, pooled.mean, mean, rtol=1e-10, atol=1e-9)
    assert_close(backend, pooled.m2, sizes.sum() * mixture_var, rtol=1e-9, atol=1e-7)


@given(parts=chunks(min_size=1, max_size=5))
def test_weights_equal_to_counts_give_exact_pooling(backend, parts):
    pieces = [moments_of(backend, p) for p in parts]
    weights = [float(p.shape[0]) for p in parts]
    assume(sum(weights) > 0)
    weighted = pool_moments(pieces, weights=weights, **backend.kwargs)
    exact = pool_moments(pieces, **backend.kwargs)
    assert_close(backend, weighted.mean, backend.to_numpy(exact.mean), rtol=1e-12, atol=1e-10)
    assert_close(backend, weighted.m2, backend.to_numpy(exact.m2), rtol=1e-10, atol=1e-8)


@given(parts=chunks(min_size=1, max_size=1), correction=st.sampled_from([0, 1, 0.5]))
def test_variance_applies_the_stated_correction(backend, parts, correction):
    (data,) = parts
    result = backend.to_numpy(
        variance(moments_of(backend, data), correction=correction, **backend.kwargs)
    )
    if data.shape[0] - correction <= 0:
        assert np.isnan(result).all()
    else:
        np.testing.assert_allclose(
            result, np.var(data, axis=0, ddof=correction), rtol=1e-10, atol=1e-10
        )


def test_pooling_is_exact_at_a_large_common_offset(backend):
    """Chunks with mean 1e6 and unit variance keep the Bessel-corrected variance to 1e-9."""
    rng = np.random.default_rng(0)
    parts = [1e6 + rng.standard_normal((n, 3)) for n in (1, 50, 7, 300, 2)]
    pooled = pool_moments([moments_of(backend, p) for p in parts], **backend.kwargs)
    expected = np.var(np.concatenate(parts) - 1e6, axis=0, ddof=1)
    assert_close(backend, variance(pooled, correction=1, **backend.kwargs), expected, rtol=1e-9)


def test_float32_chunks_at_offset_1e4_pool_to_1e3(backend):
    rng = np.random.default_rng(1)
    parts = [(1e4 + rng.standard_normal((n, 4))).astype(np.float32) for n in (64, 3, 500, 1, 128)]
    pieces = [moments(backend.asarray(p), **backend.kwargs) for p in parts]
    pooled = pool_moments(pieces, **backend.kwargs)
    expected = np.var(np.concatenate(parts).astype(np.float64), axis=0, ddof=1)
    assert_close(
        backend,
        variance(pooled, correction=1, **backend.kwargs),
        expected,
        rtol=1e-3,
        dtype="float32",
    )


@pytest.mark.parametrize(
    ("dtype", "accumulator"),
    [("float16", "float32"), ("float32", "float32"), ("float64", "float64")],
)
def test_moments_accumulate_in_float32_or_wider(backend, dtype, accumulator):
    if dtype == "float16" and backend.name == "array_api_strict":
        pytest.skip("array-api-strict has no float16")
    result = moments(backend.asarray(np.arange(12.0).reshape(4, 3), dtype=dtype), **backend.kwargs)
    assert_close(backend, result.mean, np.array([4.5, 5.5, 6.5]), rtol=1e-6, dtype=accumulator)
    assert_close(backend, result.m2, np.full(3, 45.0), rtol=1e-6, dtype=accumulator)


# --- Overflow-safe pooling and the validation of reported moments ---------------------------

CONCRETE = ("numpy", "numpy_readonly", "array_api_strict", "torch")
EPS64 = Fraction(2) ** -52
FLOAT64_MAX = Fraction(np.finfo(np.float64).max)


def backend_moments(backend, count: int, mean, m2) -> Moments:
    return Moments(
        backend.asarray(np.asarray(count, np.int64)),
        backend.asarray(np.asarray(mean, np.float64)),
        backend.asarray(np.asarray(m2, np.float64)),
    )


def concrete_only(backend) -> None:
    if backend.name not in CONCRETE:
        pytest.skip(f"{backend.name} arrays may be traced: counts are not read (documented)")


@pytest.mark.parametrize("pool", ["merge", "pool"])
def test_counts_that_would_wrap_int64_are_refused(backend, pool):
    """Two counts of 2**62 wrapped to a negative pooled count, hence a negative variance."""
    concrete_only(backend)
    parts = [
        backend_moments(backend, 2**62, [0.0], [1.0]),
        backend_moments(backend, 2**62, [1.0], [1.0]),
    ]
    pool = (
        functools.partial(merge_moments, *parts)
        if pool == "merge"
        else functools.partial(pool_moments, parts)
    )
    with pytest.raises(ValueError, match=r"at most MAX_COUNT = 2\*\*53 .* got 9223372036854775808"):
        pool(**backend.kwargs)


def test_the_count_bound_is_exactly_max_count(backend):
    concrete_only(backend)
    half = backend_moments(backend, MAX_COUNT // 2, [1.0], [2.0])
    pooled = pool_moments([half, half], **backend.kwargs)
    assert int(backend.to_numpy(pooled.count)) == MAX_COUNT == 2**53
    assert backend.to_numpy(variance(pooled, **backend.kwargs))[0] > 0
    one = backend_moments(backend, 1, [1.0], [0.0])
    with pytest.raises(ValueError, match=r"got 9007199254740993 from parts\[0\].count = "):
        pool_moments([half, half, one], **backend.kwargs)


def test_counts_that_would_wrap_their_own_dtype_are_refused():
    part = Moments(np.asarray(2**30, np.int32), np.zeros(1), np.ones(1))
    with pytest.raises(ValueError, match=r"fit the counts' dtype \(int32\); got 3221225472"):
        pool_moments([part, part, part])


@pytest.mark.parametrize("call", ["merge", "pool", "check"])
def test_a_float_count_is_refused_not_truncated(call):
    part = Moments(np.asarray(2.7), np.zeros(2), np.ones(2))
    good = moments(np.ones((3, 2)))
    calls = {
        "merge": lambda: merge_moments(part, good),
        "pool": lambda: pool_moments([good, part]),
        "check": lambda: check_moments(part),
    }
    with pytest.raises(TypeError, match=r"count` must have an integer dtype; got dtype float64"):
        calls[call]()


@st.composite
def absurd_parts(draw: st.DrawFn, *, min_size: int = 1, max_size: int = 5) -> list[tuple]:
    """(count, means, m2s) of 1 to 5 parts: any finite float64 values, counts up to 2**53."""
    channels = draw(st.integers(1, 3))
    size = draw(st.integers(min_size, max_size))
    count_limit = MAX_COUNT // size
    any_float = st.floats(allow_nan=False, allow_infinity=False)
    parts = []
    for _ in range(size):
        count = draw(st.one_of(st.integers(0, 5), st.integers(0, count_limit)))
        if count == 0:
            parts.append((0, [0.0] * channels, [0.0] * channels))
            continue
        means = draw(st.lists(any_float, min_size=channels, max_size=channels))
        m2s = draw(st.lists(any_float.map(abs), min_size=channels, max_size=channels))
        parts.append((count, means, m2s))
    return parts


def exact_pool(parts: list[tuple], channel: int) -> tuple[Fraction, Fraction, Fraction, Fraction]:
    """Exact rational pooled mean and m2 of one channel, and the rounding they may suffer."""
    counts = [Fraction(n) for n, _, _ in parts]
    means = [Fraction(m[channel]) for _, m, _ in parts]
    m2s = [Fraction(v[channel]) for _, _, v in parts]
    total = sum(counts)
    mean = sum(n * m for n, m in zip(counts, means, strict=True)) / total if total else Fraction(0)
    deviations = [m - mean for m in means]
    between = sum(n * d * d for n, d in zip(counts, deviations, strict=True))
    largest = max(abs(m) for m in means)
    k = len(parts)
    mean_error = 4 * (k + 1) * EPS64 * largest
    delta = 4 * (k + 2) * EPS64 * largest  # error of a computed deviation
    spread = sum(n * abs(d) for n, d in zip(counts, deviations, strict=True))
    m2 = sum(m2s) + between
    underflow = Fraction(2) ** -1000  # squares of tiny deviations flush to zero
    m2_error = 4 * k * EPS64 * m2 + 2 * delta * spread + total * delta * delta + underflow
    return mean, mean_error, m2, m2_error


@given(parts=absurd_parts(min_size=1, max_size=5), merge=st.booleans())
def test_pooling_absurd_finite_moments_never_gives_nan_or_a_negative_m2(backend, parts, merge):
    """Oracle: exact rational arithmetic.

    A finite result is within the float64 rounding bound of the exact one; m2 is +inf only where
    the exact m2 (plus that bound) leaves float64.
    """
    assume(not merge or len(parts) == 2)
    pieces = [backend_moments(backend, *part) for part in parts]
    with np.errstate(over="ignore", under="ignore"):
        if merge:
            pooled = merge_moments(*pieces, **backend.kwargs)
        else:
            pooled = pool_moments(pieces, **backend.kwargs)
    mean, m2 = backend.to_numpy(pooled.mean), backend.to_numpy(pooled.m2)
    assert int(backend.to_numpy(pooled.count)) == sum(n for n, _, _ in parts)
    assert np.isfinite(mean).all()
    assert not np.isnan(m2).any()
    assert (m2 >= 0).all()
    for channel in range(mean.shape[0]):
        exact_mean, mean_error, exact_m2, m2_error = exact_pool(parts, channel)
        assert abs(Fraction(mean[channel]) - exact_mean) <= mean_error
        if np.isfinite(m2[channel]):
            assert abs(Fraction(m2[channel]) - exact_m2) <= m2_error
        else:
            assert exact_m2 + m2_error >= FLOAT64_MAX


@given(parts=chunks(min_size=1, max_size=5))
def test_pool_equals_concatenation_at_magnitudes_pooled_in_units_of_the_largest_mean(
    backend, parts
):
    """Data of magnitude up to 1e123 take the rescaled path and stay exact to rounding.

    Oracle: the exact rational moments of the concatenated data.
    """
    scaled = [p * 1e120 for p in parts]
    pooled = pool_moments([moments_of(backend, p) for p in scaled], **backend.kwargs)
    data = np.concatenate(scaled)
    mean, m2 = backend.to_numpy(pooled.mean), backend.to_numpy(pooled.m2)
    assert int(backend.to_numpy(pooled.count)) == len(data)
    for channel in range(data.shape[1]):
        values = [Fraction(v) for v in data[:, channel]]
        exact_mean = sum(values) / len(values) if values else Fraction(0)
        exact_m2 = sum((v - exact_mean) ** 2 for v in values)
        rounding = 64 * EPS64 * max((abs(v) for v in values), default=Fraction(0))
        assert abs(Fraction(mean[channel]) - exact_mean) <= rounding
        underflow = Fraction(2) ** -1000  # squares of tiny deviations flush to zero
        tolerance = 64 * EPS64 * exact_m2 + len(values) * rounding * rounding + underflow
        assert abs(Fraction(m2[channel]) - exact_m2) <= tolerance


def test_check_moments_accepts_the_moments_of_data_and_returns_them(backend):
    m = moments_of(backend, np.array([[1.0, -2.0], [3.0, 5.0], [2.0, 0.0]]))
    assert check_moments(m, expected_count=3, **backend.kwargs) is m
    empty = moments_of(backend, np.zeros((0, 2)))
    assert check_moments(empty, expected_count=0, **backend.kwargs) is empty


@pytest.mark.parametrize(
    ("count", "mean", "m2", "options", "pattern"),
    [
        (
            4,
            [1e39, 0.0],
            [1.0, 1.0],
            {},
            r"`r.mean` must have every \|value\| <= 3.40282.*e\+38; got 1e\+39 in channel 0",
        ),
        (
            4,
            [0.0, -1e300],
            [1.0, 1.0],
            {},
            r"`r.mean` must have every \|value\| <= .*; got -1e\+300 in channel 1",
        ),
        (
            4,
            [0.0, 0.0],
            [1.0, 4e39],
            {},
            r"`r.m2 / count` must be <= 3.4028234663852886e\+38; got 1e\+39 in channel 1",
        ),
        (4, [0.0, 0.0], [1.0, -0.5], {}, r"`r.m2` must be >= 0; got -0.5 in channel 1"),
        (4, [np.nan, 0.0], [1.0, 1.0], {}, r"`r.mean` must be finite; got nan in channel 0"),
        (4, [0.0, 0.0], [np.inf, 1.0], {}, r"`r.m2` must be finite; got inf in channel 0"),
        (
            2**62,
            [0.0, 0.0],
            [1.0, 1.0],
            {},
            r"`r.count` must be in \[0, MAX_COUNT = 2\*\*53\]; got 4611686018427387904",
        ),
        (-1, [0.0, 0.0], [0.0, 0.0], {}, r"`r.count` must be >= 0; got"),
        (4, [0.0, 0.0], [1.0, 1.0], {"expected_count": 12}, r"`r.count` must be 12; got 4"),
        (0, [0.0, 0.0], [0.0, 3.0], {}, r"`r.m2` must be 0 for count 0; got 3.0 in channel 1"),
        (0, [2.0, 0.0], [0.0, 0.0], {}, r"`r.mean` must be 0 for count 0; got 2.0 in channel 0"),
        (
            4,
            [0.0, 20.0],
            [1.0, 1.0],
            {"max_abs": 10.0},
            r"`r.mean` must have every \|value\| <= 10.0; got 20.0 in channel 1",
        ),
    ],
)
def test_check_moments_names_what_is_wrong(count, mean, m2, options, pattern):
    report = Moments(np.asarray(count, np.int64), np.asarray(mean), np.asarray(m2))
    with pytest.raises(ValueError, match=pattern):
        check_moments(report, name="r", **options)


def test_check_moments_without_a_bound_accepts_finite_absurd_values():
    report = Moments(np.asarray(2), np.array([1e300]), np.array([1e307]))
    assert check_moments(report, max_abs=None) is report


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"expected_count": 2.0}, TypeError, r"`expected_count` must be an int or None; got float"),
        ({"expected_count": True}, TypeError, r"`expected_count` must be an int or None; got bool"),
        ({"max_abs": "big"}, TypeError, r"`max_abs` must be a real number or None; got str"),
        ({"max_abs": float("nan")}, ValueError, r"`max_abs` must be positive; got nan"),
        ({"max_abs": 0.0}, ValueError, r"`max_abs` must be positive; got 0.0"),
    ],
)
def test_check_moments_refuses_bad_options(options, error, pattern):
    with pytest.raises(error, match=pattern):
        check_moments(moments(np.ones((2, 1))), **options)


def test_check_moments_reads_every_backend(backend):
    bad = backend_moments(backend, 3, [0.0, 1e39], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"got 1e\+39 in channel 1"):
        check_moments(bad, **backend.kwargs)
