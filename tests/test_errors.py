"""Every documented error of the core, with the message that names the argument."""

from __future__ import annotations

import numpy as np
import pytest

from hbn_core import (
    ChannelAxisError,
    Moments,
    hbn_backward,
    hbn_forward,
    hbn_inference,
    merge_moments,
    moments,
    pool_moments,
    variance,
)

C = 3


@pytest.fixture
def layer_args() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((4, C, 2)),
        "scale": np.ones(C),
        "offset": np.zeros(C),
        "alpha": np.zeros(C),
        "global_mean": np.zeros(C),
        "global_var": np.ones(C),
    }


def good_moments(channels: int = C) -> Moments:
    return moments(np.arange(2.0 * channels).reshape(2, channels))


@pytest.mark.parametrize("name", ["scale", "offset", "alpha", "global_mean", "global_var"])
def test_wrong_channel_count_names_the_argument(layer_args, name):
    layer_args[name] = np.ones(C + 1)
    with pytest.raises(
        ValueError,
        match=rf"`{name}` must have shape \(3,\) to match x.shape\[1\].*got shape \(4,\)",
    ):
        hbn_forward(*layer_args.values())


def test_channels_last_mismatch_names_the_axis(layer_args):
    with pytest.raises(ValueError, match=r"`scale` must have shape \(2,\) to match x.shape\[-1\]"):
        hbn_forward(*layer_args.values(), channel_axis=-1)


@pytest.mark.parametrize("name", ["x", "scale", "global_var"])
def test_integer_arrays_are_rejected(layer_args, name):
    layer_args[name] = layer_args[name].astype(np.int64)
    with pytest.raises(
        TypeError, match=rf"`{name}` must have a real floating dtype; got dtype int64"
    ):
        hbn_forward(*layer_args.values())


def test_complex_input_is_rejected():
    with pytest.raises(
        TypeError, match=r"`x` must have a real floating dtype; got dtype complex128"
    ):
        moments(np.ones((2, 2), dtype=np.complex128))


def test_mixed_namespaces_name_the_argument(layer_args):
    xp = pytest.importorskip("array_api_strict")
    layer_args["alpha"] = xp.asarray(layer_args["alpha"])
    with pytest.raises(
        TypeError,
        match=r"`alpha` must come from the same array library as `x` \(numpy\); "
        r"got an array of array_api_strict",
    ):
        hbn_forward(*layer_args.values())


def test_non_arrays_are_rejected(layer_args):
    layer_args["offset"] = [0.0, 0.0, 0.0]
    with pytest.raises(
        TypeError, match=r"`offset` must be an array of NumPy, .*; got builtins.list"
    ):
        hbn_forward(*layer_args.values())


def test_learnable_parameters_share_one_dtype(layer_args):
    layer_args["alpha"] = layer_args["alpha"].astype(np.float32)
    with pytest.raises(
        TypeError, match=r"`alpha` must have the dtype of `scale` \(float64\).*got dtype float32"
    ):
        hbn_forward(*layer_args.values())


def test_one_dimensional_input_is_rejected(layer_args):
    layer_args["x"] = np.ones(C)
    with pytest.raises(
        ValueError, match=r"`x` must have at least 2 dimension\(s\).*got shape \(3,\)"
    ):
        hbn_forward(*layer_args.values())


def test_empty_batch_is_rejected_in_training(layer_args):
    layer_args["x"] = np.ones((0, C))
    with pytest.raises(
        ValueError, match=r"`x` must have at least one element per channel; got shape \(0, 3\)"
    ):
        hbn_forward(*layer_args.values())


def test_empty_batch_is_allowed_in_inference(layer_args):
    del layer_args["alpha"]
    layer_args["x"] = np.ones((0, C))
    assert hbn_inference(*layer_args.values()).shape == (0, C)


@pytest.mark.parametrize("channel_axis", [3, -4])
def test_channel_axis_out_of_range(layer_args, channel_axis):
    with pytest.raises(
        ChannelAxisError,
        match=rf"`channel_axis` must lie in \[-3, 2\] for an input of rank 3; got {channel_axis}",
    ):
        hbn_forward(*layer_args.values(), channel_axis=channel_axis)
    assert issubclass(ChannelAxisError, ValueError)
    assert issubclass(ChannelAxisError, IndexError)


@pytest.mark.parametrize("channel_axis", [1.0, True, "1"])
def test_channel_axis_must_be_an_int(channel_axis):
    with pytest.raises(TypeError, match=r"`channel_axis` must be an int; got"):
        moments(np.ones((2, 2)), channel_axis=channel_axis)


