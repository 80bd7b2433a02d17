"""federation.models: the reference models in Flax NNX and Keras, and their agreement with PyTorch.

The single-framework tests run once per framework, in its session (``jax``: JAX, Flax and
optax; ``tf``: TensorFlow and Keras): state round trips, HBN statistics against a float64 NumPy
forward of the canonical state, training, and the FedFN, FBN and FixBN options against
properties of their own. The ``cross`` tests load one canonical state into the torch model and
the other framework's model and check that they compute the same things, training included
(the options in float64, to rounding). JAX models of one spec share their compiled steps; a
Keras model compiles its own, once (once per statistics mode with FixBN).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from conftest import import_framework
from federation import data
from federation.models import (
    ARCHITECTURES,
    NORMS,
    ModelSpec,
    SGDConfig,
    build_model,
    trainable_batches,
)

SHAPES = {"simple-cnn": [(1, 8, 8), (3, 17, 27)], "mlp": [(1, 8, 8), (2, 5, 7)]}
# (3, 17, 27) pools to 8x13, 4x6 and 2x3: odd sizes floor, and fc1 flattens a non-square map.
TRAIN_SHAPES = {"simple-cnn": (3, 17, 27), "mlp": (2, 5, 7)}
BATCH = 6
CLASSES = 5
MODELS = pytest.mark.parametrize(
    ("architecture", "norm"), [(a, n) for a in ARCHITECTURES for n in NORMS]
)
HBN_MODES = pytest.mark.parametrize("mode", ["hybrid", "global"])
# FedFN, FBN and FixBN (`feature_norm`, `hybrid="global"`, `freeze_statistics`) on small
# models; the Simple-CNN pools (2, 8, 16) to 1x2, so fc1's flatten order differs by framework.
OPTION_SHAPE = (2, 8, 16)


def make_spec(architecture: str, norm: str, shape: tuple[int, int, int] | None = None) -> ModelSpec:
    return ModelSpec(architecture, norm, shape or TRAIN_SHAPES[architecture], CLASSES)


def option_spec(architecture: str, norm: str, dtype: str = "float32", **options: Any) -> ModelSpec:
    """A small model of ``architecture`` and ``norm`` with the ModelSpec ``options``."""
    return ModelSpec(
        architecture,
        norm,
        OPTION_SHAPE,
        CLASSES,
        hidden=16,
        channels=(4, 8, 8),
        dtype=dtype,
        **options,
    )


def make_batches(spec: ModelSpec, count: int, *, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(size=(BATCH, *spec.input_shape)).astype(np.float32),
            rng.integers(0, CLASSES, BATCH).astype(np.int64),
        )
        for _ in range(count)
    ]


def nontrivial(state: dict[str, np.ndarray], spec: ModelSpec, *, seed: int) -> dict:
    """``state`` with random norm affines, HBN alphas and statistics, BN running statistics."""
    rng = np.random.default_rng(seed)
    draws = {
        "weight": lambda c: rng.uniform(0.5, 1.5, c),
        "bias": lambda c: rng.normal(0.0, 0.2, c),
        "alpha": lambda c: rng.uniform(-2.0, 2.0, c),
        "global_mean": lambda c: rng.normal(0.0, 0.5, c),
        "global_var": lambda c: rng.uniform(0.5, 2.0, c),
        "running_mean": lambda c: rng.normal(0.0, 0.5, c),
        "running_var": lambda c: rng.uniform(0.5, 2.0, c),
    }
    changed = dict(state)
    for layer in spec.norm_layers():
        channels = state[f"{layer}.weight"].shape
        for leaf, draw in draws.items():
            if f"{layer}.{leaf}" in state:
                changed[f"{layer}.{leaf}"] = draw(channels).astype(np.float32)
    return changed


def norm_input_sizes(spec: ModelSpec) -> dict[str, int]:
    """Elements per channel, per example, at each norm layer's input."""
    if spec.architecture == "mlp":
        return {"norm1": 1}
    _, height, width = spec.input_shape
    sizes = {}
    for index in range(1, len(spec.channels) + 1):
        sizes[f"norm{index}"] = height * width
        height, width = height // 2, width // 2
    return sizes


