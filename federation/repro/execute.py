"""Running the benchmark: each run's typed result, stored as JSON as soon as it ends."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib
import json
import multiprocessing
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from federation.data import load_dataset
from federation.repro.plan import (
    TUNING_SCORE_ROUNDS,
    Run,
    plan,
    plan_ablation,
    plan_candidates,
    plan_study,
)
from federation.repro.statistics import LAST_ROUNDS, Summary

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Callable, Mapping, Sequence

    from federation.config import Config
    from federation.data import Dataset
    from federation.protocol import RoundRecord
    from federation.repro.plan import Profile

__all__ = [
    "Results",
    "RunResult",
    "StaleRunError",
    "execute",
    "export_runs",
    "import_runs",
    "run_profile",
    "tuned_lrs",
]

Curve = tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One run's stored result.

    Attributes
    ----------
    run
        What ran.
    summary
        Its final figures.
    curve, personal_curve
        ``(round, accuracy)`` of every evaluated round; FedBN's personalised accuracy.
    seconds
        Its wall time.
    config
        The resolved configuration it ran with (:meth:`federation.config.Config.to_dict`);
        ``None`` for runs stored before configurations were recorded.
    probes
        A study's probes: each probe's ``(round, accuracy)`` curve (see
        :class:`~federation.repro.plan.Study`).
    probe_seconds
        The probes' share of ``seconds``.
    """

    run: Run
    summary: Summary
    curve: Curve
    personal_curve: Curve
    seconds: float
    config: dict[str, Any] | None = None
    probes: dict[str, Curve] = dataclasses.field(default_factory=dict)
    probe_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The stored document (``OUT/runs/<run id>.json``, a line of an export)."""
        document: dict[str, Any] = {
            "run": self.run.to_json(),
            "summary": self.summary.to_json(),
            "curve": [list(point) for point in self.curve],
            "personal_curve": [list(point) for point in self.personal_curve],
            "seconds": self.seconds,
        }
        if self.config is not None:
            document["config"] = self.config
        if self.probes:
            document["probes"] = {
                name: {"curve": [list(point) for point in curve], "last10_mean_accuracy": mean}
                for name, curve in self.probes.items()
                for mean in [_last10_mean(curve)]
            }
            document["probe_seconds"] = self.probe_seconds
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> RunResult:
        """The result a stored document holds.

        Raises
        ------
        ValueError, KeyError, TypeError
            If the document is not a stored run.
        """
        return cls(
            run=Run.from_json(document["run"]),
            summary=Summary.from_json(document["summary"]),
            curve=_curve(document["curve"]),
            personal_curve=_curve(document.get("personal_curve", [])),
            seconds=float(document["seconds"]),
            config=document.get("config"),
            probes={
                name: _curve(probe["curve"]) for name, probe in document.get("probes", {}).items()
            },
            probe_seconds=float(document.get("probe_seconds", 0.0)),
        )

    def probe_mean(self, name: str) -> float | None:
        """A probe's mean accuracy over its last 10 evaluated rounds (``None`` if absent)."""
        return _last10_mean(self.probes[name]) if name in self.probes else None


def _curve(points: Sequence[Sequence[Any]]) -> Curve:
    return tuple((int(round_), float(accuracy)) for round_, accuracy in points)


def _last10_mean(curve: Curve) -> float:
    """The mean accuracy of a curve's last 10 points (the summary's metric)."""
    return float(np.mean([accuracy for _, accuracy in curve[-LAST_ROUNDS:]]))


class StaleRunError(ValueError):
    """A stored run was made with another configuration than its run has now."""


class Results(NamedTuple):
    """The stored result of every run of a profile, by phase."""

    tuning: list[RunResult]
    grid: list[RunResult]
    ablation: list[RunResult]
    candidates: list[RunResult]
    study: list[RunResult]


@functools.cache
def _dataset(name: str, seed: int) -> Dataset:
    return load_dataset(name, seed=seed)


