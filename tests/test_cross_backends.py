"""Cross-backend agreement: torch, Flax (NNX and Linen) and Keras compute the same HBN layer.

Every framework gets the same drawn case: the input (2-D or 4-D, channels first for torch and
last for Flax and Keras), the weights, the global statistics and the output cotangent. Each one
returns, in canonical (channels-first) layout, the training forward, the gradients with respect
to input, scale, offset and alpha (by its own autodiff through the adapter's custom gradient),
and the inference forward. torch is the reference the others are compared with.

The Keras test is also marked ``keras``: ``tests/test_keras_backends.py`` runs it again on Keras'
JAX and torch backends, each in a process of its own.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import floats

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.cross

# float64 within 1e-10 relative, float32 within 1e-4 (issue 7); relative to the largest value.
TOLERANCE = {"float64": 1e-10, "float32": 1e-4}


class Case(NamedTuple):
    """One layer call: canonical NCHW (or NC) arrays and the layer's settings."""

    x: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    alpha: np.ndarray
    global_mean: np.ndarray
    global_var: np.ndarray
    dy: np.ndarray
    eps: float
    dtype: str

    def channels_last(self, a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a, 1, -1)

    def channels_first(self, a: Any) -> np.ndarray:
        return np.moveaxis(np.asarray(a), -1, 1)


