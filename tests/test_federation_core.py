"""federation without a framework: layout, data, aggregation, configuration, CLI errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from federation import data, protocol
from federation.cli import _demo_table, main
from federation.config import ConfigError, StatisticsConfig, parse_config
from federation.layout import (
    Kind,
    Role,
    TensorSpec,
    check_state,
    from_channels_last,
    to_channels_last,
)
from federation.models import ModelSpec
from federation.protocol import HBNLayer, StatisticsReport
from hbn_core import Moments
from tests.strategies import floats

# -- canonical layout ---------------------------------------------------------------------------


@given(
    chw=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    out=st.integers(1, 5),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_flatten_permutation_makes_dense_layers_agree(chw, out, batch, seed):
    """A dense layer after a channels-last flatten, with the converted kernel, equals canonical."""
    rng = np.random.default_rng(seed)
    c, h, w = chw
    kernel = rng.normal(size=(out, c * h * w))
    images = rng.normal(size=(batch, c, h, w))
    spec = TensorSpec(kernel.shape, Role.SHARED, Kind.DENSE_KERNEL, flatten_from=chw)
    canonical = images.reshape(batch, -1) @ kernel.T
    channels_last = images.transpose(0, 2, 3, 1).reshape(batch, -1) @ to_channels_last(kernel, spec)
    np.testing.assert_allclose(channels_last, canonical, rtol=1e-12, atol=1e-12)


@given(shape=st.tuples(*(st.integers(1, 4) for _ in range(4))), seed=st.integers(0, 2**32 - 1))
def test_conv_kernels_go_to_hwio_and_back_exactly(shape, seed):
    kernel = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    spec = TensorSpec(shape, Role.SHARED, Kind.CONV_KERNEL)
    hwio = to_channels_last(kernel, spec)
    assert hwio.shape == (shape[2], shape[3], shape[1], shape[0])
    assert hwio[1 % shape[2], 0, 0, 0] == kernel[0, 0, 1 % shape[2], 0]
    np.testing.assert_array_equal(from_channels_last(hwio, spec), kernel)


@pytest.mark.parametrize("architecture", ["simple-cnn", "mlp"])
@pytest.mark.parametrize("norm", ["hbn", "bn", "gn", "ln", "none"])
def test_every_layout_tensor_round_trips_through_channels_last(architecture, norm):
    layout = ModelSpec(architecture, norm, (3, 11, 9), 5).layout()
    rng = np.random.default_rng(0)
    for spec in layout.values():
        value = rng.normal(size=spec.shape).astype(np.float32)
        np.testing.assert_array_equal(
            from_channels_last(to_channels_last(value, spec), spec), value
        )


def test_roles_come_from_layer_types():
    layout = ModelSpec("simple-cnn", "hbn", (1, 8, 8), 10).layout()
    assert {n for n, s in layout.items() if s.role is Role.PERSONAL} == {
        f"norm{i}.alpha" for i in (1, 2, 3)
    }
    statistics = {n for n, s in layout.items() if s.role is Role.STATISTICS}
    assert statistics == {f"norm{i}.global_{s}" for i in (1, 2, 3) for s in ("mean", "var")}
    assert layout["fc1.weight"].flatten_from == (64, 1, 1)
    assert layout["conv2.weight"].shape == (32, 16, 3, 3)


def test_too_small_images_are_refused():
    with pytest.raises(ValueError, match=r"`input_shape` .* too small"):
        ModelSpec("simple-cnn", "hbn", (1, 4, 4), 10).layout()


def test_check_state_names_the_bad_tensor():
    layout = {"a": TensorSpec((2,), Role.SHARED)}
    with pytest.raises(ValueError, match="missing \\['a'\\], unknown \\['b'\\]"):
        check_state({"b": np.zeros(2)}, layout, names=["a"])
    with pytest.raises(ValueError, match="`a` must have shape \\(2,\\); got \\(3,\\)"):
        check_state({"a": np.zeros(3)}, layout, names=["a"])
    with pytest.raises(ValueError, match="`a` holds non-finite"):
        check_state({"a": np.array([0.0, np.nan])}, layout, names=["a"])
    with pytest.raises(TypeError, match="`a` must be a floating-point"):
        check_state({"a": [0.0, 1.0]}, layout, names=["a"])


# -- data --------------------------------------------------------------------------------------


labels_strategy = hnp.arrays(np.int64, st.integers(20, 200), elements=st.integers(0, 4))


@given(
    labels=labels_strategy,
    num_clients=st.integers(1, 10),  # shards: 2 per client, at least 20 examples
    method=st.sampled_from(["iid", "dirichlet", "shards"]),
    beta=floats(0.05, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_partitions_cover_every_example_once_and_repeat_with_the_seed(
    labels, num_clients, method, beta, seed
):
    def split() -> list[np.ndarray]:
        return data.partition(
            labels, num_clients, method=method, rng=np.random.default_rng(seed), beta=beta
        )

    parts = split()
    assert len(parts) == num_clients
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert all(
        a.dtype == np.int64 and np.array_equal(a, b) for a, b in zip(parts, split(), strict=True)
    )


def test_dirichlet_with_small_beta_is_skewed_and_iid_is_balanced():
    labels = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(0)
    skewed = data.partition(labels, 10, method="dirichlet", rng=rng, beta=0.1)
    balanced = data.partition(labels, 10, method="iid", rng=rng)
    classes_per_client = np.mean([len(np.unique(labels[p])) for p in skewed if len(p)])
    assert classes_per_client < 6
    assert {len(p) for p in balanced} == {100}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "random"}, "`partition` must be 'iid', 'dirichlet' or 'shards'; got 'random'"),
        ({"method": "dirichlet", "beta": 0.0}, "`beta` must be positive"),
        ({"method": "shards", "shards_per_client": 0}, "`shards_per_client` must be >= 1"),
    ],
)
def test_bad_partitions_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.partition(np.zeros(10, np.int64), 3, rng=np.random.default_rng(0), **kwargs)


@given(n=st.integers(1, 40), batch_size=st.integers(1, 16), drop_last=st.booleans())
def test_batches_drop_only_a_partial_last_batch_that_is_not_the_only_one(n, batch_size, drop_last):
    x = np.arange(n, dtype=np.float32)[:, None, None, None]
    y = np.arange(n)
    got = list(
        data.batches(
            x,
            y,
            np.arange(n),
            batch_size=batch_size,
            rng=np.random.default_rng(0),
            drop_last=drop_last,
        )
    )
    sizes = [len(b) for _, b in got]
    seen = np.concatenate([b for _, b in got])
    assert all(s <= batch_size for s in sizes)
    if drop_last and n >= batch_size:
        assert sizes == [batch_size] * (n // batch_size)
    else:
        np.testing.assert_array_equal(np.sort(seen), y)
    assert all(np.array_equal(bx[:, 0, 0, 0], by) for bx, by in got)


def test_missing_fashion_mnist_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_dataset("fashion-mnist")


def test_npz_data_loads_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(6, 1, 8, 8)),
        "y_train": np.arange(6) % 3,
        "x_test": rng.normal(size=(3, 1, 8, 8)),
        "y_test": np.arange(3),
    }
    np.savez(tmp_path / "mine.npz", **arrays)
    loaded = data.load_dataset("npz", path=str(tmp_path / "mine.npz"))
    assert loaded.num_classes == 3
    assert loaded.input_shape == (1, 8, 8)
    assert abs(float(loaded.x_train.mean())) < 1e-6
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 1, 8, 8)))
    with pytest.raises(ValueError, match="missing \\['y_train', 'x_test', 'y_test'\\]"):
        data.load_dataset("npz", path=str(tmp_path / "bad.npz"))


# -- aggregation -------------------------------------------------------------------------------


@given(
    values=hnp.arrays(
        np.float64, st.tuples(st.integers(1, 5), st.just(3)), elements=floats(-1e3, 1e3)
    ),
    weights=st.lists(st.integers(1, 1000), min_size=5, max_size=5),
)
def test_fedavg_is_the_example_weighted_mean(values, weights):
    states = [{"w": row.astype(np.float32)} for row in values]
    weights = weights[: len(states)]
    expected = np.average(values.astype(np.float32).astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(
        protocol.fedavg(states, weights)["w"], expected, rtol=1e-6, atol=1e-4
    )


def _report(x: np.ndarray, dataset_size: int, per_example: int) -> StatisticsReport:
    """Moments of x (elements by channels), from ``len(x) // per_example`` examples."""
    moments = Moments(np.asarray(len(x), np.int64), x.mean(0), ((x - x.mean(0)) ** 2).sum(0))
    return StatisticsReport({"norm1": moments}, len(x) // per_example, dataset_size)


@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
)
def test_pooled_statistics_equal_those_of_the_concatenated_data(sizes, seed):
    rng = np.random.default_rng(seed)
    per_example = 4
    parts = [rng.normal(rng.normal(scale=5), size=(n * per_example, 2)) for n in sizes]
    reports = [_report(x, 100, per_example) for x in parts]
    everything = np.concatenate(parts)
    mean, var = protocol.pool_statistics(reports, StatisticsConfig())["norm1"]
    np.testing.assert_allclose(mean, everything.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(var, everything.var(0), rtol=1e-10, atol=1e-10)
    # The authors' Bessel correction over examples: sum of squares / (elements - elements/examples)
    _, authors = protocol.pool_statistics(reports, StatisticsConfig(variance="bessel-examples"))[
        "norm1"
    ]
    examples = sum(sizes)
    squares = ((everything - everything.mean(0)) ** 2).sum(0) / per_example
    if examples > 1:
        np.testing.assert_allclose(authors, squares / (examples - 1), rtol=1e-10)


def test_dataset_weighting_weighs_clients_by_their_data_set_size():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, size=(8, 1)), rng.normal(10, 1, size=(8, 1))
    reports = [_report(a, 300, 1), _report(b, 100, 1)]
    mean, _ = protocol.pool_statistics(reports, StatisticsConfig(weighting="dataset"))["norm1"]
    np.testing.assert_allclose(mean, 0.75 * a.mean(0) + 0.25 * b.mean(0), rtol=1e-12)


