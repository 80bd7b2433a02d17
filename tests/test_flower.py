"""federation.flower: HBN rounds on Flower, checked against the embedded simulation.

The Flower simulations run offline through ``flwr.simulation.run_simulation`` (Ray), and one
test runs the app with ``flwr run`` on a local SuperLink. Results are read from the strategy or
the app's ``results.json``, never from an exit code. Every process a test starts carries a
token in its environment, and each test checks that none is left when it ends.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

flwr = pytest.importorskip("flwr")
pytest.importorskip("torch")

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAdam, FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from federation import protocol  # noqa: E402
from federation.client import Client  # noqa: E402
from federation.config import ConfigError, parse_config  # noqa: E402
from federation.data import load_dataset  # noqa: E402
from federation.flower import (  # noqa: E402
    HBNFedAvg,
    HBNStrategy,
    config_from_run_config,
    make_client_app,
    make_server_app,
)
from federation.flower.wire import (  # noqa: E402
    STATISTICS_MESSAGE_TYPE,
    first_replies,
    replies_train_loss,
    train_reply_content,
)
from federation.layout import Role, select  # noqa: E402
from federation.models import ModelSpec  # noqa: E402
from federation.protocol import Update  # noqa: E402
from federation.simulation import RoundFailedError, Simulation  # noqa: E402
from tests.strategies import floats  # noqa: E402

pytestmark = [
    pytest.mark.flower,
    # Ray leaves files and Popen objects of its own processes unclosed.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKEN_VARIABLE = "HBN_FLOWER_TEST_TOKEN"
LOCAL_SUPERLINK_PORT = 39091  # where `flwr run ... local` starts its SuperLink
DIGITS = load_dataset("digits")


def small_config(**sections: object) -> object:
    """4 torch clients with an HBN MLP on digits: the quick federation of most tests."""
    table: dict[str, object] = {
        "rounds": 2,
        "data": {"num_clients": 4, "partition": "dirichlet", "beta": 1.0},
        "model": {"architecture": "mlp", "hidden": 16},
        "train": {"batch_size": 32},
        "clients": {"min_clients": 2},
        "eval": {"statistics": "ema"},
        # A round's global statistics are then its pool, comparable with central statistics.
        "statistics": {"momentum": 1.0},
    }
    for name, values in sections.items():
        table[name] = {**table.get(name, {}), **values} if isinstance(values, dict) else values
    return parse_config(table)


# -- processes -----------------------------------------------------------------------------------


def processes_with(token: str) -> dict[int, str]:
    """Live processes but this one whose environment carries ``token``, with their commands."""
    marker = f"{TOKEN_VARIABLE}={token}".encode()
    found = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in environment.split(b"\0") and state != "Z":
            found[int(entry.name)] = command.strip()
    return found


def wait_for_exit(token: str, seconds: float, *, ignore: tuple[str, ...] = ()) -> dict[int, str]:
    """The processes of ``token`` still alive after up to ``seconds``, ``ignore``'d ones aside."""
    deadline = time.monotonic() + seconds
    while True:
        left = {
            pid: command
            for pid, command in processes_with(token).items()
            if not any(name in command for name in ignore)
        }
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.fixture
def flower_environment(monkeypatch):
    """Flower offline and quiet; afterwards, no process this test started may be left."""
    token = uuid.uuid4().hex
    for name, value in {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "RAY_DEDUP_LOGS": "0",
        TOKEN_VARIABLE: token,
    }.items():
        monkeypatch.setenv(name, value)
    yield token
    left = wait_for_exit(token, 30)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after the test: {left}"


def simulate(config, strategy, *, num_nodes: int, mods=()) -> None:
    """Run a Flower simulation of ``config`` with ``strategy`` on Ray, offline."""
    import ray

    try:
        run_simulation(
            make_server_app(config, strategy=lambda _config, _layout: strategy),
            make_client_app(config, mods=mods),
            num_supernodes=num_nodes,
            backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
        )
    finally:
        ray.shutdown()
        gc.collect()  # Ray's unclosed objects are finalised here, under this module's filters


