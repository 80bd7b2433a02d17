"""backends.flax: the NNX HybridBatchNorm, its custom VJP, and statistics collection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests import oracle
from tests.strategies import axis_layer_cases, floats

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")
hbn_flax = pytest.importorskip("backends.flax")
linen = pytest.importorskip("flax.linen")
hbn_linen = pytest.importorskip("backends.flax.linen")

from hbn_core import Moments  # noqa: E402

pytestmark = pytest.mark.jax
NAMES = ("scale", "bias", "alpha", "global_mean", "global_var")


def layer_cases() -> st.SearchStrategy[dict]:
    """Float64 parameters and statistics, and a 2-D to 4-D input with its feature axis."""
    return axis_layer_cases(offset_key="bias")


def make_layer(case: dict) -> object:
    channels = case["x"].shape[case["axis"]]
    layer = hbn_flax.HybridBatchNorm(
        channels, axis=case["axis"], param_dtype=jnp.float64, rngs=nnx.Rngs(0)
    )
    for name in NAMES:
        getattr(layer, name)[...] = jnp.asarray(case[name])
    return layer


def oracle_forward(case: dict, x: np.ndarray | None = None) -> np.ndarray:
    x = case["x"] if x is None else x
    return oracle.hbn_forward(x, *(case[n] for n in NAMES), channel_axis=case["axis"], eps=1e-5)


def oracle_inference(case: dict) -> np.ndarray:
    return oracle.inference(
        case["x"],
        *(case[n] for n in ("scale", "bias", "global_mean", "global_var")),
        channel_axis=case["axis"],
        eps=1e-5,
    )


def plain_composition(x, scale, bias, alpha, global_mean, global_var, *, axis: int):
    """HBN as plain jnp ops, for jax.grad to differentiate (independent of the core)."""
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    w = jax.nn.sigmoid(alpha)
    mean = (1 - w) * x.mean(axes) + w * global_mean
    var = (1 - w) * x.var(axes) + w * global_var
    x_hat = (x - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + 1e-5)
    return scale.reshape(shape) * x_hat + bias.reshape(shape)


@given(case=layer_cases())
def test_training_forward_equals_float64_oracle(case):
    y = make_layer(case)(jnp.asarray(case["x"]))
    np.testing.assert_allclose(np.asarray(y), oracle_forward(case), rtol=1e-10, atol=1e-10)


@given(case=layer_cases())
def test_gradients_equal_jax_grad_of_a_plain_composition(case):
    args = [jnp.asarray(case[k]) for k in ("x", "scale", "bias", "alpha")]
    statistics = (jnp.asarray(case["global_mean"]), jnp.asarray(case["global_var"]))
    _, pullback = jax.vjp(
        lambda *a: hbn_flax.hybrid_batch_norm(*a, *statistics, case["axis"], 1e-5), *args
    )
    _, reference = jax.vjp(lambda *a: plain_composition(*a, *statistics, axis=case["axis"]), *args)
    dy = jnp.asarray(case["dy"])
    for actual, expected in zip(pullback(dy), reference(dy), strict=True):
        scale = 1 + float(jnp.abs(expected).max())
        np.testing.assert_allclose(
            np.asarray(actual), np.asarray(expected), rtol=1e-9, atol=1e-9 * scale
        )


@given(case=layer_cases(), data=st.data())
@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_input_gradient_equals_finite_differences(case, data, api):
    layer = make_layer(case) if api == "nnx" else linen_callable(case)
    dy = case["dy"]
    grad = jax.grad(lambda x: jnp.sum(jnp.asarray(dy) * layer(x)))(jnp.asarray(case["x"]))
    direction = data.draw(hnp.arrays(np.float64, case["x"].shape, elements=floats(-1, 1)))
    expected = oracle.directional_derivative(
        lambda x: np.sum(dy * oracle_forward(case, x)), case["x"], direction
    )
    scale = np.abs(dy).sum() * (1 + np.abs(case["x"]).max()) * max(1.0, np.abs(case["scale"]).max())
    np.testing.assert_allclose(
        float(np.sum(np.asarray(grad) * direction)), expected, rtol=1e-6, atol=1e-7 * scale
    )


@given(case=layer_cases())
def test_inference_uses_the_global_statistics_only(case):
    layer = make_layer(case)
    expected = oracle_inference(case)
    x = jnp.asarray(case["x"])
    np.testing.assert_allclose(
        np.asarray(layer(x, use_running_average=True)), expected, rtol=1e-10, atol=1e-10
    )
    layer.eval()
    assert layer.use_running_average
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-10, atol=1e-10)
    layer.train()
    np.testing.assert_allclose(np.asarray(layer(x)), oracle_forward(case), rtol=1e-10, atol=1e-10)


def test_global_statistics_have_a_variable_type_of_their_own():
    layer = hbn_flax.HybridBatchNorm(3, rngs=nnx.Rngs(0))
    assert set(nnx.state(layer, hbn_flax.GlobalStatistic).keys()) == {"global_mean", "global_var"}
    assert set(nnx.state(layer, nnx.Param).keys()) == {"scale", "bias", "alpha"}
    np.testing.assert_array_equal(np.asarray(layer.alpha[...]), np.zeros(3))
    no_affine = hbn_flax.HybridBatchNorm(3, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
    assert set(nnx.state(no_affine, nnx.Param).keys()) == {"alpha"}


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.norm1 = hbn_flax.HybridBatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), strides=2, rngs=rngs)
        self.norm2 = hbn_flax.HybridBatchNorm(6, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.norm1(self.conv1(x)))
        x = jax.nn.relu(self.norm2(self.conv2(x)))
        return self.head(x.mean(axis=(1, 2)))


def randomized_net(seed: int = 0) -> Net:
    net = Net(nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, layer in hbn_flax.hbn_layers(net):
        c = layer.num_features
        layer.alpha[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
        layer.global_mean[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
        layer.global_var[...] = jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)
    return net


def test_jit_equals_eager_for_outputs_and_gradients():
    net = randomized_net()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, 8, 8, 1)))

    def loss(model, x):
        return jnp.sum(model(x) ** 2)

    eager_loss, eager_grads = nnx.value_and_grad(loss)(net, x)
    jit_loss, jit_grads = nnx.jit(nnx.value_and_grad(loss))(net, x)
    np.testing.assert_allclose(float(jit_loss), float(eager_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(jit_grads), jax.tree.leaves(eager_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_vmap_over_stacked_clients_equals_separate_calls():
    clients = [randomized_net(seed) for seed in range(3)]
    graphdef, _ = nnx.split(clients[0])
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(nnx.state(c) for c in clients))
    xs = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, 8, 8, 1)), jnp.float32)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    batched = jax.vmap(forward)(stacked, xs)
    for k, client in enumerate(clients):
        np.testing.assert_allclose(
            np.asarray(batched[k]), np.asarray(client(xs[k])), rtol=1e-5, atol=1e-6
        )


def test_forward_mode_autodiff_raises_instead_of_returning_wrong_numbers():
    layer = hbn_flax.HybridBatchNorm(3, rngs=nnx.Rngs(0))
    x = jnp.ones((4, 3)) * jnp.arange(4.0)[:, None]
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(layer, (x,), (jnp.ones_like(x),))


@pytest.mark.parametrize("mode", ["hybrid", "global"])
def test_collection_equals_moments_of_concatenated_inputs_and_changes_nothing(mode):
    net = randomized_net()
    batches = [
        jnp.asarray(np.random.default_rng(n).standard_normal((n, 8, 8, 1)), jnp.float32)
        for n in (3, 1, 5)
    ]
    before = jax.tree.map(np.asarray, nnx.state(net))

    stats = hbn_flax.collect_statistics(net, batches, mode=mode)

    after = jax.tree.map(np.asarray, nnx.state(net))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    inference = mode == "global"
    first = [net.conv1(b) for b in batches]
    second = [net.conv2(jax.nn.relu(net.norm1(h, use_running_average=inference))) for h in first]
    for name, inputs in (("norm1", first), ("norm2", second)):
        data = np.concatenate([np.asarray(h, np.float64) for h in inputs]).reshape(
            -1, inputs[0].shape[-1]
        )
        assert stats[name].count == data.shape[0]
        assert stats[name].mean.dtype == np.float64
        np.testing.assert_allclose(stats[name].mean, data.mean(axis=0), rtol=1e-5, atol=1e-6)
        m2 = ((data - data.mean(axis=0)) ** 2).sum(axis=0)
        np.testing.assert_allclose(stats[name].m2, m2, rtol=1e-5, atol=1e-5)


def test_set_global_statistics_writes_mean_and_biased_variance():
    net = randomized_net()
    stats = hbn_flax.collect_statistics(
        net, [jnp.ones((4, 8, 8, 1)) * jnp.arange(4.0)[:, None, None, None]]
    )
    hbn_flax.set_global_statistics(net, stats)
    np.testing.assert_allclose(
        np.asarray(net.norm2.global_mean[...]), stats["norm2"].mean, rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(net.norm2.global_var[...]), stats["norm2"].m2 / stats["norm2"].count, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda s: s.pop("norm1"), r"missing \['norm1'\], unknown \[\]"),
        (
            lambda s: s.update(norm2=s["norm2"]._replace(count=np.asarray(0))),
            r"`statistics\['norm2'\]` must have a positive count",
        ),
        (
            lambda s: s.update(norm1=s["norm2"]),
            r"`statistics\['norm1'\]` must have a 0-d count and \(4,\) mean",
        ),
    ],
)
def test_bad_statistics_are_rejected_and_change_nothing(edit, pattern):
    net = randomized_net()
    stats = hbn_flax.collect_statistics(net, [jnp.ones((2, 8, 8, 1))])
    edit(stats)
    before = np.asarray(net.norm1.global_mean[...])
    with pytest.raises(ValueError, match=pattern):
        hbn_flax.set_global_statistics(net, stats)
    np.testing.assert_array_equal(np.asarray(net.norm1.global_mean[...]), before)


def test_from_batchnorm_keeps_the_batchnorm_inference():
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    for _ in range(5):
        bn(jnp.asarray(2 + 3 * rng.standard_normal((8, 3)), jnp.float32))
    bn.scale[...] = jnp.asarray([1.5, -0.5, 2.0], jnp.float32)
    hbn = hbn_flax.HybridBatchNorm.from_batchnorm(bn)
    x = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(hbn(x, use_running_average=True)),
        np.asarray(bn(x, use_running_average=True)),
        rtol=1e-6,
        atol=1e-6,
    )


def test_a_small_cnn_trains_with_optax():
    net = Net(nnx.Rngs(4))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((32, 8, 8, 1)), jnp.float32)
    labels = jnp.asarray(
        (
            np.asarray(x)[:, :4].mean(axis=(1, 2, 3)) > np.asarray(x)[:, 4:].mean(axis=(1, 2, 3))
        ).astype(int)
    )
    optimizer = nnx.Optimizer(net, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(net, optimizer, x, labels):
        def loss_fn(net):
            return optax.softmax_cross_entropy_with_integer_labels(net(x), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(net)
        optimizer.update(net, grads)
        return loss

    losses = [float(step(net, optimizer, x, labels)) for _ in range(60)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses[::10]


@pytest.mark.parametrize(
    ("num_features", "shape", "axis"), [(3, (4, 2), -1), (3, (3,), -1), (4, (4, 3, 5), 1)]
)
def test_wrong_shapes_raise_clear_errors(num_features, shape, axis):
    layer = hbn_flax.HybridBatchNorm(num_features, axis=axis, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"HybridBatchNorm\(\d\) expected an input of at least 2 dimensions"
    ):
        layer(jnp.ones(shape))


def test_axis_must_be_one_int():
    with pytest.raises(
        TypeError, match=r"`axis` must be one int \(the feature axis\); got \(1, 2\)"
    ):
        hbn_flax.HybridBatchNorm(3, axis=(1, 2), rngs=nnx.Rngs(0))


def test_collection_needs_a_known_mode_and_hbn_layers():
    with pytest.raises(ValueError, match=r"`mode` must be 'hybrid' or 'global'; got 'batch'"):
        hbn_flax.collect_statistics(randomized_net(), [], mode="batch")
    with pytest.raises(ValueError, match=r"`model` has no HBN layer"):
        hbn_flax.collect_statistics(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), [])


def test_numpy_moments_round_trip_into_the_layers():
    net = randomized_net()
    stats = {
        "norm1": Moments(np.asarray(4), np.arange(4.0), np.full(4, 8.0)),
        "norm2": Moments(np.asarray(2), np.zeros(6), np.full(6, 2.0)),
    }
    hbn_flax.set_global_statistics(net, stats)
    np.testing.assert_allclose(np.asarray(net.norm1.global_var[...]), np.full(4, 2.0))


def linen_callable(case: dict):
    """The Linen layer with the case's parameters, as a function of the input (training)."""
    layer, variables = linen_variables(case)
    return lambda x: layer.apply(variables, x, use_running_average=False)


