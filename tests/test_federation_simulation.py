"""federation on torch clients: partition invariance, FedAvg, personal alpha, faults, resume."""

from __future__ import annotations

import copy
import json
import re
from typing import TYPE_CHECKING

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation import protocol
from federation.client import Client
from federation.config import StatisticsConfig, parse_config
from federation.data import Dataset
from federation.evaluation import local_test_split
from federation.layout import Role, select
from federation.runner import run
from federation.simulation import RoundFailedError, Simulation

if TYPE_CHECKING:
    from hbn_core import Moments

pytest.importorskip("torch")

pytestmark = pytest.mark.torch


def synthetic_dataset(seed: int = 0, n: int = 160) -> Dataset:
    """4 classes of 8x8 images whose mean depends on the class: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = rng.normal(size=(n, 1, 8, 8)) + labels[:, None, None, None] * 0.8
    images[:, :, : labels.max() + 1, 0] += np.eye(4)[labels][:, None, :]
    return Dataset.from_arrays(
        images[: n * 3 // 4], labels[: n * 3 // 4], images[n * 3 // 4 :], labels[n * 3 // 4 :]
    )


DATA = synthetic_dataset()


def small_config(**sections: dict) -> object:
    table = {
        "rounds": 2,
        "data": {"num_clients": 4, "partition": "dirichlet", "beta": 1.0},
        "model": {"hidden": 16},
        "train": {"batch_size": 8, "lr": 0.05},
        "clients": {"min_clients": 2},
    }
    for name, values in sections.items():
        table[name] = {**table.get(name, {}), **values} if isinstance(values, dict) else values
    return parse_config(table)


def central_statistics(simulation: Simulation, indices: np.ndarray) -> dict[str, Moments]:
    """The moments every HBN layer sees when all of ``indices`` go through the global model."""
    model = simulation.models["torch"]
    model.set_state({**simulation.global_state, **simulation.initial_personal})
    return model.collect_statistics([simulation.data.x_train[indices]], "global")


@settings(max_examples=15)
@given(
    owners=st.lists(st.integers(0, 3), min_size=len(DATA.y_train), max_size=len(DATA.y_train)),
    batch_size=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_pooled_statistics_equal_central_statistics_for_any_split(owners, batch_size, seed):
    """Global mode: pooling the clients' moments gives the statistics of all data together."""
    simulation = Simulation(small_config(), dataset=DATA)
    owners = np.asarray(owners)
    settings_ = StatisticsConfig(mode="global", batch_size=batch_size)
    state = {**simulation.global_state, **simulation.initial_personal}
    rng = np.random.default_rng(seed)
    reports = [
        Client(k, "torch", np.flatnonzero(owners == k)).collect_statistics(
            simulation.models["torch"], state, DATA, settings_, rng
        )
        for k in np.unique(owners)
    ]
    pooled = protocol.pool_statistics(reports, settings_)
    central = central_statistics(simulation, np.arange(len(owners)))
    for name, (mean, var) in pooled.items():
        count, central_mean, m2 = central[name]
        np.testing.assert_allclose(mean, central_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, m2 / count, rtol=1e-5, atol=1e-6)


def test_a_round_sets_the_global_statistics_of_the_union_of_client_data():
    # Momentum 1: the global statistics are the round's pool itself.
    simulation = Simulation(small_config(statistics={"momentum": 1.0}), dataset=DATA)
    central = central_statistics(
        simulation, np.concatenate([c.indices for c in simulation.clients])
    )
    simulation.run_round()
    for name, (mean, var) in simulation.global_statistics().items():
        count, central_mean, m2 = central[name]
        np.testing.assert_allclose(mean, central_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, m2 / count, rtol=1e-5, atol=1e-6)


