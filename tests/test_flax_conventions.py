"""backends.flax against the conventions of ``nnx.BatchNorm`` and ``flax.linen.BatchNorm``.

Each convention test is parametrised over both layers, ``nnx.BatchNorm`` and HBN, and asserts
the same property of each: split/merge, ``nnx.view``, ``train``/``eval``, ``nnx.jit``,
``nnx.vmap`` over stacked models and the Linen bridge. Where HBN differs from BatchNorm by
design, the parameter says so in one line. The output dtype is checked against both Flax
BatchNorms over a grid of input, parameter and output dtypes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from tests import oracle

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
hbn_flax = pytest.importorskip("backends.flax")
hbn_linen = pytest.importorskip("backends.flax.linen")

pytestmark = pytest.mark.jax
EPSILON = 1e-5  # the default of both layers
CHANNELS = 3


@dataclass(frozen=True)
class Kind:
    """One normalisation layer and its names: what the convention tests compare."""

    name: str
    nnx_layer: type
    linen_layer: type
    statistics: tuple[str, str]  # the names of its (mean, biased variance)
    collection: str  # the Linen collection of the statistics
    params: tuple[str, ...]

    def __str__(self) -> str:
        return self.name


BATCH_NORM = Kind(
    "nnx.BatchNorm",
    nnx.BatchNorm,
    linen.BatchNorm,
    ("mean", "var"),
    "batch_stats",
    ("bias", "scale"),
)
HBN = Kind(
    "HybridBatchNorm",
    hbn_flax.HybridBatchNorm,
    hbn_linen.HybridBatchNorm,
    ("global_mean", "global_var"),
    hbn_flax.GLOBAL_STATS,
    ("alpha", "bias", "scale"),
)
KINDS = pytest.mark.parametrize("kind", [BATCH_NORM, HBN], ids=str)


def random_values(kind: Kind, seed: int) -> dict[str, np.ndarray]:
    """Float32 values for every parameter and statistic of one layer (variances positive)."""
    rng = np.random.default_rng(seed)
    values = {name: rng.standard_normal(CHANNELS) for name in kind.params}
    mean, var = kind.statistics
    values[mean] = rng.standard_normal(CHANNELS)
    values[var] = rng.uniform(0.5, 2.0, CHANNELS)
    return {name: v.astype(np.float32) for name, v in values.items()}


def make_layer(kind: Kind, seed: int = 0, **kwargs: Any) -> Any:
    layer = kind.nnx_layer(CHANNELS, rngs=nnx.Rngs(seed), **kwargs)
    for name, value in random_values(kind, seed).items():
        getattr(layer, name)[...] = jnp.asarray(value)
    return layer


class Block(nnx.Module):
    """A dense layer followed by the normalisation layer under test."""

    def __init__(self, kind: Kind, seed: int = 0) -> None:
        self.dense = nnx.Linear(4, CHANNELS, rngs=nnx.Rngs(seed), param_dtype=jnp.float32)
        self.norm = make_layer(kind, seed)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.dense(x))


def inputs(seed: int = 1, n: int = 6) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, 4)), jnp.float32)


def expected_output(kind: Kind, block: Block, x: jax.Array, *, inference: bool) -> np.ndarray:
    """The float64 oracle of ``block(x)``: normalisation with the layer's own values."""
    h = np.asarray(block.dense(x), np.float64)
    values = {name: np.asarray(v[...], np.float64) for name, v in nnx.state(block.norm).items()}
    mean, var = (values[name] for name in kind.statistics)
    common = {"channel_axis": -1, "eps": EPSILON}
    if inference:
        return oracle.inference(h, values["scale"], values["bias"], mean, var, **common)
    if kind is BATCH_NORM:
        return oracle.batch_norm(h, values["scale"], values["bias"], **common)
    return oracle.hbn_forward(
        h, values["scale"], values["bias"], values["alpha"], mean, var, **common
    )


def assert_close(actual: Any, expected: Any, tolerance: float = 1e-5) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=tolerance, atol=tolerance
    )


# nnx.view (item 1 of the issue): the mode switch that nnx.BatchNorm defines with set_view.


@KINDS
@pytest.mark.parametrize("use_running_average", [True, False])
def test_view_sets_the_mode_and_leaves_the_model_as_it_was(kind, use_running_average):
    block = Block(kind)
    if not use_running_average:
        block.eval()
    x = inputs()
    viewed = nnx.view(block, use_running_average=use_running_average)
    assert viewed.norm.use_running_average is use_running_average
    assert block.norm.use_running_average is not use_running_average
    expected = expected_output(kind, block, x, inference=use_running_average)
    assert_close(viewed(x), expected)
    # The view shares the arrays: the original keeps its mode and its outputs.
    assert_close(block(x), expected_output(kind, block, x, inference=not use_running_average))