class RecordingFedAvg(HBNFedAvg):
    """Keeps what the base strategy never sees: the global state going out, replies coming in."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sent = []
        self.reply_keys = []

    def configure_train(self, server_round, arrays, config, grid):
        self.sent.append({k: v.numpy() for k, v in arrays.items()})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.reply_keys += [set(next(iter(r.content.array_records.values()))) for r in replies]
        return super().aggregate_train(server_round, replies)


class HBNFedAdam(HBNStrategy, FedAdam):
    """HBN over FedAdam, recording the state each statistics query was sent with."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sent = []

    def configure_train(self, server_round, arrays, config, grid):
        self.sent.append({k: v.numpy() for k, v in arrays.items()})
        return super().configure_train(server_round, arrays, config, grid)


def central_statistics(config, state, clients) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each HBN layer's (mean, var) over all of ``clients``' data under ``state``, at once."""
    from federation.models.torch_model import TorchModel

    simulation = Simulation(config, dataset=DIGITS)
    model = TorchModel(
        ModelSpec("mlp", "hbn", DIGITS.input_shape, DIGITS.num_classes, hidden=16),
        seed=config.seed,
    )
    model.set_state({**state, **simulation.initial_personal})
    indices = np.concatenate([simulation.clients[k].indices for k in clients])
    moments = model.collect_statistics([DIGITS.x_train[indices]], "global")
    return {name: (m.mean, m.m2 / m.count) for name, m in moments.items()}


def assert_statistics_equal(actual, expected) -> None:
    assert set(actual) == set(expected)
    for name, (mean, var) in expected.items():
        np.testing.assert_allclose(actual[name][0], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(actual[name][1], var, rtol=1e-5, atol=1e-6)


# -- the Flower simulation against the embedded one ----------------------------------------------

MIXED = {
    "rounds": 3,
    "data": {"num_clients": 6, "partition": "dirichlet", "beta": 0.5},
    "method": "hbn",
    "model": {"architecture": "simple-cnn"},
    "clients": {"frameworks": {"torch": 3, "jax": 3}, "min_clients": 2},
    "train": {"batch_size": 32, "drop_last": True},
    "eval": {"statistics": "ema"},
}


@pytest.mark.usefixtures("flower_environment")
def test_a_flower_simulation_of_torch_and_flax_nodes_equals_the_embedded_simulation():
    """6 nodes (3 torch, 3 Flax NNX), 3 rounds on digits, every node in every round.

    The global statistics after each round equal the embedded simulation's. From round 2 on
    they are measured on a model trained by the nodes, so this also checks the weights, each
    node's data and random streams, and its alpha kept in ``context.state`` across rounds.
    """
    pytest.importorskip("flax")
    config = parse_config(MIXED)
    strategy = RecordingFedAvg(config=config, layout=_layout(config))
    simulate(config, strategy, num_nodes=6)

    embedded = Simulation(config, dataset=DIGITS)
    assert [r.round for r in strategy.history] == [1, 2, 3]
    for flower_round in strategy.history:
        record = embedded.run_round()
        assert len(flower_round.statistics_clients) == len(flower_round.trained_clients) == 6
        assert flower_round.faults == ()
        assert_statistics_equal(flower_round.statistics, embedded.global_statistics())
        assert flower_round.accuracy == pytest.approx(record.accuracy, abs=2 / len(DIGITS.y_test))
    assert sorted(strategy.client_ids.values()) == list(range(6))
    shared = set(select(embedded.layout, Role.SHARED))
    assert all(keys == shared for keys in strategy.reply_keys), "nodes send shared tensors only"


@pytest.mark.usefixtures("flower_environment")
def test_fedadam_never_touches_the_statistics():
    """Pooled statistics are exact and variances positive with a server optimiser as base."""
    config = small_config(rounds=3)
    layout = _layout(config)
    strategy = HBNFedAdam(config=config, layout=layout, eta=0.5)
    simulate(config, strategy, num_nodes=4)

    assert [r.round for r in strategy.history] == [1, 2, 3]
    shared = set(select(layout, Role.SHARED))
    assert set(strategy.m_t) == set(strategy.v_t) == set(strategy.current_arrays) == shared
    for index, flower_round in enumerate(strategy.history):
        queried = strategy.sent[index]
        assert_statistics_equal(
            flower_round.statistics, central_statistics(config, queried, range(4))
        )
        assert all((var > 0).all() for _, var in flower_round.statistics.values())
    for flower_round, following in zip(strategy.history, strategy.sent[1:], strict=False):
        for name, (mean, var) in flower_round.statistics.items():
            np.testing.assert_array_equal(following[f"{name}.global_mean"], mean.astype(np.float32))
            np.testing.assert_array_equal(following[f"{name}.global_var"], var.astype(np.float32))


def fail_statistics_of(partition: int, change):
    """A client mod: ``change(reply)`` for node ``partition``'s statistics replies."""

    def mod(message, context, call_next):
        is_statistics = message.metadata.message_type == STATISTICS_MESSAGE_TYPE
        if is_statistics and context.node_config["partition-id"] == partition:
            return change(message, call_next(message, context))
        return call_next(message, context)

    return mod


