"""federation.protocol without a framework: the round's decisions as pure functions.

Oracles: the formulas written out in float64 NumPy, deep copies of the inputs (nothing is
mutated), and layouts built by hand whose tensor names say nothing of their roles.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation import protocol
from federation.config import parse_config
from federation.layout import HBNPart, HBNTensor, Role, TensorSpec
from federation.models import ModelSpec
from federation.protocol import (
    FederationState,
    RoundFailedError,
    RoundRecord,
    StatisticsReport,
    Update,
)
from federation.repro.statistics import confidence_interval, summarize
from hbn_core import Moments
from tests.strategies import floats

# -- the layout's HBN layers ---------------------------------------------------------------------


def test_hbn_layers_come_from_the_spec_field_not_from_names():
    """Tensors named without `.global_mean` are found by their `hbn` field, and only by it."""
    layout = {
        "w": TensorSpec((3,), Role.SHARED),
        "a": TensorSpec((3,), Role.PERSONAL, hbn=HBNTensor("block", HBNPart.ALPHA)),
        "m": TensorSpec((3,), Role.STATISTICS, hbn=HBNTensor("block", HBNPart.GLOBAL_MEAN)),
        "v": TensorSpec((3,), Role.STATISTICS, hbn=HBNTensor("block", HBNPart.GLOBAL_VAR)),
        "decoy.global_mean": TensorSpec((3,), Role.SHARED),
    }
    assert protocol.hbn_layers(layout) == {"block": protocol.HBNLayer(3, "m", "v", "a")}


def test_a_statistics_tensor_that_does_not_declare_its_layer_is_refused():
    layout = {"norm1.global_mean": TensorSpec((3,), Role.STATISTICS)}
    with pytest.raises(ValueError, match=r"`norm1\.global_mean` must declare its `hbn` layer"):
        protocol.hbn_layers(layout)
    half = {"m": TensorSpec((3,), Role.STATISTICS, hbn=HBNTensor("n", HBNPart.GLOBAL_MEAN))}
    with pytest.raises(ValueError, match="HBN layer 'n' must have a global mean and variance"):
        protocol.hbn_layers(half)


@pytest.mark.parametrize(("hybrid", "alpha"), [("learned", "norm2.alpha"), ("global", None)])
def test_the_reference_models_declare_their_hbn_layers(hybrid, alpha):
    layout = ModelSpec("simple-cnn", "hbn", (1, 8, 8), 10, hybrid=hybrid).layout()
    layers = protocol.hbn_layers(layout)
    assert list(layers) == ["norm1", "norm2", "norm3"]
    assert layers["norm2"] == protocol.HBNLayer(
        32, "norm2.global_mean", "norm2.global_var", alpha, positions=4 * 4
    )
    assert [layer.positions for layer in layers.values()] == [8 * 8, 4 * 4, 2 * 2]
    assert protocol.hbn_layers(ModelSpec("mlp", "bn", (1, 8, 8), 10).layout()) == {}


# -- schedule, sampling, frameworks --------------------------------------------------------------


@given(lr=floats(1e-4, 1.0), decay=floats(0.5, 1.0), round_index=st.integers(0, 50))
def test_the_learning_rate_decays_geometrically(lr, decay, round_index):
    config = parse_config({"train": {"lr": lr, "lr_decay": decay}})
    assert protocol.learning_rate(config.train, round_index) == pytest.approx(
        lr * decay**round_index, rel=1e-12
    )


@given(
    num_clients=st.integers(1, 40),
    empty=st.sets(st.integers(0, 39)),
    fraction=floats(0.01, 1.0),
    min_clients=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_sampling_draws_the_configured_count_of_eligible_clients(
    num_clients, empty, fraction, min_clients, seed
):
    min_clients = min(min_clients, num_clients)
    config = parse_config(
        {
            "data": {"num_clients": num_clients},
            "clients": {"fraction": fraction, "min_clients": min_clients},
        }
    )
    eligible = [k for k in range(num_clients) if k not in empty]

    def draw() -> list[int]:
        rng = protocol.seeded_rng(seed, protocol.Stream.SAMPLING, 3, 0)
        return protocol.sample_clients(eligible, num_clients, config.clients, rng)

    chosen = draw()
    expected = min(max(math.floor(fraction * num_clients), min_clients), len(eligible))
    assert len(chosen) == expected
    assert chosen == sorted(set(chosen))
    assert set(chosen) <= set(eligible)
    assert draw() == chosen


def test_frameworks_are_assigned_in_canonical_order_whatever_the_key_order():
    # Flower's run configuration does not keep the table's key order (issue 20, defect 1).
    assert protocol.assign_frameworks({"jax": 1, "torch": 2}, 3) == ["torch", "torch", "jax"]
    assert protocol.assign_frameworks({}, 2) == ["torch", "torch"]
    counts = {"keras": 1, "jax": 2, "torch": 3}
    expected = ["torch"] * 3 + ["jax"] * 2 + ["keras"]
    for order in itertools.permutations(counts):
        assert protocol.assign_frameworks({name: counts[name] for name in order}, 6) == expected


def test_evaluated_rounds_are_every_nth_and_the_last_ones():
    config = parse_config({"rounds": 10, "eval": {"every": 4, "final_rounds": 2}})
    assert [r + 1 for r in range(10) if protocol.evaluates(config, r)] == [4, 8, 9, 10]


# -- checks and the fault policy -----------------------------------------------------------------

LAYERS = {"n": protocol.HBNLayer(2, "n.global_mean", "n.global_var", None)}


def report(count: int = 4, examples: int = 2) -> StatisticsReport:
    moments = Moments(np.asarray(count, np.int64), np.zeros(2), np.ones(2))
    return StatisticsReport({"n": moments}, examples, 10)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (report()._replace(examples=True), "`examples` must be a positive integer"),
        (report()._replace(dataset_size=-1), "`dataset_size` must be a positive integer"),
        (report(count=0), "positive count"),
        (report()._replace(moments={}), r"missing \['n'\]"),
    ],
)
def test_check_report_refuses_what_cannot_be_pooled(bad, match):
    protocol.check_report(report(), LAYERS)
    with pytest.raises(ValueError, match=match):
        protocol.check_report(bad, LAYERS)


POSITIONED = {"n": LAYERS["n"]._replace(positions=3)}


def moments_report(count: object, mean: float = 0.0, var: float = 1.0) -> StatisticsReport:
    size = int(count) if isinstance(count, int | np.integer) else 6
    moments = Moments(np.asarray(count), np.full(2, mean), np.full(2, var * size))
    return StatisticsReport({"n": moments}, 2, 10)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (moments_report(7), ValueError, "count` must be 6; got 7"),  # 2 examples x 3 positions
        (moments_report(2**62), ValueError, "count"),
        (moments_report(2.7), TypeError, "integer"),
        (moments_report(6.0), TypeError, "integer"),
        (moments_report(6, mean=1e39), ValueError, "<= 3.40\\d*e\\+38"),
        (moments_report(6, mean=1e300), ValueError, "mean` must have every .* <= 3.40"),
        (moments_report(6, var=1e300), ValueError, "m2 / count` must be <= 3.40"),
        (report(count=6)._replace(examples=11), ValueError, "at most its `dataset_size`"),
    ],
)
def test_check_report_ties_counts_to_examples_and_values_to_float32(bad, error, match):
    """A count is examples x positions, an integer; means and variances fit float32."""
    protocol.check_report(moments_report(6, mean=1e30, var=1e30), POSITIONED)
    with pytest.raises(error, match=match):
        protocol.check_report(bad, POSITIONED)


def test_without_declared_positions_a_count_must_be_a_multiple_of_the_examples():
    protocol.check_report(report(count=4, examples=2), LAYERS)
    with pytest.raises(ValueError, match="multiple of its 2 examples"):
        protocol.check_report(report(count=5, examples=2), LAYERS)


def test_check_update_names_the_tensor_and_refuses_non_positive_examples():
    layout = {"w": TensorSpec((2,), Role.SHARED)}
    like = {"w": np.ones(2, np.float32)}
    protocol.check_update({"w": np.zeros(2, np.float32)}, 3, layout, ["w"], like=like)
    with pytest.raises(ValueError, match="`w` must have shape"):
        protocol.check_update({"w": np.zeros(3, np.float32)}, 3, layout, ["w"], like=like)
    for examples in (0, 2.0, True, None):
        with pytest.raises(ValueError, match="`examples` must be a positive integer"):
            protocol.check_update(
                {"w": np.zeros(2, np.float32)}, examples, layout, ["w"], like=like
            )


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_check_update_refuses_a_dtype_other_than_the_global_models(dtype):
    layout = {"w": TensorSpec((2,), Role.SHARED)}
    like = {"w": np.ones(2, np.float32)}
    with pytest.raises(TypeError, match="`w` must be float32, the global model's dtype"):
        protocol.check_update({"w": np.zeros(2, dtype)}, 3, layout, ["w"], like=like)


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), "0.1", True])
def test_check_update_refuses_a_training_loss_that_is_not_a_finite_number(loss):
    layout = {"w": TensorSpec((2,), Role.SHARED)}
    state = {"w": np.ones(2, np.float32)}
    protocol.check_update(state, 3, layout, ["w"], like=state, train_loss=0.25)
    with pytest.raises(ValueError, match="training loss must be a finite number"):
        protocol.check_update(state, 3, layout, ["w"], like=state, train_loss=loss)


def test_json_safe_leaves_strict_json():
    document = {"a": [1.0, float("nan")], "b": (np.float32("inf"), "x", None, 3)}
    assert protocol.json_safe(document) == {"a": [1.0, None], "b": [None, "x", None, 3]}


def test_the_fault_policy_names_round_step_and_faults():
    protocol.require_enough(2, 2, round_number=3, step="training", faults=[])
    with pytest.raises(
        RoundFailedError,
        match=r"round 3: only 1 valid nodes in the statistics step, fewer than "
        r"clients.min_clients = 2; .* Faults: node 7: gone",
    ):
        protocol.require_enough(
            1, 2, round_number=3, step="statistics", faults=["node 7: gone"], participants="nodes"
        )


# -- statistics and weights ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_statistics_go_to_state_in_the_states_dtype_and_back(dtype):
    layers = {"n": protocol.HBNLayer(3, "n.m", "n.v", None)}
    like = {"n.m": np.zeros(3, dtype), "n.v": np.ones(3, dtype)}
    statistics = {"n": (np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0]))}
    state = protocol.statistics_state(statistics, layers, like)
    assert {v.dtype for v in state.values()} == {np.dtype(dtype)}
    back = protocol.global_statistics(state, layers)
    assert back["n"][0].dtype == np.float64
    np.testing.assert_array_equal(back["n"][0], statistics["n"][0].astype(dtype))
    np.testing.assert_array_equal(back["n"][1], statistics["n"][1].astype(dtype))


def test_next_statistics_blend_the_exact_pool_into_the_previous_statistics():
    rng = np.random.default_rng(0)
    parts = [rng.normal(k, 1 + k, size=(6 * (k + 1), 2)) for k in range(3)]
    reports = [
        StatisticsReport(
            {"n": Moments(np.asarray(len(x)), x.mean(0), ((x - x.mean(0)) ** 2).sum(0))},
            len(x),
            len(x),
        )
        for x in parts
    ]
    state = {"n.global_mean": np.full(2, 2.0), "n.global_var": np.full(2, 5.0)}
    settings = parse_config({"statistics": {"momentum": 0.25}}).statistics
    mean, var = protocol.next_statistics(state, reports, settings, LAYERS, 0)["n"]
    union = np.concatenate(parts)
    np.testing.assert_allclose(mean, 0.75 * 2.0 + 0.25 * union.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, 0.75 * 5.0 + 0.25 * union.var(0), rtol=1e-12)


def test_pooling_merges_each_layer_with_the_aggregator_it_is_given():
    reports = [
        report(count=4),
        report(count=8)._replace(
            moments={"n": Moments(np.asarray(8), np.full(2, 3.0), np.full(2, 16.0))}
        ),
    ]
    settings = parse_config({}).statistics
    seen = []

    def first_only(parts, weights):
        seen.append((len(parts), weights))
        return parts[0]

    mean, var = protocol.pool_statistics(reports, settings, aggregator=first_only)["n"]
    assert seen == [(2, None)]
    np.testing.assert_array_equal(mean, [0.0, 0.0])
    np.testing.assert_array_equal(var, [0.25, 0.25])
    exact_mean, exact_var = protocol.pool_statistics(reports, settings)["n"]
    np.testing.assert_allclose(exact_mean, [2.0, 2.0])
    np.testing.assert_allclose(exact_var, (1 + 16 + 4 * 4 + 8 * 1) / 12)


@given(momentum=floats(0.05, 0.95), seed=st.integers(0, 2**32 - 1))
def test_server_momentum_is_fedavgm_in_float64(momentum, seed):
    rng = np.random.default_rng(seed)
    current = {"w": rng.normal(size=4).astype(np.float32)}
    averaged = {"w": rng.normal(size=4).astype(np.float32)}
    velocity = {"w": rng.normal(size=4)}
    updated, new_velocity = protocol.server_step(current, averaged, velocity, momentum)
    expected_v = momentum * velocity["w"] + (
        current["w"].astype(np.float64) - averaged["w"].astype(np.float64)
    )
    np.testing.assert_allclose(new_velocity["w"], expected_v, rtol=1e-12)
    assert updated["w"].dtype == np.float32
    np.testing.assert_array_equal(
        updated["w"], (current["w"].astype(np.float64) - expected_v).astype(np.float32)
    )
    assert protocol.server_step(current, averaged, velocity, 0.0) == (averaged, {})


# -- a round as a value --------------------------------------------------------------------------


def test_a_round_maps_the_state_to_a_new_one_and_mutates_nothing():
    config = parse_config({"data": {"num_clients": 3}, "server": {"momentum": 0.5}})
    layout = {
        "w": TensorSpec((2,), Role.SHARED),
        "a": TensorSpec((2,), Role.PERSONAL, hbn=HBNTensor("n", HBNPart.ALPHA)),
        "n.global_mean": TensorSpec((2,), Role.STATISTICS, hbn=HBNTensor("n", HBNPart.GLOBAL_MEAN)),
        "n.global_var": TensorSpec((2,), Role.STATISTICS, hbn=HBNTensor("n", HBNPart.GLOBAL_VAR)),
    }
    layers = protocol.hbn_layers(layout)
    initial = {
        "w": np.ones(2, np.float32),
        "a": np.zeros(2, np.float32),
        "n.global_mean": np.zeros(2, np.float32),
        "n.global_var": np.ones(2, np.float32),
    }
    state = protocol.initial_state(initial, layout, 3)
    updates = {
        0: Update({"w": np.full(2, 3.0, np.float32)}, {"a": np.full(2, 0.5, np.float32)}, 1, 0.1),
        2: Update({"w": np.full(2, 5.0, np.float32)}, {"a": np.full(2, 0.7, np.float32)}, 3, 0.2),
    }
    reports = [StatisticsReport({"n": Moments(np.asarray(4), np.ones(2), np.full(2, 8.0))}, 2, 2)]
    before = copy.deepcopy((state, updates, reports))
    new = protocol.aggregate_round(
        state, updates, reports, config=config, layout=layout, layers=layers
    )
    for old, kept in zip(before, (state, updates, reports), strict=True):
        assert repr(old) == repr(kept)
    assert new.rounds_done == 1
    assert new.history == ()
    average = (1 * 3.0 + 3 * 5.0) / 4
    velocity = 0.5 * 0 + (1.0 - average)
    np.testing.assert_allclose(new.server_velocity["w"], [velocity] * 2)
    np.testing.assert_allclose(new.global_state["w"], [1.0 - velocity] * 2)
    np.testing.assert_allclose(new.global_state["n.global_mean"], [0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(new.global_state["n.global_var"], [0.9 + 0.2] * 2, rtol=1e-6)
    assert new.personal[1] is None
    assert new.personal[0] is updates[0].personal
    assert new.personal_average is state.personal_average  # alpha is personal
    record = RoundRecord(1, 0.05, (0, 2), (0,), (0, 2), 0.15)
    assert protocol.with_record(new, record).history == (record,)
    assert isinstance(new, FederationState)


def test_a_clients_model_state_is_its_own_personal_state_or_the_first_one():
    config = parse_config({"method": "hbn-authors"})
    state = protocol.initial_state(
        {"a": np.zeros(1), "w": np.ones(1)},
        {
            "a": TensorSpec((1,), Role.PERSONAL),
            "w": TensorSpec((1,), Role.SHARED),
        },
        2,
    )._replace(personal_average={"a": np.full(1, 0.3)}, personal=({"a": np.full(1, 9.0)}, None))
    first = protocol.first_personal(state, {"a": np.zeros(1)}, config)
    assert first is state.personal_average  # the authors' averaged alpha
    assert protocol.model_state(state.global_state, state.personal[0], first)["a"][0] == 9.0
    assert protocol.model_state(state.global_state, state.personal[1], first)["a"][0] == 0.3


@given(
    proportions=st.lists(st.integers(1, 50), min_size=1, max_size=5),
    size=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_local_test_split_is_never_empty(proportions, size, seed):
    train = np.repeat(np.arange(len(proportions)), proportions)
    test = np.repeat(np.arange(len(proportions)), 3)
    split = protocol.local_test_split(train, test, size, np.random.default_rng(seed))
    assert len(split) >= 1
    assert set(test[split]) <= set(train)


# -- the one 95% CI ------------------------------------------------------------------------------


def test_a_runs_summary_uses_the_t_interval_of_its_last_ten_accuracies():
    accuracies = [0.1 * k for k in range(1, 13)]
    history = [
        RoundRecord(k + 1, 0.05, (), (), (), 1.0, accuracy=a) for k, a in enumerate(accuracies)
    ]
    summary = summarize(history)
    last = np.asarray(accuracies[-10:])
    half = 2.2621571627409915 * last.std(ddof=1) / np.sqrt(10)  # t(0.975, 9)
    assert summary.last10_mean_accuracy == pytest.approx(last.mean(), rel=1e-12)
    assert summary.last10_ci95 == pytest.approx(half, rel=1e-9)
    assert (summary.last10_mean_accuracy, summary.last10_ci95) == confidence_interval(last)
    assert summarize(history[:1]).last10_ci95 is None


# -- the round's training loss ------------------------------------------------------------------


@given(
    results=st.lists(st.tuples(floats(0.0, 1e4), st.integers(1, 10**6)), min_size=1, max_size=20)
)
def test_the_train_loss_is_the_example_weighted_mean_of_the_clients_losses(results):
    losses = np.asarray([loss for loss, _ in results], np.float64)
    examples = np.asarray([count for _, count in results], np.float64)
    expected = (losses * examples).sum() / examples.sum()
    actual = protocol.train_loss([loss for loss, _ in results], [c for _, c in results])
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-300)
    assert min(losses) <= actual * (1 + 1e-12)
    assert actual <= max(losses) * (1 + 1e-12)


@pytest.mark.parametrize(("losses", "examples"), [([], []), ([1.0], [1, 2]), ([1.0, 2.0], [0, 0])])
def test_a_train_loss_without_clients_or_examples_is_refused(losses, examples):
    with pytest.raises(ValueError, match="`losses` and `examples`"):
        protocol.train_loss(losses, examples)
