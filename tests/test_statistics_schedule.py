"""statistics.warmup and eval.statistics = "fresh": closed forms, exactness, resume, engines.

The warm-ups' weights are checked against their closed forms by blending one-hot "pools";
the simulation's global statistics against the concatenated data's statistics (the pool stays
exact with every warm-up); evaluation options against the training they must leave alone; and
Flower against the embedded simulation.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation import protocol
from federation.config import ConfigError, StatisticsConfig, parse_config
from federation.statistics_schedule import WARMUPS, blend_momentum

momenta = st.floats(0.001, 1.0)


def closed_form_weights(momentum: float, blends: int, warmup: str) -> np.ndarray:
    """``[w_0, w_1, ..., w_t]``: the prior's and each pool's weight after ``blends`` blends."""
    m, t = momentum, blends
    s = np.arange(1, t + 1)
    if warmup == "none":
        return np.concatenate([[(1 - m) ** t], m * (1 - m) ** (t - s)])
    if warmup == "first":
        pools = m * (1 - m) ** (t - s)
        pools[0] = (1 - m) ** (t - 1)
        return np.concatenate([[0.0], pools])
    if warmup == "cumulative":
        mean_until = min(math.floor(1 / m), t)  # m_t = 1/t up to here
        if t <= mean_until:
            return np.concatenate([[0.0], np.full(t, 1 / t)])
        early = np.full(mean_until, (1 - m) ** (t - mean_until) / mean_until)
        late = m * (1 - m) ** (t - s[mean_until:])
        return np.concatenate([[0.0], early, late])
    assert warmup == "debias"
    return np.concatenate([[0.0], m * (1 - m) ** (t - s) / (1 - (1 - m) ** t)])


@given(momentum=momenta, blends=st.integers(1, 60), warmup=st.sampled_from(WARMUPS))
def test_each_warmup_weighs_the_prior_and_the_pools_as_its_closed_form(momentum, blends, warmup):
    """Blend one-hot pools with the protocol's momenta: the result is the weight vector."""
    settings = StatisticsConfig(momentum=momentum, warmup=warmup)
    width = blends + 1
    statistics = {"layer": (np.eye(width)[0], np.eye(width)[0])}  # g_0, the prior
    for index in range(blends):
        pool = np.eye(width)[index + 1]
        weight = protocol.statistics_momentum(settings, index)
        statistics = protocol.blend_statistics(statistics, {"layer": (pool, pool)}, weight)
    expected = closed_form_weights(momentum, blends, warmup)
    np.testing.assert_allclose(statistics["layer"][0], expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(statistics["layer"][1], expected, rtol=1e-9, atol=1e-12)
    assert statistics["layer"][0].sum() == pytest.approx(1.0)
    if warmup != "none":
        assert statistics["layer"][0][0] == 0.0  # the prior is gone from the first blend


@given(momentum=momenta, blend=st.integers(1, 10**4), warmup=st.sampled_from(WARMUPS))
def test_a_warmup_momentum_lies_between_the_momentum_and_one(momentum, blend, warmup):
    value = blend_momentum(momentum, blend, warmup)
    assert momentum <= value <= 1
    if warmup != "none" and blend == 1:
        assert value == 1.0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.0, 1, "none"), r"`momentum` must be in \(0, 1\]; got 0.0"),
        ((1.5, 1, "none"), r"`momentum` must be in \(0, 1\]; got 1.5"),
        ((0.1, 0, "none"), r"`blend` must be an integer >= 1 .*; got 0"),
        ((0.1, 2.0, "none"), r"`blend` must be an integer >= 1 .*; got 2.0"),
        ((0.1, 1, "adam"), r"`warmup` must be one of \['none', 'first', 'cumulative', 'debias'\]"),
    ],
)
def test_bad_schedule_arguments_are_refused_by_name(args, match):
    with pytest.raises(ValueError, match=match):
        blend_momentum(*args)


@given(weight=st.floats(0.01, 1.0), seed=st.integers(0, 2**32 - 1))
def test_fresh_evaluation_statistics_blend_the_fresh_pool_by_its_weight(weight, seed):
    rng = np.random.default_rng(seed)
    committed = {"a": (rng.normal(size=3), rng.uniform(0.1, 2, 3))}
    fresh = {"a": (rng.normal(size=3), rng.uniform(0.1, 2, 3))}
    blended = protocol.fresh_evaluation_statistics(committed, fresh, weight)
    for part in (0, 1):
        expected = (1 - weight) * committed["a"][part] + weight * fresh["a"][part]
        np.testing.assert_allclose(blended["a"][part], expected, rtol=1e-12)
    if weight == 1.0:
        np.testing.assert_array_equal(blended["a"][0], fresh["a"][0])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["statistics.warmup=adam"], r"`statistics.warmup` must be one of \['none', 'first'"),
        (["eval.statistics=fresh", "eval.fresh_weight=0"], r"`eval.fresh_weight` must be in"),
        (["eval.statistics=fresh", "eval.fresh_weight=1.5"], r"`eval.fresh_weight` must be in"),
        (["eval.fresh_weight=0.5"], r'1 unless eval.statistics = "fresh".*; got 0.5'),
        (["eval.statistics=stale"], r"`eval.statistics` must be one of \['ema', 'sync', 'fresh'"),
    ],
)
def test_bad_option_values_are_refused_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        parse_config({}, overrides)