def test_blend_is_an_ema():
    previous = {"n": (np.zeros(2), np.ones(2))}
    pooled = {"n": (np.full(2, 4.0), np.full(2, 9.0))}
    mean, var = protocol.blend_statistics(previous, pooled, 0.25)["n"]
    np.testing.assert_array_equal(mean, [1.0, 1.0])
    np.testing.assert_array_equal(var, [3.0, 3.0])


@pytest.mark.parametrize(
    ("report", "match"),
    [
        (StatisticsReport({}, 1, 1), "missing \\['norm1'\\]"),
        (
            StatisticsReport({"norm1": Moments(np.asarray(0), np.zeros(2), np.zeros(2))}, 1, 1),
            "positive count",
        ),
        (_report(np.ones((2, 2)), 1, 1)._replace(examples=0), "`examples` must be a positive"),
        (_report(np.full((2, 2), np.nan), 2, 1), "finite"),
        (_report(np.ones((2, 3)), 2, 1), "\\(2,\\) mean"),
    ],
)
def test_malformed_reports_are_refused(report, match):
    layers = {"norm1": HBNLayer(2, "norm1.global_mean", "norm1.global_var", "norm1.alpha")}
    with pytest.raises(ValueError, match=match):
        protocol.check_report(report, layers)


# -- configuration -----------------------------------------------------------------------------