def raise_disk_full(_message, _reply):
    msg = "the node's disk is full"
    raise OSError(msg)


def nan_mean(_message, reply):
    arrays = reply.content["hbn-statistics"]
    corrupted = {k: v.numpy() for k, v in arrays.items()}
    corrupted["norm1.mean"] = corrupted["norm1.mean"] * np.nan
    reply.content["hbn-statistics"] = ArrayRecord(
        {k: flwr.app.Array(v) for k, v in corrupted.items()}
    )
    return reply


@pytest.mark.usefixtures("flower_environment")
def test_failed_and_invalid_statistics_reports_are_logged_and_left_out(caplog):
    config = small_config()
    strategy = RecordingFedAvg(config=config, layout=_layout(config))
    mods = [fail_statistics_of(1, raise_disk_full), fail_statistics_of(2, nan_mean)]
    with caplog.at_level(logging.WARNING, logger="federation"):
        simulate(config, strategy, num_nodes=4, mods=mods)

    assert [r.round for r in strategy.history] == [1, 2]
    for index, flower_round in enumerate(strategy.history):
        assert len(flower_round.statistics_clients) == 2, flower_round.faults
        assert len(flower_round.trained_clients) == 4, flower_round.faults
        reasons = sorted(f.reason for f in flower_round.faults)
        assert len(reasons) == 2, flower_round.faults
        assert "disk is full" in reasons[1]
        assert re.search("finite", reasons[0])
        valid = [strategy.client_ids[node] for node in flower_round.statistics_clients]
        assert sorted(valid) == [0, 3]
        expected = central_statistics(config, strategy.sent[index], valid)
        assert_statistics_equal(flower_round.statistics, expected)
    logged = caplog.text
    assert "left out of the statistics step" in logged
    assert "the node's disk is full" in logged
    assert "finite" in logged


# -- the strategy in this process: Flower's messages delivered without Ray -----------------------


