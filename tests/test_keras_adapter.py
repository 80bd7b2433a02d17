"""backends.keras: HybridBatchNormalization, its custom gradient, serialisation and collection.

Tests marked ``keras`` use only Keras and the backend's own autodiff. tests-tf runs them on the
TensorFlow backend, and tests-cross runs them again on Keras' JAX and torch backends, each in a
process of its own (``tests/test_keras_backends.py``): Keras fixes its backend when it is
imported, from ``KERAS_BACKEND``. Tests marked only ``tf`` need TensorFlow itself.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests import oracle
from tests.strategies import axis_layer_cases, floats

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

keras = pytest.importorskip("keras")
hbn_keras = pytest.importorskip("backends.keras")

import hbn_core  # noqa: E402
from hbn_core import Moments  # noqa: E402

ops = keras.ops
pytestmark = pytest.mark.tf
BACKEND = keras.backend.backend()
EPSILON = 1e-3  # Keras' default, which the layers below keep
NAMES = ("scale", "offset", "alpha", "global_mean", "global_var")


@pytest.fixture(autouse=True)
def keras_rank_promotion() -> Iterator[None]:
    """Let Keras' own layers broadcast as they do (``Dense`` adds a bias of lower rank).

    conftest forbids rank promotion in JAX to keep the core honest; HBN itself never needs it.
    """
    jax_config = (
        importlib.import_module("jax").numpy_rank_promotion("allow")
        if BACKEND == "jax"
        else contextlib.nullcontext()
    )
    with jax_config:
        yield


def layer_cases() -> st.SearchStrategy[dict]:
    """Float64 weights and a 2-D to 4-D input with its channel axis, -1 or 1."""
    return axis_layer_cases(offset_key="offset")


def make_layer(case: dict, **kwargs: Any) -> Any:
    """A float64 layer built for the case's input, holding the case's weights."""
    layer = hbn_keras.HybridBatchNormalization(axis=case["axis"], dtype="float64", **kwargs)
    layer.build(case["x"].shape)
    layer.set_weights([case[name] for name in NAMES])
    return layer


def tensor(a: Any) -> Any:
    return ops.convert_to_tensor(np.asarray(a))


def numpy(t: Any) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(t))


def oracle_forward(case: dict, x: np.ndarray | None = None) -> np.ndarray:
    x = case["x"] if x is None else x
    return oracle.hbn_forward(x, *(case[n] for n in NAMES), channel_axis=case["axis"], eps=EPSILON)


def plain_composition(x, scale, offset, alpha, global_mean, global_var, *, axis: int):
    """HBN as plain keras.ops, for the backend's autodiff to differentiate (not the core)."""
    ndim = len(x.shape)
    axes = tuple(i for i in range(ndim) if i != axis % ndim)
    shape = [1] * ndim
    shape[axis] = -1
    count = math.prod(x.shape[i] for i in axes)
    w = ops.sigmoid(alpha)
    # Sums, not ops.mean or ops.var: Keras' JAX and torch backends reduce float64 in float32.
    batch_mean = ops.sum(x, axis=axes, keepdims=True) / count
    batch_var = ops.sum(ops.square(x - batch_mean), axis=axes) / count
    mean = (1 - w) * ops.reshape(batch_mean, (-1,)) + w * global_mean
    var = (1 - w) * batch_var + w * global_var
    x_hat = (x - ops.reshape(mean, shape)) / ops.sqrt(ops.reshape(var, shape) + EPSILON)
    return ops.reshape(scale, shape) * x_hat + ops.reshape(offset, shape)