@pytest.mark.parametrize("use_running_average", [True, False])
def test_view_switches_hbn_and_batchnorm_in_one_model_together(use_running_average):
    class Mixed(nnx.Module):
        def __init__(self) -> None:
            self.first = Block(BATCH_NORM, seed=2)
            self.second = Block(HBN, seed=3)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.second(jnp.concatenate([self.first(x), x[:, :1]], axis=1))

    model = Mixed()
    if not use_running_average:
        model.eval()
    viewed = nnx.view(model, use_running_average=use_running_average)
    assert viewed.first.norm.use_running_average is use_running_average
    assert viewed.second.norm.use_running_average is use_running_average
    x = inputs()
    h = model.first.norm(model.first.dense(x), use_running_average=use_running_average)
    expected = model.second.norm(
        model.second.dense(jnp.concatenate([h, x[:, :1]], axis=1)),
        use_running_average=use_running_average,
    )
    assert_close(viewed(x), np.asarray(expected, np.float64), tolerance=1e-6)


def test_view_with_a_filter_sets_only_the_selected_layers():
    model = nnx.Sequential(Block(BATCH_NORM, seed=2), Block(HBN, seed=3))
    viewed = nnx.view(model, only=hbn_flax.HybridBatchNorm, use_running_average=True)
    assert [layer.norm.use_running_average for layer in viewed.layers] == [False, True]


def test_view_info_lists_the_hbn_mode():
    info = nnx.view_info(Block(HBN))
    assert "HybridBatchNorm:\n  use_running_average: bool | None = None\n" in info
    assert "global statistics" in info


# Output dtype (item 2): what nnx.BatchNorm and flax.linen.BatchNorm return.

DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPES["float16"] = jnp.float16


@pytest.mark.parametrize("api", ["nnx", "linen"])
@pytest.mark.parametrize("x_dtype", ["float64", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_output_dtype_follows_flax_batchnorm(api, x_dtype, param_dtype, dtype):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, CHANNELS)), DTYPES[x_dtype])
    options = {"param_dtype": DTYPES[param_dtype], "dtype": dtype and DTYPES[dtype]}
    for affine in (True, False):
        options.update(use_scale=affine, use_bias=affine)
        for inference in (False, True):
            if api == "nnx":
                hbn = hbn_flax.HybridBatchNorm(CHANNELS, rngs=nnx.Rngs(0), **options)(
                    x, use_running_average=inference
                )
                with warnings.catch_warnings():
                    # nnx.BatchNorm writes float64 batch statistics into its float32 ones.
                    warnings.simplefilter("ignore", FutureWarning)
                    bn = nnx.BatchNorm(CHANNELS, rngs=nnx.Rngs(0), **options)(
                        x, use_running_average=inference
                    )
            else:
                hbn_layer = hbn_linen.HybridBatchNorm(use_running_average=inference, **options)
                hbn = hbn_layer.apply(hbn_layer.init(jax.random.key(0), x), x)
                bn_layer = linen.BatchNorm(use_running_average=inference, **options)
                bn, _ = bn_layer.apply(
                    bn_layer.init(jax.random.key(0), x), x, mutable=["batch_stats"]
                )
            assert hbn.dtype == bn.dtype, (affine, inference, hbn.dtype, bn.dtype)


