"""Benchmark the core's HBN forward+backward against batch normalisation done another way.

For each library and shape, the baseline is measured in the same run:

- NumPy: the core against a plain NumPy batch-norm forward+backward (textbook formulas);
- PyTorch: the core over torch tensors against ``torch.nn.functional.batch_norm`` with autograd.

Reported figures are medians over repeats, and the ratio is core / baseline (lower is better).
Usage: ``python benchmarks/run.py --output docs/benchmarks.md`` (``nox -s bench``); it also
runs the layer benchmarks (``benchmarks/torch_layer.py``, ``benchmarks/flax_layer.py``,
``benchmarks/keras_layer.py``), the federation's own overhead per round
(``benchmarks/federation_overhead.py``) and the embedded simulation against Flower's
(``benchmarks/flower_overhead.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
from typing import TYPE_CHECKING

import federation_overhead
import flax_layer
import flower_overhead
import keras_layer
import numpy as np
import torch
import torch_layer
from timing import WARMUP, median_ms

from hbn_core import hbn_backward, hbn_forward

if TYPE_CHECKING:
    from collections.abc import Callable

SHAPES = [(32, 64, 32, 32), (4, 64, 32, 32), (256, 128)]  # channels-first (N, C, ...)


def numpy_batch_norm_step(x: np.ndarray, scale: np.ndarray, dy: np.ndarray) -> Callable[[], object]:
    axes = tuple(i for i in range(x.ndim) if i != 1)
    shape = [1] * x.ndim
    shape[1] = -1
    n = x.size // x.shape[1]

    def step() -> object:
        mean = x.mean(axis=axes, keepdims=True)
        inv_std = 1 / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
        x_hat = (x - mean) * inv_std
        _ = scale.reshape(shape) * x_hat
        doffset = dy.sum(axis=axes, keepdims=True)
        dscale = (dy * x_hat).sum(axis=axes, keepdims=True)
        g = dy * scale.reshape(shape)
        s1, s2 = scale.reshape(shape) * doffset, scale.reshape(shape) * dscale
        return inv_std * (g - (s1 + x_hat * s2) / n)

    return step


def core_step(args: list, dy: object) -> Callable[[], object]:
    def step() -> object:
        _, residuals = hbn_forward(*args)
        return hbn_backward(dy, residuals)

    return step


def bench_numpy(shape: tuple[int, ...], repeats: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    c = shape[1]
    args = [x, *(np.full(c, v, np.float32) for v in (1.0, 0.0, 0.0, 0.0, 1.0))]
    steps = {"core": core_step(args, dy), "baseline": numpy_batch_norm_step(x, args[1], dy)}
    times = median_ms(steps, repeats)
    return times["core"], times["baseline"]


def bench_torch(shape: tuple[int, ...], repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    x = torch.randn(shape)
    dy = torch.randn(shape)
    c = shape[1]
    args = [x, *(torch.full((c,), v) for v in (1.0, 0.0, 0.0, 0.0, 1.0))]
    weight = torch.ones(c, requires_grad=True)
    bias = torch.zeros(c, requires_grad=True)
    leaf = x.clone().requires_grad_(True)

    def native() -> object:
        y = torch.nn.functional.batch_norm(leaf, None, None, weight, bias, training=True, eps=1e-5)
        return torch.autograd.grad(y, (leaf, weight, bias), dy)

    core = torch.no_grad()(core_step(args, dy))
    times = median_ms({"core": core, "baseline": native}, repeats)
    return times["core"], times["baseline"]


def cpu_name() -> str:
    """The CPU model as Linux reports it, else what the platform module knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def format_row(core: float, baseline: float) -> str:
    return f"core {core:8.2f} ms  baseline {baseline:8.2f} ms  ratio {core / baseline:5.2f}"


def allocator_note() -> str:
    """How glibc's malloc was set for this run (``nox -s bench`` sets it; see the noxfile)."""
    settings = [
        f"`{name}={os.environ[name]}`"
        for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
        if name in os.environ
    ]
    if not settings:
        return (
            "glibc's malloc ran with its defaults: full-size temporaries may land on fresh pages, "
            "which made large-shape times vary twofold between runs."
        )
    return (
        f"glibc's malloc kept freed memory ({', '.join(settings)}), so that full-size "
        "temporaries reuse warm pages, as in a training loop's steady state."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/benchmarks.md")
    parser.add_argument("--repeats", type=int, default=30)
    options = parser.parse_args()

    rows = []
    for library, bench in (("numpy", bench_numpy), ("torch", bench_torch)):
        for shape in SHAPES:
            core, baseline = bench(shape, options.repeats)
            rows.append((library, shape, core, baseline))
            print(f"{library:6s} {shape!s:18s} {format_row(core, baseline)}")

    lines = [
        "# Benchmarks",
        "",
        "Written by `nox -s bench` (`python benchmarks/run.py --output docs/benchmarks.md`). "
        f"Machine: {platform.machine()}, {cpu_name()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, run "
        f"{datetime.date.today().isoformat()}.",
        "",
        "## hbn_core: HBN forward+backward against batch normalisation",
        "",
        f"float32 on CPU, channels-first, median of {options.repeats} interleaved repeats after "
        f"{WARMUP} "
        "warm-up runs. The baseline runs in the same process: a plain NumPy batch-norm "
        "forward+backward for NumPy, and "
        "`torch.nn.functional.batch_norm` with autograd for PyTorch. The core runs eagerly (no "
        "compilation); its extra work against BN is the hybrid statistics and the alpha gradient. "
        f"{allocator_note()} Absolute times vary from run to run on a shared machine; compare "
        "ratios within one run.",
        "",
        "| library | shape | core (ms) | baseline (ms) | ratio core / baseline |",
        "|---|---|---:|---:|---:|",
        *(
            f"| {library} | {shape} | {core:.2f} | {baseline:.2f} | {core / baseline:.2f} |"
            for library, shape, core, baseline in rows
        ),
        "",
        *torch_layer.run(options.repeats),
        *flax_layer.run(options.repeats),
        *keras_layer.run(options.repeats),
        *federation_overhead.section(),
        *flower_overhead.section(),
    ]
    with open(options.output, "w") as handle:
        handle.write("\n".join(lines))


if __name__ == "__main__":
    main()
