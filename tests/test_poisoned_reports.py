"""Reports and updates that must not pass, and robust pools, in the embedded simulation.

Each lie is injected into one client's statistics report or training update (issue 17): the
liar is left out as a fault and the round committed without it, or, with too few honest
clients, the round fails and nothing is committed. ``tests/test_flower.py`` makes the same
checks on Flower.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from federation import protocol
from federation.client import Client
from federation.runner import run, write_results
from federation.simulation import RoundFailedError, Simulation
from tests.test_federation_simulation import DATA, small_config

pytest.importorskip("torch")

pytestmark = pytest.mark.torch


def lie_in_statistics(simulation: Simulation, client_id: int, lie) -> None:
    """Client ``client_id`` reports ``lie(moments)`` for every layer."""
    client = simulation.clients[client_id]

    def collect(*args, **kwargs):
        report = Client.collect_statistics(client, *args, **kwargs)
        return report._replace(moments={k: lie(m) for k, m in report.moments.items()})

    client.collect_statistics = collect


def lie_in_training(simulation: Simulation, client_id: int, lie) -> None:
    """Client ``client_id`` sends ``lie(update)``."""
    client = simulation.clients[client_id]

    def fit(*args, **kwargs):
        return lie(Client.fit(client, *args, **kwargs))

    client.fit = fit


LIES = {
    "mean 1e39": lambda m: m._replace(mean=np.full_like(m.mean, 1e39)),
    "m2 1e300": lambda m: m._replace(m2=np.full_like(m.m2, 1e300)),
    "count 2**62": lambda m: m._replace(count=np.asarray(2**62, np.int64)),
    "count + 1": lambda m: m._replace(count=m.count + 1),
    "float count 2.7": lambda m: m._replace(count=np.asarray(2.7)),
    "float count": lambda m: m._replace(count=np.asarray(float(m.count))),
}
REASONS = {
    "mean 1e39": r"mean` must have every \|value\| <= 3.40",
    "m2 1e300": r"m2 / count` must be <= 3.40",
    "count 2**62": r"count` must be .*; got 4611686018427387904",
    "count + 1": r"count` must be \d+; got \d+",
    "float count 2.7": "integer",
    "float count": "integer",
}


def honest_pool(simulation: Simulation, lying: int) -> protocol.GlobalStatistics:
    """The statistics the round would commit without client ``lying``."""
    clean = Simulation(simulation.config, dataset=DATA)
    lie_in_statistics(clean, lying, lambda _m: (_ for _ in ()).throw(RuntimeError("out")))
    clean.run_round()
    return clean.global_statistics()


@pytest.mark.parametrize("lie", list(LIES))
def test_a_report_that_cannot_be_true_is_a_fault_and_the_rest_pool(lie):
    simulation = Simulation(small_config(rounds=1), dataset=DATA)
    lie_in_statistics(simulation, 1, LIES[lie])
    record = simulation.run_round()
    (fault,) = record.faults
    assert (fault.client, fault.step) == (1, "statistics")
    assert re.search(REASONS[lie], fault.reason), fault.reason
    assert 1 not in record.statistics_clients
    assert 1 in record.trained_clients
    expected = honest_pool(simulation, 1)
    for name, (mean, var) in simulation.global_statistics().items():
        np.testing.assert_array_equal(mean, expected[name][0])
        np.testing.assert_array_equal(var, expected[name][1])


@pytest.mark.parametrize("lie", ["mean 1e39", "count 2**62"])
def test_a_round_that_fails_on_lies_commits_nothing(lie):
    simulation = Simulation(small_config(clients={"min_clients": 4}), dataset=DATA)
    before = simulation.state
    lie_in_statistics(simulation, 0, LIES[lie])
    with pytest.raises(RoundFailedError, match="statistics step"):
        simulation.run_round()
    assert simulation.state is before
    for name, value in before.global_state.items():
        assert np.isfinite(value).all(), name


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_an_update_in_another_dtype_is_a_fault_and_the_global_dtypes_stay(dtype):
    simulation = Simulation(small_config(rounds=1), dataset=DATA)
    lie_in_training(
        simulation,
        2,
        lambda u: u._replace(sent={k: v.astype(dtype) for k, v in u.sent.items()}),
    )
    dtypes = {k: v.dtype for k, v in simulation.global_state.items()}
    record = simulation.run_round()
    (fault,) = record.faults
    assert (fault.client, fault.step) == (2, "training")
    assert "the global model's dtype" in fault.reason
    assert {k: v.dtype for k, v in simulation.global_state.items()} == dtypes


def strict_json(text: str):
    def refuse(token):
        msg = f"not strict JSON: {token}"
        raise ValueError(msg)

    return json.loads(text, parse_constant=refuse)


def test_a_nan_training_loss_is_a_fault_and_results_json_is_strict(tmp_path):
    config = small_config(rounds=1)
    simulation = Simulation(config, dataset=DATA)
    lie_in_training(simulation, 0, lambda u: u._replace(train_loss=float("nan")))
    record = simulation.run_round()
    (fault,) = record.faults
    assert "training loss must be a finite number" in fault.reason
    assert np.isfinite(record.train_loss)

    result = run(config, out_dir=tmp_path, dataset=DATA)
    # A record holding a non-finite float (a failed evaluation's loss, say) is written as null.
    broken = dataclasses.replace(
        result, history=(dataclasses.replace(result.history[0], loss=np.inf),)
    )
    write_results(broken, tmp_path)
    document = strict_json((tmp_path / "results.json").read_text())
    assert document["rounds"][0]["loss"] is None


# -- robust pools --------------------------------------------------------------------------------


def shifted(m):
    """A lie that passes every check: the mean moved by +100 standard deviations."""
    return m._replace(mean=m.mean + 100 * np.sqrt(m.m2 / m.count))


def run_with_liar(statistics: dict, liar: bool) -> Simulation:
    config = small_config(
        rounds=1,
        data={"num_clients": 5, "partition": "iid"},
        clients={"min_clients": 5},
        statistics={"momentum": 1.0, **statistics},
    )
    simulation = Simulation(config, dataset=DATA)
    if liar:
        lie_in_statistics(simulation, 0, shifted)
    simulation.run_round()
    return simulation


@pytest.mark.parametrize(
    "pool", [{"aggregator": "trimmed", "trim": 1}, {"aggregator": "median-of-means", "groups": 3}]
)
def test_a_robust_pool_keeps_the_global_statistics_near_the_clean_ones(pool):
    clean = run_with_liar({}, liar=False).global_statistics()
    poisoned_exact = run_with_liar({}, liar=True).global_statistics()
    robust = run_with_liar(pool, liar=True).global_statistics()
    for name, (mean, var) in clean.items():
        scale = np.sqrt(var).max()
        exact_error = np.abs(poisoned_exact[name][0] - mean).max()
        robust_error = np.abs(robust[name][0] - mean).max()
        assert exact_error > 10 * scale, name  # the lie moves the exact pool ...
        assert robust_error < 1.0 * scale, name  # ... and not the robust one
        np.testing.assert_array_less(robust[name][1], 4 * var + 1e-6)


def test_exact_stays_the_default_and_bit_identical():
    assert small_config().statistics.aggregator == "exact"
    default = run_with_liar({}, liar=False)
    explicit = run_with_liar({"aggregator": "exact"}, liar=False)
    for name, value in default.global_state.items():
        np.testing.assert_array_equal(explicit.global_state[name], value)
    # and the configured pool is the exact pool itself
    assert protocol.configured_aggregator(default.config.statistics) is protocol.exact_pool
