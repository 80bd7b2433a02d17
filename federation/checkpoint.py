"""Checkpoints of the federation's state: one ``.npz`` of arrays plus JSON, checked on load.

A checkpoint holds exactly a :class:`~federation.protocol.FederationState` (the global state,
the personal average, the server's velocity, every client's personal state, the rounds done and
their records) and the resolved configuration that produced it. It holds no RNG state because
none is needed: every draw of a round comes from a generator seeded by ``(seed, round, purpose,
client)``.

It is written to a temporary file in the same folder (``checkpoint.npz.<random>.tmp``) and
renamed over the previous one, so a kill at any moment leaves either the old or the new
checkpoint, whole; the temporary files of killed writers are removed by the next save
(:func:`remove_stale_files`). Loading uses ``numpy.load(allow_pickle=False)``: the metadata is
a JSON string, never a pickle. Every field is checked against the run before it is used, and
anything amiss raises one :class:`CheckpointError` that says what.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
import zipfile
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from federation.layout import Role, check_state, select
from federation.protocol import Fault, FederationState, RoundRecord

if TYPE_CHECKING:
    from collections.abc import Mapping

    from federation.config import Config
    from federation.layout import Layout, State

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "load_checkpoint",
    "remove_stale_files",
    "save_checkpoint",
]

FORMAT_VERSION = 2
_META = "__meta__"
_SECTIONS = ("global/", "personal_average/", "server_velocity/", "personal/")


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or is not a checkpoint of this run."""


def save_checkpoint(state: FederationState, config: Config, path: str | os.PathLike[str]) -> None:
    """Write ``state`` (of a run of ``config``) to ``path`` atomically."""
    path = pathlib.Path(path)
    arrays = {f"global/{k}": v for k, v in state.global_state.items()}
    arrays |= {f"personal_average/{k}": v for k, v in state.personal_average.items()}
    arrays |= {f"server_velocity/{k}": v for k, v in state.server_velocity.items()}
    for client, personal in enumerate(state.personal):
        if personal is not None:
            arrays |= {f"personal/{client}/{k}": v for k, v in personal.items()}
    meta = {
        "format": FORMAT_VERSION,
        "rounds_done": state.rounds_done,
        "config": config.to_dict(),
        "history": [dataclasses.asdict(record) for record in state.history],
    }
    arrays[_META] = np.asarray(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_files(path)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f"{path.name}.", suffix=".tmp", delete=False
    ) as file:
        np.savez(file, allow_pickle=False, **arrays)
        file.flush()
        os.fsync(file.fileno())
    os.replace(file.name, path)