class LocalGrid:
    """A Flower Grid that hands each message to a ClientApp in this process (no Ray, no link).

    A node whose handler raises replies with an error, as Flower's runtime does.
    """

    def __init__(self, app, num_nodes: int) -> None:
        self.app = app
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node in range(1, num_nodes + 1)
        }

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ARG002 - no waiting here
        replies = []
        for message in messages:
            try:
                replies.append(self.app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as error:  # the node's failure becomes its reply
                reason = f"{type(error).__name__}: {error}"
                replies.append(Message(Error(code=0, reason=reason), reply_to=message))
        return replies


@pytest.fixture
def task_identity(monkeypatch):
    """The identity Flower's runtime gives the ServerApp, which messages are created with."""
    for name, value in {"_run_id": 1, "_task_id": 1, "_node_id": 0}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


def start(strategy, config, grid):
    initial = Simulation(config, dataset=DIGITS)
    names = select(initial.layout, Role.SHARED, Role.STATISTICS)
    arrays = ArrayRecord({k: flwr.app.Array(initial.global_state[k]) for k in names})
    return strategy.start(grid, arrays, num_rounds=config.rounds, timeout=60)


@pytest.mark.usefixtures("task_identity")
def test_too_few_valid_reports_fail_the_round_and_keep_the_state(caplog):
    config = small_config(clients={"min_clients": 3}, rounds=2)
    mods = [fail_statistics_of(0, raise_disk_full), fail_statistics_of(1, raise_disk_full)]
    grid = LocalGrid(make_client_app(config, dataset=DIGITS, mods=mods), 4)
    strategy = HBNFedAvg(config=config, layout=_layout(config))
    with (
        caplog.at_level(logging.WARNING, logger="federation"),
        pytest.raises(
            RoundFailedError,
            match=r"round 1: only 2 valid nodes in the statistics step.*disk is full",
        ),
    ):
        start(strategy, config, grid)
    assert strategy.history == []
    assert caplog.text.count("left out of the statistics step") == 2


@pytest.mark.usefixtures("task_identity")
def test_statistics_counters_and_alpha_sent_by_a_node_never_reach_the_base_strategy():
    """A node that echoes its whole state: only the shared tensors are averaged."""
    config = small_config(rounds=1)
    layout = _layout(config)

    def echo_everything(message, context, call_next):
        reply = call_next(message, context)
        if message.metadata.message_type == "train":
            arrays = dict(reply.content["arrays"])
            received = next(iter(message.content.array_records.values()))
            arrays |= {k: v for k, v in received.items() if k.endswith(("_mean", "_var"))}
            arrays["norm1.alpha"] = flwr.app.Array(np.full(16, 5.0, np.float32))
            arrays["norm1.num_batches_tracked"] = flwr.app.Array(np.asarray(7, np.int64))
            reply.content["arrays"] = ArrayRecord(arrays)
        return reply

    seen = []

    class SpyFedAdam(HBNFedAdam):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            result = super().aggregate_train(server_round, replies)
            seen.extend(set(next(iter(r.content.array_records.values()))) for r in replies)
            return result

    grid = LocalGrid(make_client_app(config, dataset=DIGITS, mods=[echo_everything]), 4)
    strategy = SpyFedAdam(config=config, layout=layout)
    result = start(strategy, config, grid)
    shared = set(select(layout, Role.SHARED))
    assert seen == [shared] * 4
    assert set(result.arrays) == shared | set(select(layout, Role.STATISTICS))
    (round_,) = strategy.history
    for name, (mean, var) in round_.statistics.items():
        np.testing.assert_array_equal(
            result.arrays[f"{name}.global_var"].numpy(), var.astype(np.float32)
        )
        np.testing.assert_array_equal(
            result.arrays[f"{name}.global_mean"].numpy(), mean.astype(np.float32)
        )


@pytest.mark.usefixtures("task_identity")
def test_flower_and_embedded_rounds_give_the_same_statistics_in_float64():
    """The same reports give the same global statistics on both engines, and float64 stays.

    Round 1's reports are computed from the same initial model, data and random streams on
    both engines, and pooled in the same (client) order: the statistics agree bit for bit.
    Later rounds start from weights averaged by Flower's FedAvg and by the protocol's, which
    agree to rounding.
    """
    config = small_config(rounds=2, model={"dtype": "float64"})
    grid = LocalGrid(make_client_app(config, dataset=DIGITS), 4)
    strategy = HBNFedAvg(config=config, layout=_layout(config))
    result = start(strategy, config, grid)
    assert {array.numpy().dtype for array in result.arrays.values()} == {np.dtype(np.float64)}
    embedded = Simulation(config, dataset=DIGITS)
    for index, flower_round in enumerate(strategy.history):
        embedded.run_round()
        expected = embedded.global_statistics()
        assert set(flower_round.statistics) == set(expected)
        for name, (mean, var) in expected.items():
            if index == 0:
                np.testing.assert_array_equal(flower_round.statistics[name][0], mean)
                np.testing.assert_array_equal(flower_round.statistics[name][1], var)
            np.testing.assert_allclose(flower_round.statistics[name][0], mean, 1e-10, 1e-12)
            np.testing.assert_allclose(flower_round.statistics[name][1], var, 1e-10, 1e-12)
    for name, value in embedded.global_state.items():
        np.testing.assert_allclose(result.arrays[name].numpy(), value, rtol=1e-9, atol=1e-12)


@pytest.mark.usefixtures("task_identity")
@settings(max_examples=50, deadline=None)
@given(
    results=st.lists(st.tuples(floats(0.0, 1e4), st.integers(1, 10**6)), min_size=1, max_size=12)
)
def test_flower_reads_the_train_loss_of_its_replies_as_the_protocol_weighs_it(results):
    """The train replies a node builds give the round loss the embedded engine computes."""
    replies = [
        Message(
            train_reply_content(Update({}, {}, count, loss)), dst_node_id=1, message_type="train"
        )
        for loss, count in results
    ]
    losses, examples = zip(*results, strict=True)
    flower = replies_train_loss(replies, "num-examples")
    assert flower == protocol.train_loss(losses, examples)
    weights = np.asarray(examples, np.float64)
    oracle = (np.asarray(losses, np.float64) * weights).sum() / weights.sum()
    np.testing.assert_allclose(flower, oracle, rtol=1e-12, atol=1e-300)


@pytest.mark.usefixtures("task_identity")
@settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    results=st.lists(st.tuples(floats(0.0, 100.0), st.integers(1, 10**4)), min_size=4, max_size=4)
)
def test_both_engines_weight_the_train_loss_by_the_clients_examples(results):
    """The same train losses and example counts give one train_loss on both engines."""
    config = small_config(rounds=1, clients={"fraction": 1.0})

    def reports(message, context, call_next):
        reply = call_next(message, context)
        if message.metadata.message_type == "train":
            loss, count = results[int(context.node_config["partition-id"])]
            reply.content["metrics"] = flwr.app.MetricRecord(
                {"num-examples": count, "train-loss": loss}
            )
        return reply

    grid = LocalGrid(make_client_app(config, dataset=DIGITS, mods=[reports]), 4)
    strategy = HBNFedAvg(config=config, layout=_layout(config))
    start(strategy, config, grid)
    fit = Client.fit

    def fit_reporting(self, *args, **kwargs):
        loss, count = results[self.client_id]
        return fit(self, *args, **kwargs)._replace(train_loss=loss, examples=count)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Client, "fit", fit_reporting)
        (embedded,) = Simulation(config, dataset=DIGITS).run()
    (flower,) = strategy.history
    assert flower.trained_clients == (1, 2, 3, 4)
    assert embedded.trained_clients == (0, 1, 2, 3)
    assert flower.train_loss == embedded.train_loss
    weights = np.asarray([count for _, count in results], np.float64)
    losses = np.asarray([loss for loss, _ in results], np.float64)
    np.testing.assert_allclose(
        embedded.train_loss, (losses * weights).sum() / weights.sum(), rtol=1e-12, atol=1e-300
    )


