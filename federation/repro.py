r"""The reproduction benchmark: every method on every setting, with 95% CIs over seeds.

``hbn-fed repro`` (or ``nox -s repro``) runs a :class:`Profile` in four phases and writes a
report (``docs/results.md`` and ``docs/results.png`` for the ``full`` profile):

1. **lr tuning**: each method and local batch size tries every lr of the profile's grid on the
   tuning setting with a seed kept apart from the reported ones; the lr with the best mean
   accuracy of its last evaluated rounds wins.
2. **grid**: each method, setting and seed runs with its tuned lr.
3. **ablations**: ``hbn`` with each of its protocol options changed, on one setting.
4. **candidates**: ``hbn`` with options that could become its defaults, on every setting and
   seed of the grid, so that a change of default is judged where the grid judges methods.

Each run is one :class:`~federation.simulation.Simulation` with torch clients; its result is
written to ``OUT/runs/<run id>.json`` as soon as it ends, and runs whose file exists are
skipped, so an interrupted grid resumes where it stopped. Runs go to ``workers`` processes,
each with one thread (small-batch SGD gains nothing from more).

The reported metric per run is the mean test accuracy of its last 10 rounds (every one of
them evaluated); a cell is the mean of that over seeds ± :math:`t_{0.975, n-1}\\, s/\\sqrt{n}`
(:math:`s` the Bessel-corrected deviation over the :math:`n` seeds). HBN's verdict against a
baseline uses the paired (same seed, same split) differences the same way: a win or a loss if
their CI excludes 0, a tie otherwise.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib
import json
import multiprocessing
import os
import platform
import re
import tempfile
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from federation.config import parse_config
from federation.data import load_dataset

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Callable, Sequence

    from federation.config import Config
    from federation.data import Dataset

__all__ = [
    "PROFILES",
    "Profile",
    "Results",
    "Run",
    "Setting",
    "export_runs",
    "import_runs",
    "plan",
    "plan_ablation",
    "plan_candidates",
    "run_profile",
    "write_report",
]

# Methods in report order: ours first, then the baselines of paper-spec §6.
# A tuning run's score: its mean accuracy over this many last rounds.
TUNING_SCORE_ROUNDS = 3
METHODS = ("hbn", "hbn-authors", "fbn", "bn", "fedbn", "fixbn", "gn", "ln", "fedfn")


@dataclasses.dataclass(frozen=True)
class Setting:
    """A data split and local batch size; ``beta = 0`` with ``partition = "iid"``."""

    partition: str
    beta: float
    batch_size: int

    @property
    def label(self) -> str:
        """``"Dir(0.6), B=4"`` or ``"IID, B=32"``."""
        split = "IID" if self.partition == "iid" else f"Dir({self.beta:g})"
        return f"{split}, B={self.batch_size}"


@dataclasses.dataclass(frozen=True)
class Profile:
    """A grid: data, federation, settings, seeds, rounds and the lr grid per batch size."""

    name: str
    data: str
    num_clients: int
    fraction: float
    rounds: int
    seeds: tuple[int, ...]
    settings: tuple[Setting, ...]
    lr_grid: dict[int, tuple[float, ...]]
    tune_rounds: int
    tune_seed: int
    tune_split: tuple[str, float]
    eval_every: int
    ablation_setting: Setting
    ablations: dict[str, tuple[str, ...]]
    candidates: dict[str, tuple[str, ...]]
    methods: tuple[str, ...] = METHODS

    @property
    def grid_size(self) -> int:
        """The grid's runs: methods x settings x seeds."""
        return len(self.methods) * len(self.settings) * len(self.seeds)

    @property
    def run_count(self) -> int:
        """Every run of the profile: lr tuning, ablations, grid and candidates."""
        tuning = len(self.methods) * sum(len(lrs) for lrs in self.lr_grid.values())
        ablations = len(self.ablations) * len(self.seeds)
        candidates = len(self.candidates) * len(self.settings) * len(self.seeds)
        return tuning + ablations + self.grid_size + candidates


