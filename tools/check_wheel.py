"""Check an installed ``hbn`` wheel from outside the source tree (``nox -s package`` runs it).

    python check_wheel.py SOURCE_TREE WORK_DIR

Run by the interpreter of a fresh environment that holds the wheel (not an editable install),
with the working directory outside ``SOURCE_TREE``. It checks that

1. ``hbn_core``, ``backends`` and ``federation`` import, from that environment, not the tree;
2. the wheel holds the C++ source of HBN's operator, which builds and loads
   (``backends.torch.compiled_kernel_available()``), and a ``HybridBatchNorm2d`` trains
   through it: the profiler records ``hbn::hybrid_batch_norm``, the output equals
   :func:`hbn_core.hbn_forward` in float64 NumPy, and an SGD step lowers the loss;
3. ``hbn-fed --version`` names the installed version, and ``hbn-fed demo --set rounds=2``
   completes, writes ``results.json`` with two rounds, and prints no framework log lines.

Each failed check raises; the exit status is then non-zero.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import json
import pathlib
import re
import subprocess
import sys
import time

PACKAGES = ("hbn_core", "backends", "federation")
# Log lines of the frameworks' native code that the command must keep off the screen.
FRAMEWORK_NOISE = re.compile(r"oneDNN|absl::|TF_ENABLE_ONEDNN_OPTS|cpu_feature_guard|^[IW]\d{4} ")


def check_imports(source: pathlib.Path) -> None:
    """The three packages import from the environment, not from the source tree."""
    for name in PACKAGES:
        module = importlib.import_module(name)
        location = pathlib.Path(module.__file__ or "").resolve()
        if location.is_relative_to(source):
            msg = f"{name} was imported from the source tree ({location}), not the wheel"
            raise AssertionError(msg)
        print(f"{name}: {location.parent}")


def check_compiled_layer() -> None:
    """A HybridBatchNorm2d trains through the C++ operator built from the wheel's source."""
    import numpy as np
    import torch

    import hbn_core
    from backends import torch as hbn_torch

    source = importlib.resources.files("backends").joinpath("csrc", "hybrid_batch_norm.cpp")
    if not source.is_file():
        msg = "the wheel lacks backends/csrc/hybrid_batch_norm.cpp"
        raise AssertionError(msg)
    started = time.perf_counter()
    if not hbn_torch.compiled_kernel_available():
        msg = "HBN's C++ operator did not build from the wheel's source"
        raise AssertionError(msg)
    print(f"HBN's C++ operator built from {source} in {time.perf_counter() - started:.0f} s")

    torch.manual_seed(0)
    layer = hbn_torch.HybridBatchNorm2d(3, dtype=torch.float64).train()
    with torch.no_grad():
        layer.global_mean.copy_(torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64))
        layer.global_var.copy_(torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64))
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    target = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)

    def loss_value() -> torch.Tensor:
        return ((layer(x) - target) ** 2).mean()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        before = loss_value()
        before.backward()
    operators = {event.name for event in profile.events()}
    if "hbn::hybrid_batch_norm" not in operators:
        msg = f"the layer did not train through hbn::hybrid_batch_norm; ran {sorted(operators)}"
        raise AssertionError(msg)

    expected, _ = hbn_core.hbn_forward(
        x.numpy(),
        layer.weight.detach().numpy(),
        layer.bias.detach().numpy(),
        layer.alpha.detach().numpy(),
        layer.global_mean.numpy(),
        layer.global_var.numpy(),
    )
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    optimizer.step()
    after = loss_value()
    if not after < before:
        msg = f"an SGD step did not lower the loss ({before.item()} -> {after.item()})"
        raise AssertionError(msg)
    print(f"HybridBatchNorm2d trained through hbn::hybrid_batch_norm: {before:.4f} -> {after:.4f}")


def check_command(work: pathlib.Path) -> None:
    """``hbn-fed --version`` and a two-round ``hbn-fed demo``, through the entry point."""
    command = pathlib.Path(sys.executable).with_name("hbn-fed")
    version = subprocess.run(
        [command, "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if version != f"hbn-fed {importlib.metadata.version('hbn')}":
        msg = f"hbn-fed --version printed {version!r}"
        raise AssertionError(msg)
    out = work / "demo"
    demo = subprocess.run(
        [command, "demo", "--set", "rounds=2", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=1200,
    )
    printed = demo.stdout + demo.stderr
    print(printed)
    if demo.returncode != 0:
        msg = f"hbn-fed demo exited with {demo.returncode}"
        raise AssertionError(msg)
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    if [r["round"] for r in rounds] != [1, 2]:
        msg = f"results.json holds rounds {[r['round'] for r in rounds]}, not [1, 2]"
        raise AssertionError(msg)
    noise = [line for line in printed.splitlines() if FRAMEWORK_NOISE.search(line)]
    if noise:
        msg = f"hbn-fed demo printed framework log lines: {noise}"
        raise AssertionError(msg)


def main() -> None:
    """Run every check; ``sys.argv`` holds the source tree and a work folder."""
    source, work = (pathlib.Path(arg).resolve() for arg in sys.argv[1:3])
    if pathlib.Path.cwd().resolve().is_relative_to(source):
        msg = f"run this from outside the source tree ({source})"
        raise SystemExit(msg)
    check_imports(source)
    check_compiled_layer()
    check_command(work)
    print("the installed wheel passed every check")


if __name__ == "__main__":
    main()