@pytest.mark.parametrize(
    ("eps", "error", "pattern"),
    [
        (-1e-5, ValueError, r"`eps` must be finite and >= 0; got -1e-05"),
        (float("nan"), ValueError, r"`eps` must be finite and >= 0; got nan"),
        ("1e-5", TypeError, r"`eps` must be a real number; got str '1e-5'"),
    ],
)
def test_bad_eps(layer_args, eps, error, pattern):
    with pytest.raises(error, match=pattern):
        hbn_forward(*layer_args.values(), eps=eps)
    del layer_args["alpha"]
    with pytest.raises(error, match=pattern):
        hbn_inference(*layer_args.values(), eps=eps)


def test_backward_needs_the_forward_residuals(layer_args):
    y, residuals = hbn_forward(*layer_args.values())
    with pytest.raises(
        TypeError,
        match=r"`residuals` must be the HBNResiduals that hbn_forward returned; got tuple",
    ):
        hbn_backward(y, tuple(residuals))
    with pytest.raises(
        ValueError,
        match=r"`dy` must have the shape of the forward's input \(4, 3, 2\); got shape \(4, 3\)",
    ):
        hbn_backward(y[..., 0], residuals)
    with pytest.raises(TypeError, match=r"`dy` must have a real floating dtype; got dtype int64"):
        hbn_backward(np.ones(y.shape, dtype=np.int64), residuals)


def test_merging_moments_of_different_channel_counts():
    with pytest.raises(ValueError, match=r"`b` must have 3 channels, as the first operand; got 2"):
        merge_moments(good_moments(3), good_moments(2))


def test_pooling_moments_of_different_channel_counts():
    with pytest.raises(
        ValueError, match=r"`parts\[2\]` must have 3 channels, as the first operand; got 4"
    ):
        pool_moments([good_moments(3), good_moments(3), good_moments(4)])


def test_pooling_nothing():
    with pytest.raises(
        ValueError, match=r"`parts` must hold at least one Moments; got an empty sequence"
    ):
        pool_moments([])


@pytest.mark.parametrize(
    ("weights", "pattern"),
    [
        ([1.0], r"`weights` must hold one weight per part, shape \(2,\); got shape \(1,\)"),
        ([1.0, -1.0], r"`weights` must be finite and >= 0; got \[1.0, -1.0\]"),
        ([1.0, float("inf")], r"`weights` must be finite and >= 0"),
        (
            [0.0, 0.0],
            r"`weights` must give a positive total to the parts with count > 0; got \[0.0, 0.0\]",
        ),
    ],
)
def test_bad_weights(weights, pattern):
    with pytest.raises(ValueError, match=pattern):
        pool_moments([good_moments(), good_moments()], weights=weights)


def test_weight_only_on_an_empty_part_is_rejected():
    empty = moments(np.ones((0, C)))
    with pytest.raises(
        ValueError, match=r"`weights` must give a positive total to the parts with count > 0"
    ):
        pool_moments([empty, good_moments()], weights=[1.0, 0.0])


@pytest.mark.parametrize(
    ("field", "value", "error", "pattern"),
    [
        (
            "count",
            np.asarray(2.0),
            TypeError,
            r"`a.count` must have an integer dtype; got dtype float64",
        ),
        ("count", np.asarray([2]), ValueError, r"`a.count` must be a 0-d array; got shape \(1,\)"),
        ("count", np.asarray(-1), ValueError, r"`a.count` must be >= 0; got"),
        (
            "mean",
            np.ones((1, C)),
            ValueError,
            r"`a.mean` must have shape \(C,\); got shape \(1, 3\)",
        ),
        (
            "m2",
            np.ones(C + 1),
            ValueError,
            r"`a.m2` must have the shape of `a.mean` \(3,\); got shape \(4,\)",
        ),
        (
            "m2",
            np.ones(C, dtype=np.int32),
            TypeError,
            r"`a.m2` must have a real floating dtype; got dtype int32",
        ),
    ],
)
def test_malformed_moments(field, value, error, pattern):
    bad = good_moments()._replace(**{field: value})
    with pytest.raises(error, match=pattern):
        merge_moments(bad, good_moments())


def test_moments_must_be_a_moments_record():
    m = good_moments()
    with pytest.raises(TypeError, match=r"`m` must be a hbn_core.Moments; got tuple"):
        variance(tuple(m))


@pytest.mark.parametrize(
    ("correction", "error", "pattern"),
    [
        (
            -1,
            ValueError,
            r"`correction` must be finite and >= 0 \(0: population, 1: Bessel\); got -1",
        ),
        ("1", TypeError, r"`correction` must be a real number; got str '1'"),
        (True, TypeError, r"`correction` must be a real number; got bool True"),
    ],
)
def test_bad_correction(correction, error, pattern):
    with pytest.raises(error, match=pattern):
        variance(good_moments(), correction=correction)
