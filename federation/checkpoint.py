"""Checkpoints that execute nothing when loaded: one ``.npz`` of arrays plus JSON metadata.

A checkpoint holds the global state, the personal average, the server's momentum, every
client's personal state, the round reached, the metrics so far and the resolved configuration.
It holds no RNG state because none is needed: every draw of a round comes from a generator
seeded by ``(seed, round, purpose, client)``. It is written to a temporary file in the same
folder and renamed over the previous one, so a kill at any moment leaves either the old or the
new checkpoint, whole. Loading uses ``numpy.load(allow_pickle=False)``: the metadata is a JSON
string, never a pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np

from federation.simulation import Fault, RoundRecord

if TYPE_CHECKING:
    from federation.simulation import Simulation

__all__ = ["FORMAT_VERSION", "load_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 2
_META = "__meta__"


def save_checkpoint(simulation: Simulation, path: str | os.PathLike[str]) -> None:
    """Write ``simulation``'s state to ``path`` atomically."""
    path = pathlib.Path(path)
    arrays = {f"global/{k}": v for k, v in simulation.global_state.items()}
    arrays |= {f"personal_average/{k}": v for k, v in simulation.personal_average.items()}
    arrays |= {f"server_velocity/{k}": v for k, v in simulation.server_velocity.items()}
    for client in simulation.clients:
        if client.personal is not None:
            arrays |= {f"personal/{client.client_id}/{k}": v for k, v in client.personal.items()}
    meta = {
        "format": FORMAT_VERSION,
        "rounds_done": simulation.rounds_done,
        "config": simulation.config.to_dict(),
        "history": [dataclasses.asdict(record) for record in simulation.history],
    }
    arrays[_META] = np.asarray(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as file:
        np.savez(file, allow_pickle=False, **arrays)
        file.flush()
        os.fsync(file.fileno())
    os.replace(file.name, path)


def load_checkpoint(simulation: Simulation, path: str | os.PathLike[str]) -> None:
    """Restore ``simulation`` (built from the same configuration) from the checkpoint at ``path``.

    Raises
    ------
    ValueError
        If the checkpoint's format is unknown, or its configuration differs from the
        simulation's in anything but ``rounds`` (a run may be extended, not changed).
    """
    with np.load(path, allow_pickle=False) as stored:
        meta = json.loads(str(stored[_META]))
        arrays = {key: stored[key] for key in stored.files if key != _META}
    if meta.get("format") != FORMAT_VERSION:
        msg = f"{path} has checkpoint format {meta.get('format')!r}; expected {FORMAT_VERSION}."
        raise ValueError(msg)
    _check_same_run(meta["config"], simulation.config.to_dict(), path)
    simulation.global_state = _section(arrays, "global/")
    simulation.personal_average = _section(arrays, "personal_average/")
    simulation.server_velocity = _section(arrays, "server_velocity/")
    for client in simulation.clients:
        personal = _section(arrays, f"personal/{client.client_id}/")
        client.personal = personal or None
    simulation.rounds_done = meta["rounds_done"]
    simulation.history = [_record(r) for r in meta["history"]]


def _section(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}


def _check_same_run(stored: dict[str, Any], current: dict[str, Any], path: Any) -> None:
    differences = sorted(
        key
        for key in stored.keys() | current.keys()
        if key != "rounds" and stored.get(key) != current.get(key)
    )
    if differences:
        msg = (
            f"{path} was written by a run with a different configuration (sections "
            f"{differences} differ); only `rounds` may change on --resume."
        )
        raise ValueError(msg)


def _record(fields: dict[str, Any]) -> RoundRecord:
    faults = [Fault(**f) for f in fields.pop("faults")]
    return RoundRecord(**fields, faults=faults)