def test_fedavg_of_the_round_is_weighted_by_example_count(monkeypatch):
    seen = {}
    original = protocol.fedavg

    def spy(states, weights):
        seen["states"], seen["weights"] = states, weights
        return original(states, weights)

    monkeypatch.setattr(protocol, "fedavg", spy)
    simulation = Simulation(small_config(), dataset=DATA)
    simulation.run_round()
    assert seen["weights"] == [len(c.indices) for c in simulation.clients]
    expected = np.average(
        np.stack([s["fc2.weight"] for s in seen["states"]]).astype(np.float64),
        axis=0,
        weights=seen["weights"],
    )
    np.testing.assert_allclose(simulation.global_state["fc2.weight"], expected, rtol=1e-6)


def test_personal_alpha_is_never_sent_and_differs_between_clients(monkeypatch):
    sent = []
    original = protocol.fedavg
    monkeypatch.setattr(protocol, "fedavg", lambda s, w: (sent.extend(s), original(s, w))[1])
    simulation = Simulation(small_config(), dataset=DATA)
    simulation.run()
    alpha_names = select(simulation.layout, Role.PERSONAL)
    assert alpha_names
    assert not any(name in update for update in sent for name in alpha_names)
    assert not any(name in simulation.global_state for name in alpha_names)
    alphas = [personal["norm1.alpha"] for personal in simulation.state.personal]
    assert not np.array_equal(alphas[0], alphas[1])
    assert all(np.abs(a).max() > 0 for a in alphas)


def test_the_authors_method_sends_and_averages_alpha(monkeypatch):
    sent = []
    original = protocol.fedavg
    monkeypatch.setattr(protocol, "fedavg", lambda s, w: (sent.extend(s), original(s, w))[1])
    simulation = Simulation(small_config(method="hbn-authors"), dataset=DATA)
    record = simulation.run_round()
    assert all("norm1.alpha" in update for update in sent)
    assert np.abs(simulation.personal_average["norm1.alpha"]).max() > 0
    assert record.accuracy is not None
    assert np.isfinite(record.loss)


@pytest.mark.parametrize("method", ["bn", "gn", "none"])
def test_models_without_hbn_skip_the_statistics_step(method):
    simulation = Simulation(small_config(method=method), dataset=DATA)
    record = simulation.run_round()
    assert record.statistics_clients == ()
    assert record.trained_clients == (0, 1, 2, 3)


# -- the baselines ------------------------------------------------------------------------------


def spy_on_fedavg(monkeypatch) -> list[tuple[list, list]]:
    """Record every FedAvg call's states and weights."""
    calls = []
    original = protocol.fedavg

    def spy(states, weights):
        calls.append((states, weights))
        return original(states, weights)

    monkeypatch.setattr(protocol, "fedavg", spy)
    return calls


def test_fedbn_keeps_batchnorm_on_its_clients_and_averages_it_only_to_evaluate(monkeypatch):
    calls = spy_on_fedavg(monkeypatch)
    simulation = Simulation(small_config(method="fedbn"), dataset=DATA)
    initial = dict(simulation.initial_personal)
    record = simulation.run_round()
    assert not any(name.startswith("norm") for name in simulation.global_state)
    own = [personal["norm1.weight"] for personal in simulation.state.personal]
    assert not np.array_equal(own[0], own[1])
    states, weights = calls[-1]
    expected = np.average(
        np.stack([s["norm1.running_mean"] for s in states]).astype(np.float64), 0, weights
    )
    np.testing.assert_allclose(simulation.personal_average["norm1.running_mean"], expected, 1e-6)
    # A returning client starts from its own BatchNorm; a new one from the initial one.
    first = protocol.first_personal(
        simulation.state, simulation.initial_personal, simulation.config
    )
    returning = protocol.model_state(simulation.global_state, simulation.state.personal[0], first)
    assert returning["norm1.weight"] is own[0]
    np.testing.assert_array_equal(first["norm1.weight"], initial["norm1.weight"])
    assert 0 <= record.personal_accuracy <= 1
    assert simulation.summary().last10_mean_personal_accuracy == record.personal_accuracy


