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
from federation.repro.plan import TUNING_SCORE_ROUNDS, Run, plan, plan_ablation, plan_candidates
from federation.repro.statistics import Summary

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Callable, Mapping, Sequence

    from federation.data import Dataset
    from federation.repro.plan import Profile

__all__ = [
    "Results",
    "RunResult",
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
    """

    run: Run
    summary: Summary
    curve: Curve
    personal_curve: Curve
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The stored document (``OUT/runs/<run id>.json``, a line of an export)."""
        return {
            "run": self.run.to_json(),
            "summary": self.summary.to_json(),
            "curve": [list(point) for point in self.curve],
            "personal_curve": [list(point) for point in self.personal_curve],
            "seconds": self.seconds,
        }

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
        )


def _curve(points: Sequence[Sequence[Any]]) -> Curve:
    return tuple((int(round_), float(accuracy)) for round_, accuracy in points)


class Results(NamedTuple):
    """The stored result of every run of a profile, by phase."""

    tuning: list[RunResult]
    grid: list[RunResult]
    ablation: list[RunResult]
    candidates: list[RunResult]


@functools.cache
def _dataset(name: str, seed: int) -> Dataset:
    return load_dataset(name, seed=seed)


def _one_thread() -> None:
    """Worker initializer: one intra-op thread per process (torch is the grid's framework)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    importlib.import_module("torch").set_num_threads(1)


def execute(run: Run, profile: Profile, out_dir: pathlib.Path) -> RunResult:
    """Run ``run`` and write its result file atomically; return the result as stored."""
    from federation.simulation import Simulation

    config = run.config(profile)
    start = time.perf_counter()
    simulation = Simulation(config, dataset=_dataset(profile.data, 0))
    history = simulation.run()
    result = RunResult(
        run=run,
        summary=simulation.summary(),
        curve=tuple((r.round, r.accuracy) for r in history if r.accuracy is not None),
        personal_curve=tuple(
            (r.round, r.personal_accuracy) for r in history if r.personal_accuracy is not None
        ),
        seconds=time.perf_counter() - start,
    )
    document = result.to_json()
    _write_json(out_dir / "runs" / f"{run.run_id}.json", document)
    return RunResult.from_json(json.loads(json.dumps(document)))


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


def _stored(run: Run, out_dir: pathlib.Path) -> RunResult | None:
    path = out_dir / "runs" / f"{run.run_id}.json"
    if not path.exists():
        return None
    return RunResult.from_json(json.loads(path.read_text()))


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
        stored = _stored(run, out_dir)
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

    ``on_done(run, result)`` is called as each run that was not stored yet ends. With
    ``workers = 0`` nothing runs: the results are those stored so far (for a report of an
    unfinished grid). Temporary files that killed runs left are removed first.
    """
    _remove_stale_files(out_dir)
    tuning = _execute_all(plan(profile), profile, out_dir, workers, on_done)
    lrs = tuned_lrs(tuning)
    grid = _execute_all(plan(profile, lrs), profile, out_dir, workers, on_done)
    ablation = _execute_all(plan_ablation(profile, lrs), profile, out_dir, workers, on_done)
    candidates = _execute_all(plan_candidates(profile, lrs), profile, out_dir, workers, on_done)
    return Results(tuning, grid, ablation, candidates)
