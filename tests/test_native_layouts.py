"""Layouts and the statistics step of models of your own, in Flax NNX and Keras 3 (issue 20).

``flax_layout`` and ``keras_layout`` give roles from the layer types, with the frameworks' own
names; ``flax_moments`` and ``keras_moments`` load a global state into the model and collect
every HBN layer's input moments. The oracle is float64 NumPy on the first layer's output, and
the server's own checks (:func:`federation.protocol.check_report`, the travelling tensors)
accept what they produce. The torch counterparts are tried in tests/test_flower_deployment.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import import_framework
from federation import protocol
from federation.layout import Role, select
from federation.protocol import StatisticsReport

RNG = np.random.default_rng(7)
INPUTS = RNG.standard_normal((10, 6)).astype(np.float32)
BIAS = np.linspace(-1.0, 1.0, 4)


def assert_moments_of(moments, examples, hidden, layout):
    """``moments`` are the exact moments of ``hidden``, and the server would accept them."""
    (name,) = moments
    assert examples == len(hidden)
    assert int(moments[name].count) == len(hidden)
    np.testing.assert_allclose(moments[name].mean, hidden.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moments[name].m2 / len(hidden), hidden.var(0), rtol=1e-5, atol=1e-6)
    report = StatisticsReport(moments, examples, examples)
    protocol.check_report(report, protocol.hbn_layers(layout))


@pytest.mark.jax
def test_a_flax_model_of_your_own_gives_its_layout_and_exact_moments():
    nnx = import_framework("flax.nnx", "jax")
    hbn_flax = import_framework("backends.flax", "jax")
    from federation.models.jax_model import flax_layout, flax_moments

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(6, 4, rngs=rngs)
            self.norm = hbn_flax.HybridBatchNorm(4, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)  # RNG key and count: left out
            self.fc2 = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(self.drop(nnx.relu(self.norm(self.fc1(x)))))

    model = Net(nnx.Rngs(0))
    layout = flax_layout(model)
    assert select(layout, Role.STATISTICS) == ["norm.global_mean", "norm.global_var"]
    assert select(layout, Role.PERSONAL) == ["norm.alpha"]
    assert set(select(layout, Role.SHARED)) == {
        "fc1.bias",
        "fc1.kernel",
        "fc2.bias",
        "fc2.kernel",
        "norm.bias",
        "norm.scale",
    }
    assert layout["fc1.kernel"].shape == (6, 4)  # Flax's own (in, out)

    state = {"fc1.bias": BIAS, "norm.global_mean": np.ones(4)}
    moments, examples = flax_moments(model, state, [INPUTS[:7], INPUTS[7:]])
    np.testing.assert_array_equal(np.asarray(model.fc1.bias[...]), BIAS.astype(np.float32))
    kernel = np.asarray(model.fc1.kernel[...], np.float64)
    assert_moments_of(moments, examples, INPUTS.astype(np.float64) @ kernel + BIAS, layout)
    with pytest.raises(ValueError, match=r"unknown: \['fc3.bias'\]"):
        flax_moments(model, {"fc3.bias": BIAS}, [INPUTS])


@pytest.mark.tf
def test_a_keras_model_of_your_own_gives_its_layout_and_exact_moments():
    keras = import_framework("keras", "tf")
    hbn_keras = import_framework("backends.keras", "tf")
    from federation.models.keras_model import keras_layout, keras_moments

    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, name="fc1"),
            hbn_keras.HybridBatchNormalization(name="hbn"),
            keras.layers.Dense(3, name="fc2"),
        ],
        name="net",
    )
    layout = keras_layout(model)
    assert select(layout, Role.STATISTICS) == ["net/hbn/global_mean", "net/hbn/global_var"]
    assert select(layout, Role.PERSONAL) == ["net/hbn/alpha"]
    assert set(select(layout, Role.SHARED)) == {
        "net/fc1/kernel",
        "net/fc1/bias",
        "net/hbn/gamma",
        "net/hbn/beta",
        "net/fc2/kernel",
        "net/fc2/bias",
    }
    assert protocol.hbn_layers(layout)["hbn"].global_mean == "net/hbn/global_mean"

    moments, examples = keras_moments(model, {"net/fc1/bias": BIAS}, [INPUTS[:3], INPUTS[3:]])
    kernel = np.asarray(model.get_layer("fc1").kernel, np.float64)
    assert_moments_of(moments, examples, INPUTS.astype(np.float64) @ kernel + BIAS, layout)
    with pytest.raises(ValueError, match=r"unknown: \['net/fc3/bias'\]"):
        keras_moments(model, {"net/fc3/bias": BIAS}, [INPUTS])