def _settings(
    splits: Sequence[tuple[str, float]], batch_sizes: Sequence[int]
) -> tuple[Setting, ...]:
    return tuple(Setting(p, b, size) for size in batch_sizes for p, b in splits)


# HBN's protocol options (paper-spec §9). Each is measured against synchronous evaluation
# statistics, the `hbn` default when the grid of docs/results.md was planned, so that the row
# "sync evaluation" is their reference; the report also compares each with `hbn` itself.
SYNC = "eval.statistics=sync"
HBN_ABLATIONS: dict[str, tuple[str, ...]] = {
    "sync evaluation statistics (authors, D7)": (SYNC,),
    "sync + hybrid statistics mode": (SYNC, "statistics.mode=hybrid"),
    "sync + statistics momentum 1": (SYNC, "statistics.momentum=1.0"),
    "sync + shared (averaged) alpha": (SYNC, "alpha.policy=averaged"),
    "sync + statistics momentum 0.002 (authors, D6)": (SYNC, "statistics.momentum=0.002"),
    "sync + hybrid recorded statistics (authors, D2)": (SYNC, "statistics.recorded=hybrid"),
}

# Options that `hbn`'s ablation favoured, measured on the whole grid: hybrid mode as a candidate
# for its defaults; the authors' D2 (which biases the pool, spec §7), alone and with their sync
# evaluation (D7) as in the ablation, to see whether it explains the lead of `hbn-authors`.
HYBRID_MODE: dict[str, tuple[str, ...]] = {"hybrid statistics mode": ("statistics.mode=hybrid",)}
HBN_CANDIDATES = {
    **HYBRID_MODE,
    "hybrid recorded statistics (authors, D2)": ("statistics.recorded=hybrid",),
    "sync + hybrid recorded statistics (authors, D2 and D7)": (
        SYNC,
        "statistics.recorded=hybrid",
    ),
}

