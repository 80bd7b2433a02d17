"""The robust pools: exact when nothing is trimmed, bounded by the honest parts under attack.

The bounds are those the docstrings derive, computed from the honest parts alone: whatever the
Byzantine parts report, the robust result must stay inside them. The exact pool is checked to
leave them under the same attacks, so the bounds are not vacuous.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import import_framework
from hbn_core import (
    Moments,
    median_of_means_pool,
    moments,
    pool_moments,
    trimmed_pool,
    variance,
)
from tests.backends import assert_close
from tests.strategies import floats

SORTING_BACKENDS = ("numpy", "numpy_readonly", "array_api_strict", "torch", "jax")


def report(count: int, mean: list[float] | np.ndarray, std: list[float] | np.ndarray) -> Moments:
    """Moments of ``count`` elements per channel with these means and biased deviations."""
    std = np.asarray(std, np.float64)
    return Moments(np.asarray(count, np.int64), np.asarray(mean, np.float64), count * std * std)


class HonestEnvelope(NamedTuple):
    """What the honest parts alone determine, per channel."""

    mean: np.ndarray  # their exact pooled mean
    var: np.ndarray  # their exact pooled biased variance
    mean_lo: np.ndarray
    mean_hi: np.ndarray
    std_lo: np.ndarray
    std_hi: np.ndarray

    @property
    def radius(self) -> np.ndarray:
        """R = sqrt(D_mu**2 + D_s**2), from the ranges of honest means and deviations."""
        return np.hypot(self.mean_hi - self.mean_lo, self.std_hi - self.std_lo)

    @property
    def slack(self) -> np.ndarray:
        """Room for float64 rounding, relative to the magnitudes involved."""
        magnitude = np.maximum(np.abs(self.mean_lo), np.abs(self.mean_hi)) + self.std_hi
        return 1e-9 * (magnitude + self.radius) + 1e-300


def envelope(honest: list[Moments]) -> HonestEnvelope:
    means = np.stack([m.mean for m in honest])
    stds = np.sqrt(np.stack([m.m2 / m.count for m in honest]))
    pooled = pool_moments(honest)
    return HonestEnvelope(
        pooled.mean, variance(pooled), means.min(0), means.max(0), stds.min(0), stds.max(0)
    )


def within_trimmed_bounds(result: Moments, honest: HonestEnvelope) -> bool:
    """|mean - honest mean| <= 2R; var in [max(0, s_min - R)**2, (s_max + R)**2 + 4R**2]."""
    radius, slack = honest.radius, honest.slack
    var = variance(result)
    low = np.maximum(honest.std_lo - radius, 0) ** 2
    high = (honest.std_hi + radius) ** 2 + 4 * radius**2
    return bool(
        np.all(np.abs(result.mean - honest.mean) <= 2 * radius + slack)
        and np.all(var >= low - slack * (honest.std_hi + radius))
        and np.all(var <= high + slack * (honest.std_hi + radius) + slack**2)
    )


def within_median_of_means_bounds(result: Moments, honest: HonestEnvelope) -> bool:
    """Mean in [mu_min, mu_max]; var in [s_min**2, s_max**2 + D_mu**2]."""
    slack, var = honest.slack, variance(result)
    spread = honest.mean_hi - honest.mean_lo
    high = honest.std_hi**2 + spread**2
    return bool(
        np.all(result.mean >= honest.mean_lo - slack)
        and np.all(result.mean <= honest.mean_hi + slack)
        and np.all(var >= honest.std_lo**2 - slack * honest.std_hi)
        and np.all(var <= high + slack * (honest.std_hi + spread) + slack**2)
    )


# --- Exact where nothing is robustified ------------------------------------------------------


@st.composite
def nonempty_chunks(draw: st.DrawFn, *, min_size: int = 1, max_size: int = 8) -> list[np.ndarray]:
    """1 to 8 arrays (n_i >= 1, C) of one channel count."""
    channels = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 7), min_size=min_size, max_size=max_size))
    return [draw(hnp.arrays(np.float64, (n, channels), elements=floats(-1e3, 1e3))) for n in sizes]


@pytest.fixture
def sorting_backend(backend):
    if backend.name not in SORTING_BACKENDS:
        pytest.skip(f"{backend.name} cannot sort: refused, tested below")
    return backend


@given(parts=nonempty_chunks())
def test_trim_zero_is_the_exact_pool_bit_for_bit(sorting_backend, parts):
    b = sorting_backend
    pieces = [moments(b.asarray(p), **b.kwargs) for p in parts]
    exact = pool_moments(pieces, **b.kwargs)
    trimmed = trimmed_pool(pieces, trim=0, **b.kwargs)
    assert int(b.to_numpy(trimmed.count)) == int(b.to_numpy(exact.count))
    np.testing.assert_array_equal(b.to_numpy(trimmed.mean), b.to_numpy(exact.mean))
    np.testing.assert_array_equal(b.to_numpy(trimmed.m2), b.to_numpy(exact.m2))


@given(parts=nonempty_chunks())
def test_one_group_is_the_exact_pool(sorting_backend, parts):
    b = sorting_backend
    pieces = [moments(b.asarray(p), **b.kwargs) for p in parts]
    exact = pool_moments(pieces, **b.kwargs)
    pooled = median_of_means_pool(pieces, groups=1, **b.kwargs)
    assert int(b.to_numpy(pooled.count)) == int(b.to_numpy(exact.count))
    np.testing.assert_array_equal(b.to_numpy(pooled.mean), b.to_numpy(exact.mean))
    assert_close(b, pooled.m2, b.to_numpy(exact.m2), rtol=1e-14, atol=1e-9)


@given(parts=nonempty_chunks(min_size=3), data=st.data())
def test_pools_agree_with_numpy_on_every_sorting_backend(sorting_backend, parts, data):
    b = sorting_backend
    trim = data.draw(st.integers(0, (len(parts) - 1) // 2))
    groups = data.draw(st.integers(1, len(parts)))
    on_numpy = [moments(p) for p in parts]
    pieces = [moments(b.asarray(p), **b.kwargs) for p in parts]
    for pool, options in (
        (trimmed_pool, {"trim": trim}),
        (median_of_means_pool, {"groups": groups}),
    ):
        expected = pool(on_numpy, **options)
        actual = pool(pieces, **options, **b.kwargs)
        assert_close(b, actual.mean, expected.mean, rtol=1e-12, atol=1e-9)
        assert_close(b, actual.m2, expected.m2, rtol=1e-10, atol=1e-7)


@given(parts=nonempty_chunks(min_size=3), empties=st.lists(st.integers(0, 8), max_size=3))
def test_parts_with_count_zero_are_left_out(parts, empties):
    pieces = [moments(p) for p in parts]
    with_empties = list(pieces)
    for position in empties:
        with_empties.insert(
            min(position, len(with_empties)), moments(np.zeros((0, parts[0].shape[1])))
        )
    trim, groups = (len(parts) - 1) // 2, len(parts)
    for pool, options in (
        (trimmed_pool, {"trim": trim}),
        (median_of_means_pool, {"groups": groups}),
    ):
        expected, actual = pool(pieces, **options), pool(with_empties, **options)
        assert int(actual.count) == int(expected.count)
        np.testing.assert_array_equal(actual.mean, expected.mean)
        np.testing.assert_array_equal(actual.m2, expected.m2)


@given(
    parts=nonempty_chunks(min_size=3),
    position=st.integers(0, 8),
    magnitude=st.sampled_from([1e6, 1e30, 1e300]),
)
def test_a_dropped_part_leaves_no_trace(parts, position, magnitude):
    """One far-away liar, trimmed: the honest pool to rounding, whatever the liar's magnitude.

    (Had its 1e300 mean set the unit of the pool, the honest deviations would underflow.)
    """
    honest = [moments(p) for p in parts]
    liar = report(7, np.full(parts[0].shape[1], magnitude), np.ones(parts[0].shape[1]))
    trimmed = trimmed_pool([*honest[:position], liar, *honest[position:]], trim=1)
    exact = pool_moments(honest)
    np.testing.assert_allclose(trimmed.mean, exact.mean, rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(variance(trimmed), variance(exact), rtol=1e-13, atol=1e-300)


# --- Byzantine parts ------------------------------------------------------------------------


@st.composite
def federations(draw: st.DrawFn) -> tuple[list[Moments], list[Moments], list[int]]:
    """Honest reports, f Byzantine ones, and where to put them: (honest, byzantine, positions).

    Honest reports have varied location and spread; Byzantine ones any finite value, counts too.
    """
    channels = draw(st.integers(1, 3))
    honest_size = draw(st.integers(2, 9))
    byzantine_size = draw(st.integers(0, honest_size - 1))

    def vector(low: float, high: float) -> np.ndarray:
        return draw(hnp.arrays(np.float64, (channels,), elements=floats(low, high)))

    honest = [
        report(draw(st.integers(1, 1000)), vector(-100, 100), vector(0, 10))
        for _ in range(honest_size)
    ]
    byzantine = [
        report(draw(st.integers(1, 2**40)), vector(-1e30, 1e30), vector(0, 1e15))
        for _ in range(byzantine_size)
    ]
    positions = [draw(st.integers(0, honest_size + i)) for i in range(byzantine_size)]
    return honest, byzantine, positions


def interleave(honest: list[Moments], byzantine: list[Moments], positions: list[int]) -> list:
    parts = list(honest)
    for part, position in zip(byzantine, positions, strict=True):
        parts.insert(position, part)
    return parts


@given(federation=federations(), data=st.data())
def test_trimmed_pool_stays_within_the_honest_bound(federation, data):
    honest, byzantine, positions = federation
    parts = interleave(honest, byzantine, positions)
    trim = data.draw(st.integers(len(byzantine), (len(parts) - 1) // 2))
    assert within_trimmed_bounds(trimmed_pool(parts, trim=trim), envelope(honest))


@given(federation=federations(), data=st.data())
def test_median_of_means_stays_within_the_honest_bound(federation, data):
    honest, byzantine, positions = federation
    parts = interleave(honest, byzantine, positions)
    groups = data.draw(st.integers(2 * len(byzantine) + 1, len(parts)))
    result = median_of_means_pool(parts, groups=groups)
    assert within_median_of_means_bounds(result, envelope(honest))


SIGMA, MU, CLIENTS, EXAMPLES = 2.0, 3.0, 10, 500


def honest_clients(seed: int, clients: int = CLIENTS) -> list[Moments]:
    """Reports of equal-sized clients with data from one normal law, N(3, 2**2), 4 channels."""
    rng = np.random.default_rng(seed)
    return [moments(rng.normal(MU, SIGMA, (EXAMPLES, 4))) for _ in range(clients)]


def poisoned(attack: str, honest_report: Moments, honest_pool: Moments) -> Moments:
    """The report a Byzantine client sends in place of ``honest_report``."""
    count, mean, m2 = honest_report
    center = honest_pool.mean
    if attack == "scale-1e3":
        return Moments(count, mean * 1e3, m2 * 1e6)
    if attack == "shift-100-sigma":
        return Moments(count, mean + 100 * SIGMA, m2)
    if attack == "sign-flip-deviations":
        return Moments(count, center - 100 * (mean - center), m2)
    if attack == "shift-3-sigma-with-counts-x1e6":
        return Moments(count * 10**6, mean + 3 * SIGMA, m2 * 10**6)
    raise AssertionError(attack)


ATTACKS = ["scale-1e3", "shift-100-sigma", "sign-flip-deviations", "shift-3-sigma-with-counts-x1e6"]


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("liars", [1, 2])
def test_named_attacks_move_the_exact_pool_and_not_the_robust_ones(attack, liars):
    """1 or 2 of 10 clients poisoned: the robust pools stay near the honest clients' pool."""
    clients = honest_clients(seed=liars)
    honest = clients[liars:]
    bound = envelope(honest)
    truth = pool_moments(honest)
    parts = [poisoned(attack, c, truth) for c in clients[:liars]] + honest
    exact = pool_moments(parts)
    assert not within_trimmed_bounds(exact, bound)
    for result, within in (
        (trimmed_pool(parts, trim=2), within_trimmed_bounds),
        (median_of_means_pool(parts, groups=5), within_median_of_means_bounds),
    ):
        assert within(result, bound)
        # The bound is loose; with equal honest clients the result is much closer.
        assert np.all(np.abs(result.mean - truth.mean) < 0.1 * SIGMA)
        assert np.all(np.abs(variance(result) / variance(truth) - 1) < 0.1)


