"""federation.models: the reference models in Flax NNX, and their agreement with PyTorch.

The ``jax`` tests need JAX only: state round trips, HBN statistics against a float64 NumPy
forward of the canonical state, and training. The ``cross`` tests load one canonical state into
the torch and the JAX model and check that they compute the same things, training included.
Models of one spec share their compiled steps, so each spec and batch shape compiles once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from conftest import import_framework
from federation.models import ARCHITECTURES, NORMS, ModelSpec, SGDConfig, build_model

SHAPES = {"simple-cnn": [(1, 8, 8), (3, 17, 27)], "mlp": [(1, 8, 8), (2, 5, 7)]}
# (3, 17, 27) pools to 8x13, 4x6 and 2x3: odd sizes floor, and fc1 flattens a non-square map.
TRAIN_SHAPES = {"simple-cnn": (3, 17, 27), "mlp": (2, 5, 7)}
BATCH = 6
CLASSES = 5
MODELS = pytest.mark.parametrize(
    ("architecture", "norm"), [(a, n) for a in ARCHITECTURES for n in NORMS]
)
HBN_MODES = pytest.mark.parametrize("mode", ["hybrid", "global"])


def make_spec(architecture: str, norm: str, shape: tuple[int, int, int] | None = None) -> ModelSpec:
    return ModelSpec(architecture, norm, shape or TRAIN_SHAPES[architecture], CLASSES)


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


@pytest.fixture
def with_jax() -> None:
    """The JAX model's frameworks: JAX, Flax and optax."""
    import_framework("federation.models.jax_model", "jax")


@pytest.fixture
def with_all() -> None:
    """Both the torch and the JAX model modules, in the cross session."""
    for module in ("federation.models.torch_model", "federation.models.jax_model"):
        import_framework(module, "cross")


# --- JAX ------------------------------------------------------------------------------------


@pytest.mark.jax
@pytest.mark.usefixtures("with_jax")
@pytest.mark.parametrize(
    ("architecture", "shape"), [(a, s) for a, shapes in SHAPES.items() for s in shapes]
)
@pytest.mark.parametrize("norm", NORMS)
def test_state_round_trip_is_exact(architecture, shape, norm):
    spec = make_spec(architecture, norm, shape)
    model = build_model("jax", spec, seed=0)
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


@pytest.mark.jax
@pytest.mark.usefixtures("with_jax")
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@HBN_MODES
def test_statistics_count_every_input_and_match_numpy(architecture, mode):
    spec = make_spec(architecture, "hbn")
    model = build_model("jax", spec, seed=0)
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


@pytest.mark.jax
@pytest.mark.usefixtures("with_jax")
def test_statistics_need_hbn_layers():
    model = build_model("jax", make_spec("mlp", "bn"), seed=0)
    with pytest.raises(ValueError, match="no HBN layer"):
        model.collect_statistics([np.zeros((2, 2, 5, 7), np.float32)], "hybrid")


@pytest.mark.jax
@pytest.mark.usefixtures("with_jax")
@MODELS
def test_training_lowers_the_loss(architecture, norm):
    spec = make_spec(architecture, norm)
    model = build_model("jax", spec, seed=0)
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


# --- JAX against torch ----------------------------------------------------------------------


def same_models(spec: ModelSpec) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """The torch and the JAX model of ``spec``, loaded with one non-trivial canonical state."""
    torch_model = build_model("torch", spec, seed=0)
    state = nontrivial(torch_model.get_state(), spec, seed=5)
    torch_model.set_state(state)
    jax_model = build_model("jax", spec, seed=1)
    jax_model.set_state(state)
    return torch_model, jax_model, state


def torch_logits(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    model.network.eval()
    with torch.no_grad():
        return model.network(torch.from_numpy(x)).numpy()


def jax_logits(model: Any, x: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    model.network.eval()
    return np.asarray(model.network(jnp.asarray(x.transpose(0, 2, 3, 1))))


@pytest.mark.cross
@pytest.mark.usefixtures("with_all")
@MODELS
def test_evaluation_agrees_with_torch(architecture, norm):
    spec = make_spec(architecture, norm)
    torch_model, jax_model, _ = same_models(spec)
    batches = make_batches(spec, 2, seed=6)
    x = batches[0][0]
    np.testing.assert_allclose(
        jax_logits(jax_model, x), torch_logits(torch_model, x), rtol=1e-4, atol=1e-5
    )
    expected, actual = torch_model.evaluate(batches), jax_model.evaluate(batches)
    assert (actual.correct, actual.examples) == (expected.correct, expected.examples)
    np.testing.assert_allclose(actual.loss_sum, expected.loss_sum, rtol=1e-4)


@pytest.mark.cross
@pytest.mark.usefixtures("with_all")
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@HBN_MODES
def test_statistics_agree_with_torch(architecture, mode):
    spec = make_spec(architecture, "hbn")
    torch_model, jax_model, _ = same_models(spec)
    inputs = [x for x, _ in make_batches(spec, 2, seed=7)]
    expected = torch_model.collect_statistics(inputs, mode)
    actual = jax_model.collect_statistics(inputs, mode)
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
    x, y = (torch.from_numpy(a) for a in batch)
    torch.nn.functional.cross_entropy(network(x), y).backward()
    return float(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in network.parameters()]))
    )


@pytest.mark.cross
@pytest.mark.usefixtures("with_all")
@MODELS
def test_one_train_call_agrees_with_torch(architecture, norm):
    spec = make_spec(architecture, norm)
    torch_model, jax_model, state = same_models(spec)
    batches = make_batches(spec, 3, seed=8)
    # Clipping at half the first step's gradient norm: active from the first step on.
    clip = 0.5 * gradient_norm(spec, state, batches[0])
    sgd = SGDConfig(lr=0.1, momentum=0.9, weight_decay=0.05, clip_norm=clip)
    expected, actual = torch_model.train(batches, sgd), jax_model.train(batches, sgd)
    assert (actual.examples, actual.steps) == (expected.examples, expected.steps)
    np.testing.assert_allclose(actual.loss_sum, expected.loss_sum, rtol=1e-4)
    trained_torch, trained_jax = torch_model.get_state(), jax_model.get_state()
    for name in spec.layout():
        if name.endswith("running_var"):
            continue  # compared below, with Flax's biased and torch's unbiased variance
        np.testing.assert_allclose(
            trained_jax[name], trained_torch[name], rtol=1e-4, atol=1e-6, err_msg=name
        )
        # The steps themselves agree, not only the states they started from.
        step_jax, step_torch = trained_jax[name] - state[name], trained_torch[name] - state[name]
        np.testing.assert_allclose(step_jax, step_torch, rtol=1e-3, atol=1e-6, err_msg=name)
    if norm == "bn":
        assert_running_vars_agree(spec, state, trained_jax, trained_torch, steps=len(batches))


def assert_running_vars_agree(
    spec: ModelSpec, state: dict, trained_jax: dict, trained_torch: dict, *, steps: int
) -> None:
    """Flax's running variances, turned unbiased as torch tracks them, equal torch's."""
    for layer, size in norm_input_sizes(spec).items():
        # Each step adds (1 - 0.9) * batch variance: torch's is n / (n - 1) times Flax's.
        n = BATCH * size
        decayed = 0.9**steps * state[f"{layer}.running_var"]
        added = (trained_jax[f"{layer}.running_var"] - decayed) * n / (n - 1)
        np.testing.assert_allclose(
            decayed + added, trained_torch[f"{layer}.running_var"], rtol=1e-4, err_msg=layer
        )