PROFILES: dict[str, Profile] = {
    # Fashion-MNIST, 100 clients, 10% per round: about 2 hours with 2 workers on 2 cores.
    "full": Profile(
        name="full",
        data="fashion-mnist",
        num_clients=100,
        fraction=0.1,
        rounds=20,
        seeds=(0, 1, 2),
        settings=_settings([("dirichlet", 0.6), ("dirichlet", 0.1), ("iid", 0.0)], (4, 32)),
        lr_grid={4: (0.005, 0.01, 0.02), 32: (0.02, 0.05, 0.1)},
        tune_rounds=8,
        tune_seed=100,
        tune_split=("dirichlet", 0.6),
        eval_every=5,
        ablation_setting=Setting("dirichlet", 0.6, 4),
        ablations=HBN_ABLATIONS,
        candidates=HBN_CANDIDATES,
    ),
    # A smoke test for CI: digits, every method, one seed, a few rounds.
    "quick": Profile(
        name="quick",
        data="digits",
        num_clients=10,
        fraction=0.5,
        rounds=6,
        seeds=(0,),
        settings=_settings([("dirichlet", 0.6)], (16,)),
        lr_grid={16: (0.05,)},
        tune_rounds=2,
        tune_seed=100,
        tune_split=("dirichlet", 0.6),
        eval_every=1,
        ablation_setting=Setting("dirichlet", 0.6, 16),
        ablations={"momentum 1": ("statistics.momentum=1.0",)},
        candidates=HYBRID_MODE,
    ),
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One federation of a phase: ``"tune"``, ``"ablation"``, ``"grid"`` or ``"candidate"``.

    An ablation or candidate run (``variant`` named) applies ``overrides`` to the method's
    configuration.
    """

    phase: str
    method: str
    setting: Setting
    seed: int
    lr: float
    rounds: int
    variant: str = ""
    overrides: tuple[str, ...] = ()

    @property
    def run_id(self) -> str:
        """A file name that says what the run is."""
        s = self.setting
        return (
            f"{self.phase}-{self.method}-{s.partition}{s.beta:g}-b{s.batch_size}"
            f"-lr{self.lr:g}-seed{self.seed}"
            + (f"-{re.sub(r'[^a-z0-9.]+', '_', self.variant.lower())}" if self.variant else "")
        )

    def config(self, profile: Profile) -> Config:
        """The run's checked configuration: the method's own defaults, then the profile's."""
        setting = self.setting
        data: dict[str, Any] = {
            "name": profile.data,
            "num_clients": profile.num_clients,
            "partition": setting.partition,
        }
        if setting.partition == "dirichlet":
            data["beta"] = setting.beta
        table = {
            "method": self.method,
            "seed": self.seed,
            "rounds": self.rounds,
            "data": data,
            "clients": {"fraction": profile.fraction, "min_clients": 1},
            "train": {"batch_size": setting.batch_size, "lr": self.lr},
            "eval": self._evaluation(profile),
        }
        return parse_config(table, self.overrides)

    def _evaluation(self, profile: Profile) -> dict[str, Any]:
        """Grid runs: every ``eval_every`` rounds and each of the last 10; tuning: the last 3."""
        if self.phase == "tune":
            return {"every": self.rounds, "final_rounds": TUNING_SCORE_ROUNDS, "batch_size": 1000}
        return {"every": profile.eval_every, "final_rounds": 10, "batch_size": 1000}


def plan(profile: Profile, tuned_lr: dict[tuple[str, int], float] | None = None) -> list[Run]:
    """The tuning runs, or with ``tuned_lr`` (method, batch size) -> lr, the grid runs.

    Grid runs are ordered seed by seed, so that an interrupted grid has whole seeds.
    """
    if tuned_lr is None:
        split, beta = profile.tune_split
        return [
            Run(
                "tune",
                method,
                Setting(split, beta, size),
                profile.tune_seed,
                lr,
                profile.tune_rounds,
            )
            for size, lrs in profile.lr_grid.items()
            for method in profile.methods
            for lr in lrs
        ]
    return [
        Run("grid", m, s, seed, tuned_lr[m, s.batch_size], profile.rounds)
        for seed in profile.seeds
        for s in profile.settings
        for m in profile.methods
        if (m, s.batch_size) in tuned_lr
    ]


def plan_ablation(profile: Profile, tuned_lr: dict[tuple[str, int], float]) -> list[Run]:
    """``hbn`` with each of the profile's ablations, on its ablation setting, for every seed."""
    setting = profile.ablation_setting
    if ("hbn", setting.batch_size) not in tuned_lr:
        return []
    lr = tuned_lr["hbn", setting.batch_size]
    return [
        Run("ablation", "hbn", setting, seed, lr, profile.rounds, variant, overrides)
        for seed in profile.seeds
        for variant, overrides in profile.ablations.items()
    ]


def plan_candidates(profile: Profile, tuned_lr: dict[tuple[str, int], float]) -> list[Run]:
    """``hbn`` with each of the profile's candidate defaults, on every grid setting and seed."""
    return [
        Run("candidate", "hbn", s, seed, tuned_lr["hbn", s.batch_size], profile.rounds, name, o)
        for seed in profile.seeds
        for s in profile.settings
        for name, o in profile.candidates.items()
        if ("hbn", s.batch_size) in tuned_lr
    ]


# -- running --------------------------------------------------------------------------------


@functools.cache
def _dataset(name: str, seed: int) -> Dataset:
    return load_dataset(name, seed=seed)


def _one_thread() -> None:
    """Worker initializer: one intra-op thread per process (torch is the grid's framework)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    importlib.import_module("torch").set_num_threads(1)


def execute(run: Run, profile: Profile, out_dir: pathlib.Path) -> dict[str, Any]:
    """Run ``run`` and write its result file atomically; return the result."""
    from federation.simulation import Simulation

    config = run.config(profile)
    start = time.perf_counter()
    simulation = Simulation(config, dataset=_dataset(profile.data, 0))
    history = simulation.run()
    result = {
        "run": dataclasses.asdict(run),
        "summary": simulation.summary(),
        "curve": [[r.round, r.accuracy] for r in history if r.accuracy is not None],
        "personal_curve": [
            [r.round, r.personal_accuracy] for r in history if r.personal_accuracy is not None
        ],
        "seconds": time.perf_counter() - start,
    }
    _write_json(out_dir / "runs" / f"{run.run_id}.json", result)
    as_stored: dict[str, Any] = json.loads(json.dumps(result))  # tuples become lists
    return as_stored


def _write_json(path: pathlib.Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as file:
        json.dump(document, file)
    os.replace(file.name, path)


def export_runs(results: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    """Write ``results`` to ``path`` as JSON lines, one run per line, in run-id order."""
    lines = sorted(json.dumps(result, sort_keys=True) for result in results)
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
            result = json.loads(line)
            run = _stored_run(result["run"])
        except (ValueError, KeyError, TypeError) as error:
            msg = f"line {number} of {path} is not a stored run: {error}."
            raise ValueError(msg) from error
        target = out_dir / "runs" / f"{run.run_id}.json"
        if not target.exists():
            _write_json(target, result)
            added += 1
    return added


def _stored_run(fields: dict[str, Any]) -> Run:
    """The :class:`Run` a result file records; records older than ablations lack its defaults."""
    return Run(
        **{
            **fields,
            "setting": Setting(**fields["setting"]),
            "overrides": tuple(fields.get("overrides", ())),
        }
    )


def _stored(run: Run, out_dir: pathlib.Path) -> dict[str, Any] | None:
    path = out_dir / "runs" / f"{run.run_id}.json"
    if not path.exists():
        return None
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _execute_all(
    runs: list[Run],
    profile: Profile,
    out_dir: pathlib.Path,
    workers: int,
    on_done: Callable[[Run, dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    """Each run's result: stored, or run now (with ``workers = 0``, missing runs are left out)."""
    results: dict[Run, dict[str, Any]] = {}
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


def tuned_lrs(tuning: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """The lr with the best tuning score per (method, batch size); ties go to the smaller lr."""
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for result in tuning:
        run = result["run"]
        key = (run["method"], run["setting"]["batch_size"])
        score = _tuning_score(result)
        if key not in best or (score, -run["lr"]) > (best[key][0], -best[key][1]):
            best[key] = (score, run["lr"])
    return {key: lr for key, (_, lr) in best.items()}


def _tuning_score(result: dict[str, Any]) -> float:
    """The mean accuracy of a tuning run's last 3 evaluated rounds (a diverged run scores 0)."""
    accuracies = [accuracy for _, accuracy in result["curve"][-TUNING_SCORE_ROUNDS:]]
    return float(np.nan_to_num(np.mean(accuracies)))


class Results(NamedTuple):
    """The stored result of every run of a profile, by phase (see :func:`execute`)."""

    tuning: list[dict[str, Any]]
    grid: list[dict[str, Any]]
    ablation: list[dict[str, Any]]
    candidates: list[dict[str, Any]]


def run_profile(
    profile: Profile,
    out_dir: pathlib.Path,
    *,
    workers: int = 1,
    on_done: Callable[[Run, dict[str, Any]], None] | None = None,
) -> Results:
    """Run (or resume) ``profile``'s phases in order, and return their results.

    ``on_done(run, result)`` is called as each run that was not stored yet ends. With
    ``workers = 0`` nothing runs: the results are those stored so far (for a report of an
    unfinished grid).
    """
    tuning = _execute_all(plan(profile), profile, out_dir, workers, on_done)
    lrs = tuned_lrs(tuning)
    grid = _execute_all(plan(profile, lrs), profile, out_dir, workers, on_done)
    ablation = _execute_all(plan_ablation(profile, lrs), profile, out_dir, workers, on_done)
    candidates = _execute_all(plan_candidates(profile, lrs), profile, out_dir, workers, on_done)
    return Results(tuning, grid, ablation, candidates)


# -- the report -----------------------------------------------------------------------------


def seed_interval(values: Sequence[float]) -> tuple[float, float]:
    r"""The mean of ``values`` and its 95% CI half-width, :math:`t_{0.975,n-1}\\, s/\\sqrt{n}`."""
    from scipy import stats

    array = np.asarray(values, np.float64)
    if len(array) < 2:
        return float(array.mean()), float("nan")
    half = stats.t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / np.sqrt(len(array))
    return float(array.mean()), float(half)


Cells = dict[tuple[str, Setting], dict[int, float]]


def _by_cell(grid: list[dict[str, Any]], key: str = "last10_mean_accuracy") -> Cells:
    """Each (method, setting)'s metric ``key`` by seed."""
    cells: Cells = {}
    for result in grid:
        run = result["run"]
        setting = Setting(**run["setting"])
        value = result["summary"].get(key)
        if value is not None:
            cells.setdefault((run["method"], setting), {})[run["seed"]] = value
    return cells


def _format(mean: float, half: float) -> str:
    ci = "" if np.isnan(half) else f" ± {100 * half:.1f}"
    return f"{100 * mean:.1f}{ci}"


def verdict(ours: dict[int, float], theirs: dict[int, float]) -> tuple[str, float, float]:
    """``"win"``, ``"tie"`` or ``"loss"`` of ``ours`` against ``theirs`` (paired by seed).

    With a single common seed there is no interval, and the verdict is ``"n/a"``.
    """
    seeds = sorted(ours.keys() & theirs.keys())
    mean, half = seed_interval([ours[s] - theirs[s] for s in seeds])
    if np.isnan(half):
        return "n/a", mean, half
    if abs(mean) <= half:
        return "tie", mean, half
    return ("win" if mean > 0 else "loss"), mean, half


def write_report(
    profile: Profile,
    results: Results,
    markdown: pathlib.Path,
    figure: pathlib.Path,
    *,
    command: str,
) -> None:
    """Write the tables (``markdown``) and the accuracy curves (``figure``)."""
    markdown.parent.mkdir(parents=True, exist_ok=True)
    grid = results.grid
    lines = [
        f"# Reproduction benchmark ({profile.name} profile)",
        "",
        "Generated by `federation.repro`; do not edit by hand. What the figures mean, and what",
        "we found where they disagree with the paper: [results-discussion.md]"
        "(results-discussion.md).",
        "",
        *_setup_lines(profile, grid, command),
        *_main_tables(profile, grid),
        *_verdict_lines(profile, grid, "hbn"),
        *_verdict_lines(profile, grid, "hbn-authors"),
        *_personal_lines(profile, grid),
        *_ablation_lines(profile, grid, results.ablation),
        *_candidate_lines(profile, grid, results.candidates),
        *_tuning_lines(profile, results.tuning),
    ]
    markdown.write_text("\n".join(lines) + "\n")
    _plot(profile, grid, figure)


def _setup_lines(profile: Profile, grid: list[dict[str, Any]], command: str) -> list[str]:
    seconds = sum(r["seconds"] for r in grid)
    complete = len(grid) == profile.grid_size
    return [
        "## Set-up",
        "",
        f"- Command: `{command}`",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {platform.platform()}",
        f"- Data: `{profile.data}`, {profile.num_clients} clients, {profile.fraction:.0%} per "
        "round; Simple-CNN; torch clients.",
        f"- {profile.rounds} rounds, 1 local epoch, SGD momentum 0.9, clip 10; "
        f"seeds {list(profile.seeds)}.",
        "- Metric: mean test accuracy (%) of the last 10 rounds, mean ± 95% CI over seeds"
        " (t-interval). **Bold**: the best mean of a column.",
        f"- Grid runs stored: {len(grid)} of {profile.grid_size}"
        + ("" if complete else " (**incomplete**: a cell without ± has one seed)")
        + f"; compute {seconds / 3600:.2f} h (sum of run times).",
        "",
    ]


def _main_tables(profile: Profile, grid: list[dict[str, Any]]) -> list[str]:
    cells = _by_cell(grid)
    lines = ["## Accuracy", ""]
    header = "| method | " + " | ".join(s.label for s in profile.settings) + " |"
    lines += [header, "|---" * (len(profile.settings) + 1) + "|"]
    best = {
        s: max(
            (np.mean(list(cells[m, s].values())) for m in profile.methods if (m, s) in cells),
            default=np.nan,
        )
        for s in profile.settings
    }
    for method in profile.methods:
        row = [f"`{method}`"]
        for setting in profile.settings:
            values = cells.get((method, setting), {})
            if not values:
                row.append("-")
                continue
            mean, half = seed_interval(list(values.values()))
            text = _format(mean, half)
            row.append(f"**{text}**" if np.isclose(mean, best[setting]) else text)
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def _verdict_lines(profile: Profile, grid: list[dict[str, Any]], ours: str) -> list[str]:
    """``ours`` against every other method: paired differences and their verdicts."""
    cells = _by_cell(grid)
    lines = [
        f"## `{ours}` against each baseline",
        "",
        f"Paired difference `{ours}` - baseline in accuracy points, mean ± 95% CI over seeds:",
        "",
        "| baseline | "
        + " | ".join(s.label for s in profile.settings)
        + " | wins / ties / losses |",
        "|---" * (len(profile.settings) + 2) + "|",
    ]
    for method in (m for m in profile.methods if m != ours):
        row, counts = [f"`{method}`"], {"win": 0, "tie": 0, "loss": 0}
        for setting in profile.settings:
            mine, theirs = cells.get((ours, setting), {}), cells.get((method, setting), {})
            if not mine.keys() & theirs.keys():
                row.append("-")
                continue
            outcome, mean, half = verdict(mine, theirs)
            counts[outcome] = counts.get(outcome, 0) + 1
            row.append(f"{_format(mean, half)} ({outcome})")
        row.append(f"{counts['win']} / {counts['tie']} / {counts['loss']}")
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def _personal_lines(profile: Profile, grid: list[dict[str, Any]]) -> list[str]:
    cells = _by_cell(grid, "last10_mean_personal_accuracy")
    if not cells:
        return []
    lines = [
        "## FedBN, personalised",
        "",
        "Each round's clients with their own BatchNorm on a local test split (500 test examples",
        "drawn with the client's label proportions). Not comparable with the global test accuracy",
        "above: a client's local task has fewer classes.",
        "",
        "| method | " + " | ".join(s.label for s in profile.settings) + " |",
        "|---" * (len(profile.settings) + 1) + "|",
    ]
    for method in sorted({m for m, _ in cells}):
        row = [f"`{method}` (personalised)"]
        for setting in profile.settings:
            values = cells.get((method, setting), {})
            row.append(_format(*seed_interval(list(values.values()))) if values else "-")
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def _ablation_lines(
    profile: Profile, grid: list[dict[str, Any]], ablation: list[dict[str, Any]]
) -> list[str]:
    """Each variant's accuracy and paired differences from ``hbn`` and its reference row.

    A variant's reference row is the one whose overrides it extends by one.
    """
    setting = profile.ablation_setting
    baseline = _by_cell(grid).get(("hbn", setting), {})
    by_overrides: dict[tuple[str, ...], dict[int, float]] = {(): baseline}
    for result in ablation:
        run = result["run"]
        value = result["summary"]["last10_mean_accuracy"]
        by_overrides.setdefault(tuple(run["overrides"]), {})[run["seed"]] = value
    lines = [
        "## HBN's protocol options",
        "",
        f'`hbn` on {setting.label}: its defaults (`statistics.mode = "global"`, '
        '`statistics.momentum = 0.1`, personal alpha, `eval.statistics = "ema"`), then options'
        " changed. Accuracy (%), and paired differences (points) from `hbn` and from the row"
        " whose options it extends by one:",
        "",
        "| variant | options | accuracy | vs `hbn` | vs reference row |",
        "|---|---|---|---|---|",
    ]
    variants = {"`hbn` (defaults)": (), **profile.ablations}
    for variant, overrides in variants.items():
        values = by_overrides.get(tuple(overrides), {})
        if not values:
            continue
        reference = by_overrides.get(tuple(overrides[:-1]), {}) if len(overrides) > 1 else {}
        cells = [
            _difference(values, baseline) if overrides else "",
            _difference(values, reference) if len(overrides) > 1 else "",
        ]
        options = ", ".join(f"`{o}`" for o in overrides)
        accuracy = _format(*seed_interval(list(values.values())))
        lines.append(f"| {variant} | {options} | {accuracy} | {cells[0]} | {cells[1]} |")
    return [*lines, ""]


def _candidate_lines(
    profile: Profile, grid: list[dict[str, Any]], candidates: list[dict[str, Any]]
) -> list[str]:
    """Each candidate's accuracy per setting, and its paired differences from ``hbn``."""
    if not candidates:
        return []
    cells = _by_cell(grid)
    lines = [
        "## Candidate defaults for `hbn`",
        "",
        "`hbn` with options its ablation favoured, on every setting and seed of the grid."
        " Accuracy (%), and paired differences (points) from `hbn` and `hbn-authors`:",
        "",
        "| variant | | " + " | ".join(s.label for s in profile.settings) + " |",
        "|---" * (len(profile.settings) + 2) + "|",
    ]
    for variant, overrides in profile.candidates.items():
        measured = _by_cell([r for r in candidates if tuple(r["run"]["overrides"]) == overrides])
        by_setting = [measured.get(("hbn", s), {}) for s in profile.settings]
        rows = {
            "accuracy": [
                _format(*seed_interval(list(v.values()))) if v else "-" for v in by_setting
            ],
            **{
                f"vs `{method}`": [
                    _difference(v, cells.get((method, s), {}))
                    for v, s in zip(by_setting, profile.settings, strict=True)
                ]
                for method in ("hbn", "hbn-authors")
            },
        }
        options = ", ".join(f"`{o}`" for o in overrides)
        lines += [
            f"| {variant} ({options}) | {name} | " + " | ".join(row) + " |"
            for name, row in rows.items()
        ]
    return [*lines, ""]


def _difference(values: dict[int, float], reference: dict[int, float]) -> str:
    """The paired difference with its verdict, or ``-`` without common seeds."""
    if not values.keys() & reference.keys():
        return "-"
    outcome, mean, half = verdict(values, reference)
    return f"{_format(mean, half)} ({outcome})"


def _tuning_lines(profile: Profile, tuning: list[dict[str, Any]]) -> list[str]:
    split, beta = profile.tune_split
    chosen = tuned_lrs(tuning)
    lines = [
        "## lr tuning",
        "",
        "Each method and batch size tried every lr below on "
        f"{Setting(split, beta, 0).label.split(',')[0]} with seed {profile.tune_seed} (not a "
        f"reported seed) for {profile.tune_rounds} rounds; score: mean accuracy (%) of the last "
        f"{TUNING_SCORE_ROUNDS} rounds. The chosen lr is in bold.",
        "",
    ]
    for size, lrs in profile.lr_grid.items():
        lines += [f"B = {size}:", "", "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"]
        lines.append("|---" * (len(lrs) + 1) + "|")
        scores = {
            (r["run"]["method"], r["run"]["lr"]): _tuning_score(r)
            for r in tuning
            if r["run"]["setting"]["batch_size"] == size
        }
        for method in profile.methods:
            row = [f"`{method}`"]
            for lr in lrs:
                text = f"{100 * scores[method, lr]:.1f}" if (method, lr) in scores else "-"
                row.append(f"**{text}**" if chosen.get((method, size)) == lr else text)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _plot(profile: Profile, grid: list[dict[str, Any]], path: pathlib.Path) -> None:
    """Mean test accuracy over seeds per round, one panel per setting."""
    from matplotlib.figure import Figure

    columns = len({s.partition + str(s.beta) for s in profile.settings})
    rows = -(-len(profile.settings) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows))
    axes = np.atleast_1d(figure.subplots(rows, columns, sharey=True)).ravel()
    for axis, setting in zip(axes, profile.settings, strict=False):
        for method in profile.methods:
            curves = [
                r["curve"]
                for r in grid
                if r["run"]["method"] == method and Setting(**r["run"]["setting"]) == setting
            ]
            if curves:
                rounds = [point[0] for point in curves[0]]
                mean = np.mean([[point[1] for point in c] for c in curves], axis=0)
                axis.plot(rounds, mean, label=method, linewidth=2 if method == "hbn" else 1)
        axis.set(title=setting.label, xlabel="round", ylabel="test accuracy")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