def linen_variables(case: dict) -> dict:
    layer = hbn_linen.HybridBatchNorm(axis=case["axis"], param_dtype=jnp.float64)
    variables = layer.init(jax.random.key(0), jnp.asarray(case["x"]), use_running_average=False)
    params = {
        k: jnp.asarray(case[n])
        for k, n in (("scale", "scale"), ("bias", "bias"), ("alpha", "alpha"))
    }
    stats = {
        "global_mean": jnp.asarray(case["global_mean"]),
        "global_var": jnp.asarray(case["global_var"]),
    }
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, {"params": params, "global_stats": stats}
    )
    return layer, {"params": params, "global_stats": stats}


@given(case=layer_cases())
def test_linen_forward_gradients_and_inference_equal_the_oracles(case):
    layer, variables = linen_variables(case)
    x = jnp.asarray(case["x"])
    y = layer.apply(variables, x, use_running_average=False)
    np.testing.assert_allclose(np.asarray(y), oracle_forward(case), rtol=1e-10, atol=1e-10)
    expected = oracle_inference(case)
    inferred = layer.apply(variables, x, use_running_average=True)
    np.testing.assert_allclose(np.asarray(inferred), expected, rtol=1e-10, atol=1e-10)

    def loss(params, x):
        return jnp.sum(
            jnp.asarray(case["dy"])
            * layer.apply({**variables, "params": params}, x, use_running_average=False)
        )

    grads = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
    statistics = (variables["global_stats"]["global_mean"], variables["global_stats"]["global_var"])
    reference = jax.grad(
        lambda p, x: jnp.sum(
            jnp.asarray(case["dy"])
            * plain_composition(
                x, p["scale"], p["bias"], p["alpha"], *statistics, axis=case["axis"]
            )
        ),
        argnums=(0, 1),
    )(variables["params"], x)
    for actual, wanted in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        scale = 1 + float(jnp.abs(wanted).max())
        np.testing.assert_allclose(
            np.asarray(actual), np.asarray(wanted), rtol=1e-9, atol=1e-9 * scale
        )