@pytest.mark.usefixtures("task_identity")
def test_the_strategy_leaves_the_callers_train_config_as_it_was():
    config = small_config(rounds=1)
    grid = LocalGrid(make_client_app(config, dataset=DIGITS), 4)
    strategy = HBNFedAvg(config=config, layout=_layout(config))
    initial = Simulation(config, dataset=DIGITS)
    names = select(initial.layout, Role.SHARED, Role.STATISTICS)
    arrays = ArrayRecord({k: flwr.app.Array(initial.global_state[k]) for k in names})
    train_config = ConfigRecord({"mine": 1})
    strategy.start(grid, arrays, num_rounds=1, timeout=60, train_config=train_config)
    assert [r.round for r in strategy.history] == [1]
    assert dict(train_config) == {"mine": 1}


class DuplicatingGrid(LocalGrid):
    """Delivers node 1's replies twice, as a network that retries may."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        return replies + [r for r in replies if r.metadata.src_node_id == 1]


class AveragingSpy(FedAvg):
    """FedAvg that keeps the replies it averages."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.averaged = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.averaged.append([r.metadata.src_node_id for r in replies])
        return super().aggregate_train(server_round, replies)


class HBNAveragingSpy(HBNStrategy, AveragingSpy):
    """HBN over the spy: what reaches the base strategy's average."""


@pytest.mark.usefixtures("task_identity")
def test_a_reply_delivered_twice_counts_once(caplog):
    config = small_config(rounds=1)
    app = make_client_app(config, dataset=DIGITS)
    clean = HBNFedAvg(config=config, layout=_layout(config))
    start(clean, config, LocalGrid(app, 4))
    twice = HBNAveragingSpy(config=config, layout=_layout(config))
    with caplog.at_level(logging.WARNING, logger="federation"):
        start(twice, config, DuplicatingGrid(app, 4))
    assert caplog.text.count("a second reply from node 1 is ignored") >= 2  # statistics, train
    assert [sorted(nodes) for nodes in twice.averaged] == [[1, 2, 3, 4]]
    (round_,) = twice.history
    assert round_.trained_clients == round_.statistics_clients == (1, 2, 3, 4)
    assert round_.faults == ()
    # Round 1's statistics come from the initial model: the duplicate changed nothing there.
    for name, (mean, var) in clean.history[0].statistics.items():
        np.testing.assert_array_equal(round_.statistics[name][0], mean)
        np.testing.assert_array_equal(round_.statistics[name][1], var)