class Results(NamedTuple):
    """A framework's answers, canonical layout, as float64 NumPy."""

    y: np.ndarray
    dx: np.ndarray
    dscale: np.ndarray
    doffset: np.ndarray
    dalpha: np.ndarray
    y_inference: np.ndarray


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """2-D or 4-D inputs, batch 1-16, channels 1-32, either float dtype, drawn weights."""
    ndim = draw(st.sampled_from([2, 4]))
    channels = draw(st.integers(1, 32))
    shape = (
        draw(st.integers(1, 16)),
        channels,
        *(draw(st.integers(1, 4)) for _ in range(ndim - 2)),
    )
    dtype = draw(st.sampled_from(["float32", "float64"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    loc, spread = draw(floats(-5, 5)), draw(floats(0.1, 10))

    def cast(a: np.ndarray) -> np.ndarray:
        return a.astype(dtype)

    return Case(
        x=cast(rng.normal(loc, spread, size=shape)),
        scale=cast(rng.normal(size=channels)),
        offset=cast(rng.normal(size=channels)),
        alpha=cast(rng.normal(scale=2, size=channels)),
        global_mean=cast(rng.normal(loc, spread, size=channels)),
        global_var=cast(rng.uniform(0.1, 5, size=channels) * spread**2),
        dy=cast(rng.normal(size=shape)),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        dtype=dtype,
    )


def torch_results(case: Case) -> Results:
    torch = pytest.importorskip("torch")
    hbn_torch = pytest.importorskip("backends.torch")
    layer_type = hbn_torch.HybridBatchNorm1d if case.x.ndim == 2 else hbn_torch.HybridBatchNorm2d
    layer = layer_type(len(case.scale), eps=case.eps, dtype=getattr(torch, case.dtype))
    with torch.no_grad():
        for name, value in (
            ("weight", case.scale),
            ("bias", case.offset),
            ("alpha", case.alpha),
            ("global_mean", case.global_mean),
            ("global_var", case.global_var),
        ):
            getattr(layer, name).copy_(torch.from_numpy(value))
    x = torch.from_numpy(case.x).requires_grad_(True)
    y = layer.train()(x)
    grads = torch.autograd.grad(
        y, [x, layer.weight, layer.bias, layer.alpha], torch.from_numpy(case.dy)
    )
    with torch.no_grad():
        inference = layer.eval()(x)
    return Results(*(t.detach().numpy() for t in (y, *grads, inference)))


def nnx_results(case: Case) -> Results:
    jax = pytest.importorskip("jax")
    nnx = pytest.importorskip("flax.nnx")
    hbn_flax = pytest.importorskip("backends.flax")
    layer = hbn_flax.HybridBatchNorm(
        len(case.scale), epsilon=case.eps, param_dtype=case.dtype, rngs=nnx.Rngs(0)
    )
    for name, value in (
        ("scale", case.scale),
        ("bias", case.offset),
        ("alpha", case.alpha),
        ("global_mean", case.global_mean),
        ("global_var", case.global_var),
    ):
        getattr(layer, name)[...] = value
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x, dy = case.channels_last(case.x), case.channels_last(case.dy)

    def loss(params: Any, x: Any) -> Any:
        return (dy * nnx.merge(graphdef, params, rest)(x, use_running_average=False)).sum()

    y = layer(x, use_running_average=False)
    dparams, dx = jax.grad(loss, argnums=(0, 1))(params, x)
    inference = layer(x, use_running_average=True)
    return Results(
        case.channels_first(y),
        case.channels_first(dx),
        *(np.asarray(dparams[name][...]) for name in ("scale", "bias", "alpha")),
        case.channels_first(inference),
    )


def linen_results(case: Case) -> Results:
    jax = pytest.importorskip("jax")
    linen = pytest.importorskip("backends.flax.linen")
    module = linen.HybridBatchNorm(epsilon=case.eps, param_dtype=case.dtype)
    params = {"scale": case.scale, "bias": case.offset, "alpha": case.alpha}
    stats = {"global_mean": case.global_mean, "global_var": case.global_var}
    x, dy = case.channels_last(case.x), case.channels_last(case.dy)

    def forward(params: Any, x: Any, *, inference: bool) -> Any:
        variables = {"params": params, linen.GLOBAL_STATS: stats}
        return module.apply(variables, x, use_running_average=inference)

    def loss(params: Any, x: Any) -> Any:
        return (dy * forward(params, x, inference=False)).sum()

    dparams, dx = jax.grad(loss, argnums=(0, 1))(params, x)
    return Results(
        case.channels_first(forward(params, x, inference=False)),
        case.channels_first(dx),
        *(np.asarray(dparams[name]) for name in ("scale", "bias", "alpha")),
        case.channels_first(forward(params, x, inference=True)),
    )


@contextlib.contextmanager
def keras_rank_promotion() -> Iterator[None]:
    """Keras' JAX backend broadcasts ranks; conftest forbids that for the core only."""
    keras = importlib.import_module("keras")
    if keras.backend.backend() == "jax":
        with importlib.import_module("jax").numpy_rank_promotion("allow"):
            yield
    else:
        yield


@pytest.fixture(scope="module")
def keras_autodiff() -> Any:
    """The Keras tests' backend-agnostic gradients (imported outside Hypothesis' ``@given``)."""
    return pytest.importorskip("tests.test_keras_adapter")


def keras_results(case: Case, autodiff: Any) -> Results:
    keras = pytest.importorskip("keras")
    hbn_keras = pytest.importorskip("backends.keras")
    gradients, weight_gradients = autodiff.gradients, autodiff.weight_gradients
    ops = keras.ops
    x, dy = case.channels_last(case.x), case.channels_last(case.dy)
    layer = hbn_keras.HybridBatchNormalization(epsilon=case.eps, dtype=case.dtype)
    layer.build(x.shape)
    layer.set_weights([case.scale, case.offset, case.alpha, case.global_mean, case.global_var])
    x_tensor, dy_tensor = ops.convert_to_tensor(x), ops.convert_to_tensor(dy)
    with keras_rank_promotion():
        y = layer(x_tensor, training=True)
        (dx,) = gradients(lambda t: ops.sum(dy_tensor * layer(t, training=True)), [x_tensor])
        dscale, doffset, dalpha = weight_gradients(layer, x_tensor, dy_tensor)
        inference = layer(x_tensor, training=False)
    return Results(
        case.channels_first(ops.convert_to_numpy(y)),
        case.channels_first(dx),
        dscale,
        doffset,
        dalpha,
        case.channels_first(ops.convert_to_numpy(inference)),
    )


def assert_agree(actual: Results, expected: Results, dtype: str) -> None:
    tolerance = TOLERANCE[dtype]
    for name, a, e in zip(Results._fields, actual, expected, strict=True):
        assert a.shape == e.shape, name
        scale = 1 + np.abs(e.astype(np.float64)).max()
        np.testing.assert_allclose(
            a.astype(np.float64),
            e.astype(np.float64),
            rtol=tolerance,
            atol=tolerance * scale,
            err_msg=name,
        )


@given(case=cases())
def test_flax_nnx_agrees_with_torch(case):
    assert_agree(nnx_results(case), torch_results(case), case.dtype)


@given(case=cases())
def test_flax_linen_agrees_with_torch(case):
    assert_agree(linen_results(case), torch_results(case), case.dtype)


@pytest.mark.keras
@given(case=cases())
def test_keras_agrees_with_torch(case, keras_autodiff):
    assert_agree(keras_results(case, keras_autodiff), torch_results(case), case.dtype)