def numpy_norm1_input(state: dict[str, np.ndarray], spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    """The input of ``norm1`` in float64 NumPy, from the canonical state, channels on axis 1."""
    x = x.astype(np.float64)
    if spec.architecture == "mlp":
        return x.reshape(len(x), -1) @ state["fc1.weight"].T.astype(np.float64) + state["fc1.bias"]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    y = np.einsum("nchwij,ocij->nohw", windows, state["conv1.weight"].astype(np.float64))
    return y + state["conv1.bias"][:, None, None]


def assert_states_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


# Each framework compared with torch: its model module and the marker of its own session.
MODULES = {
    "jax": ("federation.models.jax_model", "jax"),
    "keras": ("federation.models.keras_model", "tf"),
}


@pytest.fixture(
    params=[pytest.param(name, marks=getattr(pytest.mark, MODULES[name][1])) for name in MODULES]
)
def framework(request: pytest.FixtureRequest) -> str:
    """A framework alone, in its own session: ``jax`` or ``keras``."""
    module, marker = MODULES[request.param]
    import_framework(module, marker)
    return request.param


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.cross) for name in MODULES])
def other(request: pytest.FixtureRequest) -> str:
    """A framework to compare with torch, in the cross session: ``jax`` or ``keras``."""
    for module in ("federation.models.torch_model", MODULES[request.param][0]):
        import_framework(module, "cross")
    return request.param


# --- Each framework alone -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "shape"), [(a, s) for a, shapes in SHAPES.items() for s in shapes]
)
@pytest.mark.parametrize("norm", NORMS)
def test_state_round_trip_is_exact(framework, architecture, shape, norm):
    spec = make_spec(architecture, norm, shape)
    model = build_model(framework, spec, seed=0)
    assert model.layout == spec.layout()
    initial = model.get_state()
    assert {k: v.shape for k, v in initial.items()} == {
        k: s.shape for k, s in spec.layout().items()
    }
    assert all(v.dtype == np.float32 for v in initial.values())
    rng = np.random.default_rng(1)
    state = {name: rng.normal(size=s.shape).astype(np.float32) for name, s in spec.layout().items()}
    model.set_state(state)
    assert_states_equal(model.get_state(), state)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@HBN_MODES
def test_statistics_count_every_input_and_match_numpy(framework, architecture, mode):
    spec = make_spec(architecture, "hbn")
    model = build_model(framework, spec, seed=0)
    model.set_state(nontrivial(model.get_state(), spec, seed=2))
    state = model.get_state()
    inputs = [x for x, _ in make_batches(spec, 2, seed=3)]
    collected = model.collect_statistics(inputs, mode)
    assert list(collected) == spec.norm_layers()
    for name, size in norm_input_sizes(spec).items():
        assert collected[name].count.dtype == np.int64
        assert int(collected[name].count) == 2 * BATCH * size
    y = numpy_norm1_input(state, spec, np.concatenate(inputs))
    axes = tuple(a for a in range(y.ndim) if a != 1)
    mean = y.mean(axis=axes)
    m2 = ((y - mean.reshape(-1, *[1] * (y.ndim - 2))) ** 2).sum(axis=axes)
    np.testing.assert_allclose(collected["norm1"].mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(collected["norm1"].m2, m2, rtol=1e-5)
    assert_states_equal(model.get_state(), state)


def test_statistics_need_hbn_layers(framework):
    model = build_model(framework, make_spec("mlp", "bn"), seed=0)
    with pytest.raises(ValueError, match="no HBN layer"):
        model.collect_statistics([np.zeros((2, 2, 5, 7), np.float32)], "hybrid")


@MODELS
def test_training_lowers_the_loss(framework, architecture, norm):
    spec = make_spec(architecture, norm)
    model = build_model(framework, spec, seed=0)
    batch = make_batches(spec, 1, seed=4)
    # A zero learning rate measures the training loss; the optimiser structure stays the same,
    # so all three calls share one compiled step.
    probe = SGDConfig(lr=0.0, momentum=0.9, weight_decay=1e-3, clip_norm=5.0)
    before = model.train(batch, probe)
    result = model.train(
        batch * 4, SGDConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, clip_norm=5.0)
    )
    after = model.train(batch, probe)
    assert (result.examples, result.steps) == (4 * BATCH, 4)
    assert after.loss_sum < 0.7 * before.loss_sum
    assert all(np.isfinite(v).all() for v in model.get_state().values())


