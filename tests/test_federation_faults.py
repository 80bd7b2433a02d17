"""Rounds that commit all or nothing, and checkpoints that cannot lie, under injected faults.

Each test injects one fault found by fault injection (issue 16) and checks that the global
state, the records and the checkpoint stay whole: a model that writes into what it was lent,
an evaluation that fails after training, clients that vanish during the synchronous
evaluation pass, a checkpoint of another run or a tampered one, and files killed writers left.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import zipfile

import numpy as np
import pytest

from federation.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from federation.cli import main
from federation.client import Client
from federation.config import parse_config
from federation.repro import PROFILES, run_profile
from federation.runner import run
from federation.simulation import RoundFailedError, Simulation
from tests.test_federation_simulation import DATA, small_config

pytest.importorskip("torch")

pytestmark = pytest.mark.torch


def assert_states_equal(actual, expected) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


# -- 1. models get copies ------------------------------------------------------------------------


class Vandal:
    """A model that writes NaN into every array ``set_state`` lent it, then fails its step."""

    def __init__(self, model) -> None:
        self.model = model
        self.layout = model.layout

    def set_state(self, state) -> None:
        self.model.set_state(state)
        for value in state.values():
            value[...] = np.nan

    def collect_statistics(self, *_args, **_kwargs):
        msg = "the vandal's statistics step fails"
        raise RuntimeError(msg)

    def train(self, *_args, **_kwargs):
        msg = "the vandal's training step fails"
        raise RuntimeError(msg)


def vandalise(simulation: Simulation, client_id: int, method: str) -> None:
    """Client ``client_id`` runs ``method`` on a :class:`Vandal` around its model."""
    client = simulation.clients[client_id]
    step = getattr(Client, method)
    setattr(client, method, lambda model, *a, **k: step(client, Vandal(model), *a, **k))


def raise_in(simulation: Simulation, client_id: int, method: str) -> None:
    def fail(*_args, **_kwargs):
        msg = "the client fails"
        raise RuntimeError(msg)

    setattr(simulation.clients[client_id], method, fail)


@pytest.mark.parametrize("method", ["collect_statistics", "fit"])
def test_a_model_that_writes_into_its_state_then_fails_leaves_a_failed_round_unchanged(method):
    simulation = Simulation(small_config(clients={"min_clients": 4}), dataset=DATA)
    simulation.run_round()
    before = simulation.state
    expected = copy.deepcopy(before)
    vandalise(simulation, 1, method)
    with pytest.raises(RoundFailedError, match="only 3 valid clients"):
        simulation.run_round()
    assert simulation.state is before
    assert_states_equal(simulation.global_state, expected.global_state)
    assert_states_equal(simulation.personal_average, expected.personal_average)
    for now, then in zip(simulation.state.personal, expected.personal, strict=True):
        assert_states_equal(now, then)


@pytest.mark.parametrize("method", ["collect_statistics", "fit"])
def test_a_model_that_writes_into_its_state_then_fails_is_only_left_out(method):
    """The round commits as if the client had simply failed: bit for bit."""
    vandalised = Simulation(small_config(), dataset=DATA)
    vandalise(vandalised, 2, method)
    failed = Simulation(small_config(), dataset=DATA)
    raise_in(failed, 2, method)
    for simulation in (vandalised, failed):
        simulation.run_round()
    assert_states_equal(vandalised.global_state, failed.global_state)
    assert all(np.isfinite(v).all() for v in vandalised.global_state.values())


# -- 2. an evaluation that fails after training --------------------------------------------------


def test_an_evaluation_that_fails_is_recorded_and_the_round_committed_and_checkpointed(
    tmp_path, monkeypatch, caplog
):
    config = small_config(rounds=3)
    clean = run(config, dataset=DATA)
    evaluate = Simulation.evaluate

    def fail_in_round_two(self, state, round_index, *args):
        if round_index == 1:
            msg = "the test set went missing"
            raise OSError(msg)
        return evaluate(self, state, round_index, *args)

    monkeypatch.setattr(Simulation, "evaluate", fail_in_round_two)
    with caplog.at_level(logging.WARNING, logger="federation"):
        result = run(config, out_dir=tmp_path, dataset=DATA)
    assert [r.round for r in result.history] == [1, 2, 3]
    failed = result.history[1]
    assert failed.accuracy is None
    assert failed.evaluation_error == "OSError: the test set went missing"
    assert "evaluation failed" in caplog.text
    assert [r.accuracy for r in result.history[::2]] == [r.accuracy for r in clean.history[::2]]
    assert_states_equal(result.simulation.global_state, clean.simulation.global_state)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert [r["round"] for r in stored["rounds"]] == [1, 2, 3]
    assert stored["rounds"][1]["evaluation_error"] == failed.evaluation_error
    monkeypatch.undo()
    resumed = run(config, out_dir=tmp_path, resume=True, dataset=DATA)
    assert resumed.history == result.history


def test_personal_evaluation_with_one_example_per_client_runs_from_the_command(tmp_path, capsys):
    path = tmp_path / "fedbn.toml"
    path.write_text(
        'rounds = 1\nmethod = "fedbn"\n[data]\nnum_clients = 4\n[model]\narchitecture = "mlp"\n'
        "hidden = 16\n[eval]\npersonal_examples = 1\n"
    )
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Traceback" not in out
    (record,) = json.loads((tmp_path / "out" / "results.json").read_text())["rounds"]
    assert record["evaluation_error"] is None
    assert 0 <= record["personal_accuracy"] <= 1


# -- 3. the synchronous evaluation pass ----------------------------------------------------------


def offline_while_evaluating(monkeypatch, clients: set[int]) -> None:
    """``clients`` fail the statistics pass of evaluation, and only that pass."""
    collect, evaluate = Client.collect_statistics, Simulation.evaluate
    evaluating = []

    def collect_unless_offline(self, *args, **kwargs):
        if evaluating and self.client_id in clients:
            msg = "client offline"
            raise ConnectionError(msg)
        return collect(self, *args, **kwargs)

    def flagged_evaluate(self, *args):
        evaluating.append(True)
        try:
            return evaluate(self, *args)
        finally:
            evaluating.clear()

    monkeypatch.setattr(Client, "collect_statistics", collect_unless_offline)
    monkeypatch.setattr(Simulation, "evaluate", flagged_evaluate)


def test_faults_of_the_sync_evaluation_pass_are_recorded(monkeypatch):
    simulation = Simulation(small_config(eval={"statistics": "sync"}), dataset=DATA)
    offline_while_evaluating(monkeypatch, {1})
    record = simulation.run_round()
    assert [(f.round, f.client, f.step) for f in record.faults] == [(1, 1, "evaluation statistics")]
    assert record.faults[0].reason == "ConnectionError: client offline"
    assert record.accuracy is not None
    assert record.evaluation_error is None
    assert simulation.summary().faults == 1


@pytest.mark.parametrize("offline", [{0, 1}, {0, 1, 2, 3}], ids=["too-few", "none"])
def test_a_sync_evaluation_pass_with_too_few_clients_fails_the_evaluation_not_the_round(
    monkeypatch, offline
):
    """min_clients holds in the evaluation pass too; the EMA statistics never stand in."""
    config = small_config(eval={"statistics": "sync"}, clients={"min_clients": 3})
    simulation = Simulation(config, dataset=DATA)
    offline_while_evaluating(monkeypatch, offline)
    record = simulation.run_round()
    assert simulation.rounds_done == 1
    assert record.trained_clients == (0, 1, 2, 3)
    assert record.accuracy is None
    assert record.loss is None
    assert record.evaluation_error.startswith("RoundFailedError: round 1: only ")
    assert "valid clients in the evaluation statistics step" in record.evaluation_error
    assert {f.client for f in record.faults} == offline


# -- 4. and 5. checkpoints that are of this run and whole ----------------------------------------


def reload(simulation: Simulation, path, config=None):
    return load_checkpoint(
        path,
        config=config or simulation.config,
        initial=Simulation(simulation.config, dataset=DATA).state,
        layout=simulation.layout,
    )


def test_a_checkpoint_round_trips_exactly(tmp_path):
    simulation = Simulation(small_config(rounds=3, server={"momentum": 0.5}), dataset=DATA)
    simulation.run_round()
    simulation.run_round()
    save_checkpoint(simulation.state, simulation.config, tmp_path / "checkpoint.npz")
    loaded = reload(simulation, tmp_path / "checkpoint.npz")
    assert loaded.rounds_done == 2
    assert loaded.history == simulation.history
    assert_states_equal(loaded.global_state, simulation.global_state)
    assert_states_equal(loaded.server_velocity, simulation.state.server_velocity)
    for a, b in zip(loaded.personal, simulation.state.personal, strict=True):
        assert_states_equal(a, b)


def test_resume_compares_the_order_of_the_frameworks(tmp_path):
    simulation = Simulation(small_config(), dataset=DATA)
    written = parse_config(small_config().to_dict(), ["clients.frameworks={torch=2, jax=2}"])
    save_checkpoint(simulation.state, written, tmp_path / "checkpoint.npz")
    reordered = parse_config(written.to_dict(), ["clients.frameworks={jax=2, torch=2}"])
    assert reordered.clients.frameworks == written.clients.frameworks  # equal as dicts
    with pytest.raises(CheckpointError, match=r"sections \['clients'\] differ: clients.frameworks"):
        reload(simulation, tmp_path / "checkpoint.npz", reordered)
    assert reload(simulation, tmp_path / "checkpoint.npz", written).rounds_done == 0


def tamper(path, change_meta=None, change_arrays=None) -> None:
    """Rewrite the checkpoint at ``path`` with its metadata or arrays changed."""
    with np.load(path, allow_pickle=False) as stored:
        meta = json.loads(str(stored["__meta__"]))
        arrays = {k: stored[k] for k in stored.files if k != "__meta__"}
    if change_meta is not None:
        change_meta(meta)
    if change_arrays is not None:
        change_arrays(arrays)
    np.savez(path, __meta__=np.asarray(json.dumps(meta)), **arrays)


def set_key(key, value):
    return lambda meta: meta.__setitem__(key, value)


def nan_in(name):
    def change(arrays):
        arrays[name] = arrays[name] * np.nan

    return change


TAMPERINGS = {
    "rounds_done 99": (
        set_key("rounds_done", 99),
        None,
        r"`rounds_done` must be an integer in \[0, 2\] .*; got 99",
    ),
    "rounds_done ahead of history": (
        lambda m: m.__setitem__("history", m["history"][:1]),
        None,
        "`rounds_done` = 2 but the history holds 1 rounds",
    ),
    "negative rounds_done": (set_key("rounds_done", -1), None, "got -1"),
    "string rounds_done": (set_key("rounds_done", "2"), None, "got '2'"),
    "format": (set_key("format", 1), None, "has checkpoint format 1; expected 2"),
    "history order": (
        lambda m: m["history"].reverse(),
        None,
        "history round 1 is numbered 2",
    ),
    "history type": (
        lambda m: m["history"][0].__setitem__("accuracy", "high"),
        None,
        "history round 1: `accuracy` has the wrong type",
    ),
    "flower statistics": (
        lambda m: m["history"][0].__setitem__("statistics", {"norm1": [[0.0], [1.0]]}),
        None,
        "history round 1: `statistics` is the Flower engine's and must be {} here",
    ),
    "flower evaluated clients": (
        lambda m: m["history"][1].__setitem__("evaluated_clients", [1, 2]),
        None,
        "history round 2: `evaluated_clients` is the Flower engine's",
    ),
    "nan tensor": (None, nan_in("global/fc2.bias"), "`fc2.bias` holds non-finite values"),
    "wrong shape": (
        None,
        lambda a: a.__setitem__("global/fc2.weight", a["global/fc2.weight"].T),
        "`fc2.weight` must have shape",
    ),
    "missing tensor": (
        None,
        lambda a: a.pop("global/norm1.global_var"),
        r"missing \['norm1.global_var'\]",
    ),
    "unknown array": (
        None,
        lambda a: a.__setitem__("extra", np.zeros(1)),
        r"unknown arrays \['extra'\]",
    ),
    "wrong dtype": (
        None,
        lambda a: a.__setitem__("global/fc1.bias", a["global/fc1.bias"].astype(np.float64)),
        "`global/fc1.bias` must be float32; got float64",
    ),
    "client out of range": (
        None,
        lambda a: a.update({k.replace("personal/0/", "personal/9/"): v for k, v in a.items()}),
        "`personal/9` is not one of the 4 clients",
    ),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The checkpoint of a finished two-round run of ``small_config()``."""
    out = tmp_path_factory.mktemp("written")
    run(small_config(), out_dir=out, dataset=DATA)
    return (out / "checkpoint.npz").read_bytes()