def test_replies_from_unsampled_nodes_and_second_replies_are_left_out(caplog):
    def reply(node, *, error=False, reply_to=""):
        metadata = types.SimpleNamespace(src_node_id=node, reply_to_message_id=reply_to)
        return types.SimpleNamespace(metadata=metadata, has_error=lambda: error)

    def message(message_id, node):
        metadata = types.SimpleNamespace(message_id=message_id, dst_node_id=node)
        return types.SimpleNamespace(metadata=metadata)

    superlink = 0
    first, other, again, stranger = reply(1), reply(2), reply(1), reply(9)
    # The SuperLink answers for node 3, which it could not reach, from its own node id.
    unreachable = reply(superlink, error=True, reply_to="m3")
    sent = [message("m1", 1), message("m2", 2), message("m3", 3)]
    with caplog.at_level(logging.WARNING, logger="federation"):
        kept = first_replies([first, other, again, stranger, unreachable], (1, 2, 3), sent)
    assert kept == {1: first, 2: other, 3: unreachable}
    assert "a second reply from node 1 is ignored" in caplog.text
    assert "a reply from node 9, which was not sampled, is ignored" in caplog.text


def test_the_run_configuration_maps_onto_the_hbn_configuration():
    config, options = config_from_run_config(
        {
            "rounds": 3,
            "train.lr": 0.1,
            "clients.frameworks.torch": 2,
            "clients.frameworks.jax": 2,
            "data.num_clients": 4,
            "flower.timeout": 60.0,
        }
    )
    assert config.rounds == 3
    assert config.train.lr == 0.1
    assert config.client_frameworks == ["torch", "torch", "jax", "jax"]
    assert options.timeout == 60.0
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['flower.port'\]"):
        config_from_run_config({"flower.port": 1})
    with pytest.raises(ConfigError, match=r"`flower\.timeout` must be a positive number"):
        config_from_run_config({"flower.timeout": 0})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['train.rate'\]"):
        config_from_run_config({"train.rate": 1})


def test_what_cannot_run_on_flower_is_refused():
    layout = _layout(small_config())
    with pytest.raises(ConfigError, match=r"`alpha\.policy` must be 'personal'"):
        HBNFedAvg(config=small_config(alpha={"policy": "averaged"}), layout=layout)
    with pytest.raises(ConfigError, match=r"`eval\.statistics` must be 'ema'"):
        HBNFedAvg(config=small_config(eval={"statistics": "sync"}), layout=layout)
    for method in ("fedbn", "fixbn"):
        with pytest.raises(ConfigError, match=f"`method` '{method}' runs in the embedded"):
            HBNFedAvg(config=small_config(method=method), layout=layout)
    with pytest.raises(ConfigError, match=r"`server\.momentum` must be 0 on Flower"):
        HBNFedAvg(config=small_config(server={"momentum": 0.9}), layout=layout)


def _layout(config):
    return config.model_spec(DIGITS.input_shape, DIGITS.num_classes).layout()


# -- flwr run ------------------------------------------------------------------------------------


def stop_local_superlink(token: str) -> None:
    """Stop the SuperLink ``flwr run`` left running, once the run's own processes are gone."""
    superlink = ("flower-superlink", "flower-superexec")
    wait_for_exit(token, 60, ignore=superlink)
    for pid, command in processes_with(token).items():
        if any(name in command for name in superlink):
            os.kill(pid, signal.SIGTERM)


def docs_block(language: str, marker: str) -> str:
    """The one ``language`` code block of docs/flower.md that holds ``marker``."""
    text = (ROOT / "docs" / "flower.md").read_text()
    blocks = re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    (block,) = [block for block in blocks if marker in block]
    return block