def test_method_defaults_fill_keys_the_user_did_not_set():
    config = parse_config({"method": "hbn-authors", "statistics": {"momentum": 0.1}})
    assert config.statistics.momentum == 0.1
    assert config.statistics.mode == "hybrid"
    assert config.statistics.max_batches == 1
    assert config.alpha.policy == "averaged"
    assert config.eval.statistics == "sync"
    assert parse_config({}).statistics.mode == "global"
    assert parse_config({"method": "fedbn"}).eval.personal
    assert parse_config({"method": "fbn"}).statistics.momentum == 0.1


@pytest.mark.parametrize(
    ("method", "norm", "layout_has"),
    [
        ("hbn", "hbn", {"norm1.alpha": "personal", "norm1.global_mean": "statistics"}),
        ("fbn", "hbn", {"norm1.global_mean": "statistics"}),
        ("bn", "bn", {"norm1.weight": "shared", "norm1.running_mean": "shared"}),
        ("fedbn", "bn", {"norm1.weight": "personal", "norm1.running_mean": "personal"}),
        ("fixbn", "bn", {"norm1.running_var": "shared"}),
        ("gn", "gn", {"norm1.weight": "shared"}),
        ("ln", "ln", {"norm1.weight": "shared"}),
        ("fedfn", "none", {"fc1.weight": "shared"}),
    ],
)
def test_each_method_builds_its_model(method, norm, layout_has):
    spec = parse_config({"method": method}).model_spec((1, 8, 8), 10)
    assert spec.norm == norm
    assert spec.feature_norm == (method == "fedfn")
    layout = spec.layout()
    assert {name: layout[name].role.value for name in layout_has} == layout_has
    assert ("norm1.alpha" in layout) == (method == "hbn")