def gradients(loss: Callable[..., Any], args: list[Any]) -> list[np.ndarray]:
    """The gradients of the scalar ``loss(*args)`` with respect to the tensors ``args``."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(args)
            value = loss(*args)
        return [numpy(g) for g in tape.gradient(value, args)]
    if BACKEND == "jax":
        import jax

        return [numpy(g) for g in jax.grad(loss, argnums=tuple(range(len(args))))(*args)]
    import torch

    args = [a.detach().requires_grad_(True) for a in args]
    return [numpy(g) for g in torch.autograd.grad(loss(*args), args)]


def weight_gradients(layer: Any, x: Any, dy: Any, **call: Any) -> list[np.ndarray]:
    """The gradients of ``sum(dy * layer(x, training=True))`` for ``layer.trainable_weights``.

    ``call`` holds further arguments of the call (a ``mask``).

    Each backend reaches the weights its own way: a tape over the variables (TensorFlow), a
    stateless call (JAX), or the variables' tensors (torch).
    """
    if BACKEND == "jax":
        non_trainable = [v.value for v in layer.non_trainable_weights]

        def loss(*trainable: Any) -> Any:
            y, _ = layer.stateless_call(list(trainable), non_trainable, x, training=True, **call)
            return ops.sum(dy * y)

        return gradients(loss, [v.value for v in layer.trainable_weights])
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = ops.sum(dy * layer(x, training=True, **call))
        return [numpy(g) for g in tape.gradient(value, layer.trainable_weights)]
    import torch

    value = ops.sum(dy * layer(x, training=True, **call))
    return [
        numpy(g) for g in torch.autograd.grad(value, [v.value for v in layer.trainable_weights])
    ]


def assert_gradients_close(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-9 * (1 + np.abs(e).max()))


@pytest.mark.keras
def test_keras_runs_on_the_backend_that_keras_backend_names():
    assert keras.backend.backend() == os.environ.get("KERAS_BACKEND", "tensorflow")


@pytest.mark.keras
@given(case=layer_cases())
def test_training_forward_equals_the_core_and_the_float64_oracle(case):
    y = numpy(make_layer(case)(tensor(case["x"]), training=True))
    core, _ = hbn_core.hbn_forward(
        case["x"], *(case[n] for n in NAMES), channel_axis=case["axis"], eps=EPSILON
    )
    np.testing.assert_allclose(y, core, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, oracle_forward(case), rtol=1e-10, atol=1e-10)


@pytest.mark.keras
@given(case=layer_cases())
def test_gradients_equal_the_core_and_autodiff_of_a_plain_composition(case):
    layer = make_layer(case)
    x, dy = tensor(case["x"]), tensor(case["dy"])
    actual = gradients(lambda x: ops.sum(dy * layer(x, training=True)), [x])
    actual += weight_gradients(layer, x, dy)
    statistics = [tensor(case["global_mean"]), tensor(case["global_var"])]
    reference = gradients(
        lambda *a: ops.sum(dy * plain_composition(*a, *statistics, axis=case["axis"])),
        [tensor(case[k]) for k in ("x", "scale", "offset", "alpha")],
    )
    assert_gradients_close(actual, reference)
    _, residuals = hbn_core.hbn_forward(
        case["x"], *(case[n] for n in NAMES), channel_axis=case["axis"], eps=EPSILON
    )
    assert_gradients_close(actual, list(hbn_core.hbn_backward(case["dy"], residuals)))


@pytest.mark.keras
@given(case=layer_cases(), data=st.data())
def test_input_gradient_equals_float64_finite_differences(case, data):
    layer = make_layer(case)
    dy = case["dy"]
    (grad,) = gradients(
        lambda x: ops.sum(tensor(dy) * layer(x, training=True)), [tensor(case["x"])]
    )
    direction = data.draw(hnp.arrays(np.float64, case["x"].shape, elements=floats(-1, 1)))
    expected = oracle.directional_derivative(
        lambda x: np.sum(dy * oracle_forward(case, x)), case["x"], direction
    )
    scale = np.abs(dy).sum() * (1 + np.abs(case["x"]).max()) * max(1.0, np.abs(case["scale"]).max())
    # The floor tolerates finite differences that underflow when dy is tiny.
    np.testing.assert_allclose(
        float(np.sum(grad * direction)), expected, rtol=1e-6, atol=1e-7 * scale + 1e-12
    )


@pytest.mark.keras
@given(case=layer_cases())
def test_inference_uses_the_global_statistics_only(case):
    expected = oracle.inference(
        case["x"],
        *(case[n] for n in ("scale", "offset", "global_mean", "global_var")),
        channel_axis=case["axis"],
        eps=EPSILON,
    )
    layer = make_layer(case)
    x = tensor(case["x"])
    for training in (False, None):
        np.testing.assert_allclose(
            numpy(layer(x, training=training)), expected, rtol=1e-10, atol=1e-10
        )
    layer.trainable = False  # as for BatchNormalization: inference even with training=True
    np.testing.assert_allclose(numpy(layer(x, training=True)), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.keras
def test_weights_have_keras_names_kinds_and_initial_values():
    layer = hbn_keras.HybridBatchNormalization()
    layer.build((None, 5, 5, 3))
    assert [w.name for w in layer.trainable_weights] == ["gamma", "beta", "alpha"]
    assert [w.name for w in layer.non_trainable_weights] == ["global_mean", "global_var"]
    expected = {"gamma": 1, "beta": 0, "alpha": 0, "global_mean": 0, "global_var": 1}
    for weight in layer.weights:
        np.testing.assert_array_equal(numpy(weight), np.full(3, expected[weight.name], np.float32))
    bare = hbn_keras.HybridBatchNormalization(center=False, scale=False)
    bare.build((None, 3))
    assert [w.name for w in bare.trainable_weights] == ["alpha"]
    assert (bare.gamma, bare.beta) == (None, None)


@pytest.mark.keras
def test_defaults_follow_batch_normalization():
    layer = hbn_keras.HybridBatchNormalization()
    batch_norm = keras.layers.BatchNormalization()
    for name in ("axis", "momentum", "epsilon", "center", "scale"):
        assert getattr(layer, name) == getattr(batch_norm, name), name


@pytest.mark.keras
def test_mixed_precision_keeps_float32_weights_and_returns_float16():
    x = np.random.default_rng(0).standard_normal((8, 4, 4, 3)).astype(np.float32)
    layer = hbn_keras.HybridBatchNormalization(dtype="mixed_float16")
    y = layer(tensor(x), training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    assert {keras.backend.standardize_dtype(w.dtype) for w in layer.weights} == {"float32"}
    reference = hbn_keras.HybridBatchNormalization()(tensor(x), training=True)
    np.testing.assert_allclose(numpy(y), numpy(reference), rtol=2e-3, atol=2e-3)


def small_cnn(seed: int = 0) -> Any:
    """Two convolutions, each followed by HBN, with random alphas and global statistics."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, padding="same", name="conv1"),
            hbn_keras.HybridBatchNormalization(name="norm1"),
            keras.layers.ReLU(),
            keras.layers.Conv2D(6, 3, strides=2, padding="same", name="conv2"),
            hbn_keras.HybridBatchNormalization(name="norm2"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2, name="head"),
        ],
        name="cnn",
    )
    rng = np.random.default_rng(seed)
    for _, layer in hbn_keras.hbn_layers(model):
        c = layer.num_features
        layer.alpha.assign(rng.standard_normal(c).astype(np.float32))
        layer.global_mean.assign(rng.standard_normal(c).astype(np.float32))
        layer.global_var.assign(rng.uniform(0.5, 2, c).astype(np.float32))
    return model


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8, 8, 1)).astype(np.float32)