class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool = True):
        x = linen.Conv(4, (3, 3), name="conv")(x)
        x = linen.relu(hbn_linen.HybridBatchNorm(use_running_average=not train, name="norm1")(x))
        return hbn_linen.HybridBatchNorm(use_running_average=not train, name="norm2")(x)


@pytest.mark.parametrize("mode", ["hybrid", "global"])
def test_linen_collection_equals_moments_of_concatenated_inputs(mode):
    net = LinenNet()
    rng = np.random.default_rng(6)
    batches = [jnp.asarray(rng.standard_normal((n, 6, 6, 1)), jnp.float32) for n in (2, 3)]
    variables = net.init(jax.random.key(0), batches[0])
    rng_stats = {
        "global_mean": jnp.asarray(rng.standard_normal(4), jnp.float32),
        "global_var": jnp.full(4, 2.0, jnp.float32),
    }
    variables = {**variables, "global_stats": {"norm1": rng_stats, "norm2": rng_stats}}
    before = jax.tree.map(np.asarray, variables)

    stats = hbn_linen.collect_statistics(net, variables, batches, mode=mode)

    for a, b in zip(
        jax.tree.leaves(jax.tree.map(np.asarray, variables)), jax.tree.leaves(before), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    conv = linen.Conv(4, (3, 3))
    first = [conv.apply({"params": variables["params"]["conv"]}, b) for b in batches]
    norm = hbn_linen.HybridBatchNorm()
    norm1 = {
        "params": variables["params"]["norm1"],
        "global_stats": variables["global_stats"]["norm1"],
    }
    second = [linen.relu(norm.apply(norm1, h, use_running_average=mode == "global")) for h in first]
    for name, inputs in (("norm1", first), ("norm2", second)):
        data = np.concatenate([np.asarray(h, np.float64) for h in inputs]).reshape(-1, 4)
        assert stats[name].count == data.shape[0]
        np.testing.assert_allclose(stats[name].mean, data.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            stats[name].m2, ((data - data.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-5, atol=1e-5
        )

    updated = hbn_linen.set_global_statistics(variables, stats)
    np.testing.assert_allclose(
        np.asarray(updated["global_stats"]["norm2"]["global_var"]),
        stats["norm2"].m2 / stats["norm2"].count,
        rtol=1e-5,
    )
    np.testing.assert_array_equal(
        np.asarray(variables["global_stats"]["norm2"]["global_var"]), np.full(4, 2.0)
    )
    with pytest.raises(ValueError, match=r"missing \['norm1'\], unknown \[\]"):
        hbn_linen.set_global_statistics(variables, {"norm2": stats["norm2"]})


def test_linen_training_needs_no_mutable_collection_and_jit_equals_eager():
    net = LinenNet()
    x = jnp.asarray(np.random.default_rng(7).standard_normal((4, 6, 6, 1)), jnp.float32)
    variables = net.init(jax.random.key(0), x)
    eager = net.apply(variables, x)
    compiled = jax.jit(net.apply)(variables, x)
    np.testing.assert_allclose(np.asarray(compiled), np.asarray(eager), rtol=1e-5, atol=1e-6)


def test_linen_layers_start_from_batchnorm_running_statistics():
    class WithBatchNorm(linen.Module):
        norm: type = linen.BatchNorm

        @linen.compact
        def __call__(self, x, train: bool = True):
            return self.norm(use_running_average=not train, name="norm")(
                linen.Dense(3, name="dense")(x)
            )

    rng = np.random.default_rng(8)
    x = jnp.asarray(2 + 3 * rng.standard_normal((16, 5)), jnp.float32)
    bn_model = WithBatchNorm()
    variables = bn_model.init(jax.random.key(0), x)
    for _ in range(4):
        _, updates = bn_model.apply(variables, x, mutable=["batch_stats"])
        variables = {**variables, **updates}
    expected = bn_model.apply(variables, x, train=False)

    hbn_model = WithBatchNorm(norm=hbn_linen.HybridBatchNorm)
    hbn_variables = {
        "params": variables["params"],
        "global_stats": hbn_linen.global_stats_from_batch_stats(variables["batch_stats"]),
    }
    hbn_variables["params"] = {
        **hbn_variables["params"],
        "norm": {**variables["params"]["norm"], "alpha": jnp.zeros(3)},
    }
    np.testing.assert_allclose(
        np.asarray(hbn_model.apply(hbn_variables, x, train=False)),
        np.asarray(expected),
        rtol=1e-5,
        atol=1e-5,
    )


@given(case=layer_cases())
def test_nnx_layer_parameter_gradients_equal_jax_grad_of_a_plain_composition(case):
    layer = make_layer(case)
    x = jnp.asarray(case["x"])
    dy = jnp.asarray(case["dy"])
    grads = nnx.grad(lambda layer: jnp.sum(dy * layer(x)))(layer)
    statistics = (jnp.asarray(case["global_mean"]), jnp.asarray(case["global_var"]))
    reference = jax.grad(
        lambda p: jnp.sum(
            dy
            * plain_composition(
                x, p["scale"], p["bias"], p["alpha"], *statistics, axis=case["axis"]
            )
        ),
    )({name: jnp.asarray(case[name]) for name in ("scale", "bias", "alpha")})
    for name in ("scale", "bias", "alpha"):
        wanted = np.asarray(reference[name])
        np.testing.assert_allclose(
            np.asarray(grads[name][...]), wanted, rtol=1e-9, atol=1e-9 * (1 + np.abs(wanted).max())
        )