def test_fixbn_freezes_statistics_from_its_switch_round():
    config = parse_config({"method": "fixbn", "rounds": 10, "fixbn": {"switch_fraction": 0.3}})
    assert [protocol.freezes_statistics(config, r) for r in range(10)] == [False] * 3 + [True] * 7
    assert not protocol.freezes_statistics(parse_config({"method": "bn", "rounds": 10}), 9)


def test_the_demo_configuration_is_valid():
    config = parse_config(_demo_table())
    assert config.method == "hbn"
    assert sorted(set(config.client_frameworks)) == ["jax", "keras", "torch"]


def test_overrides_are_toml_values_and_bare_words():
    config = parse_config({}, ["train.lr=0.2", "method=bn", "clients.frameworks={torch=6, jax=4}"])
    assert config.train.lr == 0.2
    assert config.method == "bn"
    assert config.client_frameworks == ["torch"] * 6 + ["jax"] * 4


@pytest.mark.parametrize(
    ("table", "overrides", "match"),
    [
        ({"trian": {}}, [], "unknown key\\(s\\) \\['trian'\\]; the top level allows"),
        ({"train": {"learning_rate": 1}}, [], "unknown key\\(s\\) \\['train.learning_rate'\\]"),
        ({}, ["model.norm=bn"], "unknown key\\(s\\) \\['model.norm'\\]"),
        ({}, ["train.lr=-1"], "`train.lr` must be > 0; got -1"),
        ({}, ["train.epochs=1.5"], "`train.epochs` must be a int; got 1.5"),
        ({}, ["method=paper"], "`method` must be one of \\['hbn', 'hbn-authors', 'fbn'"),
        ({}, ["server.momentum=1"], "`server.momentum` must be in \\[0, 1\\)"),
        ({}, ["fixbn.switch_fraction=2"], "`fixbn.switch_fraction` must be in \\[0, 1\\]"),
        ({}, ["clients.frameworks={torch=3}"], "counts summing to data.num_clients = 10"),
        ({}, ["clients.frameworks={pytorch=10}"], "keyed by \\['torch', 'jax', 'keras'\\]"),
        ({}, ["statistics.momentum=0"], "`statistics.momentum` must be in \\(0, 1\\]"),
        ({}, ["lr"], "an override must look like key=value"),
    ],
)
def test_bad_configurations_are_refused_with_the_key_named(table, overrides, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(table, overrides)


def test_the_command_refuses_a_bad_config_before_training(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("rounds = 3\n[train]\nlr = 'fast'\n")
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "`train.lr` must be a float; got 'fast'" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_idx_files_are_read_as_the_mnist_format_says(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    labels = np.arange(5, dtype=np.uint8) % 2
    test_images, test_labels = images[:2], labels[:2]

    def write(name: str, array: np.ndarray) -> None:
        header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
        with gzip.open(tmp_path / name, "wb") as file:
            file.write(header + array.tobytes())

    write("train-images-idx3-ubyte.gz", images)
    write("train-labels-idx1-ubyte.gz", labels)
    write("t10k-images-idx3-ubyte.gz", test_images)
    write("t10k-labels-idx1-ubyte.gz", test_labels)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    loaded = data.load_dataset("fashion-mnist")
    assert loaded.input_shape == (1, 3, 4)
    np.testing.assert_array_equal(loaded.y_train, labels)
    standardised = (images - images.mean()) / images.std()
    np.testing.assert_allclose(loaded.x_train[:, 0], standardised, rtol=1e-5, atol=1e-6)