# -- through the simulation (torch clients) -------------------------------------------------------


@pytest.fixture
def torch_federation():
    """The synthetic data and small configurations of tests/test_federation_simulation.py."""
    pytest.importorskip("torch")
    from tests import test_federation_simulation

    return test_federation_simulation


@pytest.mark.torch
@pytest.mark.parametrize("warmup", WARMUPS)
def test_with_every_warmup_the_statistics_combine_exact_central_pools(torch_federation, warmup):
    """The pool stays exact: global statistics combine the concatenated data's statistics.

    Every round pools all clients, so each pool is the statistics of all data under that
    round's global model, and the global statistics are the warm-up's closed-form combination.
    """
    from federation.simulation import Simulation

    momentum, rounds = 0.3, 3
    config = torch_federation.small_config(
        rounds=rounds,
        clients={"fraction": 1.0, "min_clients": 2},
        statistics={"momentum": momentum, "warmup": warmup},
    )
    simulation = Simulation(config, dataset=torch_federation.DATA)
    everyone = np.concatenate([c.indices for c in simulation.clients])
    pools = []
    for _ in range(rounds):
        central = torch_federation.central_statistics(simulation, everyone)
        pools.append({n: (mean, m2 / count) for n, (count, mean, m2) in central.items()})
        simulation.run_round()
    weights = closed_form_weights(momentum, rounds, warmup)
    for name, (mean, var) in simulation.global_statistics().items():
        channels = mean.shape
        expected_mean = weights[0] * np.zeros(channels) + sum(
            w * np.asarray(p[name][0], np.float64) for w, p in zip(weights[1:], pools, strict=True)
        )
        expected_var = weights[0] * np.ones(channels) + sum(
            w * np.asarray(p[name][1], np.float64) for w, p in zip(weights[1:], pools, strict=True)
        )
        np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, expected_var, rtol=1e-5, atol=1e-6)


EVALUATIONS = {
    "ema": {"statistics": "ema"},
    "sync": {"statistics": "sync"},
    "fresh": {"statistics": "fresh"},
    "fresh, weight 0.5": {"statistics": "fresh", "fresh_weight": 0.5},
}


@pytest.mark.torch
@pytest.mark.parametrize("warmup", ["none", "cumulative"])
def test_evaluation_statistics_never_change_training(torch_federation, warmup):
    from federation.simulation import Simulation

    finals = {}
    for name, evaluation in EVALUATIONS.items():
        config = torch_federation.small_config(
            rounds=3, statistics={"warmup": warmup}, eval=evaluation
        )
        simulation = Simulation(config, dataset=torch_federation.DATA)
        simulation.run()
        finals[name] = simulation
    reference = finals["ema"]
    for name, simulation in finals.items():
        for key, value in reference.global_state.items():
            np.testing.assert_array_equal(simulation.global_state[key], value, err_msg=name)
        for mine, theirs in zip(simulation.state.personal, reference.state.personal, strict=True):
            assert (mine is None) == (theirs is None)
            for key, value in (theirs or {}).items():
                np.testing.assert_array_equal(mine[key], value, err_msg=name)
        assert [r.train_loss for r in simulation.history] == [
            r.train_loss for r in reference.history
        ]
    # ... while evaluation itself differs: the options do something.
    losses = {name: [r.loss for r in s.history] for name, s in finals.items()}
    assert losses["fresh"] != losses["ema"]


@pytest.mark.torch
def test_fresh_evaluation_uses_exactly_the_pool_the_next_round_blends(torch_federation):
    """Fresh evaluation of round t (weight 1) uses round t + 1's pool with round t's weights.

    With momentum 1 round t + 1 commits its pool alone, so its state holds that pool.
    """
    from federation.simulation import Simulation

    fresh = Simulation(
        torch_federation.small_config(
            rounds=3, statistics={"momentum": 1.0}, eval={"statistics": "fresh"}
        ),
        dataset=torch_federation.DATA,
    )
    ema = Simulation(
        torch_federation.small_config(rounds=3, statistics={"momentum": 1.0}),
        dataset=torch_federation.DATA,
    )
    first, record = fresh.step(fresh.state)
    second, _ = fresh.step(first)
    layers = fresh.hbn_layers
    next_statistics = {
        name: second.global_state[name]
        for layer in layers.values()
        for name in (layer.global_mean, layer.global_var)
    }
    mixed = first._replace(global_state={**first.global_state, **next_statistics})
    assert fresh.evaluate(first, 0, [], []) == ema.evaluate(mixed, 0, [], [])
    assert record.accuracy == fresh.evaluate(first, 0, [], [])[0]
    assert ema.evaluate(first, 0, [], []) != fresh.evaluate(first, 0, [], [])


class KilledError(Exception):
    """Stands in for a kill between two rounds."""