def test_a_local_test_split_follows_the_clients_label_proportions():
    simulation = Simulation(small_config(method="fedbn", data={"beta": 0.3}), dataset=DATA)
    for client in simulation.clients:
        split = local_test_split(simulation.setup, 0, client.client_id)
        train = np.bincount(DATA.y_train[client.indices], minlength=4) / len(client.indices)
        test = np.bincount(DATA.y_test[split], minlength=4) / len(split)
        np.testing.assert_allclose(test, train, atol=1 / len(split))


def test_fixbn_freezes_the_running_statistics_from_its_switch_round():
    config = small_config(method="fixbn", rounds=3, fixbn={"switch_fraction": 1 / 3})
    simulation = Simulation(config, dataset=DATA)
    before = dict(simulation.global_state)
    simulation.run_round()
    switched = dict(simulation.global_state)
    assert not np.array_equal(switched["norm1.running_mean"], before["norm1.running_mean"])
    simulation.run()
    for name in ("norm1.running_mean", "norm1.running_var", "norm3.running_var"):
        np.testing.assert_array_equal(simulation.global_state[name], switched[name])
    assert not np.array_equal(simulation.global_state["norm1.weight"], switched["norm1.weight"])


def test_fbn_trains_with_the_pooled_statistics_blended_by_its_momentum():
    simulation = Simulation(small_config(method="fbn"), dataset=DATA)
    assert not select(simulation.layout, Role.PERSONAL)
    everything = np.concatenate([c.indices for c in simulation.clients])
    central = central_statistics(simulation, everything)
    simulation.run_round()
    for name, (mean, var) in simulation.global_statistics().items():
        count, central_mean, m2 = central[name]
        np.testing.assert_allclose(mean, 0.1 * central_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, 0.9 + 0.1 * m2 / count, rtol=1e-5, atol=1e-6)


def test_fedfn_feeds_fc1_unit_features_scaled_by_the_square_root_of_their_size():
    import torch

    simulation = Simulation(small_config(method="fedfn"), dataset=DATA)
    network = simulation.models["torch"].network
    seen = []
    network.fc1.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    network(torch.from_numpy(DATA.x_train[:5]))
    norms = torch.linalg.vector_norm(seen[0], dim=1)
    np.testing.assert_allclose(norms.detach().numpy(), np.sqrt(seen[0].shape[1]), rtol=1e-5)


def test_server_momentum_is_fedavgm_over_the_rounds_averages(monkeypatch):
    calls = spy_on_fedavg(monkeypatch)
    simulation = Simulation(small_config(server={"momentum": 0.5}, rounds=3), dataset=DATA)
    weights = [simulation.global_state["fc2.weight"].astype(np.float64)]
    velocity = np.zeros_like(weights[0])
    for _ in range(3):
        simulation.run_round()
        states, examples = calls[-1]
        average = np.average(
            np.stack([s["fc2.weight"] for s in states]).astype(np.float64), 0, examples
        )
        velocity = 0.5 * velocity + (weights[-1] - average)
        weights.append(weights[-1] - velocity)
        np.testing.assert_allclose(simulation.global_state["fc2.weight"], weights[-1], 1e-5, 1e-6)
        weights[-1] = simulation.global_state["fc2.weight"].astype(np.float64)


def test_a_run_with_the_same_seed_gives_the_same_results():
    first = Simulation(small_config(), dataset=DATA)
    second = Simulation(small_config(), dataset=DATA)
    first.run()
    second.run()
    assert [r.accuracy for r in first.history] == [r.accuracy for r in second.history]
    for name, value in first.global_state.items():
        np.testing.assert_array_equal(second.global_state[name], value)