def traced_keras_model(
    monkeypatch: pytest.MonkeyPatch, spec: ModelSpec, steps: list[str]
) -> tuple[Any, list[str]]:
    """A Keras model of ``spec``, and the names of its ``steps`` each time one is traced."""
    import_framework("federation.models.keras_model", "tf")
    import keras

    if keras.backend.backend() == "torch":
        pytest.skip("Keras runs its steps eagerly on torch: nothing is traced")
    traces: list[str] = []

    def counting(step: str) -> None:
        original = getattr(model.network, step)
        # Keras' step methods run in Python only while their compiled function is traced.
        monkeypatch.setattr(model.network, step, lambda data: traces.append(step) or original(data))

    model = build_model("keras", spec, seed=0)
    for step in steps:
        counting(step)
    return model, traces


@pytest.mark.tf
def test_keras_steps_compile_once(monkeypatch):
    spec = make_spec("simple-cnn", "hbn")
    model, traces = traced_keras_model(monkeypatch, spec, ["train_step", "predict_step"])
    batches = make_batches(spec, 2, seed=9)
    # New hyperparameters (clipping and momentum off included), new states and new batches
    # of the same size reuse the steps compiled by the first calls.
    for seed, sgd in enumerate([SGDConfig(lr=0.1), SGDConfig(0.05, 0.9, 1e-3, 1.0)]):
        model.set_state(nontrivial(model.get_state(), spec, seed=seed))
        model.train(batches + make_batches(spec, 1, seed=seed), sgd)
        model.evaluate(batches)
    assert sorted(traces) == ["predict_step", "train_step"]


@pytest.mark.tf
def test_keras_compiles_one_train_step_per_statistics_mode(monkeypatch):
    spec = option_spec("mlp", "bn")
    model, traces = traced_keras_model(monkeypatch, spec, ["train_step"])
    batches = make_batches(spec, 2, seed=17)
    for freeze in (False, True, True, False, True):
        model.train(batches, SGDConfig(lr=0.1), freeze_statistics=freeze)
    assert traces == ["train_step", "train_step"]