@pytest.mark.parametrize("x_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_half_precision_inputs_are_normalised_in_float32(x_dtype, api):
    """The output is not rounded to the input's half precision: it holds float32 digits."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(3 + 2 * rng.standard_normal((64, CHANNELS)), DTYPES[x_dtype])
    x64 = np.asarray(x, np.float64)  # the half-precision values, exactly
    if api == "nnx":
        y = hbn_flax.HybridBatchNorm(CHANNELS, rngs=nnx.Rngs(0))(x)
    else:
        layer = hbn_linen.HybridBatchNorm(use_running_average=False)
        y = layer.apply(layer.init(jax.random.key(0), x), x)
    ones, zeros = np.ones(CHANNELS), np.zeros(CHANNELS)
    expected = oracle.hbn_forward(
        x64, ones, zeros, zeros, zeros, ones, channel_axis=-1, eps=EPSILON
    )
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-5, atol=1e-5)


# The nnx.BatchNorm conventions (item 3), each asserted of both layers.


@KINDS
def test_split_into_params_and_batch_stats_is_exhaustive_and_merge_round_trips(kind):
    block = Block(kind)
    graphdef, params, statistics = nnx.split(block, nnx.Param, nnx.BatchStat)
    assert set(params["norm"].keys()) == set(kind.params)
    assert set(statistics["norm"].keys()) == set(kind.statistics)
    x = inputs()
    for inference in (False, True):
        merged = nnx.merge(graphdef, params, statistics)
        merged.set_attributes(use_running_average=inference)
        assert_close(merged(x), expected_output(kind, block, x, inference=inference))
    clone = nnx.clone(block)
    nnx.update(clone, nnx.state(Block(kind, seed=5)))
    nnx.update(clone, nnx.state(block))
    assert_close(clone(x), expected_output(kind, block, x, inference=False))


@KINDS
def test_train_and_eval_switch_every_layer(kind):
    block = Block(kind)
    x = inputs()
    block.eval()
    assert_close(block(x), expected_output(kind, block, x, inference=True))
    block.train()
    assert_close(block(x), expected_output(kind, block, x, inference=False))


@KINDS
@pytest.mark.parametrize("inference", [False, True])
def test_nnx_jit_equals_eager_for_outputs_and_gradients(kind, inference):
    x = inputs()

    def loss(block: Block, x: jax.Array) -> jax.Array:
        return jnp.sum(block(x) ** 2 * jnp.arange(1.0, CHANNELS + 1)[None, :])

    eager_block, jit_block = Block(kind), Block(kind)
    for block in (eager_block, jit_block):
        block.set_attributes(use_running_average=inference)
    grad = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.Param))
    eager_value, eager_grads = grad(eager_block, x)
    jit_value, jit_grads = nnx.jit(grad)(jit_block, x)
    np.testing.assert_allclose(float(jit_value), float(eager_value), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jit_grads), jax.tree.leaves(eager_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    for a, b in zip(
        jax.tree.leaves(nnx.state(jit_block)), jax.tree.leaves(nnx.state(eager_block)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@KINDS
@pytest.mark.parametrize("inference", [False, True])
def test_nnx_vmap_over_stacked_models_equals_each_model(kind, inference):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> Any:
        return kind.nnx_layer(CHANNELS, rngs=rngs)

    stacked = create(nnx.Rngs(0))
    assert {v.shape for v in jax.tree.leaves(nnx.state(stacked))} == {(3, CHANNELS)}
    members = [make_layer(kind, seed) for seed in range(3)]
    nnx.update(stacked, jax.tree.map(lambda *v: jnp.stack(v), *(nnx.state(m) for m in members)))
    xs = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, CHANNELS)), jnp.float32)

    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def forward(layer: Any, x: jax.Array) -> jax.Array:
        return layer(x, use_running_average=inference)

    batched = forward(stacked, xs)
    for k, member in enumerate(members):
        assert_close(batched[k], np.asarray(member(xs[k], use_running_average=inference)))
    # What each member's call changed (BatchNorm's running statistics in training), the
    # stacked call changed in its slice.
    member_states = (jax.tree.leaves(nnx.state(m)) for m in members)
    for stacked_leaf, *member_leaves in zip(
        jax.tree.leaves(nnx.state(stacked)), *member_states, strict=True
    ):
        assert_close(stacked_leaf, np.stack([np.asarray(v) for v in member_leaves]), 1e-6)


@KINDS
def test_training_moves_the_running_statistics_of_batchnorm_only(kind):
    """Differs by design: HBN keeps no running statistics; set_global_statistics sets them."""
    layer = make_layer(kind)
    before = {name: np.asarray(getattr(layer, name)[...]) for name in kind.statistics}
    layer(jnp.asarray(5 + np.random.default_rng(3).standard_normal((8, CHANNELS)), jnp.float32))
    changed = [
        not np.array_equal(np.asarray(getattr(layer, name)[...]), value)
        for name, value in before.items()
    ]
    moves = kind is BATCH_NORM
    assert changed == [moves, moves]


@KINDS
@pytest.mark.parametrize("inference", [False, True])
def test_to_linen_bridge_gives_the_linen_layers_variables_and_outputs(kind, inference):
    x = inputs()[:, :CHANNELS]
    bridged = nnx.bridge.ToLinen(kind.nnx_layer, args=(CHANNELS,))
    variables = bridged.init(jax.random.key(0), x)
    native = kind.linen_layer(use_running_average=inference)
    native_variables = native.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, native_variables)
    assert set(variables) == {"params", kind.collection}
    values = random_values(kind, seed=4)
    variables = {
        "params": {name: jnp.asarray(values[name]) for name in kind.params},
        kind.collection: {name: jnp.asarray(values[name]) for name in kind.statistics},
    }
    y, _ = bridged.apply(variables, x, use_running_average=inference, mutable=True)
    expected, _ = native.apply(variables, x, mutable=True)
    assert_close(y, np.asarray(expected, np.float64), 1e-6)


@KINDS
@pytest.mark.parametrize("inference", [False, True])
def test_to_nnx_bridge_gives_the_nnx_layers_variable_types_and_outputs(kind, inference):
    x = inputs()[:, :CHANNELS]
    bridged = nnx.bridge.ToNNX(kind.linen_layer(use_running_average=inference), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(bridged, x)
    native = make_layer(kind, seed=4)
    statistic_type = type(getattr(native, kind.statistics[0]))
    assert set(nnx.state(bridged, statistic_type).keys()) == set(kind.statistics)
    assert set(nnx.state(bridged, nnx.Param).keys()) == set(kind.params)
    nnx.update(bridged, nnx.state(native))
    # BatchNorm's training updates batch_stats, so it needs a mutable collection; HBN's does not.
    y = bridged(x, mutable=True) if kind is BATCH_NORM and not inference else bridged(x)
    assert_close(y, np.asarray(native(x, use_running_average=inference), np.float64), 1e-6)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("momentum", 0.9),
        ("bias_init", nnx.initializers.zeros_init()),
        ("scale_init", nnx.initializers.ones_init()),
        ("axis_name", "batch"),
        ("axis_index_groups", [[0]]),
        ("use_fast_variance", False),
        ("promote_dtype", nnx.nn.dtypes.promote_dtype),
        ("bias_metadata", {}),
        ("scale_metadata", {}),
    ],
)
def test_batchnorm_arguments_without_an_hbn_meaning_are_refused(name, value):
    """Does not apply: no running statistics, constant initialisers, per-device statistics."""
    nnx.BatchNorm(CHANNELS, rngs=nnx.Rngs(0), **{name: value})  # BatchNorm takes it
    with pytest.raises(TypeError, match=name):
        hbn_flax.HybridBatchNorm(CHANNELS, rngs=nnx.Rngs(0), **{name: value})


def test_a_mask_is_refused_where_batchnorm_takes_one():
    """Does not apply: HBN's Flax layers take no ``mask`` (the Keras layer does)."""
    x = inputs()[:, :CHANNELS]
    mask = jnp.ones((6, CHANNELS), bool)
    nnx.BatchNorm(CHANNELS, rngs=nnx.Rngs(0))(x, mask=mask)  # BatchNorm takes one
    with pytest.raises(TypeError, match="mask"):
        hbn_flax.HybridBatchNorm(CHANNELS, rngs=nnx.Rngs(0))(x, mask=mask)


# Second-order gradients: reverse over reverse, and forward over reverse (jax.hessian).


def plain_composition(x, scale, bias, alpha, global_mean, global_var):
    """HBN as plain jnp ops (channels last), for JAX's autodiff to differentiate."""
    w = jax.nn.sigmoid(alpha)
    mean = (1 - w) * x.mean(0) + w * global_mean
    var = (1 - w) * x.var(0) + w * global_var
    return scale[None, :] * (x - mean[None, :]) / jnp.sqrt(var[None, :] + EPSILON) + bias[None, :]


def test_second_order_gradients_equal_those_of_a_plain_composition():
    rng = np.random.default_rng(11)
    x, dy = (jnp.asarray(rng.standard_normal((6, CHANNELS))) for _ in range(2))
    params = [jnp.asarray(rng.standard_normal(CHANNELS)) for _ in range(3)]
    statistics = (jnp.asarray(rng.standard_normal(CHANNELS)), jnp.asarray([0.5, 1.0, 2.0]))

    def loss(function: Any) -> Any:
        return lambda x, *p: jnp.sum(dy * function(x, *p, *statistics))

    layer = loss(lambda *a: hbn_flax.hybrid_batch_norm(*a, -1, EPSILON))
    reference = loss(plain_composition)

    def penalty(loss: Any) -> Any:  # a gradient penalty: the squared input gradient
        return lambda x, *p: jnp.sum(jax.grad(loss)(x, *p) ** 2)

    argnums = tuple(range(4))
    for transform in (
        lambda f: jax.hessian(f, argnums=argnums),
        lambda f: jax.grad(penalty(f), argnums=argnums),
    ):
        actual, expected = transform(layer)(x, *params), transform(reference)(x, *params)
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-9, atol=1e-12)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(layer, (x, *params), (x, *params))