@pytest.mark.parametrize("seed", range(5))
def test_with_all_clients_honest_the_robust_pools_are_close_to_exact(seed):
    """Equal clients of one law: within a third of one client's standard error of the mean."""
    clients = honest_clients(seed)
    exact = pool_moments(clients)
    client_error = SIGMA / math.sqrt(EXAMPLES)
    for result in (
        trimmed_pool(clients, trim=1),
        trimmed_pool(clients, trim=2),
        median_of_means_pool(clients, groups=3),
        median_of_means_pool(clients, groups=5),
    ):
        assert int(result.count) == int(exact.count)
        assert np.all(np.abs(result.mean - exact.mean) < client_error)
        assert np.all(np.abs(variance(result) / variance(exact) - 1) < 0.05)


# --- Errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"trim": -1}, ValueError, r"`trim` must satisfy 0 <= 2 \* trim < 5 .*; got -1"),
        ({"trim": 3}, ValueError, r"`trim` must satisfy 0 <= 2 \* trim < 5 .*; got 3"),
        ({"trim": True}, TypeError, r"`trim` must be an int; got bool True"),
        ({"trim": 1.0}, TypeError, r"`trim` must be an int; got float 1.0"),
    ],
)
def test_bad_trim(options, error, pattern):
    parts = [*honest_clients(0, clients=5), moments(np.zeros((0, 4)))]
    with pytest.raises(error, match=pattern):
        trimmed_pool(parts, **options)