class KilledError(Exception):
    """Stands in for a kill between two rounds."""


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    config = small_config(rounds=3)
    uninterrupted = run(config, dataset=DATA)

    def kill_after_round_two(record):
        if record.round == 2:
            raise KilledError

    with pytest.raises(KilledError):
        run(config, out_dir=tmp_path, dataset=DATA, on_round=kill_after_round_two)
    resumed = run(config, out_dir=tmp_path, resume=True, dataset=DATA)
    assert resumed.simulation.rounds_done == 3
    for name, value in uninterrupted.simulation.global_state.items():
        np.testing.assert_array_equal(resumed.simulation.global_state[name], value)
    for a, b in zip(
        uninterrupted.simulation.state.personal, resumed.simulation.state.personal, strict=True
    ):
        for name, value in a.items():
            np.testing.assert_array_equal(b[name], value)
    assert [r.accuracy for r in resumed.history] == [r.accuracy for r in uninterrupted.history]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_checkpoints_load_without_pickle_and_refuse_another_run(tmp_path):
    run(small_config(), out_dir=tmp_path, dataset=DATA)
    with np.load(tmp_path / "checkpoint.npz", allow_pickle=False) as stored:
        assert all(stored[k].dtype != object for k in stored.files)
        assert any(k.startswith("personal/") for k in stored.files)
    with pytest.raises(ValueError, match=r"different configuration .*'train'"):
        run(small_config(train={"lr": 0.2}), out_dir=tmp_path, resume=True, dataset=DATA)


# -- faults ------------------------------------------------------------------------------------


def corrupt_statistics(change):
    def wrap(collect):
        def corrupted(*args, **kwargs):
            report = collect(*args, **kwargs)
            moments = dict(report.moments)
            moments["norm1"] = change(moments["norm1"])
            return report._replace(moments=moments)

        return corrupted

    return wrap


def corrupt_update(change):
    def wrap(fit):
        def corrupted(*args, **kwargs):
            update = fit(*args, **kwargs)
            return update._replace(sent=change(dict(update.sent)))

        return corrupted

    return wrap


def raising(_method):
    def fail(*_args, **_kwargs):
        msg = "the client's disk is full"
        raise OSError(msg)

    return fail