@pytest.mark.torch
@pytest.mark.parametrize(
    ("warmup", "evaluation"),
    [("debias", {"statistics": "fresh", "fresh_weight": 0.5}), ("first", {"statistics": "fresh"})],
)
def test_resume_after_a_kill_is_identical_with_the_options(
    torch_federation, tmp_path, warmup, evaluation
):
    from federation.runner import run

    config = torch_federation.small_config(
        rounds=4, statistics={"momentum": 0.2, "warmup": warmup}, eval=evaluation
    )
    data = torch_federation.DATA
    uninterrupted = run(config, dataset=data)

    def kill_after_round_two(record):
        if record.round == 2:
            raise KilledError

    with pytest.raises(KilledError):
        run(config, out_dir=tmp_path, dataset=data, on_round=kill_after_round_two)
    resumed = run(config, out_dir=tmp_path, resume=True, dataset=data)
    assert resumed.simulation.rounds_done == 4
    for name, value in uninterrupted.simulation.global_state.items():
        np.testing.assert_array_equal(resumed.simulation.global_state[name], value)
    assert [(r.accuracy, r.loss) for r in resumed.history] == [
        (r.accuracy, r.loss) for r in uninterrupted.history
    ]
    assert len(json.loads((tmp_path / "results.json").read_text())["rounds"]) == 4


# -- on Flower ------------------------------------------------------------------------------------


@pytest.fixture
def flower_tests(monkeypatch):
    """tests/test_flower.py's helpers, and the identity Flower's runtime gives the ServerApp."""
    pytest.importorskip("flwr")
    pytest.importorskip("torch")
    from flwr.supercore.task_identity import TaskIdentity

    from tests import test_flower

    for name, value in {"_run_id": 1, "_task_id": 1, "_node_id": 0}.items():
        monkeypatch.setattr(TaskIdentity, name, value)
    return test_flower


@pytest.mark.flower
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("warmup", ["first", "cumulative", "debias"])
def test_flower_and_embedded_rounds_give_the_same_statistics_with_a_warmup(flower_tests, warmup):
    from federation.flower import HBNFedAvg, make_client_app
    from federation.simulation import Simulation

    config = flower_tests.small_config(
        rounds=3,
        model={"dtype": "float64"},
        statistics={"momentum": 0.3, "warmup": warmup},
    )
    grid = flower_tests.LocalGrid(make_client_app(config, dataset=flower_tests.DIGITS), 4)
    strategy = HBNFedAvg(config=config, layout=flower_tests._layout(config))
    flower_tests.start(strategy, config, grid)
    embedded = Simulation(config, dataset=flower_tests.DIGITS)
    assert len(strategy.history) == 3
    for flower_round in strategy.history:
        embedded.run_round()
        for name, (mean, var) in embedded.global_statistics().items():
            np.testing.assert_allclose(flower_round.statistics[name][0], mean, 1e-10, 1e-12)
            np.testing.assert_allclose(flower_round.statistics[name][1], var, 1e-10, 1e-12)
    # The warm-up acted: round 1's statistics are its pool alone, whatever the momentum.
    first = strategy.history[0].statistics
    none_config = flower_tests.small_config(rounds=1, statistics={"momentum": 0.3})
    plain = Simulation(none_config, dataset=flower_tests.DIGITS)
    plain.run_round()
    name = next(iter(first))
    assert not np.allclose(first[name][1], plain.global_statistics()[name][1])


@pytest.mark.flower
def test_flower_refuses_fresh_evaluation(flower_tests):
    from federation.flower import HBNFedAvg

    config = flower_tests.small_config(eval={"statistics": "fresh", "fresh_weight": 0.5})
    with pytest.raises(ConfigError, match=r"`eval\.statistics` must be 'ema' on Flower"):
        HBNFedAvg(config=config, layout=flower_tests._layout(config))


@pytest.mark.torch
def test_a_failed_fresh_pass_fails_the_rounds_evaluation_and_keeps_its_training(
    torch_federation, monkeypatch
):
    from federation.client import Client
    from federation.simulation import Simulation

    def config(evaluation):
        return torch_federation.small_config(
            rounds=1, clients={"fraction": 1.0, "min_clients": 2}, eval=evaluation
        )

    reference = Simulation(config({"statistics": "ema"}), dataset=torch_federation.DATA)
    reference.run()
    collect = Client.collect_statistics
    calls = []

    def fails_after_the_rounds_own_step(self, *args, **kwargs):
        calls.append(self.client_id)
        if len(calls) > 4:  # the round's own step asked the 4 clients; the fresh pass fails
            msg = "node lost"
            raise RuntimeError(msg)
        return collect(self, *args, **kwargs)

    monkeypatch.setattr(Client, "collect_statistics", fails_after_the_rounds_own_step)
    simulation = Simulation(config({"statistics": "fresh"}), dataset=torch_federation.DATA)
    (record,) = simulation.run()
    assert record.accuracy is None
    assert "evaluation statistics" in record.evaluation_error
    assert [f.step for f in record.faults] == ["evaluation statistics"] * 4
    assert {f.round for f in record.faults} == {2}  # the round whose step it anticipates
    for name, value in reference.global_state.items():
        np.testing.assert_array_equal(simulation.global_state[name], value)
