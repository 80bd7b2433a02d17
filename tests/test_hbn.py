"""hbn_forward, hbn_backward and hbn_inference on every array library.

The references are float64 NumPy oracles, finite differences and each library's own autodiff.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hbn_core import hbn_backward, hbn_forward, hbn_inference, moments, variance
from tests import oracle
from tests.backends import assert_close
from tests.strategies import LayerInputs, floats, layer_inputs

PARAMETERS = ("x", "scale", "offset", "alpha", "global_mean", "global_var")


def arrays(backend, inputs: LayerInputs, dtype: str = "float64") -> list:
    return [backend.asarray(getattr(inputs, name), dtype=dtype) for name in PARAMETERS]


def forward(backend, inputs: LayerInputs, dtype: str = "float64"):
    return hbn_forward(
        *arrays(backend, inputs, dtype),
        channel_axis=inputs.channel_axis,
        eps=inputs.eps,
        **backend.kwargs,
    )


def oracle_forward(inputs: LayerInputs, **replace) -> np.ndarray:
    inputs = inputs._replace(**replace)
    return oracle.hbn_forward(
        *(getattr(inputs, name) for name in PARAMETERS),
        channel_axis=inputs.channel_axis,
        eps=inputs.eps,
    )


@given(inputs=layer_inputs())
def test_forward_equals_float64_oracle(backend, inputs):
    y, _ = forward(backend, inputs)
    assert_close(backend, y, oracle_forward(inputs), rtol=1e-10, atol=1e-10, dtype="float64")


@given(inputs=layer_inputs(eps_values=(1e-5, 1e-3)))
def test_float32_forward_is_close_to_float64_oracle(backend, inputs):
    x32 = inputs.x.astype(np.float32).astype(np.float64)
    y, _ = forward(backend, inputs, dtype="float32")
    expected = oracle_forward(inputs, x=x32)
    # float32 rounding relative to the normalised scale |y| ~ |scale| * |x - mu| / std.
    assert_close(
        backend, y, expected, rtol=1e-4, atol=1e-4 * (1 + np.abs(expected).max()), dtype="float32"
    )


@given(inputs=layer_inputs(eps_values=(1e-3, 0.1)), data=st.data())
def test_backward_equals_finite_differences(backend, inputs, data):
    """<grad_p, v_p> equals d/dt L(p + t v_p) for L = sum(dy * y), each p, with float64 FD."""
    dy = data.draw(hnp.arrays(np.float64, inputs.x.shape, elements=floats(-1, 1)))
    _, residuals = forward(backend, inputs)
    gradients = hbn_backward(backend.asarray(dy), residuals, **backend.kwargs)
    for name, gradient in zip(PARAMETERS, gradients, strict=False):
        point = getattr(inputs, name)
        direction = data.draw(
            hnp.arrays(np.float64, point.shape, elements=floats(-1, 1)), label=name
        )

        def loss(value, name=name):
            return np.sum(dy * oracle_forward(inputs, **{name: value}))

        expected = oracle.directional_derivative(loss, point, direction)
        actual = float(np.sum(backend.to_numpy(gradient) * direction))
        scale = (
            np.sum(np.abs(dy)) * (1 + np.abs(point).max()) * max(1.0, np.abs(inputs.scale).max())
        )
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7 * scale, err_msg=name)


@given(inputs=layer_inputs(eps_values=(1e-5, 1e-3)), data=st.data())
def test_backward_equals_the_library_autodiff_of_the_forward(backend, inputs, data):
    dy = data.draw(hnp.arrays(np.float64, inputs.x.shape, elements=floats(-1, 1)))
    _, residuals = forward(backend, inputs)
    analytic = hbn_backward(backend.asarray(dy), residuals, **backend.kwargs)

    def output(x, scale, offset, alpha, global_mean, global_var):
        y, _ = hbn_forward(
            x,
            scale,
            offset,
            alpha,
            global_mean,
            global_var,
            channel_axis=inputs.channel_axis,
            eps=inputs.eps,
        )
        return y

    autodiff = backend.vjp(output, arrays(backend, inputs), backend.asarray(dy))
    for a, b in zip(analytic, autodiff[:4], strict=True):
        expected = backend.to_numpy(b)
        assert_close(
            backend,
            a,
            expected,
            rtol=1e-9,
            atol=1e-9 * (1 + np.abs(expected).max()),
            dtype="float64",
        )


@given(inputs=layer_inputs(eps_values=(1e-5, 1e-3, 0.1)))  # a constant channel has variance 0
def test_alpha_minus_infinity_is_batch_norm(backend, inputs):
    y, _ = forward(backend, inputs._replace(alpha=np.full_like(inputs.alpha, -np.inf)))
    expected = oracle.batch_norm(
        inputs.x, inputs.scale, inputs.offset, channel_axis=inputs.channel_axis, eps=inputs.eps
    )
    assert_close(backend, y, expected, rtol=1e-10, atol=1e-10)


@given(inputs=layer_inputs())
def test_alpha_plus_infinity_is_inference(backend, inputs):
    y, _ = forward(backend, inputs._replace(alpha=np.full_like(inputs.alpha, np.inf)))
    assert_close(backend, y, oracle_inference(inputs), rtol=1e-10, atol=1e-10)


@given(inputs=layer_inputs(eps_values=(1e-5, 1e-3, 0.1)), sign=st.sampled_from([-1.0, 1.0]))
def test_large_alpha_approaches_its_limit(backend, inputs, sign):
    limit, _ = forward(backend, inputs._replace(alpha=np.full_like(inputs.alpha, sign * np.inf)))
    near, _ = forward(backend, inputs._replace(alpha=np.full_like(inputs.alpha, sign * 40.0)))
    assert_close(backend, near, backend.to_numpy(limit), rtol=1e-9, atol=1e-9)


def oracle_inference(inputs: LayerInputs) -> np.ndarray:
    return oracle.inference(
        inputs.x,
        inputs.scale,
        inputs.offset,
        inputs.global_mean,
        inputs.global_var,
        channel_axis=inputs.channel_axis,
        eps=inputs.eps,
    )


@given(inputs=layer_inputs())
def test_inference_equals_oracle(backend, inputs):
    names = ("x", "scale", "offset", "global_mean", "global_var")
    y = hbn_inference(
        *(backend.asarray(getattr(inputs, n)) for n in names),
        channel_axis=inputs.channel_axis,
        eps=inputs.eps,
        **backend.kwargs,
    )
    assert_close(backend, y, oracle_inference(inputs), rtol=1e-10, atol=1e-10, dtype="float64")


@given(inputs=layer_inputs(eps_values=(0.0,)))
def test_batch_norm_limit_output_has_zero_mean_and_unit_variance(backend, inputs):
    channels = inputs.x.shape[inputs.channel_axis]
    assume(inputs.x.size // channels >= 2)  # one element per channel has no variance to divide by
    x = backend.asarray(inputs.x + np.linspace(0, 1, inputs.x.size).reshape(inputs.x.shape))
    one, zero = backend.asarray(np.ones(channels)), backend.asarray(np.zeros(channels))
    minus_inf = backend.asarray(np.full(channels, -np.inf))
    y, _ = hbn_forward(
        x,
        one,
        zero,
        minus_inf,
        zero,
        one,
        channel_axis=inputs.channel_axis,
        eps=0.0,
        **backend.kwargs,
    )
    stats = moments(y, channel_axis=inputs.channel_axis, **backend.kwargs)
    assert_close(backend, stats.mean, np.zeros(channels), rtol=0, atol=1e-9)
    assert_close(backend, variance(stats, **backend.kwargs), np.ones(channels), rtol=1e-9)


@given(inputs=layer_inputs(), data=st.data())
def test_channels_last_equals_channels_first(backend, inputs, data):
    """The same data laid out channels-last gives the transposed output and gradients."""
    dy = data.draw(hnp.arrays(np.float64, inputs.x.shape, elements=floats(-1, 1)))
    first = inputs._replace(x=np.moveaxis(inputs.x, inputs.channel_axis, 1), channel_axis=1)
    last = inputs._replace(x=np.moveaxis(inputs.x, inputs.channel_axis, -1), channel_axis=-1)
    y_first, res_first = forward(backend, first)
    y_last, res_last = forward(backend, last)
    assert_close(
        backend, y_last, np.moveaxis(backend.to_numpy(y_first), 1, -1), rtol=1e-12, atol=1e-12
    )
    dy_first = backend.asarray(np.moveaxis(dy, inputs.channel_axis, 1))
    dy_last = backend.asarray(np.moveaxis(dy, inputs.channel_axis, -1))
    grads_first = hbn_backward(dy_first, res_first, **backend.kwargs)
    grads_last = hbn_backward(dy_last, res_last, **backend.kwargs)
    dx_first = np.moveaxis(backend.to_numpy(grads_first[0]), 1, -1)
    assert_close(backend, grads_last[0], dx_first, rtol=1e-10, atol=1e-10)
    for first_grad, last_grad in zip(grads_first[1:], grads_last[1:], strict=True):
        assert_close(backend, last_grad, backend.to_numpy(first_grad), rtol=1e-10, atol=1e-10)


@given(inputs=layer_inputs(eps_values=(1e-5,)))
def test_forward_and_backward_trace_under_the_library_compiler(backend, inputs):
    """Same values under jax.jit / tf.function(jit_compile=True) as eagerly."""
    values = arrays(backend, inputs)

    def step(*args):
        y, residuals = hbn_forward(*args, channel_axis=inputs.channel_axis, eps=inputs.eps)
        return (y, *hbn_backward(y, residuals))

    eager = step(*values)
    compiled = backend.compile(step)(*values)
    # XLA rewrites divisions as reciprocal multiplies and fuses sums: a few ulps apart, which the
    # backward's cancellations lift to ~1e-12 relative. The cross-framework target is 1e-10.
    for a, b in zip(compiled, eager, strict=True):
        assert_close(backend, a, backend.to_numpy(b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_low_precision_input_keeps_its_dtype_and_parameters_get_theirs(backend, dtype):
    if backend.name == "array_api_strict" and dtype == "float16":
        pytest.skip("array-api-strict has no float16")
    x = backend.asarray(np.arange(24.0).reshape(4, 3, 2) / 7, dtype=dtype)
    params = [backend.asarray(np.full(3, v), dtype="float32") for v in (1.5, 0.5, 0.3, 0.2, 2.0)]
    y, residuals = hbn_forward(x, *params, **backend.kwargs)
    gradients = hbn_backward(y, residuals, **backend.kwargs)
    assert str(backend.to_numpy(y).dtype) == dtype
    assert str(backend.to_numpy(gradients[0]).dtype) == dtype
    assert [str(backend.to_numpy(g).dtype) for g in gradients[1:]] == ["float32"] * 3


@pytest.mark.tf
def test_unknown_dimensions_inside_tf_function():
    """A tf.function traced with unknown dimensions (as Keras retraces) gives the eager values."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 2))
    params = [rng.standard_normal(3) for _ in range(4)] + [rng.uniform(0.5, 2, 3)]
    vector = tf.TensorSpec([3], tf.float64)

    @tf.function(input_signature=[tf.TensorSpec([None, 3, None], tf.float64)] + [vector] * 5)
    def step(*args):
        y, residuals = hbn_forward(*args)
        stats = moments(args[0])
        return (y, *hbn_backward(y, residuals), stats.count, stats.mean, stats.m2)

    traced = step(tf.constant(x), *map(tf.constant, params))
    y, residuals = hbn_forward(x, *params)
    stats = moments(x)
    eager = (y, *hbn_backward(y, residuals), stats.count, stats.mean, stats.m2)
    for a, b in zip(traced, eager, strict=True):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-12, atol=1e-12)
    assert traced[5].dtype == tf.int64


@pytest.mark.jax
def test_jax_vmap_over_stacked_clients_equals_one_call_per_client():
    """``jax.vmap`` over stacked client models and batches, as the Flax adapter will use it."""
    jax = pytest.importorskip("jax")
    rng = np.random.default_rng(0)
    clients = 3
    x = rng.standard_normal((clients, 6, 2, 4))
    params = [rng.standard_normal((clients, 4)) for _ in range(4)] + [
        rng.uniform(0.5, 2, (clients, 4))
    ]

    def step(x, *params):
        y, residuals = hbn_forward(x, *params, channel_axis=-1)
        return (y, *hbn_backward(y, residuals), moments(x, channel_axis=-1).m2)

    batched = jax.vmap(step)(*map(jax.numpy.asarray, (x, *params)))
    for k in range(clients):
        one = step(x[k], *(p[k] for p in params))
        for a, b in zip(batched, one, strict=True):
            np.testing.assert_allclose(np.asarray(a[k]), b, rtol=1e-12, atol=1e-12)