def test_flwr_run_runs_the_app_and_its_result_says_so(flower_environment, tmp_path):
    """docs/flower.md's offline ``flwr run``, its shell lines as written, on a smaller run.

    The documented federation (6 nodes, 5 rounds of the Simple-CNN) is cut down by a
    ``--run-config`` added to the documented command and by 4 nodes instead of 6; the result
    is read from ``results.json``, since ``flwr run`` can exit 0 after a failed run.
    """
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", LOCAL_SUPERLINK_PORT)) == 0:
            pytest.fail(
                f"a SuperLink already listens on port {LOCAL_SUPERLINK_PORT}; stop it first"
            )
    flwr_command = shutil.which("flwr", path=os.path.dirname(sys.executable))
    assert flwr_command is not None, "the flower extra installs the flwr command"
    script = docs_block("bash", "flwr run examples/flower-app local")
    documented = (
        'flwr run examples/flower-app local --stream --federation-config "num-supernodes=6"'
    )
    assert documented in script, script
    out = tmp_path / "out"
    run_config = (
        "rounds=2 data.num_clients=4 data.beta=1.0 model.architecture='mlp' "
        "clients.frameworks.torch=4 clients.frameworks.jax=0 clients.min_clients=2 "
        f"flower.out_dir='{out}' flower.timeout=300.0"
    )
    smaller = documented.replace("num-supernodes=6", "num-supernodes=4")
    script = script.replace(documented, f'{smaller} --run-config "{run_config}"')
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the documented path, from here
    environment = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    }
    try:
        completed = subprocess.run(
            ["bash", "-e", "-c", script],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        stop_local_superlink(flower_environment)
    log = completed.stdout + completed.stderr
    assert (tmp_path / ".flwr" / "config.toml").is_file(), log  # the documented FLWR_HOME
    results = out / "results.json"
    assert results.is_file(), f"the run wrote no results (exit code {completed.returncode}):\n{log}"
    document = json.loads(results.read_text())
    assert document["status"] == "completed", document["error"]
    assert [r["round"] for r in document["rounds"]] == [1, 2]
    assert all(r["faults"] == [] for r in document["rounds"])
    with np.load(out / "global_state.npz") as state:
        assert (state["norm1.global_var"] > 0).all()


@pytest.mark.parametrize(
    ("package", "absent"),
    [
        ("federation", ("flwr", "ray")),
        ("federation.flower", ("ray", "torch", "jax", "flax", "tensorflow", "keras")),
    ],
)
def test_imports_stay_light(package, absent):
    """``import federation`` never imports Flower; ``federation.flower`` no framework or Ray."""
    code = (
        f"import json, sys; import {package}; "
        "print(json.dumps(sorted({m.partition('.')[0] for m in sys.modules})))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    imported = set(json.loads(completed.stdout))
    assert imported.isdisjoint(absent), sorted(imported & set(absent))


# -- reports and updates that must not pass, and robust pools (issue 17) -------------------------


def change_statistics(change):
    """A statistics-reply change: ``change(arrays)`` on the reply's NumPy arrays."""

    def apply(_message, reply):
        arrays = {k: v.numpy() for k, v in reply.content["hbn-statistics"].items()}
        reply.content["hbn-statistics"] = ArrayRecord(
            {k: flwr.app.Array(v) for k, v in change(arrays).items()}
        )
        return reply

    return apply


def change_train_reply(partition: int, change):
    """A client mod: ``change(content)`` on node ``partition``'s train replies."""

    def mod(message, context, call_next):
        reply = call_next(message, context)
        if message.metadata.message_type == "train" and context.node_config["partition-id"] == (
            partition
        ):
            change(reply.content)
        return reply

    return mod


POISONED_REPORTS = {
    "mean 1e39": (lambda a: a | {"norm1.mean": np.full_like(a["norm1.mean"], 1e39)}, "3.40"),
    "m2 1e300": (lambda a: a | {"norm1.m2": np.full_like(a["norm1.m2"], 1e300)}, "3.40"),
    "count 2**62": (
        lambda a: a | {"norm1.count": np.asarray(2**62, np.int64)},
        "4611686018427387904",
    ),
    "count + 1": (
        lambda a: a | {"norm1.count": np.asarray(a["norm1.count"] + 1)},
        "count` must be",
    ),
    "float count": (
        lambda a: a | {"norm1.count": a["norm1.count"].astype(np.float64)},
        "integer",
    ),
}


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("lie", list(POISONED_REPORTS))
def test_a_flower_report_that_cannot_be_true_is_a_fault_and_the_rest_pool(lie):
    change, reason = POISONED_REPORTS[lie]
    config = small_config(rounds=1)
    mods = [fail_statistics_of(1, change_statistics(change))]
    grid = LocalGrid(make_client_app(config, dataset=DIGITS, mods=mods), 4)
    strategy = RecordingFedAvg(config=config, layout=_layout(config))
    result = start(strategy, config, grid)
    (flower_round,) = strategy.history
    (fault,) = flower_round.faults
    assert fault.step == "statistics"
    assert reason in fault.reason, fault.reason
    valid = sorted(strategy.client_ids[node] for node in flower_round.statistics_clients)
    assert valid == [0, 2, 3]
    assert_statistics_equal(
        flower_round.statistics, central_statistics(config, strategy.sent[0], valid)
    )
    assert all(np.isfinite(array.numpy()).all() for array in result.arrays.values())


@pytest.mark.usefixtures("task_identity")
def test_a_flower_round_that_fails_on_lies_commits_nothing():
    config = small_config(rounds=1, clients={"min_clients": 4})
    change, _ = POISONED_REPORTS["mean 1e39"]
    mods = [fail_statistics_of(0, change_statistics(change))]
    grid = LocalGrid(make_client_app(config, dataset=DIGITS, mods=mods), 4)
    strategy = HBNFedAvg(config=config, layout=_layout(config))
    with pytest.raises(RoundFailedError, match="statistics step"):
        start(strategy, config, grid)
    assert strategy.history == []


def float16_arrays(content):
    arrays = {k: v.numpy().astype(np.float16) for k, v in content["arrays"].items()}
    content["arrays"] = ArrayRecord({k: flwr.app.Array(v) for k, v in arrays.items()})


def nan_loss(content):
    metrics = dict(content["metrics"])
    content["metrics"] = flwr.app.MetricRecord({**metrics, "train-loss": float("nan")})


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (float16_arrays, "must be float32, the global model's dtype; got float16"),
        (nan_loss, "training loss must be a finite number"),
    ],
    ids=["float16", "nan-loss"],
)
def test_a_flower_update_in_another_dtype_or_with_a_nan_loss_is_a_fault(change, reason):
    config = small_config(rounds=1)
    mods = [change_train_reply(2, change)]
    grid = LocalGrid(make_client_app(config, dataset=DIGITS, mods=mods), 4)
    strategy = HBNFedAvg(config=config, layout=_layout(config))
    result = start(strategy, config, grid)
    (flower_round,) = strategy.history
    (fault,) = flower_round.faults
    assert fault.step == "training"
    assert reason in fault.reason
    assert len(flower_round.trained_clients) == 3
    assert {a.numpy().dtype for a in result.arrays.values()} == {np.dtype(np.float32)}
    assert np.isfinite(flower_round.train_loss)