@pytest.mark.parametrize(
    ("groups", "error", "pattern"),
    [
        (0, ValueError, r"`groups` must satisfy 1 <= groups <= 5 .*; got 0"),
        (6, ValueError, r"`groups` must satisfy 1 <= groups <= 5 .*; got 6"),
        (None, TypeError, r"`groups` must be an int; got NoneType None"),
    ],
)
def test_bad_groups(groups, error, pattern):
    with pytest.raises(error, match=pattern):
        median_of_means_pool(honest_clients(0, clients=5), groups=groups)


@pytest.mark.parametrize("pool", [trimmed_pool, median_of_means_pool])
def test_nothing_to_pool(pool):
    options = {"trim": 0} if pool is trimmed_pool else {"groups": 1}
    with pytest.raises(ValueError, match=r"`parts` must hold at least one Moments; got an empty"):
        pool([], **options)
    with pytest.raises(
        ValueError, match=r"must satisfy .* <=? 0 \(the parts with a positive count\)"
    ):
        pool([moments(np.zeros((0, 2)))], **options)


def test_counts_that_would_wrap_are_refused():
    liar = report(2**62, [0.0], [1.0])
    with pytest.raises(ValueError, match=r"at most MAX_COUNT = 2\*\*53"):
        trimmed_pool([liar, liar, report(3, [0.0], [1.0])], trim=1)


@pytest.mark.tf
def test_tensorflow_tensors_are_refused_with_a_hint():
    tf = import_framework("tensorflow", "tf")
    part = moments(tf.constant([[1.0, 2.0], [3.0, 5.0]]))
    with pytest.raises(TypeError, match=r"robust pools sort values: .* \(convert them to NumPy\)"):
        trimmed_pool([part, part, part], trim=1)
