"""``hbn-fed demo``: the README's main command, end to end, with torch, JAX and Keras clients."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cross


def test_the_demo_trains_one_model_with_three_frameworks(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "federation", "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, results["config"]["rounds"] + 1))
    frameworks = {c["framework"] for c in results["clients"]}
    assert frameworks == {"torch", "jax", "keras"}
    assert all(len(r["trained_clients"]) == 10 and not r["faults"] for r in rounds)
    chance = 1 / 10
    assert rounds[-1]["accuracy"] > 5 * chance
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert "HBN federation" in completed.stdout
