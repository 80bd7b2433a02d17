"""With every framework in one process, the core gives each library NumPy's float64 results.

These run in tests-cross, where torch, JAX (with x64) and TensorFlow are imported side by side.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hbn_core import hbn_backward, hbn_forward, hbn_inference, moments, pool_moments
from tests.backends import BACKEND_PARAMS, assert_close, make_backend
from tests.strategies import chunks, floats, layer_inputs

FRAMEWORKS = [param for param in BACKEND_PARAMS if param.marks]
pytestmark = pytest.mark.cross


@pytest.fixture(params=FRAMEWORKS)
def framework(request: pytest.FixtureRequest, backend_from_param) -> object:
    return backend_from_param(request.param)


@given(inputs=layer_inputs(), data=st.data())
def test_forward_backward_and_inference_equal_numpy(framework, inputs, data):
    numpy = make_backend("numpy")
    dy = data.draw(hnp.arrays(np.float64, inputs.x.shape, elements=floats(-1, 1)))
    options = {"channel_axis": inputs.channel_axis, "eps": inputs.eps}
    results = {}
    for backend in (numpy, framework):
        args = [backend.asarray(a) for a in inputs[:6]]
        y, residuals = hbn_forward(*args, **options)
        gradients = hbn_backward(backend.asarray(dy), residuals)
        inferred = hbn_inference(args[0], *args[1:3], *args[4:6], **options)
        results[backend.name] = [backend.to_numpy(a) for a in (y, *gradients, inferred)]
    # Libraries sum in different orders; the backward's cancellations lift those ulps to ~1e-12
    # relative. 1e-10 is the float64 agreement target across frameworks.
    for expected, actual in zip(results["numpy"], results[framework.name], strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10)


@given(parts=chunks(min_size=1, max_size=4))
def test_pooled_moments_equal_numpy(framework, parts):
    numpy = make_backend("numpy")
    expected = pool_moments([moments(numpy.asarray(p)) for p in parts])
    actual = pool_moments([moments(framework.asarray(p)) for p in parts])
    assert int(framework.to_numpy(actual.count)) == int(expected.count)
    assert_close(framework, actual.mean, expected.mean, rtol=1e-13, atol=1e-12)
    assert_close(framework, actual.m2, expected.m2, rtol=1e-12, atol=1e-10)