def shift_100_sigma(arrays):
    shifted = dict(arrays)
    for key in [k for k in arrays if k.endswith(".mean")]:
        layer = key.removesuffix(".mean")
        std = np.sqrt(arrays[f"{layer}.m2"] / arrays[f"{layer}.count"])
        shifted[key] = arrays[key] + 100 * std
    return shifted


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    "pool", [{"aggregator": "trimmed", "trim": 1}, {"aggregator": "median-of-means", "groups": 3}]
)
def test_a_robust_pool_on_flower_keeps_the_statistics_near_the_clean_ones(pool):
    def statistics(settings, liar):
        config = small_config(
            rounds=1,
            data={"num_clients": 5, "partition": "iid"},
            clients={"min_clients": 5},
            statistics=settings,
        )
        mods = [fail_statistics_of(0, change_statistics(shift_100_sigma))] if liar else []
        grid = LocalGrid(make_client_app(config, dataset=DIGITS, mods=mods), 5)
        strategy = HBNFedAvg(config=config, layout=_layout(config))
        start(strategy, config, grid)
        (flower_round,) = strategy.history
        assert flower_round.faults == ()
        return flower_round.statistics

    clean = statistics({}, liar=False)
    exact = statistics({}, liar=True)
    robust = statistics(pool, liar=True)
    for name, (mean, var) in clean.items():
        scale = np.sqrt(var).max()
        assert np.abs(exact[name][0] - mean).max() > 10 * scale, name
        assert np.abs(robust[name][0] - mean).max() < scale, name
        np.testing.assert_array_less(robust[name][1], 4 * var + 1e-6)
