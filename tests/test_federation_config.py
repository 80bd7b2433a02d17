"""The configuration declared once: every option's range, the rules, and the documented table."""

from __future__ import annotations

import dataclasses
import pathlib
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.cli import main
from federation.config import (
    METHODS,
    Config,
    ConfigError,
    StatisticsConfig,
    configuration_table,
    parse_config,
)
from federation.models import CollectionMode
from federation.repro.plan import GRID_METHODS

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "federation.md"


def options() -> list[tuple[str, dataclasses.Field[typing.Any], typing.Any]]:
    """Every option: its dotted key, its field and its type."""
    found = []
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        if field.metadata.get("section"):
            section = hints[field.name]
            section_hints = typing.get_type_hints(section)
            found += [
                (f"{field.name}.{f.name}", f, section_hints[f.name])
                for f in dataclasses.fields(section)
            ]
        else:
            found.append((field.name, field, hints[field.name]))
    return found


def test_the_documented_table_is_the_declared_one():
    text = DOCS.read_text()
    assert configuration_table() in text, "regenerate it: federation.config.configuration_table()"


def test_every_option_is_documented_and_every_number_has_a_finite_range():
    for key, field, hint in options():
        assert field.metadata["doc"], key
        if hint in (int, float) or typing.get_origin(hint) is dict:
            bounds = field.metadata["bounds"]
            assert bounds is not None, key
            assert bounds.high < float("inf"), key


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.lr=inf", "`train.lr` must be a finite number; got inf"),
        ("train.lr=1e400", "`train.lr` must be a finite number; got inf"),
        ("train.lr=nan", "`train.lr` must be a finite number; got nan"),
        ("train.lr=5000.0", "`train.lr` must be <= 1000; got 5000.0"),
        ("train.weight_decay=inf", "`train.weight_decay` must be a finite number"),
        ("data.beta=1e400", "`data.beta` must be a finite number"),
        ("seed=-1", r"`seed` must be in \[0, 4294967295\]; got -1"),
        ("rounds=true", "`rounds` must be a int; got True"),
        ("clients.frameworks={torch=true}", "`clients.frameworks.torch` must be a int; got True"),
        ("clients.frameworks={torch=-1}", "`clients.frameworks.torch` must be >= 0; got -1"),
        ("train.drop_last=1", "`train.drop_last` must be a bool; got 1"),
        ("eval.framework=tensorflow", r"`eval.framework` must be one of \['', 'torch'"),
        ("data.num_clients=10000000", "`data.num_clients` must be <= 1000000"),
    ],
)
def test_values_out_of_their_declared_range_are_refused_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        parse_config({}, [override])


@pytest.mark.parametrize("method", ["fbn"])
def test_hybrid_recorded_statistics_without_a_learned_alpha_are_refused_at_parse_time(method):
    with pytest.raises(
        ConfigError, match=r"`statistics.recorded` must be 'batch' with method 'fbn'"
    ):
        parse_config({"method": method, "statistics": {"recorded": "hybrid"}})
    for learned in ("hbn", "hbn-authors"):
        assert parse_config({"method": learned}, ["statistics.recorded=hybrid"])


def test_method_names_and_collection_modes_are_defined_once():
    (method,) = [f for f in dataclasses.fields(Config) if f.name == "method"]
    assert list(method.metadata["allowed"]) == list(METHODS)
    assert tuple(m for m in METHODS if m != "none") == GRID_METHODS
    assert typing.get_type_hints(StatisticsConfig)["mode"] == CollectionMode


@given(
    lr=st.floats(1e-6, 1000, allow_nan=False),
    rounds=st.integers(1, 1000),
    frameworks=st.permutations(["torch", "jax", "keras"]),
)
def test_a_resolved_configuration_parses_back_to_itself(lr, rounds, frameworks):
    table = {
        "rounds": rounds,
        "train": {"lr": lr},
        "clients": {"frameworks": dict.fromkeys(frameworks, 0) | {frameworks[0]: 10}},
    }
    config = parse_config(table)
    again = parse_config(config.to_dict())
    assert again == config
    assert list(again.clients.frameworks) == list(config.clients.frameworks)


def test_the_command_refuses_an_infinite_learning_rate_in_one_line(tmp_path, capsys):
    path = tmp_path / "inf.toml"
    path.write_text("rounds = 1\n[train]\nlr = inf\n")
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().out
    assert "`train.lr` must be a finite number; got inf" in out
    assert "Traceback" not in out
    assert not (tmp_path / "out").exists()