def fit_losses(jit_compile: bool | str) -> tuple[list[float], Any]:
    """The per-epoch losses of the small CNN learning which image half is brighter."""
    model = small_cnn(seed=4)
    x = images(64, seed=4)
    labels = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype(np.int32)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    history = model.fit(x, labels, batch_size=16, epochs=25, verbose=0)
    return history.history["loss"], model


@pytest.mark.keras
def test_model_fit_lowers_the_loss_learns_alpha_and_keeps_the_global_statistics():
    initial = dict(hbn_keras.hbn_layers(small_cnn(seed=4)))
    losses, model = fit_losses(jit_compile="auto")
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
    for name, layer in hbn_keras.hbn_layers(model):
        for statistic in ("global_mean", "global_var"):
            expected = numpy(getattr(initial[name], statistic))
            np.testing.assert_array_equal(numpy(getattr(layer, statistic)), expected)
        assert not np.array_equal(numpy(layer.alpha), numpy(initial[name].alpha))


@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf.function", "xla"])
def test_model_fit_on_tensorflow_with_and_without_xla(jit_compile):
    losses, model = fit_losses(jit_compile=jit_compile)
    assert model.jit_compile is jit_compile
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


def test_xla_compiled_gradients_equal_eager_ones():
    import tensorflow as tf

    model = small_cnn(seed=5)
    x = tf.constant(images(6, seed=5))

    def loss_and_gradients(x: Any) -> list[Any]:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) ** 2)
        return [loss, *tape.gradient(loss, model.trainable_weights)]

    eager = loss_and_gradients(x)
    compiled = tf.function(loss_and_gradients, jit_compile=True)(x)
    for a, b in zip(compiled, eager, strict=True):
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=1e-5, atol=1e-6)


@pytest.mark.keras
def test_a_saved_model_reloads_with_identical_outputs(tmp_path):
    model = small_cnn(seed=1)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert [type(layer).__name__ for _, layer in hbn_keras.hbn_layers(reloaded)] == [
        "HybridBatchNormalization"
    ] * 2
    x = tensor(images(5, seed=1))
    for training in (True, False):
        np.testing.assert_array_equal(
            numpy(reloaded(x, training=training)), numpy(model(x, training=training))
        )


def test_model_export_to_a_saved_model_serves_the_inference_outputs(tmp_path):
    """``model.export`` (TensorFlow SavedModel, for TF Serving and TFLite converters)."""
    import tensorflow as tf

    model = small_cnn(seed=6)
    model.export(tmp_path / "exported", format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "exported"))  # holds the variables
    x = images(5, seed=6)
    np.testing.assert_allclose(
        numpy(served.serve(x)), numpy(model(x, training=False)), rtol=1e-6, atol=1e-6
    )


@pytest.mark.keras
def test_get_config_round_trips():
    # momentum is refused unless at its default (test_unsupported_arguments_are_refused).
    layer = hbn_keras.HybridBatchNormalization(
        axis=1,
        epsilon=1e-5,
        center=False,
        gamma_initializer=keras.initializers.Constant(2.0),
        name="norm",
        dtype="float64",
    )
    config = layer.get_config()
    assert {k: config[k] for k in ("axis", "momentum", "epsilon", "center", "scale")} == {
        "axis": 1,
        "momentum": 0.99,
        "epsilon": 1e-5,
        "center": False,
        "scale": True,
    }
    clone = hbn_keras.HybridBatchNormalization.from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == "hbn>HybridBatchNormalization"
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is hbn_keras.HybridBatchNormalization
    restored.build((None, 3, 4))
    np.testing.assert_array_equal(numpy(restored.gamma), np.full(3, 2.0))


