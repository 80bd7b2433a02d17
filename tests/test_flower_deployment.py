"""federation.flower in a deployment (issue 20): what only a real deployment used to show.

A node's framework whatever the run configuration's key order, every step bounded by
``flower.timeout``, ``results.json`` that cannot go stale, and personal state that survives a
restarted SuperNode. The strategy and the apps run in this process over stub grids
(:class:`tests.test_flower.LocalGrid`), so each defect is tried directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")
pytest.importorskip("torch")

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.supercore.run import RunNotRunningException  # noqa: E402

from federation.flower import HBNFedAvg, config_from_run_config, make_client_app  # noqa: E402
from federation.flower.app import make_server_app  # noqa: E402
from federation.flower.client_app import (  # noqa: E402
    PERSONAL_KEY,
    STATE_DIR_KEY,
    load_personal_state,
    personal_state_path,
)
from federation.flower.strategy import NodeSetupError  # noqa: E402
from federation.flower.wire import (  # noqa: E402
    STATISTICS_MESSAGE_TYPE,
    state_from_record,
    travelling_state,
)
from federation.layout import Role, select  # noqa: E402
from federation.simulation import Simulation  # noqa: E402
from tests.test_flower import (  # noqa: E402
    DIGITS,
    ROOT,
    LocalGrid,
    _layout,
    flower_environment,  # noqa: F401 - a fixture
    small_config,
    start,
    task_identity,  # noqa: F401 - a fixture
)

pytestmark = [pytest.mark.flower, pytest.mark.usefixtures("task_identity")]

# -- defect 1: a node's framework is a function of its partition ---------------------------------

ROUND_TRIP = """
import json, sys
from flwr.common.config import flatten_dict, get_project_config
from flwr.common.serde import user_config_from_proto, user_config_to_proto
from federation.flower import config_from_run_config

