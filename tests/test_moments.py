"""Properties of moments, merge_moments, pool_moments and variance, on every array library."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hbn_core import Moments, merge_moments, moments, pool_moments, variance
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