@pytest.mark.keras
@pytest.mark.parametrize("mode", ["hybrid", "global"])
def test_collection_equals_moments_of_concatenated_inputs_and_changes_nothing(mode):
    model = small_cnn(seed=2)
    batches = [images(n, seed=n) for n in (3, 1, 5)]
    before = [numpy(w) for w in model.weights]

    stats = hbn_keras.collect_statistics(model, batches, mode=mode)

    for weight, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(numpy(weight), value, err_msg=weight.path)
    conv1, norm1, relu, conv2 = (model.get_layer(index=i) for i in range(4))
    first = [conv1(b) for b in batches]
    second = [conv2(relu(norm1(h, training=mode == "hybrid"))) for h in first]
    assert list(stats) == ["norm1", "norm2"]
    for name, inputs in (("norm1", first), ("norm2", second)):
        data = np.concatenate([numpy(h).astype(np.float64) for h in inputs])
        data = data.reshape(-1, data.shape[-1])
        assert stats[name].count.dtype == np.int64
        assert int(stats[name].count) == data.shape[0]
        assert stats[name].mean.dtype == stats[name].m2.dtype == np.float64
        np.testing.assert_allclose(stats[name].mean, data.mean(axis=0), rtol=1e-5, atol=1e-6)
        m2 = ((data - data.mean(axis=0)) ** 2).sum(axis=0)
        np.testing.assert_allclose(stats[name].m2, m2, rtol=1e-5, atol=1e-5)


@pytest.mark.keras
def test_set_global_statistics_writes_mean_and_biased_variance():
    model = small_cnn(seed=3)
    stats = hbn_keras.collect_statistics(model, [images(4, seed=3)])
    hbn_keras.set_global_statistics(model, stats)
    norm2 = model.get_layer("norm2")
    np.testing.assert_allclose(numpy(norm2.global_mean), stats["norm2"].mean, rtol=1e-6)
    np.testing.assert_allclose(
        numpy(norm2.global_var), stats["norm2"].m2 / stats["norm2"].count, rtol=1e-5
    )


@pytest.mark.keras
@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda s: s.pop("norm1"), r"missing \['norm1'\], unknown \[\]"),
        (lambda s: s.update(extra=s["norm1"]), r"missing \[\], unknown \['extra'\]"),
        (
            lambda s: s.update(norm2=s["norm2"]._replace(count=np.asarray(0))),
            r"`statistics\['norm2'\]` must have a positive count",
        ),
        (
            lambda s: s.update(norm1=s["norm2"]),
            r"`statistics\['norm1'\]` must have a 0-d count and \(4,\) mean",
        ),
        (
            lambda s: s.update(norm2=s["norm2"]._replace(mean=s["norm2"].mean * np.nan)),
            r"must hold finite means",
        ),
    ],
)
def test_bad_statistics_are_rejected_and_change_nothing(edit, pattern):
    model = small_cnn(seed=3)
    stats = hbn_keras.collect_statistics(model, [images(2, seed=3)])
    edit(stats)
    before = [numpy(w) for w in model.weights]
    with pytest.raises(ValueError, match=pattern):
        hbn_keras.set_global_statistics(model, stats)
    for weight, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(numpy(weight), value)


@pytest.mark.keras
def test_numpy_moments_set_the_global_statistics():
    model = keras.Sequential([keras.Input((2,)), hbn_keras.HybridBatchNormalization(name="norm")])
    moments = Moments(np.asarray(4), np.array([1.0, -1.0]), np.array([8.0, 4.0]))
    hbn_keras.set_global_statistics(model, {"norm": moments})
    np.testing.assert_array_equal(numpy(model.get_layer("norm").global_var), [2.0, 1.0])


@pytest.mark.keras
def test_nested_layers_are_keyed_by_path_and_found_by_type():
    block = keras.Sequential(
        [
            keras.layers.BatchNormalization(name="bn"),
            hbn_keras.HybridBatchNormalization(name="norm"),
        ],
        name="block",
    )
    inputs = keras.Input((3,))
    outputs = hbn_keras.HybridBatchNormalization(name="norm")(block(inputs))
    model = keras.Model(inputs, outputs)
    assert [name for name, _ in hbn_keras.hbn_layers(model)] == ["block/norm", "norm"]
    stats = hbn_keras.collect_statistics(model, [np.ones((2, 3), np.float32)])
    assert int(stats["block/norm"].count) == int(stats["norm"].count) == 2


@pytest.mark.keras
def test_layers_with_one_path_are_rejected():
    class Twins(keras.layers.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.first = hbn_keras.HybridBatchNormalization(name="norm")
            self.second = hbn_keras.HybridBatchNormalization(name="norm")

        def call(self, x):
            return self.second(self.first(x))

    with pytest.raises(ValueError, match=r"HBN layers must have unique paths.*\['norm'\]"):
        hbn_keras.hbn_layers(Twins())


@pytest.mark.keras
def test_collection_needs_a_known_mode_and_hbn_layers():
    with pytest.raises(ValueError, match=r"`mode` must be 'hybrid' or 'global'; got 'batch'"):
        hbn_keras.collect_statistics(small_cnn(), [], mode="batch")
    with pytest.raises(ValueError, match=r"`model` has no HBN layer"):
        hbn_keras.collect_statistics(keras.Sequential([keras.layers.Dense(2)]), [])


@pytest.mark.keras
def test_unbuilt_layers_collect_nothing_and_take_no_statistics():
    model = keras.Sequential([hbn_keras.HybridBatchNormalization(name="norm")])
    stats = hbn_keras.collect_statistics(model, [])
    assert int(stats["norm"].count) == 0
    with pytest.raises(ValueError, match=r"HBN layers \['norm'\] are not built"):
        hbn_keras.set_global_statistics(model, stats)


@pytest.mark.keras
@pytest.mark.parametrize(
    ("axis", "shape", "pattern"),
    [
        (-1, (4,), r"expects inputs of at least 2 dimensions.*got input shape \(4,\)"),
        (2, (4, 3), r"`axis` must lie in \[-2, 1\] for inputs of rank 2; got axis=2"),
        (-3, (4, 3), r"`axis` must lie in \[-2, 1\] for inputs of rank 2; got axis=-3"),
    ],
)
def test_wrong_shapes_raise_clear_errors_when_building(axis, shape, pattern):
    layer = hbn_keras.HybridBatchNormalization(axis=axis)
    with pytest.raises(ValueError, match=pattern):
        layer(tensor(np.ones(shape, np.float32)))


@pytest.mark.keras
def test_unknown_channel_size_is_rejected():
    layer = hbn_keras.HybridBatchNormalization()
    with pytest.raises(ValueError, match=r"needs a known size on axis -1.*\(None, None\)"):
        layer.build((None, None))


@pytest.mark.keras
@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((4, 2), r"expected axis -1 of input shape to have value 3"),
        ((4, 5, 3), r"expected ndim=2, found ndim=3"),
    ],
)
def test_a_built_layer_rejects_other_channels_or_ranks(shape, pattern):
    layer = hbn_keras.HybridBatchNormalization()
    layer(tensor(np.ones((4, 3), np.float32)))
    with pytest.raises(ValueError, match=pattern):
        layer(tensor(np.ones(shape, np.float32)), training=True)


