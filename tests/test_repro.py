"""The reproduction benchmark's quick profile: every method runs and beats chance; resume."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from federation.repro import (
    PROFILES,
    RunResult,
    confidence_interval,
    export_runs,
    import_runs,
    plan,
    plan_ablation,
    plan_candidates,
    run_profile,
    verdict,
    write_report,
)

pytest.importorskip("torch")

pytestmark = pytest.mark.torch

QUICK = PROFILES["quick"]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    finished = []
    phases = run_profile(QUICK, out, workers=2, on_done=lambda run, _: finished.append(run))
    return out, phases, finished


def test_every_method_runs_and_beats_chance(quick_results):
    _, results, _ = quick_results
    grid = results.grid
    chance = 1 / 10
    accuracy = {r.run.method: r.summary.last10_mean_accuracy for r in grid}
    assert sorted(accuracy) == sorted(QUICK.methods)
    assert all(value > 2 * chance for value in accuracy.values()), accuracy
    assert all(r.summary.faults == 0 for r in grid)


def test_each_run_is_stored_once_and_a_second_call_resumes_without_rerunning(quick_results):
    out, phases, finished = quick_results
    stored = len(list((out / "runs").glob("*.json")))
    assert len(finished) == sum(len(phase) for phase in phases) == stored == QUICK.run_count
    again = []
    resumed = run_profile(QUICK, out, workers=1, on_done=lambda run, _: again.append(run))
    assert again == []
    assert resumed == phases


def test_the_grid_runs_before_the_investigation_of_hbns_options(quick_results):
    _, _, finished = quick_results
    phases = [run.phase for run in finished]
    assert phases == sorted(phases, key=["tune", "grid", "ablation", "candidate"].index)


def test_exported_runs_import_into_a_fresh_folder_and_resume_there(quick_results, tmp_path):
    _, phases, _ = quick_results
    exported = tmp_path / "runs.jsonl"
    export_runs([run for phase in phases for run in phase], exported)
    fresh = tmp_path / "fresh"
    assert import_runs(exported, fresh) == sum(len(phase) for phase in phases)
    assert import_runs(exported, fresh) == 0
    again = []
    assert run_profile(QUICK, fresh, workers=1, on_done=lambda run, _: again.append(run)) == phases
    assert again == []


def test_a_run_recorded_before_ablations_existed_imports_under_its_own_id(quick_results, tmp_path):
    out, results, _ = quick_results
    grid = results.grid
    record = grid[0].to_json()
    del record["run"]["variant"], record["run"]["overrides"]
    exported = tmp_path / "runs.jsonl"
    exported.write_text(json.dumps(record) + "\n")
    fresh = tmp_path / "fresh"
    assert import_runs(exported, fresh) == 1
    (stored,) = (fresh / "runs").iterdir()
    assert RunResult.from_json(json.loads((out / "runs" / stored.name).read_text())) == grid[0]


def test_a_corrupt_export_is_refused_with_its_line(tmp_path):
    exported = tmp_path / "runs.jsonl"
    exported.write_text('{"run": {"phase": "grid"}}\n')
    with pytest.raises(ValueError, match=r"line 1 of .* is not a stored run"):
        import_runs(exported, tmp_path / "out")


def test_the_report_has_every_method_and_a_plot(quick_results, tmp_path):
    _, phases, _ = quick_results
    markdown, figure = tmp_path / "results.md", tmp_path / "results.png"
    write_report(QUICK, phases, markdown, figure, command="hbn-fed repro --profile quick")
    text = markdown.read_text()
    for method in QUICK.methods:
        assert f"| `{method}` |" in text
    assert "`fedbn` (personalised)" in text
    for ours in ("hbn", "hbn-authors"):
        verdicts = text.split(f"## `{ours}` against each baseline")[1].split("##")[0]
        rows = [line.split(" |")[0] for line in verdicts.splitlines() if line.startswith("| `")]
        assert rows == [f"| `{m}`" for m in QUICK.methods if m != ours]
    assert "| momentum 1 | `statistics.momentum=1.0` |" in text
    candidate = "| hybrid statistics mode (`statistics.mode=hybrid`) |"
    assert all(f"{candidate} {row} |" in text for row in ("accuracy", "vs `hbn`"))
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_ablation_runs_apply_their_overrides_to_hbn():
    runs = plan_ablation(QUICK, {("hbn", 16): 0.03})
    assert [(r.method, r.lr, r.variant) for r in runs] == [("hbn", 0.03, "momentum 1")]
    config = runs[0].config(QUICK)
    assert config.statistics.momentum == 1.0
    assert runs[0].run_id.endswith("-momentum_1")


def test_candidate_runs_cover_every_grid_setting_and_seed_with_hbns_lr():
    profile = dataclasses.replace(QUICK, seeds=(0, 1), settings=PROFILES["full"].settings)
    lrs = {("hbn", 4): 0.01, ("hbn", 32): 0.05, ("bn", 4): 0.02}
    runs = plan_candidates(profile, lrs)
    assert {(r.setting, r.seed) for r in runs} == {
        (s, seed) for s in profile.settings for seed in profile.seeds
    }
    assert len(runs) == len(profile.settings) * len(profile.seeds)
    assert all(r.lr == lrs["hbn", r.setting.batch_size] for r in runs)
    assert all(r.run_id.endswith("-hybrid_statistics_mode") for r in runs)
    assert runs[0].config(profile).statistics.mode == "hybrid"


def test_runs_are_planned_seed_by_seed_with_the_tuned_lr():
    lrs = {
        (m, s.batch_size): 0.01 * (i + 1)
        for i, m in enumerate(QUICK.methods)
        for s in QUICK.settings
    }
    runs = plan(QUICK, lrs)
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)
    assert all(r.lr == lrs[r.method, r.setting.batch_size] for r in runs)
    config = runs[0].config(QUICK)
    assert (config.method, config.data.name, config.rounds) == (runs[0].method, "digits", 6)
    assert json.dumps(config.to_dict())  # the run's configuration is plain data


def test_seed_intervals_are_student_t_intervals():
    mean, half = confidence_interval([0.70, 0.72, 0.74])
    assert mean == pytest.approx(0.72)
    # t(0.975, 2) = 4.302653, s = 0.02: half-width 4.302653 * 0.02 / sqrt(3).
    assert half == pytest.approx(4.302653 * 0.02 / np.sqrt(3), rel=1e-6)


@pytest.mark.parametrize(
    ("ours", "theirs", "outcome"),
    [
        ({0: 0.80, 1: 0.81, 2: 0.82}, {0: 0.70, 1: 0.71, 2: 0.73}, "win"),
        ({0: 0.70, 1: 0.71, 2: 0.73}, {0: 0.80, 1: 0.81, 2: 0.82}, "loss"),
        ({0: 0.80, 1: 0.70, 2: 0.75}, {0: 0.70, 1: 0.80, 2: 0.75}, "tie"),
        ({0: 0.80}, {0: 0.70}, "n/a"),
    ],
)
def test_verdicts_pair_runs_by_seed(ours, theirs, outcome):
    assert verdict(ours, theirs)[0] == outcome