FAULTS = {
    "raises-in-statistics": ("collect_statistics", raising, "OSError: the client's disk is full"),
    "raises-in-training": ("fit", raising, "OSError: the client's disk is full"),
    "nan-mean": (
        "collect_statistics",
        corrupt_statistics(lambda m: m._replace(mean=m.mean * np.nan)),
        "finite",
    ),
    "negative-count": (
        "collect_statistics",
        corrupt_statistics(lambda m: m._replace(count=-m.count)),
        "positive count",
    ),
    "zero-count": (
        "collect_statistics",
        corrupt_statistics(lambda m: m._replace(count=0 * m.count)),
        "positive count",
    ),
    "statistics-wrong-shape": (
        "collect_statistics",
        corrupt_statistics(lambda m: m._replace(mean=m.mean[:-1])),
        "shapes",
    ),
    "inf-weights": (
        "fit",
        corrupt_update(lambda s: {**s, "fc2.bias": s["fc2.bias"] * np.inf}),
        "non-finite",
    ),
    "wrong-keys": (
        "fit",
        corrupt_update(
            lambda s: {**{k: v for k, v in s.items() if k != "fc1.bias"}, "x": s["fc1.bias"]}
        ),
        "missing \\['fc1.bias'\\], unknown \\['x'\\]",
    ),
    "wrong-shape": (
        "fit",
        corrupt_update(lambda s: {**s, "fc2.weight": s["fc2.weight"].T}),
        "`fc2.weight` must have shape",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_faulty_client_is_left_out_and_the_reason_recorded(fault):
    method, wrap, reason = FAULTS[fault]
    simulation = Simulation(small_config(), dataset=DATA)
    bad = simulation.clients[2]
    setattr(bad, method, wrap(getattr(bad, method)))
    record = simulation.run_round()
    assert [(f.client, f.round) for f in record.faults] == [(2, 1)]
    assert re.search(reason, record.faults[0].reason)
    step = "statistics" if method == "collect_statistics" else "training"
    kept = record.statistics_clients if step == "statistics" else record.trained_clients
    assert kept == (0, 1, 3)
    assert all(np.isfinite(v).all() for v in simulation.global_state.values())
    assert (simulation.state.personal[2] is None) == (step == "training")


def test_too_few_valid_clients_fail_the_round_and_change_nothing():
    simulation = Simulation(small_config(clients={"min_clients": 3}), dataset=DATA)
    simulation.run_round()
    before = copy.deepcopy((simulation.global_state, simulation.state.personal))
    for client in simulation.clients[:2]:
        client.fit = raising(client.fit)
    with pytest.raises(
        RoundFailedError, match=r"only 2 valid clients in the training step.*disk is full"
    ):
        simulation.run_round()
    assert simulation.rounds_done == 1
    for name, value in before[0].items():
        np.testing.assert_array_equal(simulation.global_state[name], value)
    for personal, now in zip(before[1], simulation.state.personal, strict=True):
        assert all(np.array_equal(personal[k], now[k]) for k in personal)


def test_a_model_of_your_own_replaces_the_reference_model():
    from federation.models import ModelSpec
    from federation.models.torch_model import TorchModel

    mine = TorchModel(ModelSpec("mlp", "hbn", (1, 8, 8), 4, hidden=8), seed=1)
    simulation = Simulation(small_config(), dataset=DATA, models={"torch": mine})
    record = simulation.run_round()
    assert record.trained_clients == (0, 1, 2, 3)
    assert simulation.global_state["fc1.weight"].shape == (8, 64)
    assert set(simulation.hbn_layers) == {"norm1"}


def test_models_of_your_own_must_cover_the_frameworks_and_share_a_layout():
    from federation.models import ModelSpec
    from federation.models.torch_model import TorchModel

    config = small_config(clients={"frameworks": {"torch": 2, "jax": 2}})
    small = TorchModel(ModelSpec("mlp", "hbn", (1, 8, 8), 4, hidden=8), seed=1)
    wide = TorchModel(ModelSpec("mlp", "hbn", (1, 8, 8), 4, hidden=9), seed=1)
    with pytest.raises(ValueError, match=r"missing \['jax'\]"):
        Simulation(config, dataset=DATA, models={"torch": small})
    with pytest.raises(ValueError, match="share one canonical layout; jax's differs"):
        Simulation(config, dataset=DATA, models={"torch": small, "jax": wide})


def test_hybrid_recorded_statistics_mix_batch_and_global_with_the_clients_alpha():
    """The authors' reports (D2): (1 - w) batch + w global, w = sigmoid(alpha) of the client."""
    simulation = Simulation(small_config(), dataset=DATA)
    rng = np.random.default_rng(0)
    state = {**simulation.global_state, **simulation.initial_personal}
    channels = state["norm1.alpha"].shape[0]
    state["norm1.alpha"] = rng.normal(size=channels).astype(np.float32)
    state["norm1.global_mean"] = rng.normal(size=channels).astype(np.float32)
    state["norm1.global_var"] = rng.uniform(0.5, 2, size=channels).astype(np.float32)
    client = simulation.clients[0]
    model = simulation.models["torch"]

    def report(recorded: str) -> Moments:
        settings_ = StatisticsConfig(recorded=recorded, shuffle=False)
        return client.collect_statistics(model, state, DATA, settings_, rng).moments["norm1"]

    batch, hybrid = report("batch"), report("hybrid")
    w = 1 / (1 + np.exp(-state["norm1.alpha"].astype(np.float64)))
    expected_mean = (1 - w) * batch.mean + w * state["norm1.global_mean"]
    expected_var = (1 - w) * batch.m2 / batch.count + w * state["norm1.global_var"]
    assert hybrid.count == batch.count
    np.testing.assert_allclose(hybrid.mean, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(hybrid.m2 / hybrid.count, expected_var, rtol=1e-6)