@pytest.mark.keras
@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"axis": (1, 2)}, TypeError, r"`axis` must be one int \(the channel axis\); got \(1, 2\)"),
        ({"momentum": 1.5}, ValueError, r"`momentum` is not supported.*; got 1.5"),
        ({"epsilon": -1.0}, ValueError, r"`epsilon` must be >= 0; got -1.0"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        hbn_keras.HybridBatchNormalization(**kwargs)


# Masking, as in BatchNormalization: masked positions stay out of the batch statistics.


def masked_oracle(case: dict, mask: np.ndarray) -> np.ndarray:
    """Float64 NumPy: the hybrid forward with batch statistics of the kept positions only.

    ``mask`` has one dimension less than ``x`` and is broadcast against it without its last
    axis (BatchNormalization's convention); a channel with no kept position has batch mean and
    variance 0.
    """
    x, axis = case["x"], case["axis"] % case["x"].ndim
    channels = x.shape[axis]
    kept = np.broadcast_to(mask[..., None], x.shape)
    values = np.moveaxis(x, axis, -1).reshape(-1, channels)
    keep = np.moveaxis(kept, axis, -1).reshape(-1, channels)
    columns = [values[keep[:, c], c] for c in range(channels)]
    mean = np.array([c.mean() if c.size else 0.0 for c in columns])
    var = np.array([c.var() if c.size else 0.0 for c in columns])
    w = oracle.sigmoid(case["alpha"])
    return oracle.inference(
        x,
        case["scale"],
        case["offset"],
        (1 - w) * mean + w * case["global_mean"],
        (1 - w) * var + w * case["global_var"],
        channel_axis=axis,
        eps=EPSILON,
    )


def masks(case: dict) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.bool_, case["x"].shape[:-1])


@pytest.mark.keras
@given(case=layer_cases(), data=st.data())
def test_masked_training_forward_equals_the_float64_oracle_of_the_kept_positions(case, data):
    mask = data.draw(masks(case))
    layer = make_layer(case)
    y = numpy(layer(tensor(case["x"]), mask=tensor(mask), training=True))
    np.testing.assert_allclose(y, masked_oracle(case, mask), rtol=1e-10, atol=1e-10)
    # Inference ignores the mask, as BatchNormalization's does.
    np.testing.assert_array_equal(
        numpy(layer(tensor(case["x"]), mask=tensor(mask), training=False)),
        numpy(layer(tensor(case["x"]), training=False)),
    )


@pytest.mark.keras
@given(case=layer_cases(), data=st.data())
def test_masked_values_change_only_their_own_outputs(case, data):
    mask = data.draw(masks(case))
    kept = np.broadcast_to(mask[..., None], case["x"].shape)
    noise = data.draw(hnp.arrays(np.float64, case["x"].shape, elements=floats(-1e3, 1e3)))
    layer = make_layer(case)
    y = numpy(layer(tensor(case["x"]), mask=tensor(mask), training=True))
    changed = numpy(
        layer(tensor(np.where(kept, case["x"], noise)), mask=tensor(mask), training=True)
    )
    np.testing.assert_allclose(changed[kept], y[kept], rtol=1e-10, atol=1e-10)


@pytest.mark.keras
@given(case=layer_cases(), data=st.data())
def test_masked_input_gradient_equals_float64_finite_differences(case, data):
    mask = data.draw(masks(case))
    layer = make_layer(case)
    dy = case["dy"]
    (grad,) = gradients(
        lambda x: ops.sum(tensor(dy) * layer(x, mask=tensor(mask), training=True)),
        [tensor(case["x"])],
    )
    direction = data.draw(hnp.arrays(np.float64, case["x"].shape, elements=floats(-1, 1)))
    expected = oracle.directional_derivative(
        lambda x: np.sum(dy * masked_oracle({**case, "x": x}, mask)), case["x"], direction
    )
    scale = np.abs(dy).sum() * (1 + np.abs(case["x"]).max()) * max(1.0, np.abs(case["scale"]).max())
    np.testing.assert_allclose(
        float(np.sum(grad * direction)), expected, rtol=1e-6, atol=1e-7 * scale + 1e-12
    )