def _one_thread() -> None:
    """Worker initializer: one intra-op thread per process (torch is the grid's framework)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    importlib.import_module("torch").set_num_threads(1)


def execute(run: Run, profile: Profile, out_dir: pathlib.Path) -> RunResult:
    """Run ``run`` and write its result file atomically; return the result as stored.

    A study run of ``hbn`` also evaluates each of the study's probes on each evaluated round,
    with the probe's configuration and the run's state, read only.
    """
    from federation.simulation import Simulation

    config = run.config(profile)
    start = time.perf_counter()
    simulation = Simulation(config, dataset=_dataset(profile.data, 0))
    probes = _probe_configs(run, profile)
    probe_curves: dict[str, list[tuple[int, float]]] = {name: [] for name in probes}
    probe_seconds = 0.0

    def evaluate_probes(record: RoundRecord) -> None:
        nonlocal probe_seconds
        if record.accuracy is None:
            return
        probe_start = time.perf_counter()
        sampled = [simulation.clients[i] for i in record.sampled]
        for name, probe_config in probes.items():  # the run's state, evaluated as configured
            state, index = simulation.state, record.round - 1
            accuracy, _ = simulation.evaluate(state, index, sampled, [], config=probe_config)
            probe_curves[name].append((record.round, accuracy))
        probe_seconds += time.perf_counter() - probe_start

    history = simulation.run(on_round=evaluate_probes if probes else None)
    result = RunResult(
        run=run,
        summary=simulation.summary(),
        curve=tuple((r.round, r.accuracy) for r in history if r.accuracy is not None),
        personal_curve=tuple(
            (r.round, r.personal_accuracy) for r in history if r.personal_accuracy is not None
        ),
        seconds=time.perf_counter() - start,
        config=config.to_dict(),
        probes={name: tuple(curve) for name, curve in probe_curves.items()},
        probe_seconds=probe_seconds,
    )
    document = result.to_json()
    _write_json(out_dir / "runs" / f"{run.run_id}.json", document)
    return RunResult.from_json(json.loads(json.dumps(document)))


def _probe_configs(run: Run, profile: Profile) -> dict[str, Config]:
    """The configuration of each probe ``run`` evaluates with (study runs of ``hbn`` only)."""
    if run.phase != "study" or run.method != "hbn" or profile.study is None:
        return {}
    return {
        name: dataclasses.replace(run, overrides=run.overrides + overrides).config(profile)
        for name, overrides in profile.study.probes.items()
    }


def _write_json(path: pathlib.Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f"{path.name}.", suffix=".tmp", delete=False
    ) as file:
        json.dump(document, file)
    os.replace(file.name, path)


def export_runs(results: Sequence[RunResult], path: pathlib.Path) -> None:
    """Write ``results`` to ``path`` as JSON lines, one run per line, in run-id order."""
    lines = sorted(json.dumps(result.to_json(), sort_keys=True) for result in results)
    path.write_text("".join(f"{line}\n" for line in lines))


def import_runs(path: pathlib.Path, out_dir: pathlib.Path) -> int:
    """Store the runs of a JSON-lines file (see :func:`export_runs`) in ``out_dir``.

    A grid then resumes from them. Runs already stored are left as they are. Returns the
    number of runs added.

    Raises
    ------
    ValueError
        If a line is not a stored run; the message gives its line number.
    """
    added = 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            document = json.loads(line)
            run = RunResult.from_json(document).run
        except (ValueError, KeyError, TypeError) as error:
            msg = f"line {number} of {path} is not a stored run: {error}."
            raise ValueError(msg) from error
        target = out_dir / "runs" / f"{run.run_id}.json"
        if not target.exists():
            _write_json(target, document)
            added += 1
    return added


def _stored(run: Run, profile: Profile, out_dir: pathlib.Path) -> RunResult | None:
    """The stored result of ``run``, or ``None``.

    Raises
    ------
    StaleRunError
        If the stored run is another run under the same id (another number of rounds, say),
        or records a configuration other than ``run``'s now (a method's
        defaults changed since, say): it is never silently reused; move its file away to rerun
        it. An option the stored configuration lacks counts as its default (options are added
        with the former behaviour as default); runs stored before configurations were recorded
        are taken as they are.
    """
    path = out_dir / "runs" / f"{run.run_id}.json"
    if not path.exists():
        return None
    result = RunResult.from_json(json.loads(path.read_text()))
    if result.run != run:
        msg = f"{path} holds another run than {run.run_id} now: {result.run}; move it away."
        raise StaleRunError(msg)
    if result.config is not None:
        planned = run.config(profile)
        defaults = _flat(json.loads(json.dumps(type(planned)().to_dict())))
        stored, now = _flat(result.config), _flat(json.loads(json.dumps(planned.to_dict())))
        changed = sorted(
            key
            for key in stored.keys() | now.keys()
            if stored.get(key, defaults.get(key)) != now.get(key, defaults.get(key))
        )
        if changed:
            msg = (
                f"{path} was run with another configuration than {run.run_id} has now: "
                f"{', '.join(f'{k} = {stored.get(k)!r}, now {now.get(k)!r}' for k in changed)}; "
                "move it away to rerun it."
            )
            raise StaleRunError(msg)
    return result


def _flat(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` as ``{"train.lr": 0.1}`` (a table option stays whole)."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and key != "frameworks":
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _remove_stale_files(out_dir: pathlib.Path) -> None:
    """Remove the temporary files of result files whose writer was killed."""
    for stale in (out_dir / "runs").glob("*.json.*.tmp"):
        stale.unlink(missing_ok=True)


def _execute_all(
    runs: list[Run],
    profile: Profile,
    out_dir: pathlib.Path,
    workers: int,
    on_done: Callable[[Run, RunResult], None] | None,
) -> list[RunResult]:
    """Each run's result: stored, or run now (with ``workers = 0``, missing runs are left out)."""
    results: dict[Run, RunResult] = {}
    pending = []
    for run in runs:
        stored = _stored(run, profile, out_dir)
        if stored is None:
            pending.append(run)
        else:
            results[run] = stored
    if not workers:
        return [results[run] for run in runs if run in results]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_one_thread
    ) as pool:
        futures = {pool.submit(execute, run, profile, out_dir): run for run in pending}
        for future in concurrent.futures.as_completed(futures):
            run = futures[future]
            results[run] = future.result()
            if on_done is not None:
                on_done(run, results[run])
    return [results[run] for run in runs]