@pytest.mark.parametrize("case", TAMPERINGS)
def test_a_tampered_checkpoint_is_refused_with_one_clear_error(tmp_path, written, case):
    change_meta, change_arrays, match = TAMPERINGS[case]
    (tmp_path / "checkpoint.npz").write_bytes(written)
    run(small_config(), out_dir=tmp_path, resume=True, dataset=DATA)  # whole, it loads
    tamper(tmp_path / "checkpoint.npz", change_meta, change_arrays)
    with pytest.raises(CheckpointError, match=match):
        run(small_config(), out_dir=tmp_path, resume=True, dataset=DATA)


def test_a_checkpoint_without_the_flower_only_fields_of_its_records_loads(tmp_path, written):
    """Records written before the engines shared one record type lack its Flower-only fields."""
    (tmp_path / "checkpoint.npz").write_bytes(written)
    whole = run(small_config(), out_dir=tmp_path, resume=True, dataset=DATA)

    def drop_flower_fields(meta):
        for record in meta["history"]:
            for name in ("statistics", "evaluated_clients", "evaluation_incomplete"):
                del record[name]

    tamper(tmp_path / "checkpoint.npz", drop_flower_fields)
    assert run(small_config(), out_dir=tmp_path, resume=True, dataset=DATA).history == whole.history