@pytest.mark.keras
@given(case=layer_cases())
def test_a_mask_that_keeps_everything_equals_no_mask(case):
    layer = make_layer(case)
    x, dy = tensor(case["x"]), tensor(case["dy"])
    everything = tensor(np.ones(case["x"].shape[:-1], bool))
    np.testing.assert_allclose(
        numpy(layer(x, mask=everything, training=True)),
        numpy(layer(x, training=True)),
        rtol=1e-12,
        atol=1e-12,
    )
    assert_gradients_close(
        gradients(lambda x: ops.sum(dy * layer(x, mask=everything, training=True)), [x])
        + weight_gradients(layer, x, dy, mask=everything),
        gradients(lambda x: ops.sum(dy * layer(x, training=True)), [x])
        + weight_gradients(layer, x, dy),
    )


def padded_sequences() -> np.ndarray:
    """(6, 5, 3) float32 sequences padded with zeros after lengths 5, 1, 3, 2, 4 and 0."""
    x = 3 + 2 * np.random.default_rng(9).standard_normal((6, 5, 3)).astype(np.float32)
    for row, length in enumerate((5, 1, 3, 2, 4, 0)):
        x[row, length:] = 0.0
    return x


@pytest.mark.keras
@pytest.mark.parametrize("mode", ["hybrid", "global"])
def test_a_masking_layer_keeps_the_padding_out_of_fit_and_of_collected_statistics(mode):
    x = padded_sequences()
    model = keras.Sequential(
        [
            keras.Input((5, 3)),
            keras.layers.Masking(0.0),
            hbn_keras.HybridBatchNormalization(name="norm"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.ones((6, 2), np.float32), epochs=1, verbose=0)  # no masking warning
    stats = hbn_keras.collect_statistics(model, [x[:4], x[4:]], mode=mode)
    rows = x.reshape(-1, 3)[np.any(x.reshape(-1, 3) != 0, axis=1)].astype(np.float64)
    assert int(stats["norm"].count) == rows.shape[0] == 15
    np.testing.assert_allclose(stats["norm"].mean, rows.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(
        stats["norm"].m2, ((rows - rows.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-10
    )


@pytest.mark.keras
def test_the_mask_passes_through_to_the_next_layer():
    layer = hbn_keras.HybridBatchNormalization()
    assert layer.supports_masking
    masked = keras.layers.Masking(0.0)(tensor(padded_sequences()))
    mask = numpy(masked._keras_mask)
    np.testing.assert_array_equal(numpy(layer.compute_mask(masked, masked._keras_mask)), mask)


@pytest.mark.keras
def test_collection_refuses_a_mask_that_differs_between_channels():
    """BatchNormalization broadcasts masks without the last axis: with axis=1, per channel."""
    layer = hbn_keras.HybridBatchNormalization(axis=1, name="norm")
    x = np.ones((4, 3, 5), np.float32)
    mask = np.ones((4, 3), bool)
    mask[0, 1] = False
    with pytest.raises(ValueError, match=r"same mask for every channel of HBN layer 'norm'"):
        hbn_keras.collect_statistics(
            keras.Sequential([layer]),
            [(x, mask)],
            forward=lambda model, b: model.layers[0](b[0], mask=b[1], training=False),
        )


@pytest.mark.keras
def test_a_mask_of_another_rank_is_refused():
    layer = hbn_keras.HybridBatchNormalization()
    with pytest.raises(
        ValueError, match=r"`mask` must have one dimension less than the inputs.*\(4, 5, 3\)"
    ):
        layer(tensor(np.ones((4, 5, 3))), mask=tensor(np.ones((4,), bool)), training=True)


# Every BatchNormalization argument: supported, or refused with a reason.


@pytest.mark.keras
def test_regularizers_add_one_loss_per_regularised_weight():
    regularizers = {
        "gamma": keras.regularizers.L2(0.1),
        "beta": keras.regularizers.L1(0.2),
        "alpha": keras.regularizers.L1L2(0.3, 0.4),
    }
    layer = hbn_keras.HybridBatchNormalization(
        **{f"{name}_regularizer": r for name, r in regularizers.items()}
    )
    layer.build((None, 3))
    rng = np.random.default_rng(5)
    for name in regularizers:
        getattr(layer, name).assign(rng.standard_normal(3).astype(np.float32))
    layer(tensor(np.ones((4, 3), np.float32)), training=True)
    expected = sorted(
        float(numpy(regularizer(getattr(layer, name))))
        for name, regularizer in regularizers.items()
    )
    assert sorted(float(numpy(loss)) for loss in layer.losses) == pytest.approx(expected)
    assert expected[0] > 0


@pytest.mark.keras
def test_constraints_project_each_weight_after_an_optimizer_step():
    constrained = hbn_keras.HybridBatchNormalization(
        gamma_constraint="non_neg", beta_constraint="non_neg", alpha_constraint="non_neg"
    )
    free = hbn_keras.HybridBatchNormalization()
    for layer in (constrained, free):
        layer.build((None, 3))
        weights = layer.trainable_weights
        keras.optimizers.SGD(1.0).apply_gradients(
            [(ops.full((3,), 5.0), weight) for weight in weights]
        )
    # gamma 1 - 5, beta 0 - 5, alpha 0 - 5: negative without the constraint, 0 with it.
    assert [numpy(w).tolist() for w in free.trainable_weights] == [[-4.0] * 3] + [[-5.0] * 3] * 2
    assert [numpy(w).tolist() for w in constrained.trainable_weights] == [[0.0] * 3] * 3


@pytest.mark.keras
def test_initializers_set_the_global_statistics_and_alpha():
    layer = hbn_keras.HybridBatchNormalization(
        moving_mean_initializer=keras.initializers.Constant(2.0),
        moving_variance_initializer=keras.initializers.Constant(3.0),
        alpha_initializer=keras.initializers.Constant(-1.0),
    )
    layer.build((None, 2))
    assert [numpy(w).tolist() for w in (layer.global_mean, layer.global_var, layer.alpha)] == [
        [2.0, 2.0],
        [3.0, 3.0],
        [-1.0, -1.0],
    ]


@pytest.mark.keras
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"momentum": 0.9}, r"`momentum` is not supported.*no moving statistics.*got 0.9"),
        ({"renorm": True}, r"`renorm=True` is not supported.*Batch Renormalization"),
        (
            {"renorm_clipping": {"rmax": 3.0}},
            r"`renorm_clipping` is not supported.*only with renorm=True",
        ),
        ({"renorm_momentum": 0.5}, r"`renorm_momentum` is not supported.*got 0.5"),
        ({"synchronized": True}, r"`synchronized=True` is not supported.*each replica"),
    ],
)
def test_unsupported_arguments_are_refused(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        hbn_keras.HybridBatchNormalization(**kwargs)


@pytest.mark.keras
def test_a_batch_normalization_config_builds_the_same_layer():
    batch_norm = keras.layers.BatchNormalization(
        axis=1,
        epsilon=1e-4,
        center=False,
        moving_variance_initializer=keras.initializers.Constant(2.0),
        gamma_regularizer="l2",
        gamma_constraint="non_neg",
    )
    layer = hbn_keras.HybridBatchNormalization.from_config(batch_norm.get_config())
    x = tensor(np.random.default_rng(6).standard_normal((4, 3, 2)).astype(np.float32))
    for normalisation in (batch_norm, layer):
        normalisation.build((None, 3, 2))
    assert (layer.axis, layer.epsilon, layer.beta) == (1, 1e-4, None)
    assert type(layer.gamma.constraint) is type(batch_norm.gamma.constraint)
    np.testing.assert_allclose(
        numpy(layer(x, training=False)), numpy(batch_norm(x, training=False)), rtol=1e-6
    )


# stateless_call with NumPy inputs and weights, as BatchNormalization takes them.


@pytest.mark.keras
@pytest.mark.parametrize("training", [True, False])
def test_stateless_call_takes_numpy_inputs_and_weights(training):
    case = {
        "x": np.random.default_rng(7).standard_normal((6, 3)),
        "axis": -1,
        **{name: np.linspace(0.5, 1.5, 3) for name in NAMES},
    }
    layer = make_layer(case)
    trainable = [numpy(w) for w in layer.trainable_weights]
    non_trainable = [numpy(w) for w in layer.non_trainable_weights]
    y, statistics = layer.stateless_call(trainable, non_trainable, case["x"], training=training)
    expected = oracle_forward(case) if training else oracle.inference(
        case["x"], *(case[n] for n in ("scale", "offset", "global_mean", "global_var")),
        channel_axis=-1, eps=EPSILON,
    )  # fmt: skip
    np.testing.assert_allclose(numpy(y), expected, rtol=1e-10, atol=1e-10)
    for value, before in zip(statistics, non_trainable, strict=True):
        np.testing.assert_array_equal(numpy(value), before)


# Second-order gradients: a loss on an input gradient (gradient penalty), differentiated.


def second_order(function: Callable[..., Any], args: list[Any], dy: Any, v: Any) -> list[Any]:
    """The gradients, for ``args``, of ``sum(v * d/dx sum(dy * function(*args)))``, as tensors.

    ``x`` is ``args[0]``. Each backend nests its own autodiff: two GradientTapes, ``jax.grad``
    of ``jax.grad``, or ``torch.autograd.grad`` with ``create_graph=True``.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as outer:
            outer.watch(args)
            with tf.GradientTape() as inner:
                inner.watch(args)
                value = ops.sum(dy * function(*args))
            penalty = ops.sum(v * inner.gradient(value, args[0]))
        grads = outer.gradient(penalty, args)
    elif BACKEND == "jax":
        import jax

        def penalty(*a: Any) -> Any:
            return ops.sum(v * jax.grad(lambda *b: ops.sum(dy * function(*b)))(*a))

        grads = jax.grad(penalty, argnums=tuple(range(len(args))))(*args)
    else:
        import torch

        args = [a.detach().requires_grad_(True) for a in args]
        (dx,) = torch.autograd.grad(ops.sum(dy * function(*args)), args[0], create_graph=True)
        grads = torch.autograd.grad(ops.sum(v * dx), args, allow_unused=True)
    # An argument the input gradient does not depend on (the offset) may get None.
    return [ops.zeros_like(a) if g is None else g for g, a in zip(grads, args, strict=True)]


@pytest.mark.keras
@pytest.mark.parametrize("path", ["custom gradient", "masked"])
@given(case=layer_cases(), data=st.data())
def test_second_order_gradients_equal_those_of_a_plain_composition(case, data, path):
    v = tensor(data.draw(hnp.arrays(np.float64, case["x"].shape, elements=floats(-1, 1))))
    dy = tensor(case["dy"])
    statistics = [tensor(case["global_mean"]), tensor(case["global_var"])]
    options = {"axis": case["axis"], "epsilon": EPSILON}
    everything = tensor(np.ones(case["x"].shape, bool))

    mask = everything if path == "masked" else None

    def layer_function(*a: Any) -> Any:
        return hbn_keras.hybrid_batch_norm(*a, *statistics, mask=mask, **options)

    args = [tensor(case[k]) for k in ("x", "scale", "offset", "alpha")]
    actual = map(numpy, second_order(layer_function, args, dy, v))
    composition = lambda *a: plain_composition(*a, *statistics, axis=case["axis"])  # noqa: E731
    expected = map(numpy, second_order(composition, args, dy, v))
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-8, atol=1e-8 * (1 + np.abs(e).max()))


@pytest.mark.keras
def test_a_gradient_penalty_through_the_layer_trains_its_weights_as_a_composition_does():
    rng = np.random.default_rng(8)
    case = {
        "x": rng.standard_normal((5, 4, 3)),
        "axis": -1,
        "scale": rng.uniform(0.5, 2, 3),
        "offset": rng.standard_normal(3),
        "alpha": rng.standard_normal(3),
        "global_mean": rng.standard_normal(3),
        "global_var": rng.uniform(0.5, 2, 3),
    }
    layer = make_layer(case)
    dy, v = tensor(rng.standard_normal((5, 4, 3))), tensor(rng.standard_normal((5, 4, 3)))
    weights = [w.value for w in layer.trainable_weights]  # gamma, beta, alpha
    non_trainable = [w.value for w in layer.non_trainable_weights]

    def through_layer(x: Any, *trainable: Any) -> Any:
        y, _ = layer.stateless_call(list(trainable), non_trainable, x, training=True)
        return y

    statistics = [tensor(case["global_mean"]), tensor(case["global_var"])]
    args = [tensor(case["x"]), *weights]
    actual = [numpy(g) for g in second_order(through_layer, args, dy, v)]
    composition = lambda *a: plain_composition(*a, *statistics, axis=-1)  # noqa: E731
    expected = [numpy(g) for g in second_order(composition, args, dy, v)]
    assert_gradients_close(actual, expected)
    assert np.abs(expected[3]).max() > 1e-3  # alpha's second-order term is not trivially 0


@pytest.mark.keras
def test_backend_specific_second_order_checks():
    """torch: gradgradcheck in float64; JAX: jax.hessian (forward over reverse); TF: XLA."""
    rng = np.random.default_rng(10)
    args = [tensor(rng.standard_normal((4, 3))), tensor(rng.uniform(0.5, 2, 3))]
    args += [tensor(rng.standard_normal(3)), tensor(rng.standard_normal(3))]
    statistics = [tensor(rng.standard_normal(3)), tensor(rng.uniform(0.5, 2, 3))]
    if BACKEND == "torch":
        import torch

        inputs = tuple(a.detach().requires_grad_(True) for a in args)
        assert torch.autograd.gradgradcheck(
            lambda *a: hbn_keras.hybrid_batch_norm(*a, *statistics, epsilon=EPSILON), inputs
        )
    elif BACKEND == "jax":
        import jax

        dy = tensor(rng.standard_normal((4, 3)))

        def loss(function: Callable[..., Any]) -> Callable[[Any], Any]:
            return lambda x: ops.sum(dy * function(x, *args[1:], *statistics))

        hessian = jax.hessian(loss(lambda *a: hbn_keras.hybrid_batch_norm(*a, epsilon=EPSILON)))
        reference = jax.hessian(loss(lambda *a: plain_composition(*a, axis=-1)))
        np.testing.assert_allclose(
            numpy(hessian(args[0])), numpy(reference(args[0])), rtol=1e-9, atol=1e-9
        )
    else:
        import tensorflow as tf

        dy, v = (tensor(rng.standard_normal((4, 3))) for _ in range(2))

        def penalty_gradients(*a: Any) -> list[Any]:
            layer = lambda *b: hbn_keras.hybrid_batch_norm(*b, *statistics, epsilon=EPSILON)  # noqa: E731
            return second_order(layer, list(a), dy, v)

        compiled = tf.function(penalty_gradients, jit_compile=True)(*args)
        composition = lambda *a: plain_composition(*a, *statistics, axis=-1)  # noqa: E731
        expected = [numpy(g) for g in second_order(composition, args, dy, v)]
        assert_gradients_close([numpy(g) for g in compiled], expected)