def tuned_lrs(tuning: Sequence[RunResult]) -> dict[tuple[str, int], float]:
    """The lr with the best tuning score per (method, batch size); ties go to the smaller lr."""
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for result in tuning:
        run = result.run
        key = (run.method, run.setting.batch_size)
        score = tuning_score(result)
        if key not in best or (score, -run.lr) > (best[key][0], -best[key][1]):
            best[key] = (score, run.lr)
    return {key: lr for key, (_, lr) in best.items()}


def tuning_score(result: RunResult) -> float:
    """The mean accuracy of a tuning run's last 3 evaluated rounds (a diverged run scores 0)."""
    accuracies = [accuracy for _, accuracy in result.curve[-TUNING_SCORE_ROUNDS:]]
    return float(np.nan_to_num(np.mean(accuracies)))


def run_profile(
    profile: Profile,
    out_dir: pathlib.Path,
    *,
    workers: int = 1,
    on_done: Callable[[Run, RunResult], None] | None = None,
) -> Results:
    """Run (or resume) ``profile``'s phases in order, and return their results.

    lr tuning comes first unless the profile fixes its ``lrs``; then its ``phases``, in the
    order grid, ablation, study, candidates. ``on_done(run, result)`` is called as each run
    that was not stored yet ends. With ``workers = 0`` nothing runs: the results are those
    stored so far (for a report of an unfinished grid, even while another process runs it).
    Otherwise temporary files that killed runs left are removed first.

    Raises
    ------
    StaleRunError
        If a stored run was made with another configuration than its run has now.
    """
    if workers:
        _remove_stale_files(out_dir)

    def phase(name: str, runs: list[Run]) -> list[RunResult]:
        if name not in profile.phases:
            return []
        return _execute_all(runs, profile, out_dir, workers, on_done)

    tuning = [] if profile.lrs else _execute_all(plan(profile), profile, out_dir, workers, on_done)
    lrs = profile.lrs or tuned_lrs(tuning)
    grid = phase("grid", plan(profile, lrs))
    ablation = phase("ablation", plan_ablation(profile, lrs))
    study = phase("study", plan_study(profile, lrs))
    candidates = phase("candidates", plan_candidates(profile, lrs))
    return Results(tuning, grid, ablation, candidates, study)