def test_the_command_refuses_a_checkpoint_that_is_not_one_in_one_line(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 1\n[data]\nnum_clients = 4\n[model]\narchitecture = "mlp"\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.npz").write_bytes(b"not a zip file")
    assert main(["run", str(path), "--out", str(out), "--resume"]) == 2
    printed = capsys.readouterr().out
    assert "cannot resume:" in printed
    assert "cannot be read as a checkpoint" in printed
    assert "Traceback" not in printed


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="federation"):
        result = run(small_config(rounds=1), out_dir=tmp_path, resume=True, dataset=DATA)
    assert "no checkpoint at" in caplog.text
    assert "starting from round 1" in caplog.text
    assert result.simulation.rounds_done == 1


# -- 7. the files killed writers leave -----------------------------------------------------------


def test_stale_temporary_files_are_removed(tmp_path):
    stale = tmp_path / "checkpoint.npz.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    legacy = tmp_path / "tmpab12cd.tmp"
    with zipfile.ZipFile(legacy, "w") as archive:
        archive.writestr("global/x.npy", b"half")
    unrelated = tmp_path / "notes.tmp"
    unrelated.write_text("mine")
    run(small_config(rounds=1), out_dir=tmp_path, dataset=DATA)
    assert not stale.exists()
    assert not legacy.exists()
    assert unrelated.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "accuracy.png",
        "checkpoint.npz",
        "notes.tmp",
        "results.json",
    ]


def test_stale_temporary_result_files_of_the_benchmark_are_removed_by_a_run_not_a_report(
    tmp_path,
):
    runs = tmp_path / "runs"
    runs.mkdir()
    stale = runs / "grid-hbn-dirichlet0.6-b16-lr0.05-seed0.json.k1ll3d.tmp"
    stale.write_text("{")
    # A report (workers = 0) may read the store while another process writes it: it keeps
    # what may be that writer's file.
    report = run_profile(PROFILES["quick"], tmp_path, workers=0)
    assert stale.read_text() == "{"
    assert report.grid == []
    # A run removes it first (a profile with nothing to run: fixed lrs, no phases).
    nothing_to_run = dataclasses.replace(
        PROFILES["quick"], phases=(), lrs={("hbn", 4): 0.01, ("bn", 4): 0.01}
    )
    run_profile(nothing_to_run, tmp_path, workers=1)
    assert not stale.exists()
