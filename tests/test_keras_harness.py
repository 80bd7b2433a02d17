"""Keras' own layer harness on HybridBatchNormalization: BatchNormalization's tests, adapted.

Each test of ``keras/src/layers/normalization/batch_normalization_test.py`` (Keras 3.15), over
its parameter grid, runs here on :class:`backends.keras.HybridBatchNormalization`, with Keras'
``TestCase`` (``run_layer_test``, ``assertAllClose``, ...). The adaptations, applied throughout:

- HBN has three trainable weights (``gamma``, ``beta``, ``alpha``) and keeps no moving
  statistics. Its non-trainable ``global_mean`` and ``global_var`` take their place, with
  BatchNormalization's ``moving_mean_initializer`` and ``moving_variance_initializer``.
- Where Keras' test needs plain batch normalisation in training, the layer gets
  ``alpha = -inf`` (weight 0 on the global statistics), where HBN is batch normalisation.
- Where Keras' test reads the moving statistics after training with ``momentum=0`` (the last
  batch's statistics), this test reads the statistics that ``collect_statistics`` returns
  for that batch, which ``set_global_statistics`` writes.

Where a case does not apply, the test says why in one line and asserts the refusal. tests-tf
runs these on Keras' TensorFlow backend; tests-cross reruns them on its JAX and torch backends
(``tests/test_keras_backends.py``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

keras = pytest.importorskip("keras")
hbn_keras = pytest.importorskip("backends.keras")

from keras.src import testing  # noqa: E402

from tests.test_keras_adapter import keras_rank_promotion  # noqa: E402, F401

pytestmark = [
    pytest.mark.tf,
    pytest.mark.keras,
    # Keras' run_layer_test fits on a generator with shuffle=True, which Keras warns about.
    pytest.mark.filterwarnings("ignore:`shuffle=True` was passed:UserWarning"),
]
HBN = hbn_keras.HybridBatchNormalization
layers, ops = keras.layers, keras.ops
BATCH_STATISTICS_ONLY = keras.initializers.Constant(-math.inf)  # alpha = -inf


@pytest.fixture
def harness() -> Iterator[Any]:
    """Keras' ``TestCase``, set up as Keras' own tests run it."""
    case = testing.TestCase("run_layer_test")
    case.setUp()
    yield case
    case.doCleanups()


def statistics_of(model_or_layer: Any, batch: Any, **call: Any) -> Any:
    """The moments that ``collect_statistics`` measures for the HBN layer on ``batch``."""
    if isinstance(model_or_layer, HBN):
        model = keras.Sequential([model_or_layer])
        stats = hbn_keras.collect_statistics(
            model, [batch], forward=lambda m, b: m.layers[0](b, training=False, **call)
        )
    else:
        stats = hbn_keras.collect_statistics(model_or_layer, [batch])
    (moments,) = stats.values()
    return moments


# test_bn_basics: the three run_layer_test calls, with HBN's weight counts (alpha is the third
# trainable weight, and the only one without center and scale).
BASICS = {
    "vector": (
        {"center": True, "scale": True},
        (2, 3),
        {"trainable": 3, "non_trainable": 2, "losses": 0},
    ),
    "vector-no-affine": (
        {"center": False, "scale": False},
        (2, 3),
        {"trainable": 1, "non_trainable": 2, "losses": 0},
    ),
    "image-regularizers": (
        {"center": True, "scale": True, "beta_regularizer": "l2", "gamma_regularizer": "l2"},
        (2, 4, 4, 3),
        {"trainable": 3, "non_trainable": 2, "losses": 2},
    ),
}


@pytest.mark.parametrize("case", list(BASICS))
def test_bn_basics(harness, case):
    init_kwargs, input_shape, expected = BASICS[case]
    harness.run_layer_test(
        HBN,
        init_kwargs=init_kwargs,
        call_kwargs={"training": True},
        input_shape=input_shape,
        expected_output_shape=input_shape,
        expected_num_trainable_weights=expected["trainable"],
        expected_num_non_trainable_weights=expected["non_trainable"],
        expected_num_seed_generators=0,
        expected_num_losses=expected["losses"],
        supports_masking=True,
    )


@pytest.mark.parametrize("moving_variance_initializer", ["zeros", "ones"])
@pytest.mark.parametrize("moving_mean_initializer", ["zeros", "ones"])
@pytest.mark.parametrize("input_shape", [(5, 2, 3), (5, 3, 3, 2)])
@pytest.mark.parametrize("axis", [-1, 1])
def test_correctness(
    harness, axis, input_shape, moving_mean_initializer, moving_variance_initializer
):
    layer = HBN(
        axis=axis,
        moving_mean_initializer=moving_mean_initializer,
        moving_variance_initializer=moving_variance_initializer,
        alpha_initializer=BATCH_STATISTICS_ONLY,
    )
    # Random data centered on 5.0, variance 10.0
    x = np.random.default_rng(0).normal(loc=5.0, scale=10.0, size=input_shape)
    out = x
    for _ in range(3):
        out = layer(out, training=True)

    # Assert the normalization is correct.
    broadcast_shape = [1] * len(input_shape)
    broadcast_shape[axis] = input_shape[axis]
    out = ops.convert_to_numpy(out)
    out = out - np.reshape(ops.convert_to_numpy(layer.beta), broadcast_shape)
    out = out / np.reshape(ops.convert_to_numpy(layer.gamma), broadcast_shape)
    reduction_axes = tuple(i for i in range(len(input_shape)) if i != axis % len(input_shape))
    harness.assertAllClose(np.mean(out, axis=reduction_axes), 0.0, atol=1e-3)
    harness.assertAllClose(np.std(out, axis=reduction_axes), 1.0, atol=1e-3)
    # HBN keeps no moving statistics: training leaves the global ones at their initial values.
    harness.assertAllClose(layer.global_mean, float(moving_mean_initializer == "ones"))
    harness.assertAllClose(layer.global_var, float(moving_variance_initializer == "ones"))

    # Inference done before training shouldn't match.
    inference_out = layer(x, training=False)
    training_out = layer(x, training=True)
    harness.assertNotAllClose(inference_out, training_out)

    # Keras: "since momentum is zero, inference after training should match". HBN: once the
    # global statistics are this batch's own (collected, then set), inference matches.
    model = keras.Sequential([layer])
    hbn_keras.set_global_statistics(model, hbn_keras.collect_statistics(model, [x]))
    training_out = layer(x, training=True)
    inference_out = layer(x, training=False)
    harness.assertAllClose(inference_out, training_out, atol=1e-5, rtol=1e-5)

    # Masked result with no training should not differ
    x[:, 1, :] = 0.0
    unmasked_out = layer(x, training=False)
    masked = layers.Masking()(x)
    masked_out = layer(masked, training=False)
    harness.assertAllClose(unmasked_out, masked_out)

    # Masked result should differ from unmasked result
    unmasked_out = layer(x, training=False)
    x[:, 1, :] = 0.0
    masked = layers.Masking()(x)
    masked_out = layer(masked, training=True)
    harness.assertNotAllClose(unmasked_out, masked_out)


def test_input_fully_masked(harness):
    # Keras' grid adds synchronized=True on TensorFlow, but its condition compares the function
    # keras.backend.backend with a string, so it runs synchronized=False only; HBN refuses
    # synchronized=True (test_unsupported_arguments_are_refused in test_keras_adapter.py).
    norm = HBN(scale=False, center=False, synchronized=False)
    x = np.zeros((4, 5))
    mask = np.zeros((4,), dtype=np.float32)
    y = norm(x, mask=mask, training=True)
    harness.assertAllClose(y, np.zeros_like(x, dtype=np.float32))


@pytest.mark.parametrize("mask_value", [0.0, 0.1, 1])
@pytest.mark.parametrize("run_eagerly", [True, False])
def test_bachnorm_ignore_masked_values(harness, run_eagerly, mask_value):
    padded_data = np.array(
        [[[1, 5], [2, 5], [mask_value, mask_value], [mask_value, mask_value]] for _ in range(10)],
        dtype="float32",
    )
    inputs = layers.Input((None, 2))
    masked = layers.Masking(mask_value=mask_value)(inputs)
    normed = HBN()(masked)
    model = keras.Model(inputs, normed)
    model.compile("rmsprop", loss=keras.losses.MeanSquaredError(), run_eagerly=run_eagerly)
    model.fit(x=padded_data, y=padded_data, batch_size=10, epochs=5, verbose=0)
    # Keras reads the moving statistics after fit with momentum 0; HBN's global statistics
    # stay as they are in fit, and the collected statistics exclude the masked steps.
    harness.assertAllClose(model.layers[2].global_mean, [0.0, 0.0])
    stats = statistics_of(model, padded_data)
    harness.assertAllClose(stats.mean, [1.5, 5.0])
    harness.assertAllClose(stats.m2 / stats.count, [0.25, 0.0])


def test_trainable_behavior(harness):
    # Keras passes momentum=0.8, which HBN refuses: it keeps no moving statistics.
    layer = HBN(axis=-1, epsilon=1e-7, alpha_initializer=BATCH_STATISTICS_ONLY)
    layer.build((1, 4, 4, 3))
    layer.trainable = False
    assert len(layer.weights) == 5
    assert len(layer.trainable_weights) == 0
    assert len(layer.non_trainable_weights) == 5

    # Random data centered on 5.0, variance 10.0
    x = np.random.default_rng(1).normal(loc=5.0, scale=10.0, size=(200, 4, 4, 3))

    out = layer(x, training=True)
    harness.assertAllClose(out, x)

    layer.trainable = True
    assert len(layer.weights) == 5
    assert len(layer.trainable_weights) == 3
    assert len(layer.non_trainable_weights) == 2

    for _ in range(10):
        out = layer(x, training=True)

    out = ops.convert_to_numpy(out)
    out = out - np.reshape(ops.convert_to_numpy(layer.beta), (1, 1, 1, 3))
    out = out / np.reshape(ops.convert_to_numpy(layer.gamma), (1, 1, 1, 3))

    harness.assertAllClose(np.mean(out, axis=(0, 1, 2)), 0.0, atol=1e-3)
    harness.assertAllClose(np.std(out, axis=(0, 1, 2)), 1.0, atol=1e-3)


def test_large_value_within_autocast_scope(harness):
    layer = HBN()
    layer.build((1, 4, 4, 3))
    # Use 70000 to trigger overflow for float16
    large_value = ops.full(layer.global_var.shape, 70000)
    with keras.src.backend.AutocastScope("float16"):
        layer.global_var.assign(large_value)
        harness.assertAllClose(layer.global_var.value, large_value)


def test_masked_broadcast_normalization(harness):
    input_shape = (1, 2, 3, 4)
    mask_shape = (1, 2, 1)
    x = ops.ones(input_shape)
    mask = ops.ones(mask_shape)

    layer = HBN(axis=-1, epsilon=1e-3, alpha_initializer=BATCH_STATISTICS_ONLY)

    y = layer(x, training=True, mask=mask)

    mean_y = ops.mean(y, axis=[0, 1, 2])

    harness.assertAllClose(mean_y, ops.zeros((4,)), atol=1e-6)
    harness.assertAllClose(y, ops.zeros_like(y), atol=1e-6)

    stats = statistics_of(layer, x, mask=mask)
    harness.assertAllClose(stats.mean, ops.ones((4,)), atol=1e-6)
    harness.assertAllClose(stats.m2 / stats.count, ops.zeros((4,)), atol=1e-6)


# test_renorm_basics (two run_layer_test calls), test_renorm_invalid_clipping_keys (three),
# test_renorm_stddev_initializer, test_renorm_inference, test_renorm_correctness and
# test_serialization construct BatchNormalization with renorm=True.
RENORM_CASES = {
    "basics": {"center": True, "scale": True, "renorm": True},
    "basics-clipping": {"renorm": True, "renorm_clipping": {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}},
    "invalid-clipping-keys": {"renorm": True, "renorm_clipping": {"random_key": 1.0}},
    "invalid-rmax": {"renorm": True, "renorm_clipping": {"rmax": 0.0, "rmin": 1.0}},
    "invalid-dmax": {"renorm": True, "renorm_clipping": {"rmax": 1.0, "dmax": -1.0}},
    "stddev-initializer": {
        "renorm": True,
        "moving_variance_initializer": keras.initializers.Constant(4.0),
    },
    "inference": {"renorm": True},
    "correctness": {"axis": -1, "epsilon": 1e-3, "renorm": True, "renorm_momentum": 0.8},
    "serialization": {
        "renorm": True,
        "renorm_clipping": {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
        "renorm_momentum": 0.95,
    },
}


@pytest.mark.parametrize("case", list(RENORM_CASES))
def test_renorm_is_refused(case):
    """Does not apply: HBN mixes batch and global statistics with alpha, not Batch Renorm."""
    with pytest.raises(ValueError, match=r"`renorm=True` is not supported"):
        HBN(**RENORM_CASES[case])


def test_serialization(harness):
    # Keras' test serialises renorm arguments (refused above); this one every HBN argument.
    layer = HBN(
        axis=1,
        epsilon=1e-4,
        center=False,
        gamma_initializer="he_normal",
        moving_mean_initializer=keras.initializers.Constant(0.5),
        moving_variance_initializer="ones",
        gamma_regularizer=keras.regularizers.L2(0.1),
        gamma_constraint="non_neg",
        alpha_initializer=keras.initializers.Constant(1.5),
        alpha_regularizer="l1",
        alpha_constraint=keras.constraints.MaxNorm(2.0),
    )
    config = layer.get_config()
    new_layer = HBN.from_config(config)
    assert new_layer.get_config() == config
    harness.run_class_serialization_test(layer)
