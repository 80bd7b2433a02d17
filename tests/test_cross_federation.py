"""Cross-framework agreement of the federation: state, statistics, logits and whole federations.

All models are float64 here, so that agreement can be asked to rounding: the canonical state goes
torch -> Flax -> Keras bit for bit, the three compute the same logits (training and inference
mode) and the same HBN statistics from one state, and federations of all-torch, all-JAX,
all-Keras and mixed clients reach the same global model.

How SGD with momentum is matched (``federation.models.SGDConfig``): every framework clips the
global gradient norm exactly, ``g * min(1, c / |g|)`` (torch's ``clip_grad_norm_`` divides by
``|g| + 1e-6``, so the torch model clips by hand), then adds coupled weight decay ``wd * w``, then
``b = mu * b + g`` and ``w -= lr * b`` (torch's form; optax's ``sgd`` traces the same buffer, the
Keras model has an optimiser of its own because Keras' SGD decays weights decoupled and keeps
its step in float32). The optimiser is fresh for every local training call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import import_framework
from federation.config import parse_config
from federation.models import ARCHITECTURES, NORMS, ModelSpec, build_model
from federation.simulation import Simulation

pytestmark = pytest.mark.cross

FRAMEWORKS = ("torch", "jax", "keras")
MODULES = {"torch": "torch", "jax": "jax", "keras": "keras"}
SHAPE = (2, 9, 10)


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, str, str], Any]:
    """float64 reference models, built once per (framework, architecture, norm)."""
    for framework in FRAMEWORKS:
        import_framework(MODULES[framework], "cross")
    return {}


def model(cache: dict, framework: str, architecture: str, norm: str) -> Any:
    key = (framework, architecture, norm)
    if key not in cache:
        spec = ModelSpec(architecture, norm, SHAPE, 5, hidden=16, dtype="float64")
        cache[key] = build_model(framework, spec, seed=0)
    return cache[key]


def drawn_state(reference: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every canonical tensor drawn afresh, statistics and BatchNorm variances positive."""
    state = {}
    for name, spec in reference.layout.items():
        value = rng.normal(scale=0.5, size=spec.shape)
        if name.endswith(("_var", "running_var")):
            value = rng.uniform(0.5, 2.0, size=spec.shape)
        state[name] = value
    return state


def logits(framework: str, instance: Any, x: np.ndarray, *, training: bool) -> np.ndarray:
    """The network's logits on canonical NCHW ``x`` in training or inference mode."""
    if framework == "torch":
        torch = import_framework("torch", "cross")
        network = instance.network.train(training)
        with torch.no_grad():
            return network(torch.from_numpy(x)).numpy()
    if framework == "jax":
        from federation.models import jax_model

        network = instance.network
        network.train() if training else network.eval()
        return np.asarray(jax_model._logits(network, x))
    return np.asarray(instance.network(x, training=training))


MODELS = pytest.mark.parametrize(
    ("architecture", "norm"), [(a, n) for a in ARCHITECTURES for n in NORMS]
)


@MODELS
def test_canonical_state_goes_through_every_framework_bit_for_bit(models, architecture, norm):
    state = drawn_state(model(models, "torch", architecture, norm), np.random.default_rng(0))
    current = state
    for framework in ("torch", "jax", "keras", "torch"):
        instance = model(models, framework, architecture, norm)
        instance.set_state(current)
        current = instance.get_state()
    for name, value in state.items():
        assert current[name].dtype == np.float64, name
        np.testing.assert_array_equal(current[name], value, err_msg=name)


@MODELS
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_the_same_state_gives_the_same_logits(models, architecture, norm, training):
    rng = np.random.default_rng(1)
    state = drawn_state(model(models, "torch", architecture, norm), rng)
    x = rng.normal(size=(7, *SHAPE))
    results = {}
    for framework in FRAMEWORKS:
        instance = model(models, framework, architecture, norm)
        instance.set_state(state)
        results[framework] = logits(framework, instance, x, training=training)
    for framework in ("jax", "keras"):
        np.testing.assert_allclose(results[framework], results["torch"], rtol=1e-10, atol=1e-10)


@settings(max_examples=10)
@given(
    architecture=st.sampled_from(ARCHITECTURES),
    mode=st.sampled_from(["hybrid", "global"]),
    batch_sizes=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_statistics_collection_agrees_across_frameworks(
    models, architecture, mode, batch_sizes, seed
):
    rng = np.random.default_rng(seed)
    state = drawn_state(model(models, "torch", architecture, "hbn"), rng)
    batches = [rng.normal(rng.normal(), rng.uniform(0.5, 3), size=(n, *SHAPE)) for n in batch_sizes]
    collected = {}
    for framework in FRAMEWORKS:
        instance = model(models, framework, architecture, "hbn")
        instance.set_state(state)
        collected[framework] = instance.collect_statistics(batches, mode)
    for framework in ("jax", "keras"):
        for layer, (count, mean, m2) in collected["torch"].items():
            other = collected[framework][layer]
            assert int(other.count) == int(count)
            np.testing.assert_allclose(other.mean, mean, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(other.m2, m2, rtol=1e-10, atol=1e-10 * float(count))


def federation(frameworks: dict[str, int]) -> dict[str, np.ndarray]:
    config = parse_config(
        {
            "rounds": 3,
            "data": {"num_clients": 4},
            "model": {"dtype": "float64", "hidden": 32},
            "clients": {"frameworks": frameworks, "min_clients": 2},
            "train": {"weight_decay": 1e-3, "clip_norm": 5.0},
            "eval": {"framework": "torch", "every": 3},
        }
    )
    simulation = Simulation(config)
    simulation.run()
    return simulation.global_state


@pytest.mark.usefixtures("models")
def test_mixed_and_single_framework_federations_reach_the_same_global_model():
    reference = federation({"torch": 4})
    for frameworks in ({"jax": 4}, {"keras": 4}, {"torch": 2, "jax": 1, "keras": 1}):
        state = federation(frameworks)
        for name, value in reference.items():
            scale = max(1.0, float(np.abs(value).max()))
            np.testing.assert_allclose(
                state[name], value, rtol=0, atol=1e-8 * scale, err_msg=f"{frameworks}: {name}"
            )
