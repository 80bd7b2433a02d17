"""What a new ClientApp process on a torch SuperNode pays before it computes anything.

A Flower deployment (``--isolation subprocess``) starts a new ClientApp process for every
message. Each imports Flower's client side, loads the app module (``federation.flower.app``),
loads the data set, imports the framework and builds the model. This script times each phase in
fresh processes and prints the median of ``--runs`` of them (``docs/flower.md``, Costs).

    python benchmarks/clientapp_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PHASES = ("flower", "hbn app module", "digits", "torch", "model")

ONE_PROCESS = """
import json, time
marks = [time.perf_counter()]
import flwr.app, flwr.clientapp
marks.append(time.perf_counter())
import federation.flower.app
marks.append(time.perf_counter())
from federation.data import load_dataset
data = load_dataset("digits")
marks.append(time.perf_counter())
import torch
marks.append(time.perf_counter())
from federation.config import parse_config
from federation.models import build_model
spec = parse_config({"model": {"architecture": "mlp"}}).model_spec(
    data.input_shape, data.num_classes
)
build_model("torch", spec, seed=0)
marks.append(time.perf_counter())
print(json.dumps([b - a for a, b in zip(marks, marks[1:])]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes to time")
    runs = parser.parse_args().runs
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    timings = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", ONE_PROCESS],
                env=environment,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for _ in range(runs)
    ]
    medians = [statistics.median(run[i] for run in timings) for i in range(len(PHASES))]
    totals = statistics.median(sum(run) for run in timings)
    print(f"median of {runs} fresh processes (seconds)")
    for phase, seconds in zip(PHASES, medians, strict=True):
        print(f"  {phase:<15} {seconds:6.2f}")
    print(f"  {'in all':<15} {totals:6.2f}")


if __name__ == "__main__":
    main()