project = get_project_config(sys.argv[1])
flat = flatten_dict(project["tool"]["flwr"]["app"]["config"])
received = user_config_from_proto(user_config_to_proto(flat))
config, _ = config_from_run_config(received)
print(json.dumps([list(received), config.client_frameworks, config.eval_framework]))
"""


def test_a_nodes_framework_survives_flowers_run_config_round_trip_in_every_process():
    """Flower's protobuf round trip reorders the run configuration per ``PYTHONHASHSEED``."""
    seen = []
    for seed in ("0", "1", "2", "3", "4", "5"):
        completed = subprocess.run(
            [sys.executable, "-c", ROUND_TRIP, str(ROOT / "examples" / "flower-app")],
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        keys, frameworks, evaluation = json.loads(completed.stdout)
        seen.append(keys)
        assert frameworks == ["torch"] * 3 + ["jax"] * 3, f"PYTHONHASHSEED={seed}"
        assert evaluation == "torch", f"PYTHONHASHSEED={seed}"
    # The key order itself is not what decides: it does differ between processes or here.
    flat = {"data.num_clients": 6, "clients.frameworks.jax": 3, "clients.frameworks.torch": 3}
    for order in (list(flat), list(reversed(flat))):
        config, _ = config_from_run_config({key: flat[key] for key in order})
        assert config.client_frameworks == ["torch"] * 3 + ["jax"] * 3
        assert config.eval_framework == "torch"
    assert all(len(keys) == len(seen[0]) for keys in seen)


def test_the_embedded_simulation_assigns_the_same_frameworks_whatever_the_key_order():
    assigned = [
        [
            client.framework
            for client in Simulation(
                small_config(clients={"frameworks": frameworks}), dataset=DIGITS
            ).clients
        ]
        for frameworks in ({"jax": 2, "torch": 2}, {"torch": 2, "jax": 2})
    ]
    assert assigned == [["torch", "torch", "jax", "jax"]] * 2


def test_a_node_without_its_framework_stops_the_run_at_its_first_message():
    config = small_config(rounds=2)
    calls = []

    def models(framework):
        calls.append(framework)
        msg = f"No module named {framework!r}"
        raise ImportError(msg)

    grid = CountingGrid(make_client_app(config, dataset=DIGITS, models=models), 4)
    strategy = HBNFedAvg(config=config, layout=_layout(config))
    with pytest.raises(NodeSetupError, match=r"partition \d lacks its framework 'torch'"):
        start(strategy, config, grid)
    assert grid.sent == 4  # the first statistics query, one message per node, and no more
    assert strategy.history == []


class CountingGrid(LocalGrid):
    """A LocalGrid that counts the messages it delivers and records each step's timeout."""

    def __init__(self, app, num_nodes: int) -> None:
        super().__init__(app, num_nodes)
        self.sent = 0
        self.timeouts: list[tuple[str, float | None]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += len(messages)
        if messages:
            self.timeouts.append((messages[0].metadata.message_type, timeout))
        return super().send_and_receive(messages, timeout=timeout)


# -- defect 2: every step honours flower.timeout -------------------------------------------------


class StuckGrid(CountingGrid):
    """Node 1 never answers the statistics query: the grid waits out ``timeout`` for it."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == STATISTICS_MESSAGE_TYPE:
            stuck = [m for m in messages if m.metadata.dst_node_id == 1]
            answered = [m for m in messages if m.metadata.dst_node_id != 1]
            replies = super().send_and_receive(answered, timeout=timeout)
            self.timeouts[-1] = (STATISTICS_MESSAGE_TYPE, timeout)
            if stuck:
                assert timeout is not None, "the statistics query waits forever"
                assert timeout <= 600, f"the statistics query waits {timeout} s"
                time.sleep(timeout)  # the stuck node's reply never comes
            return replies
        return super().send_and_receive(messages, timeout=timeout)


def test_every_step_of_a_round_waits_at_most_the_configured_timeout():
    config = small_config(rounds=2, clients={"min_clients": 3})
    grid = StuckGrid(make_client_app(config, dataset=DIGITS), 4)
    strategy = HBNFedAvg(config=config, layout=_layout(config))
    initial = Simulation(config, dataset=DIGITS)
    names = select(initial.layout, Role.SHARED, Role.STATISTICS)
    arrays = flwr.app.ArrayRecord({k: flwr.app.Array(initial.global_state[k]) for k in names})
    strategy.start(grid, arrays, num_rounds=2, timeout=0.25)
    steps = {message_type for message_type, _ in grid.timeouts}
    assert steps == {STATISTICS_MESSAGE_TYPE, "train", "evaluate"}
    assert {timeout for _, timeout in grid.timeouts} == {0.25}
    for flower_round in strategy.history:
        (fault,) = flower_round.faults
        assert (fault.client, fault.step) == (1, "statistics")
        assert "no reply before the timeout" in fault.reason


def test_no_step_waits_for_more_connected_nodes_than_min_clients():
    """Flower's FedAvg waits, with no timeout, for ``min_*_nodes`` connected nodes."""
    config = small_config(clients={"min_clients": 3})
    strategy = HBNFedAvg(config=config, layout=_layout(config))
    assert strategy.min_train_nodes == strategy.min_evaluate_nodes == 3
    assert strategy.min_available_nodes == 3


def test_the_server_app_passes_flower_timeout_to_the_statistics_query(tmp_path):
    config = small_config(rounds=1)
    grid = CountingGrid(make_client_app(config, dataset=DIGITS), 4)
    run_server_app(config, grid, run_id=3, out_dir=tmp_path, timeout=7.5)
    assert {timeout for _, timeout in grid.timeouts} == {7.5}
    assert STATISTICS_MESSAGE_TYPE in {message_type for message_type, _ in grid.timeouts}


# -- defect 4: results.json per round, with the run id and a status ------------------------------


def run_server_app(config, grid, *, run_id, out_dir, timeout=60.0, strategy=None):
    from federation.flower.wire import ServerOptions

    app = make_server_app(
        config,
        options=ServerOptions(timeout=timeout, out_dir=str(out_dir)),
        strategy=None if strategy is None else (lambda _config, _layout: strategy),
    )
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    app(grid, context)


def read_results(out_dir):
    return json.loads((out_dir / "results.json").read_text())


class WatchingGrid(CountingGrid):
    """Reads results.json before each step; ``interrupt(step number)`` may end the run."""

    def __init__(self, app, num_nodes, out_dir, interrupt=None) -> None:
        super().__init__(app, num_nodes)
        self.out_dir = out_dir
        self.interrupt = interrupt
        self.seen: list[dict] = []
        self.steps = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages:
            self.steps += 1
            self.seen.append(read_results(self.out_dir))
            if self.interrupt is not None:
                self.interrupt(self.steps)
        return super().send_and_receive(messages, timeout=timeout)


def stop_at(step):
    def interrupt(current):
        if current == step:
            raise RunNotRunningException

    return interrupt


def fail_at(step):
    def interrupt(current):
        if current == step:
            msg = "the link went down"
            raise ConnectionError(msg)

    return interrupt


def test_results_are_written_every_round_and_a_stopped_or_failed_run_never_says_completed(
    tmp_path,
):
    config = small_config(rounds=2)
    app = make_client_app(config, dataset=DIGITS)

    completed = WatchingGrid(app, 4, tmp_path)
    run_server_app(config, completed, run_id=11, out_dir=tmp_path)
    document = read_results(tmp_path)
    assert (document["run_id"], document["status"]) == (11, "completed")
    assert [r["round"] for r in document["rounds"]] == [1, 2]
    # Before each step the file already named this run, running, with the rounds done so far.
    assert {(seen["run_id"], seen["status"]) for seen in completed.seen} == {(11, "running")}
    # Steps: query, train, evaluate per round; a round is written once it is evaluated.
    assert [len(seen["rounds"]) for seen in completed.seen] == [0, 0, 0, 1, 1, 1]
    with np.load(tmp_path / "global_state.npz", allow_pickle=False) as state:
        assert set(state.files) == set(select(_layout(config), Role.SHARED, Role.STATISTICS))

    stopped = WatchingGrid(app, 4, tmp_path, interrupt=stop_at(4))  # round 2's query
    with pytest.raises(RunNotRunningException):
        run_server_app(config, stopped, run_id=12, out_dir=tmp_path)
    assert stopped.seen[0]["run_id"] == 12, "the new run showed the previous run's results"
    assert stopped.seen[0]["status"] == "running"
    document = read_results(tmp_path)
    assert (document["run_id"], document["status"]) == (12, "stopped")
    assert [r["round"] for r in document["rounds"]] == [1]

    failed = WatchingGrid(app, 4, tmp_path, interrupt=fail_at(2))  # round 1's training
    with pytest.raises(ConnectionError):
        run_server_app(config, failed, run_id=13, out_dir=tmp_path)
    document = read_results(tmp_path)
    assert (document["run_id"], document["status"]) == (13, "failed")
    assert "the link went down" in document["error"]
    assert document["rounds"] == []
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left"


# -- defect 5: a restarted SuperNode continues its alpha -----------------------------------------


def node_context(node_id, partition, state_dir, *, run_id=1):
    return Context(
        run_id=run_id,
        node_id=node_id,
        node_config={
            "partition-id": partition,
            "num-partitions": 4,
            STATE_DIR_KEY: str(state_dir),
        },
        state=RecordDict(),
        run_config={},
    )


def test_a_restarted_node_continues_the_alpha_it_kept_on_its_disk(tmp_path):
    config = small_config(rounds=1)
    grid = LocalGrid(make_client_app(config, dataset=DIGITS), 4)
    for node in grid.contexts:
        grid.contexts[node] = node_context(node, node - 1, tmp_path)
    strategy = HBNFedAvg(config=config, layout=_layout(config))
    result = start(strategy, config, grid)

    layout = _layout(config)
    initial = Simulation(config, dataset=DIGITS).initial_personal
    for node, context in grid.contexts.items():
        path = personal_state_path(context, node - 1, 4)
        assert path == tmp_path / "run-1" / f"partition-{node - 1}-of-4.npz"
        kept = load_personal_state(path, layout)
        in_memory = state_from_record(context.state.array_records[PERSONAL_KEY])
        assert kept.keys() == in_memory.keys() == set(select(layout, Role.PERSONAL))
        for name, value in kept.items():
            np.testing.assert_array_equal(value, in_memory[name])
        assert any(not np.array_equal(kept[n], initial[n]) for n in kept), "alpha never moved"

    # Node 2 restarts: a new node id, an empty context.state, the same partition and folder.
    restarted = node_context(99, 1, tmp_path)
    forgetful = Context(
        run_id=1,
        node_id=98,
        node_config={"partition-id": 1, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )
    app = make_client_app(config, dataset=DIGITS)
    settings = flwr.app.ConfigRecord({"server-round": 2, "lr": 0.05})
    train = Message(
        content=RecordDict({"arrays": result.arrays, "config": settings}),
        message_type="train",
        dst_node_id=2,
    )
    # Training runs the forward pass through alpha: its update tells which alpha a node used.
    after_restart = app(train, restarted).content["arrays"]  # reads the file first
    original = app(train, grid.contexts[2]).content["arrays"]  # its context.state
    from_scratch = app(train, forgetful).content["arrays"]
    for name in original:
        np.testing.assert_array_equal(after_restart[name].numpy(), original[name].numpy())
    assert any(
        not np.array_equal(from_scratch[name].numpy(), original[name].numpy()) for name in original
    ), "the initial alpha gives the same update: the test cannot tell"


def test_a_corrupt_or_pickled_personal_state_is_refused_never_loaded(tmp_path):
    config = small_config(rounds=1)
    layout = _layout(config)
    path = tmp_path / "run-1" / "partition-1-of-4.npz"
    path.parent.mkdir()
    np.savez(path, **{"norm1.alpha": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match=r"personal state .*partition-1-of-4\.npz"):
        load_personal_state(path, layout)
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot be used"):
        load_personal_state(path, layout)
    app = make_client_app(config, dataset=DIGITS)
    grid = LocalGrid(app, 4)
    grid.contexts[2] = node_context(2, 1, tmp_path)
    strategy = HBNFedAvg(config=config, layout=layout)
    start(strategy, config, grid)
    # The node with the corrupt file was left out with the reason, not reset silently.
    (flower_round,) = strategy.history
    (fault,) = [f for f in flower_round.faults if f.step == "statistics"]
    assert fault.client == 2
    assert "cannot be used" in fault.reason


# -- a real deployment on 127.0.0.1: a SuperLink, two SuperNodes, `flwr run` ---------------------

BIN = pathlib.Path(sys.executable).parent
DEPLOYMENT_RUN = {
    "rounds": 2,
    "data.num_clients": 2,
    "model.architecture": "mlp",
    "clients.frameworks.torch": 2,
    "clients.frameworks.jax": 0,
    "clients.min_clients": 1,
    # A healthy step takes 10 to 30 s on a 2-core machine (each message's ClientApp process
    # imports Flower and torch first), but over 60 s when pytest-xdist runs a Ray simulation on
    # the other core. The timeout bounds only what never answers: the SuperLink reports a killed
    # node unavailable within seconds, so it costs the healthy run nothing.
    "flower.timeout": 150.0,
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """The PIDs of ``pid``'s children, grandchildren, ... (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``process``, its process group and every descendant, by PID, with bounded waits.

    Flower's SuperExec starts sessions of its own, outside the process group.
    """
    others = descendants(process.pid)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # children left by a leader that exited
    for pid in others:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def deployment(tmp_path):
    """A SuperLink and two torch SuperNodes on 127.0.0.1, each stopped by its PID at the end."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    link_port, node_ports = free_port(), (free_port(), free_port())
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    environment = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",  # logs read while the processes run
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    processes: list[subprocess.Popen] = []
    logs = contextlib.ExitStack()

    def spawn(name, *arguments):
        log = logs.enter_context((tmp_path / f"{name}.log").open("w"))
        process = subprocess.Popen(
            [str(BIN / arguments[0]), *arguments[1:]],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: it and its children stop together
        )
        processes.append(process)
        return process

    try:
        # The torch layer's C++ operator, built (or found built) while the SuperLink starts, so
        # that no node builds it inside a timed step. Its build directory is keyed by
        # sys.executable, so it is built by the interpreter of Flower's ClientApp processes.
        build = spawn("torch-build", clientapp_interpreter(), "-m", "backends.torch", "build")
        spawn(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
            "--database",
            str(tmp_path / "link.db"),
        )
        wait_until(lambda: accepts(link_port), 60, "the SuperLink's port")
        nodes = [
            spawn(
                f"supernode-{k}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--node-config",
                f"partition-id={k} num-partitions=2 {STATE_DIR_KEY}='{tmp_path / f'state-{k}'}'",
            )
            for k, port in enumerate(node_ports)
        ]
        link_log = tmp_path / "superlink.log"
        wait_until(
            lambda: link_log.read_text().count("Activated node_id") >= 2,
            120,
            "both SuperNodes to connect",
        )
        build.wait(600)
        yield {"environment": environment, "nodes": nodes, "spawn": spawn, "logs": tmp_path}
    finally:
        for process in reversed(processes):
            stop_group(process)
        logs.close()


def clientapp_interpreter() -> str:
    """The interpreter of the ``flwr-clientapp`` script: its shebang, or pip's sh trampoline."""
    first, second, *_ = (BIN / "flwr-clientapp").read_text().splitlines()
    trampoline = re.match(r"'''exec' (\S+)", second) if first == "#!/bin/sh" else None
    shebang = re.match(r"#!(\S+)$", first)
    if trampoline is not None:
        return trampoline.group(1)
    return shebang.group(1) if shebang is not None else sys.executable


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.5)


def rounds_written(path) -> int:
    try:
        return len(json.loads(path.read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.usefixtures("flower_environment")
def test_a_deployment_runs_two_rounds_and_records_a_supernode_killed_mid_run(deployment, tmp_path):
    out = tmp_path / "out"
    run = {**DEPLOYMENT_RUN, "flower.out_dir": str(out)}
    run_config = " ".join(
        f"{key}='{value}'" if isinstance(value, str) else f"{key}={value}"
        for key, value in run.items()
    )
    flwr_run = deployment["spawn"](
        "flwr-run",
        "flwr",
        "run",
        str(ROOT / "examples" / "flower-app"),
        "test",
        "--stream",
        "--run-config",
        run_config,
    )
    results = out / "results.json"
    started = time.monotonic()
    wait_until(
        lambda: rounds_written(results) >= 1 or flwr_run.poll() is not None,
        240,
        "round 1 in results.json",
    )
    assert flwr_run.poll() is None, (tmp_path / "flwr-run.log").read_text()[-3000:]
    round_one = time.monotonic() - started
    stop_group(deployment["nodes"][1])  # node 1 dies while round 2 goes out
    flwr_run.wait(450)  # at most one timeout per step of round 2
    done = time.monotonic() - started
    print(f"deployment: round 1 written after {round_one:.0f} s, the run done after {done:.0f} s")
    log = (tmp_path / "flwr-run.log").read_text()
    document = json.loads(results.read_text())
    assert document["status"] == "completed", f"{document['error']}\n{log[-3000:]}"
    assert [r["round"] for r in document["rounds"]] == [1, 2]
    first, second = document["rounds"]
    assert first["faults"] == []
    assert len(second["faults"]) >= 1, second
    assert {fault["round"] for fault in second["faults"]} == {2}
    assert len(second["trained_clients"]) == 1
    print("deployment: step seconds", [r["seconds"] for r in document["rounds"]])

    # Round 1's global statistics are the embedded simulation's.
    config, _ = config_from_run_config(
        {**flat_app_config(), **{k: v for k, v in run.items() if not k.startswith("flower.")}}
    )
    embedded = Simulation(config, dataset=DIGITS)
    embedded.run_round()
    for name, (mean, var) in embedded.global_statistics().items():
        np.testing.assert_allclose(first["statistics"][name]["mean"], mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(first["statistics"][name]["var"], var, rtol=1e-5, atol=1e-7)


def flat_app_config() -> dict:
    from flwr.common.config import flatten_dict, get_project_config

    project = get_project_config(ROOT / "examples" / "flower-app")
    return flatten_dict(project["tool"]["flwr"]["app"]["config"])


# -- defect 3: the documented install line and the flower extra ----------------------------------


def declared_extras() -> dict[str, list[str]]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]


def requirements_of(extras: list[str]) -> set[str]:
    """The requirement names ``hbn[extras]`` brings, following ``hbn[...]`` self-references."""
    declared, names, pending = declared_extras(), set(), list(extras)
    seen: set[str] = set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in declared, f"the extra {extra!r} is not declared"
        for requirement in declared[extra]:
            match = re.match(r"hbn\[([^\]]+)\]", requirement)
            if match:
                pending += [e.strip() for e in match.group(1).split(",")]
            else:
                names.add(re.split(r"[\[<>=;! ]", requirement, maxsplit=1)[0].lower())
    return names


def test_the_documented_install_lines_name_declared_extras_that_bring_what_flower_needs():
    docs = (ROOT / "docs" / "flower.md").read_text()
    lines = re.findall(r'pip install ((?:"torch==[^"]+" )?(?:-e )?"[^"]+")', docs)
    assert any('-e ".[' in line and "torch==2.13.0" in line for line in lines), lines
    for line in lines:
        extras = re.search(r"\[([^\]]+)\]", line).group(1).split(",")
        names = requirements_of(extras)
        assert {"flwr", "scikit-learn"} <= names, (line, names)
    app = (ROOT / "examples" / "flower-app" / "pyproject.toml").read_text()
    (dependency,) = re.findall(r'dependencies = \["hbn\[([^\]]+)\]"\]', app)
    assert {"flwr", "scikit-learn", "torch"} <= requirements_of(dependency.split(","))


def test_the_documented_install_line_installs_from_a_checkout():
    """docs/flower.md's install line, as written, resolved by pip (``--dry-run``) here."""
    (line,) = [
        line
        for line in doc_block("bash", "pip install").splitlines()
        if line.startswith("pip install")
    ]
    arguments = shlex.split(line)[2:]
    assert "-e" in arguments, line  # from the checkout, not PyPI (hbn is not published yet)
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert re.search(r"^Would install .*\bhbn-", completed.stdout, flags=re.MULTILINE), (
        completed.stdout[-3000:]
    )


@pytest.mark.parametrize("command", ["flower-superlink", "flower-supernode", "flwr run"])
def test_every_option_of_the_documented_deployment_commands_exists(command):
    """The deployment's commands need certificates and machines; their options are checked."""
    text = (ROOT / "docs" / "flower.md").read_text().replace("\\\n", " ")
    lines = [
        line
        for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
        for line in block.splitlines()
        if line.startswith(command)
    ]
    assert lines, f"docs/flower.md runs no {command}"
    executable, *subcommand = command.split()
    usage = subprocess.run(
        [str(BIN / executable), *subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"},
    ).stdout
    for line in lines:
        for option in re.findall(r"(?<!\S)(--[a-z][a-z-]*)", line):
            assert option in usage, f"{command} has no option {option} ({line})"


# -- defect 7: logs that count what HBN left out, and a flagged partial accuracy ---------------


def fail_step_of(partition: int, message_type: str):
    def mod(message, context, call_next):
        if (
            message.metadata.message_type == message_type
            and context.node_config["partition-id"] == partition
        ):
            msg = f"node {partition} fails its {message_type}"
            raise RuntimeError(msg)
        return call_next(message, context)

    return mod


def test_hbn_logs_its_own_count_and_flags_an_accuracy_with_nodes_missing(caplog, tmp_path):
    import logging

    from flwr.common.logger import console_handler

    config = small_config(rounds=2)
    mods = [fail_step_of(2, "train"), fail_step_of(3, "evaluate")]
    grid = LocalGrid(make_client_app(config, dataset=DIGITS, mods=mods), 4)
    strategy = HBNFedAvg(config=config, layout=_layout(config))
    with caplog.at_level(logging.INFO, logger="federation"):
        run_server_app(config, grid, run_id=5, out_dir=tmp_path, strategy=strategy)
    assert console_handler in logging.getLogger("federation").handlers
    logged = caplog.text
    assert "round 1: training: 3 of 4 sampled nodes counted, 1 left out; node 3:" in logged
    assert "fails its train" in logged
    assert "round 2: the accuracy is measured on 3 of 4 clients' test shares" in logged
    last = strategy.history[-1]
    assert last.evaluation_incomplete
    assert len(last.evaluated_clients) == 3
    document = read_results(tmp_path)
    assert document["rounds"][-1]["evaluation_incomplete"] is True


def test_an_accuracy_of_every_node_is_not_flagged():
    config = small_config(rounds=1)
    grid = LocalGrid(make_client_app(config, dataset=DIGITS), 4)
    strategy = HBNFedAvg(config=config, layout=_layout(config))
    start(strategy, config, grid)
    (flower_round,) = strategy.history
    assert not flower_round.evaluation_incomplete
    assert flower_round.evaluated_clients == (1, 2, 3, 4)


# -- defect 6: HBN in a Flower user's own app -----------------------------------------------------


def test_hbn_reads_only_its_own_prefix_and_leaves_the_apps_keys_alone():
    from federation.config import ConfigError

    run_config = {
        "num-server-rounds": 3,
        "my-app.lr": 0.1,
        "hbn.rounds": 2,
        "hbn.data.num_clients": 4,
        "hbn.clients.frameworks.jax": 1,
        "hbn.clients.frameworks.torch": 3,
        "hbn.flower.timeout": 5.0,
    }
    config, server = config_from_run_config(run_config)
    assert (config.rounds, config.data.num_clients, server.timeout) == (2, 4, 5.0)
    assert config.client_frameworks == ["torch", "torch", "torch", "jax"]
    with pytest.raises(ConfigError, match="num-server-rounds"):
        config_from_run_config({"num-server-rounds": 3, "rounds": 2})
    with pytest.raises(ConfigError, match="lr"):
        config_from_run_config({**run_config, "hbn.train.lr": -1.0})


def test_a_converted_torch_models_state_dict_starts_the_strategy_with_roles_deciding():
    import torch

    from backends.torch import HybridBatchNorm, convert_batchnorm
    from federation.models.torch_model import torch_layout

    model = convert_batchnorm(
        torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3),
            torch.nn.BatchNorm2d(4),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * 6 * 6, 10),
        )
    )
    assert isinstance(model[1], HybridBatchNorm)
    layout = torch_layout(model)
    assert select(layout, Role.STATISTICS) == ["1.global_mean", "1.global_var"]
    assert set(select(layout, Role.PERSONAL)) == {"1.alpha", "1.running_mean", "1.running_var"}
    assert set(select(layout, Role.SHARED)) == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
    }
    assert "1.num_batches_tracked" not in layout
    assert {name: spec.shape for name, spec in layout.items()} == {
        name: tuple(t.shape) for name, t in model.state_dict().items() if name in layout
    }

    config = small_config(rounds=1)
    HBNFedAvg(config=config, layout=layout)  # the layout is one the strategy accepts
    record = flwr.app.ArrayRecord(model.state_dict())  # the habitual start
    travelling = travelling_state(state_from_record(record), layout)
    assert set(travelling) == set(select(layout, Role.SHARED, Role.STATISTICS))
    state = {**state_from_record(record), "stray.weight": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match=r"does not know: \['stray.weight'\]"):
        travelling_state(state, layout)


def doc_block(language: str, marker: str) -> str:
    """The one ``language`` code block of docs/flower.md that holds ``marker``."""
    text = (ROOT / "docs" / "flower.md").read_text()
    blocks = re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    (block,) = [block for block in blocks if marker in block]
    return block


def test_the_documented_app_of_your_own_runs_and_pools_its_nodes_exactly():
    """docs/flower.md's own-app example, as written there, on three nodes in this process."""
    import torch

    namespace: dict = {"__name__": "my_app"}
    exec(compile(doc_block("python", "# my_app.py"), "docs/flower.md", "exec"), namespace)
    strategies, results = [], []

    class Recording(namespace["HBNFedAvg"]):
        def start(self, *args, **kwargs):
            strategies.append(self)
            results.append(super().start(*args, **kwargs))
            return results[-1]

    namespace["HBNFedAvg"] = Recording  # what main() builds its strategy with
    run_config = {
        "num-server-rounds": 3,  # the app's own keys, which HBN leaves alone
        "local-epochs": 1,
        "hbn.rounds": 2,
        "hbn.data.num_clients": 3,
        "hbn.clients.min_clients": 3,
        "hbn.statistics.momentum": 1.0,  # round 1's statistics are then the pool itself
        "hbn.flower.timeout": 60.0,
    }
    grid = LocalGrid(namespace["client_app"], 3)
    for node, context in grid.contexts.items():
        grid.contexts[node] = Context(
            run_id=1,
            node_id=node,
            node_config=context.node_config,
            state=RecordDict(),
            run_config=run_config,
        )
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    namespace["server_app"](grid, server)

    (strategy,), (result,) = strategies, results
    assert [r.round for r in strategy.history] == [1, 2]
    assert all(r.faults == () and r.accuracy is not None for r in strategy.history)
    # The oracle: float64 moments of the first layer's output over the union of the nodes' data.
    from sklearn.datasets import load_digits

    model = namespace["make_model"]()
    weight, bias = (t.detach().double().numpy() for t in (model[0].weight, model[0].bias))
    hidden = load_digits().data / 16 @ weight.T + bias
    mean, var = strategy.history[0].statistics["1"]
    np.testing.assert_allclose(mean, hidden.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, hidden.var(0), rtol=1e-5, atol=1e-6)
    # The roles decided what travelled; alpha trained on each node and stayed there.
    layout = namespace["torch_layout"](model)
    assert set(result.arrays) == set(select(layout, Role.SHARED, Role.STATISTICS))
    for context in grid.contexts.values():
        kept = context.state["alpha"].to_torch_state_dict()
        assert (
            set(kept)
            == set(select(layout, Role.PERSONAL))
            == {
                "1.alpha",
                "1.running_mean",
                "1.running_var",
            }
        )
        assert not torch.equal(kept["1.alpha"], model[1].alpha.detach())


def test_the_statistics_query_refuses_an_unknown_framework_or_mode():
    from flwr.clientapp import ClientApp

    from federation.flower import register_statistics_query

    with pytest.raises(ValueError, match=r"`framework` must be one of .*got 'mxnet'"):
        register_statistics_query(ClientApp(), framework="mxnet", model=id, batches=list)
    with pytest.raises(ValueError, match=r"`mode` must be 'hybrid' or 'global'; got 'batch'"):
        register_statistics_query(
            ClientApp(), framework="torch", model=id, batches=list, mode="batch"
        )


class UnavailableGrid(LocalGrid):
    """Gives messages ids as Flower's grid does; the SuperLink answers for node 2, now gone."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
        gone = [m for m in messages if m.metadata.dst_node_id == 2]
        replies = super().send_and_receive(
            [m for m in messages if m.metadata.dst_node_id != 2], timeout=timeout
        )
        for message in gone:
            reply = Message(flwr.app.Error(code=5, reason="Node Unavailable"), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own node id
            replies.append(reply)
        return replies


def test_an_error_the_superlink_sends_for_a_gone_node_is_that_nodes_fault(caplog):
    import logging

    config = small_config(rounds=1)
    grid = UnavailableGrid(make_client_app(config, dataset=DIGITS), 4)
    strategy = HBNFedAvg(config=config, layout=_layout(config))
    with caplog.at_level(logging.WARNING, logger="federation"):
        start(strategy, config, grid)
    (flower_round,) = strategy.history
    assert {(f.client, f.step) for f in flower_round.faults} == {
        (2, "statistics"),
        (2, "training"),
    }
    assert "which was not sampled" not in caplog.text