def numpy_fedfn_mlp_logits(state: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    r"""A FedFN MLP without norm in float64 NumPy: fc1 sees :math:`\sqrt{d}\, z/\lVert z \rVert`."""
    z = x.reshape(len(x), -1).astype(np.float64)
    z = np.sqrt(z.shape[1]) * z / np.linalg.norm(z, axis=1, keepdims=True)
    hidden = np.maximum(z @ state["fc1.weight"].T + state["fc1.bias"], 0.0)
    return hidden @ state["fc2.weight"].T + state["fc2.bias"]


def test_fedfn_scales_the_features_of_fc1_to_root_d(framework):
    spec = option_spec("mlp", "none", feature_norm=True)
    model = build_model(framework, spec, seed=0)
    state = model.get_state()
    x = make_batches(spec, 1, seed=10)[0][0]
    # Per-example scales of 1e-3 to 1e3: the features of fc1 have norm sqrt(d) whatever they are.
    x = x * np.logspace(-3, 3, BATCH, dtype=np.float32)[:, None, None, None]
    expected = numpy_fedfn_mlp_logits(state, x)
    np.testing.assert_allclose(LOGITS[framework](model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature_norm", [True, False], ids=["fedfn", "plain"])
def test_fedfn_makes_a_bias_free_cnn_invariant_to_input_scale(framework, feature_norm):
    # Without biases, conv, ReLU and max-pool are positively homogeneous: the flat features
    # scale with the input, and only FedFN's normalisation removes that scale.
    spec = option_spec("simple-cnn", "none", feature_norm=feature_norm)
    model = build_model(framework, spec, seed=0)
    state = model.get_state()
    model.set_state(
        {
            k: np.zeros_like(v) if k.startswith("conv") and k.endswith("bias") else v
            for k, v in state.items()
        }
    )
    x = make_batches(spec, 1, seed=11)[0][0]
    logits, scaled = LOGITS[framework](model, x), LOGITS[framework](model, 10.0 * x)
    assert np.allclose(scaled, logits, rtol=1e-5, atol=1e-5) == feature_norm


def as_batchnorm_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An FBN state as a BatchNorm state: the global statistics as running statistics."""
    return {name.replace(".global_", ".running_"): value for name, value in state.items()}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fbn_trains_as_batchnorm_with_its_global_statistics_frozen(framework, architecture):
    fbn_spec = option_spec(architecture, "hbn", "float64", hybrid="global")
    fbn = build_model(framework, fbn_spec, seed=0)
    assert not any(name.endswith("alpha") for name in fbn.get_state())
    fbn.set_state(nontrivial(fbn.get_state(), fbn_spec, seed=12))
    bn = build_model(framework, dataclasses.replace(fbn_spec, norm="bn", hybrid="learned"), seed=1)
    bn.set_state(as_batchnorm_state(fbn.get_state()))
    batches = make_batches(fbn_spec, 3, seed=13)
    # Weight decay and momentum: a trained alpha of +inf would turn NaN.
    sgd = SGDConfig(lr=0.1, momentum=0.9, weight_decay=0.05, clip_norm=1.0)
    fbn_result = fbn.train(batches, sgd)
    bn_result = bn.train(batches, sgd, freeze_statistics=True)
    np.testing.assert_allclose(fbn_result.loss_sum, bn_result.loss_sum, rtol=1e-10)
    trained_fbn, trained_bn = as_batchnorm_state(fbn.get_state()), bn.get_state()
    assert trained_fbn.keys() == trained_bn.keys()
    for name, value in trained_bn.items():
        np.testing.assert_allclose(trained_fbn[name], value, rtol=1e-10, atol=1e-12, err_msg=name)
    # Training and collection normalise HBN's inputs with the global statistics alone.
    inputs = [x for x, _ in batches]
    hybrid, global_ = (fbn.collect_statistics(inputs, mode) for mode in ("hybrid", "global"))
    for name, moments in global_.items():
        assert int(hybrid[name].count) == int(moments.count)
        np.testing.assert_allclose(hybrid[name].mean, moments.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(hybrid[name].m2, moments.m2, rtol=1e-12)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_frozen_statistics_stay_while_the_affines_train(framework, architecture):
    spec = option_spec(architecture, "bn")
    model = build_model(framework, spec, seed=0)
    model.set_state(nontrivial(model.get_state(), spec, seed=14))
    before = model.get_state()
    batches = make_batches(spec, 2, seed=15)
    model.train(batches, SGDConfig(lr=0.1, momentum=0.9), freeze_statistics=True)
    frozen = model.get_state()
    for layer in spec.norm_layers():
        for leaf in ("running_mean", "running_var"):
            np.testing.assert_array_equal(frozen[f"{layer}.{leaf}"], before[f"{layer}.{leaf}"])
        for leaf in ("weight", "bias"):
            assert not np.array_equal(frozen[f"{layer}.{leaf}"], before[f"{layer}.{leaf}"])
    # The next call without freezing updates the statistics again.
    model.train(batches, SGDConfig(lr=0.1))
    tracking = model.get_state()
    for layer in spec.norm_layers():
        assert not np.array_equal(
            tracking[f"{layer}.running_mean"], frozen[f"{layer}.running_mean"]
        )


# --- Each framework against torch -----------------------------------------------------------


def same_models(spec: ModelSpec, other: str) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """The torch and the ``other`` model of ``spec``, loaded with one non-trivial state."""
    torch_model = build_model("torch", spec, seed=0)
    state = nontrivial(torch_model.get_state(), spec, seed=5)
    torch_model.set_state(state)
    other_model = build_model(other, spec, seed=1)
    other_model.set_state(state)
    return torch_model, other_model, state


def torch_logits(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    model.network.eval()
    with torch.no_grad():
        return model.network(torch.from_numpy(x)).numpy()


def jax_logits(model: Any, x: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    model.network.eval()
    return np.asarray(model.network(jnp.asarray(x.transpose(0, 2, 3, 1))))


def keras_logits(model: Any, x: np.ndarray) -> np.ndarray:
    # The Keras network takes canonical NCHW images; it transposes them itself.
    return np.asarray(model.network(x, training=False))


LOGITS = {"jax": jax_logits, "keras": keras_logits}


@MODELS
def test_evaluation_agrees_with_torch(other, architecture, norm):
    spec = make_spec(architecture, norm)
    torch_model, other_model, _ = same_models(spec, other)
    batches = make_batches(spec, 2, seed=6)
    x = batches[0][0]
    np.testing.assert_allclose(
        LOGITS[other](other_model, x), torch_logits(torch_model, x), rtol=1e-4, atol=1e-5
    )
    expected, actual = torch_model.evaluate(batches), other_model.evaluate(batches)
    assert (actual.correct, actual.examples) == (expected.correct, expected.examples)
    np.testing.assert_allclose(actual.loss_sum, expected.loss_sum, rtol=1e-4)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@HBN_MODES
def test_statistics_agree_with_torch(other, architecture, mode):
    spec = make_spec(architecture, "hbn")
    torch_model, other_model, _ = same_models(spec, other)
    inputs = [x for x, _ in make_batches(spec, 2, seed=7)]
    expected = torch_model.collect_statistics(inputs, mode)
    actual = other_model.collect_statistics(inputs, mode)
    assert list(actual) == list(expected) == spec.norm_layers()
    for name, moments in expected.items():
        assert int(actual[name].count) == int(moments.count)
        np.testing.assert_allclose(actual[name].mean, moments.mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(actual[name].m2, moments.m2, rtol=1e-5)


def gradient_norm(spec: ModelSpec, state: dict, batch: tuple[np.ndarray, np.ndarray]) -> float:
    """The global gradient norm of the mean cross-entropy at ``state``, in training mode."""
    import torch

    probe = build_model("torch", spec, seed=0)
    probe.set_state(state)
    network = probe.network
    network.train()
    x, y = torch.from_numpy(batch[0].astype(spec.dtype)), torch.from_numpy(batch[1])
    torch.nn.functional.cross_entropy(network(x), y).backward()
    return float(
        torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in network.parameters() if p.grad is not None])
        )
    )


@MODELS
def test_one_train_call_agrees_with_torch(other, architecture, norm):
    spec = make_spec(architecture, norm)
    torch_model, other_model, state = same_models(spec, other)
    batches = make_batches(spec, 3, seed=8)
    # Clipping at half the first step's gradient norm: active from the first step on.
    clip = 0.5 * gradient_norm(spec, state, batches[0])
    sgd = SGDConfig(lr=0.1, momentum=0.9, weight_decay=0.05, clip_norm=clip)
    expected, actual = torch_model.train(batches, sgd), other_model.train(batches, sgd)
    assert (actual.examples, actual.steps) == (expected.examples, expected.steps)
    np.testing.assert_allclose(actual.loss_sum, expected.loss_sum, rtol=1e-4)
    trained_torch, trained_other = torch_model.get_state(), other_model.get_state()
    for name in spec.layout():
        if name.endswith("running_var"):
            continue  # compared below, with a biased and torch's unbiased variance
        np.testing.assert_allclose(
            trained_other[name], trained_torch[name], rtol=1e-4, atol=1e-6, err_msg=name
        )
        # The steps themselves agree, not only the states they started from.
        step_other = trained_other[name] - state[name]
        step_torch = trained_torch[name] - state[name]
        np.testing.assert_allclose(step_other, step_torch, rtol=1e-3, atol=1e-6, err_msg=name)
    if norm == "bn":
        assert_running_vars_agree(spec, state, trained_other, trained_torch, steps=len(batches))


def assert_running_vars_agree(
    spec: ModelSpec, state: dict, trained_other: dict, trained_torch: dict, *, steps: int
) -> None:
    """Flax's and Keras' running variances, turned unbiased as torch tracks them, equal torch's."""
    for layer, size in norm_input_sizes(spec).items():
        # Each step adds (1 - 0.9) * batch variance: torch's is n / (n - 1) times the biased one.
        n = BATCH * size
        decayed = 0.9**steps * state[f"{layer}.running_var"]
        added = (trained_other[f"{layer}.running_var"] - decayed) * n / (n - 1)
        np.testing.assert_allclose(
            decayed + added, trained_torch[f"{layer}.running_var"], rtol=1e-4, err_msg=layer
        )


def assert_close_states(actual: dict, expected: dict) -> None:
    """The same tensors, equal to float64 rounding."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-10, atol=1e-10, err_msg=name)


# FedFN, FBN and FixBN: (architecture, norm, ModelSpec options, freeze_statistics).
OPTIONS = {
    "fedfn-cnn": ("simple-cnn", "hbn", {"feature_norm": True}, False),
    "fedfn-mlp": ("mlp", "ln", {"feature_norm": True}, False),
    "fbn-cnn": ("simple-cnn", "hbn", {"hybrid": "global"}, False),
    "fbn-mlp": ("mlp", "hbn", {"hybrid": "global"}, False),
    "fixbn-cnn": ("simple-cnn", "bn", {}, True),
    "fixbn-mlp": ("mlp", "bn", {}, True),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_train_and_evaluate_as_torch_in_float64(other, option):
    from tests.test_cross_federation import logits

    architecture, norm, options, freeze = OPTIONS[option]
    spec = option_spec(architecture, norm, "float64", **options)
    torch_model, other_model, state = same_models(spec, other)
    batches = make_batches(spec, 3, seed=16)
    clip = 0.5 * gradient_norm(spec, state, batches[0])
    sgd = SGDConfig(lr=0.1, momentum=0.9, weight_decay=0.05, clip_norm=clip)
    expected = torch_model.train(batches, sgd, freeze_statistics=freeze)
    actual = other_model.train(batches, sgd, freeze_statistics=freeze)
    assert (actual.examples, actual.steps) == (expected.examples, expected.steps)
    # Keras reports its training loss in float32.
    np.testing.assert_allclose(actual.loss_sum, expected.loss_sum, rtol=1e-6)
    assert_close_states(other_model.get_state(), torch_model.get_state())
    expected_eval, actual_eval = torch_model.evaluate(batches), other_model.evaluate(batches)
    assert actual_eval.correct == expected_eval.correct
    np.testing.assert_allclose(actual_eval.loss_sum, expected_eval.loss_sum, rtol=1e-10)
    # Inference, then training mode (last: BatchNorm's running variances then part ways).
    x = batches[0][0].astype(np.float64)
    for training in (False, True):
        np.testing.assert_allclose(
            logits(other, other_model, x, training=training),
            logits("torch", torch_model, x, training=training),
            rtol=1e-10,
            atol=1e-10,
        )


# --- Tiny clients: a 1-example BatchNorm batch is skipped, in every framework -------------------

ALL_MODULES = {"torch": ("federation.models.torch_model", "torch"), **MODULES}
# (architecture, norm, spec options, freeze_statistics): where 1-example batches differ.
TINY_CASES = [
    ("mlp", "bn", {}, False),  # BatchNorm after a dense layer: one value per channel
    ("mlp", "bn", {}, True),  # frozen statistics (FixBN's second stage): no batch statistics
    ("mlp", "bn", {"local_norm": True}, False),  # FedBN
    ("simple-cnn", "bn", {}, False),  # 2x2 maps or larger: 4 values per channel at least
    ("mlp", "hbn", {}, False),  # HBN: the global half of the mixture normalises
    ("mlp", "hbn", {"hybrid": "global"}, False),  # FBN
    ("mlp", "gn", {}, False),
    ("mlp", "none", {"feature_norm": True}, False),  # FedFN
]


@pytest.fixture(
    params=[
        pytest.param(name, marks=getattr(pytest.mark, marker))
        for name, (_, marker) in ALL_MODULES.items()
    ]
)
def any_framework(request: pytest.FixtureRequest) -> str:
    """Every framework, each in its own session: ``torch``, ``jax`` or ``keras``."""
    module, marker = ALL_MODULES[request.param]
    import_framework(module, marker)
    return request.param


def tiny_client_batches(spec: ModelSpec, examples: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A client's batches of size 2, as the federation cuts them: 3 examples give 2 and 1."""
    rng = np.random.default_rng(examples)
    x = rng.normal(size=(examples, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, CLASSES, examples).astype(np.int64)
    return list(data.batches(x, y, np.arange(examples), batch_size=2, rng=None))


@pytest.mark.parametrize(("architecture", "norm", "options", "frozen"), TINY_CASES)
def test_tiny_clients_train_in_every_framework(any_framework, architecture, norm, options, frozen):
    """Clients of 1 and 3 examples, batch size 2: nothing raises, nothing turns non-finite.

    A 1-example batch is skipped exactly where BatchNorm would normalise one value per channel
    with its own statistics; a client with only such a batch returns the state it received.
    """
    spec = option_spec(architecture, norm, **options)
    model = build_model(any_framework, spec, seed=0)
    start = nontrivial(model.get_state(), spec, seed=1)
    skips_single = norm == "bn" and architecture == "mlp" and not frozen
    for examples in (1, 3):
        batches = tiny_client_batches(spec, examples)
        assert [len(y) for _, y in batches] == ([1] if examples == 1 else [2, 1])
        model.set_state(start)
        result = model.train(batches, SGDConfig(lr=0.1), freeze_statistics=frozen)
        trained = model.get_state()
        kept = [len(y) for _, y in batches if not (skips_single and len(y) == 1)]
        assert (result.steps, result.examples) == (len(kept), sum(kept))
        assert all(np.isfinite(value).all() for value in trained.values())
        assert np.isfinite(result.loss_sum)
        if not kept:
            assert_states_equal(trained, start)
        else:
            assert any(not np.array_equal(trained[k], start[k]) for k in start)
        evaluation = model.evaluate(batches)
        assert evaluation.examples == examples
        assert np.isfinite(evaluation.loss_sum)


@pytest.mark.parametrize(
    ("architecture", "norm", "frozen", "skipped"),
    [
        ("mlp", "bn", False, True),
        ("mlp", "bn", True, False),
        ("simple-cnn", "bn", False, False),
        ("mlp", "hbn", False, False),
        ("mlp", "gn", False, False),
    ],
)
def test_trainable_batches_skip_only_single_value_batchnorm_batches(
    architecture, norm, frozen, skipped
):
    spec = option_spec(architecture, norm)
    batches = [tiny_client_batches(spec, n)[-1] for n in (1, 2, 3)]  # sizes 1, 2, 1
    kept = list(trainable_batches(batches, spec, freeze_statistics=frozen))
    assert [len(y) for _, y in kept] == ([2] if skipped else [1, 2, 1])
    assert all(
        k is b
        for k, b in zip(kept, [b for b in batches if len(b[1]) > 1 or not skipped], strict=True)
    )


@pytest.mark.parametrize(
    ("architecture", "shape"), [(a, s) for a, shapes in SHAPES.items() for s in shapes]
)
@pytest.mark.parametrize("norm", NORMS)
def test_norm_positions_are_the_elements_per_example_at_each_norm(architecture, shape, norm):
    spec = make_spec(architecture, norm, shape)
    expected = norm_input_sizes(spec) if norm != "none" else {}
    assert spec.norm_positions() == expected
    assert list(expected) == spec.norm_layers()


TINY_METHODS = ["hbn", "hbn-authors", "fbn", "bn", "fedbn", "fixbn", "gn", "ln", "fedfn", "none"]


@pytest.mark.torch
@pytest.mark.parametrize("examples_per_client", [1, 3])
@pytest.mark.parametrize("method", TINY_METHODS)
def test_a_federation_of_tiny_clients_runs_every_method(method, examples_per_client):
    """Every client must succeed (min_clients = all of them), every round, batch size 2."""
    import_framework("federation.models.torch_model", "torch")
    from federation.config import parse_config
    from federation.data import Dataset
    from federation.runner import run

    rng = np.random.default_rng(0)
    clients, test = 4, 6
    train = clients * examples_per_client
    labels = np.arange(train + test) % 3
    images = rng.normal(size=(train + test, 1, 8, 8)) + labels[:, None, None, None]
    dataset = Dataset.from_arrays(images[:train], labels[:train], images[train:], labels[train:])
    config = parse_config(
        {
            "method": method,
            "rounds": 2,
            "data": {"num_clients": clients, "partition": "iid"},
            "model": {"architecture": "mlp", "hidden": 8},
            "train": {"batch_size": 2, "lr": 0.05},
            "clients": {"min_clients": clients},
        }
    )
    result = run(config, dataset=dataset)
    assert [record.round for record in result.history] == [1, 2]
    assert all(not record.faults for record in result.history)
    assert all(np.isfinite(record.accuracy) for record in result.history)
