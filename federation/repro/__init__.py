r"""The reproduction benchmark: every method on every setting, with 95% CIs over seeds.

``hbn-fed repro`` (or ``nox -s repro``) runs a :class:`Profile`'s phases and writes a report
(``docs/results.md`` and ``docs/results.png`` for the ``full`` profile):

1. **lr tuning**: each method and local batch size tries every lr of the profile's grid on the
   tuning setting with a seed kept apart from the reported ones; the lr with the best mean
   accuracy of its last evaluated rounds wins.
2. **grid**: each method, setting and seed runs with its tuned lr.
3. **ablations**: ``hbn`` with each of its protocol options changed, on one setting.
4. **study**: variants of ``hbn`` and the baselines they must beat, on seeds kept apart from
   the reported ones (a :class:`Study`), so that options are chosen without the reported
   seeds; evaluation-only options are probes of the same runs.
5. **candidates**: ``hbn`` with options that could become its defaults, on every setting and
   seed of the grid, so that a change of default is judged where the grid judges methods.

The ``full`` profile runs tuning, grid, ablations and candidates; ``study`` the study alone
(``docs/results-study.md``); ``long`` a grid of ``hbn``, ``hbn-authors``, ``bn`` and ``fixbn``
over 250 rounds with fixed lrs and a per-round lr decay (``docs/results-long.md``).
Each stored run records its resolved configuration, and a stored run whose configuration
differs from its run's now is refused (:class:`StaleRunError`), never silently reused.

Each run is one :class:`~federation.simulation.Simulation` with torch clients; its typed
result (:class:`RunResult`) is written to ``OUT/runs/<run id>.json`` as soon as it ends, and
runs whose file exists are skipped, so an interrupted grid resumes where it stopped. Runs go to
``workers`` processes, each with one thread (small-batch SGD gains nothing from more).

The reported metric per run is the mean test accuracy of its last 10 rounds (every one of
them evaluated); a cell is the mean of that over seeds with its 95% CI, the t-interval of
:func:`~federation.repro.statistics.confidence_interval`. HBN's verdict against a baseline uses
the paired (same seed, same split) differences the same way: a win or a loss if their CI
excludes 0, a tie otherwise.

Modules: :mod:`~federation.repro.plan` (profiles and runs), :mod:`~federation.repro.execute`
(running and storing), :mod:`~federation.repro.report` (tables and plot) and
:mod:`~federation.repro.statistics` (the one CI definition, verdicts, run summaries).
"""

from federation.repro.execute import (
    Results,
    RunResult,
    StaleRunError,
    execute,
    export_runs,
    import_runs,
    run_profile,
    tuned_lrs,
)
from federation.repro.plan import (
    PROFILES,
    Profile,
    Run,
    Setting,
    Study,
    plan,
    plan_ablation,
    plan_candidates,
    plan_study,
)
from federation.repro.report import write_report
from federation.repro.statistics import Summary, confidence_interval, summarize, verdict

__all__ = [
    "PROFILES",
    "Profile",
    "Results",
    "Run",
    "RunResult",
    "Setting",
    "StaleRunError",
    "Study",
    "Summary",
    "confidence_interval",
    "execute",
    "export_runs",
    "import_runs",
    "plan",
    "plan_ablation",
    "plan_candidates",
    "plan_study",
    "run_profile",
    "summarize",
    "tuned_lrs",
    "verdict",
    "write_report",
]
