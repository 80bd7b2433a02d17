"""The reproduction benchmark's quick profile: every method runs and beats chance; resume."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from federation.repro import (
    PROFILES,
    RunResult,
    Setting,
    StaleRunError,
    Study,
    confidence_interval,
    export_runs,
    import_runs,
    plan,
    plan_ablation,
    plan_candidates,
    plan_study,
    run_profile,
    tuned_lrs,
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


# -- issue 18: the study on held-out seeds and the long profile -------------------------------

ROOT = pathlib.Path(__file__).resolve().parent.parent
FRESH_HALF = ("eval.statistics=fresh", "eval.fresh_weight=0.5")
TINY_STUDY = dataclasses.replace(
    QUICK,
    name="tiny-study",
    rounds=3,
    phases=("study",),
    lrs={("hbn", 16): 0.05, ("hbn-authors", 16): 0.05},
    study=Study(
        settings=(Setting("dirichlet", 0.6, 16),),
        seeds=(100,),
        variants={
            "hbn": ("hbn", ()),
            "hbn-authors": ("hbn-authors", ()),
            "first, fresh 0.5": ("hbn", ("statistics.warmup=first", *FRESH_HALF)),
            "first": ("hbn", ("statistics.warmup=first",)),
        },
        probes={"fresh 0.5": FRESH_HALF},
    ),
)
TINY_LONG = dataclasses.replace(
    QUICK,
    name="tiny-long",
    rounds=6,
    eval_every=2,
    methods=("hbn", "bn"),
    phases=("grid",),
    grid_phase="long",
    lrs={("hbn", 16): 0.05, ("bn", 16): 0.05},
    lr_decay=0.9,
    gap_rounds=(5, 6),
)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, run_profile(TINY_STUDY, out, workers=1)


def test_the_study_holds_out_the_reported_seeds_and_pairs_both_hbn_baselines():
    full, study = PROFILES["full"], PROFILES["study"]
    assert study.study is not None
    assert not set(study.study.seeds) & set(full.seeds)
    assert set(study.study.settings) == {Setting("dirichlet", 0.6, 4), Setting("dirichlet", 0.1, 4)}
    runs = plan_study(study, study.lrs)
    assert len(runs) == study.run_count == study.study.run_count
    variants = [r.variant for r in runs]
    assert variants[:12] == ["hbn-authors"] * 6 + ["hbn"] * 6  # baselines first, whole
    warmups = {r.config(study).statistics.warmup for r in runs if r.method == "hbn"}
    assert warmups == {"none", "first", "cumulative", "debias"}
    assert all(r.config(study).eval.statistics == "ema" for r in runs if r.method == "hbn")
    with pytest.raises(ValueError, match=r"must override `eval\.\*` keys only"):
        Study(study.study.settings, (100,), {}, probes={"bad": ("statistics.momentum=1",)})


def test_a_probe_equals_a_run_configured_with_it_bit_for_bit(tiny_study):
    _, results = tiny_study
    by_variant = {r.run.variant: r for r in results.study}
    assert set(by_variant) == set(TINY_STUDY.study.variants)
    probed = by_variant["first"].probes["fresh 0.5"]
    configured = by_variant["first, fresh 0.5"].curve
    assert probed == configured
    assert probed != by_variant["first"].curve  # the probe evaluated otherwise
    assert "fresh 0.5" in by_variant["hbn"].probes
    assert by_variant["hbn-authors"].probes == {}  # probes are of hbn's runs only


def test_the_study_resumes_and_its_report_pairs_variants_and_probes(tiny_study, tmp_path):
    out, results = tiny_study
    again = []
    assert run_profile(TINY_STUDY, out, workers=1, on_done=lambda r, _: again.append(r)) == results
    assert again == []
    markdown, figure = tmp_path / "study.md", tmp_path / "study.png"
    write_report(TINY_STUDY, results, markdown, figure, command="hbn-fed repro")
    text = markdown.read_text()
    assert "## Study of the statistics' warm-up and evaluation (held-out seeds)" in text
    assert "| first (`statistics.warmup=first`) | vs `hbn-authors` |" in text
    assert "| first, evaluated with `eval.statistics=fresh`, `eval.fresh_weight=0.5` |" in text
    assert "## Accuracy" not in text  # no grid in a study profile
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_a_stored_run_of_another_configuration_is_refused(tiny_study, tmp_path):
    _, results = tiny_study
    copy = tmp_path / "copy"
    export_runs(results.study, tmp_path / "runs.jsonl")
    import_runs(tmp_path / "runs.jsonl", copy)
    changed = dataclasses.replace(TINY_STUDY, lr_decay=0.5)  # every run's train.lr_decay
    with pytest.raises(StaleRunError, match=r"train\.lr_decay = 1\.0, now 0\.5; move it away"):
        run_profile(changed, copy, workers=0)
    # An option the stored configuration lacks counts as its default: still the same run.
    path = copy / "runs" / f"{results.study[0].run.run_id}.json"
    document = json.loads(path.read_text())
    del document["config"]["statistics"]["warmup"]
    path.write_text(json.dumps(document))
    reused = run_profile(TINY_STUDY, copy, workers=0).study
    assert [(r.run, r.curve) for r in reused] == [(r.run, r.curve) for r in results.study]
    # ... but not where the run sets it otherwise.
    first = next(r for r in results.study if r.run.variant == "first")
    path = copy / "runs" / f"{first.run.run_id}.json"
    document = json.loads(path.read_text())
    del document["config"]["statistics"]["warmup"]
    path.write_text(json.dumps(document))
    with pytest.raises(StaleRunError, match=r"statistics\.warmup = None, now 'first'"):
        run_profile(TINY_STUDY, copy, workers=0)


def test_the_long_profile_is_the_issues_protocol_with_the_grids_tuned_lrs():
    long = PROFILES["long"]
    assert set(long.methods) >= {"hbn", "hbn-authors", "bn", "fixbn"}
    assert long.rounds >= 150
    assert len(long.seeds) == 3
    assert (long.data, long.num_clients, long.fraction) == ("fashion-mnist", 100, 0.1)
    assert set(long.settings) == {Setting("dirichlet", 0.6, 4), Setting("dirichlet", 0.1, 4)}
    stored = [
        json.loads(line) for line in (ROOT / "docs/results-runs.jsonl").read_text().splitlines()
    ]
    tuning = [RunResult.from_json(d) for d in stored if d["run"]["phase"] == "tune"]
    grid_lrs = tuned_lrs(tuning)
    assert long.lrs == {(m, 4): grid_lrs[m, 4] for m in long.methods}
    runs = plan(long, long.lrs)
    assert len(runs) == long.run_count == 24
    # Its runs never take the ids of the 20-round grid's, so both share a store.
    full = PROFILES["full"]
    grid_ids = {r.run_id for r in plan(full, tuned_lrs(tuning))}
    assert not grid_ids & {r.run_id for r in runs}
    config = runs[0].config(long)
    assert (config.train.lr_decay, config.eval.every, config.eval.final_rounds) == (0.998, 10, 10)


def test_the_long_profile_resumes_where_it_stopped_and_reports_the_gap(tmp_path):
    out = tmp_path / "long"
    first = run_profile(TINY_LONG, out, workers=1)
    assert len(first.grid) == TINY_LONG.grid_size == 2
    # Interrupted before its last run ended: that run's file is missing.
    missing = first.grid[-1].run
    (out / "runs" / f"{missing.run_id}.json").unlink()
    finished = []
    results = run_profile(TINY_LONG, out, workers=1, on_done=lambda r, _: finished.append(r))
    assert finished == [missing]  # the stored run is not rerun
    assert [(r.run, r.curve) for r in results.grid] == [(r.run, r.curve) for r in first.grid]
    assert all(r.run.run_id.startswith("long-") for r in results.grid)
    # The same ids with another horizon are other runs: refused, never reused.
    with pytest.raises(StaleRunError, match="holds another run than long-"):
        run_profile(dataclasses.replace(TINY_LONG, rounds=5), out, workers=0)
    assert not results.tuning  # fixed lrs: no tuning
    for result in results.grid:
        assert result.config["train"]["lr_decay"] == 0.9
        assert [r for r, _ in result.curve] == [1, 2, 3, 4, 5, 6]  # each of the last 10
    markdown, figure = tmp_path / "long.md", tmp_path / "long.png"
    write_report(TINY_LONG, results, markdown, figure, command="hbn-fed repro --profile long")
    text = markdown.read_text()
    assert "lr x 0.9 per round" in text
    gap = text.split("## The gap over rounds")[1]
    assert "| `hbn` - `bn` | " in gap
    assert "Fixed: the `full` profile's tuned lrs" in text
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_the_command_line_refuses_a_stale_run_in_one_line(quick_results, tmp_path, capsys):
    from federation import cli

    _, results, _ = quick_results
    stale = results.grid[0].to_json()
    stale["config"]["train"]["lr"] = 0.123
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / f"{results.grid[0].run.run_id}.json").write_text(json.dumps(stale))
    for stored in results.tuning:  # the lrs the grid is planned with
        (tmp_path / "runs" / f"{stored.run.run_id}.json").write_text(json.dumps(stored.to_json()))
    argv = ["repro", "--profile", "quick", "--out", str(tmp_path), "--workers", "0", "--quiet"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert captured.out.startswith("cannot start:")
    assert "train.lr = 0.123, now" in captured.out
    assert "move it away to rerun it" in " ".join(captured.out.split())
