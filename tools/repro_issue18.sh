#!/usr/bin/env bash
# Issue 18's experiments, one command per phase, resumable, with ONE worker process.
#
#   tools/repro_issue18.sh study   # held-out seeds 100-102: warm-ups, fresh-evaluation probes
#   tools/repro_issue18.sh full    # the 20-round grid and its candidates (add the study's
#                                  # winners to HBN_CANDIDATES in federation/repro/plan.py first)
#   tools/repro_issue18.sh long    # hbn, hbn-authors, bn, fixbn over 250 rounds
#
# Runs are stored as they finish in $HBN_REPRO_STORE (default /work/runs/repro, outside any
# worktree), so a killed phase resumes where it stopped; the same command resumes it. Each
# phase first imports the runs committed in docs/ (so a fresh store starts from them), then
# runs what is missing, then writes its report (docs/results*.md and .png) and exports its runs
# (docs/results*-runs.jsonl) for committing. HBN_REPRO_WORKERS=0 only rewrites the report and
# the export from the stored runs. Run it from the repository root.
set -euo pipefail
phase=${1:?usage: tools/repro_issue18.sh study|full|long}
store=${HBN_REPRO_STORE:-/work/runs/repro}
workers=${HBN_REPRO_WORKERS:-1}
python=${HBN_PYTHON:-/work/venv/bin/python}
case "$phase" in
    study) report=docs/results-study.md; runs=docs/results-study-runs.jsonl ;;
    full) report=docs/results.md; runs=docs/results-runs.jsonl ;;
    long) report=docs/results-long.md; runs=docs/results-long-runs.jsonl ;;
    *) echo "usage: tools/repro_issue18.sh study|full|long; got $phase" >&2; exit 2 ;;
esac
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$store/.torch_ext}
repro() { "$python" -m federation repro --profile "$phase" --out "$store" "$@"; }
for committed in docs/results-runs.jsonl "$runs"; do
    if [[ -f $committed ]]; then
        repro --workers 0 --import-runs "$committed" --quiet
    fi
done
repro --workers "$workers" --report "$report" --export-runs "$runs" --quiet