def remove_stale_files(path: str | os.PathLike[str]) -> None:
    """Remove the temporary files that killed writers of the checkpoint ``path`` left.

    They are ``<name>.<random>.tmp`` beside it, and ``tmp<random>.tmp`` zip files from
    versions that named them so.
    """
    path = pathlib.Path(path)
    for stale in path.parent.glob(f"{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    for legacy in path.parent.glob("tmp*.tmp"):
        if zipfile.is_zipfile(legacy):
            legacy.unlink(missing_ok=True)


def load_checkpoint(
    path: str | os.PathLike[str], *, config: Config, initial: FederationState, layout: Layout
) -> FederationState:
    """The state the checkpoint at ``path`` holds, checked against this run.

    Parameters
    ----------
    path
        The checkpoint.
    config
        This run's configuration; the checkpoint's may differ only in ``rounds``.
    initial
        This run's initial state: its tensors' dtypes and its number of clients.
    layout
        The model's canonical layout: every tensor's name and shape.

    Raises
    ------
    CheckpointError
        If the file cannot be read without pickle, its format is unknown, its configuration
        differs from ``config`` in anything but ``rounds`` (the order of
        ``clients.frameworks`` included), its rounds and history disagree, or a tensor is
        missing, unknown, of the wrong shape or dtype, or not finite.
    """
    meta, arrays = _read(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else meta
        msg = f"{path} has checkpoint format {found!r}; expected {FORMAT_VERSION}."
        raise CheckpointError(msg)
    if not isinstance(meta.get("config"), dict):
        _refuse(path, "it holds no configuration.")
    _check_same_run(meta["config"], config.to_dict(), path)
    rounds_done = meta.get("rounds_done")
    written_rounds = meta["config"].get("rounds")
    if (
        isinstance(rounds_done, bool)
        or not isinstance(rounds_done, int)
        or not isinstance(written_rounds, int)
        or not 0 <= rounds_done <= written_rounds
    ):
        _refuse(
            path,
            f"`rounds_done` must be an integer in [0, {written_rounds}] (the rounds of the run "
            f"that wrote it); got {rounds_done!r}.",
        )
    history = meta.get("history")
    if not isinstance(history, list) or len(history) != rounds_done:
        count = len(history) if isinstance(history, list) else history
        _refuse(path, f"`rounds_done` = {rounds_done} but the history holds {count!r} rounds.")
    try:
        records = tuple(_record(fields, number) for number, fields in enumerate(history, 1))
        return _state(arrays, initial, layout, rounds_done, records)
    except (ValueError, TypeError, KeyError) as error:
        _refuse(path, str(error), error)


def _refuse(path: object, detail: str, cause: Exception | None = None) -> NoReturn:
    msg = f"{path} is not a usable checkpoint of this run: {detail}"
    raise CheckpointError(msg) from cause


def _read(path: str | os.PathLike[str]) -> tuple[Any, dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(str(stored[_META]))
            arrays = {key: stored[key] for key in stored.files if key != _META}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        msg = f"{path} cannot be read as a checkpoint: {type(error).__name__}: {error}"
        raise CheckpointError(msg) from error
    return meta, arrays


def _ordered(value: Any) -> Any:
    """``value`` with every table as a list of pairs, so that key order counts."""
    if isinstance(value, dict):
        return [(key, _ordered(item)) for key, item in value.items()]
    return value


def _check_same_run(stored: dict[str, Any], current: dict[str, Any], path: Any) -> None:
    differences = [
        (key, then, now) for key, then, now in _differences(stored, current) if key != "rounds"
    ]
    if differences:
        sections = sorted({key.split(".")[0] for key, _, _ in differences})
        details = "; ".join(
            f"{key} is {then!r} in the checkpoint, {now!r} now" for key, then, now in differences
        )
        msg = (
            f"{path} was written by a run with a different configuration (sections "
            f"{sections} differ: {details}; tables such as clients.frameworks are compared in "
            "order). Only `rounds` may change on --resume."
        )
        raise CheckpointError(msg)


def _differences(
    stored: dict[str, Any], current: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """The keys whose values differ (each section key by key, tables in order)."""
    found = []
    for key in sorted(stored.keys() | current.keys()):
        then, now = stored.get(key), current.get(key)
        if not prefix and isinstance(then, dict) and isinstance(now, dict):
            found += _differences(then, now, f"{key}.")
        elif _ordered(then) != _ordered(now):
            found.append((f"{prefix}{key}", then, now))
    return found


def _state(
    arrays: Mapping[str, np.ndarray],
    initial: FederationState,
    layout: Layout,
    rounds_done: int,
    history: tuple[RoundRecord, ...],
) -> FederationState:
    unknown = sorted(k for k in arrays if not k.startswith(_SECTIONS))
    if unknown:
        msg = f"unknown arrays {unknown}."
        raise ValueError(msg)
    global_state = _section(arrays, "global/", initial.global_state, layout)
    personal_average = _section(arrays, "personal_average/", initial.personal_average, layout)
    velocity: State = {}
    if any(k.startswith("server_velocity/") for k in arrays):
        like = {name: np.zeros((), np.float64) for name in select(layout, Role.SHARED)}
        velocity = _section(arrays, "server_velocity/", like, layout)
    personal: list[State | None] = [None] * len(initial.personal)
    owners = {k.split("/")[1] for k in arrays if k.startswith("personal/")}
    for owner in sorted(owners):
        if not owner.isdigit() or int(owner) >= len(personal):
            msg = f"`personal/{owner}` is not one of the {len(personal)} clients."
            raise ValueError(msg)
        personal[int(owner)] = _section(
            arrays, f"personal/{owner}/", initial.personal_average, layout
        )
    return FederationState(
        global_state, personal_average, velocity, tuple(personal), rounds_done, history
    )


def _section(arrays: Mapping[str, np.ndarray], prefix: str, like: State, layout: Layout) -> State:
    """The arrays under ``prefix``: exactly ``like``'s names, shapes from ``layout``, its dtypes."""
    section = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
    try:
        check_state(section, layout, names=list(like))
    except (ValueError, TypeError) as error:
        msg = f"`{prefix.rstrip('/')}`: {error}"
        raise ValueError(msg) from error
    for name, value in section.items():
        if value.dtype != like[name].dtype:
            msg = f"`{prefix}{name}` must be {like[name].dtype}; got {value.dtype}."
            raise ValueError(msg)
    return {name: section[name] for name in like}


_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "round": (int,),
    "lr": (float, int),
    "train_loss": (float, int),
    "accuracy": (float, int, type(None)),
    "loss": (float, int, type(None)),
    "personal_accuracy": (float, int, type(None)),
    "evaluation_error": (str, type(None)),
}
_CLIENT_LISTS = ("sampled", "statistics_clients", "trained_clients", "evaluated_clients")
# Fields that only the Flower engine fills: a checkpoint may leave them out, or hold them empty.
_FLOWER_ONLY = {"statistics": {}, "evaluated_clients": [], "evaluation_incomplete": False}


def _record(fields: Any, number: int) -> RoundRecord:
    """The round record ``fields`` describe, which must be round ``number``."""
    where = f"history round {number}"
    names = {f.name for f in dataclasses.fields(RoundRecord)}
    optional = {
        "accuracy",
        "loss",
        "personal_accuracy",
        "evaluation_error",
        "seconds",
        "faults",
        *_FLOWER_ONLY,
    }
    if not isinstance(fields, dict) or not names - optional <= set(fields) <= names:
        msg = f"{where} must be a record with the fields {sorted(names)}; got {fields!r}."
        raise ValueError(msg)
    for name, kinds in _RECORD_TYPES.items():
        value = fields.get(name)
        if isinstance(value, bool) or (name in fields and not isinstance(value, kinds)):
            msg = f"{where}: `{name}` has the wrong type ({type(value).__name__})."
            raise TypeError(msg)
    if fields["round"] != number:
        msg = f"{where} is numbered {fields['round']!r}; rounds are recorded in order from 1."
        raise ValueError(msg)
    for name, empty in _FLOWER_ONLY.items():
        if fields.get(name, empty) != empty:
            msg = f"{where}: `{name}` is the Flower engine's and must be {empty!r} here."
            raise ValueError(msg)
    fields = {**fields, **_FLOWER_ONLY}
    for name in _CLIENT_LISTS:
        value = fields[name]
        if not isinstance(value, list) or not all(_is_int(c) for c in value):
            msg = f"{where}: `{name}` must be a list of client ids; got {value!r}."
            raise TypeError(msg)
    seconds = fields.get("seconds", {})
    if not isinstance(seconds, dict) or not all(
        isinstance(v, float | int) and not isinstance(v, bool) for v in seconds.values()
    ):
        msg = f"{where}: `seconds` must map parts to seconds; got {seconds!r}."
        raise TypeError(msg)
    faults = fields.get("faults", [])
    if not isinstance(faults, list):
        msg = f"{where}: `faults` must be a list; got {faults!r}."
        raise TypeError(msg)
    return RoundRecord(
        **{
            **fields,
            **{name: tuple(fields[name]) for name in _CLIENT_LISTS},
            "statistics": {},
            "seconds": dict(seconds),
            "faults": tuple(_fault(fault, where) for fault in faults),
        }
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fault(fields: Any, where: str) -> Fault:
    names = [f.name for f in dataclasses.fields(Fault)]
    valid = (
        isinstance(fields, dict)
        and set(fields) == set(names)
        and _is_int(fields["round"])
        and _is_int(fields["client"])
        and isinstance(fields["step"], str)
        and isinstance(fields["reason"], str)
    )
    if not valid:
        msg = f"{where}: a fault must hold round, client, step and reason; got {fields!r}."
        raise TypeError(msg)
    return Fault(**fields)
