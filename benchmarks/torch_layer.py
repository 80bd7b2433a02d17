"""Benchmark backends.torch.HybridBatchNorm against nn.BatchNorm and a plain autograd HBN.

Rows, all measured in one process: torch's ``nn.BatchNorm*d`` (the baseline), ``HybridBatchNorm*d``
as it trains by default (its fast path as one C++ operator), the same fast path as a Python
``torch.autograd.Function``, the layer calling hbn_core directly, an HBN written as a plain
autograd composition (the way the authors' layer is written), and the floor of any layer with a
Python custom gradient (a ``torch.autograd.Function`` that only copies its input). Time is
forward+backward, median over repeats after warm-up; a second table times a gradient-penalty step
(a double backward) of BatchNorm, HBN and the autograd HBN. Memory is the peak resident memory
that one training step of a small CNN adds, each variant in a fresh process, and the bytes
autograd saves for backward in that step. ``python benchmarks/torch_layer.py`` runs this file
alone and prints its section of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
from typing import TYPE_CHECKING

import torch
from timing import WARMUP, median_ms
from torch import nn

from backends.torch import HybridBatchNorm1d, HybridBatchNorm2d

if TYPE_CHECKING:
    from collections.abc import Callable

SHAPES = [(32, 64, 32, 32), (4, 64, 32, 32), (256, 128)]
VARIANTS = ["batchnorm", "hbn", "hbn-python", "hbn-core", "hbn-autograd"]
TIMED = [*VARIANTS, "function-floor"]


class AutogradHybridBatchNorm(nn.Module):
    """HBN as plain autograd ops: autograd differentiates through every statistic."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.alpha = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("global_mean", torch.zeros(num_features))
        self.register_buffer("global_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise with hybrid statistics; autograd records every op."""
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        w = torch.sigmoid(self.alpha)
        mean = (1 - w) * x.mean(dims) + w * self.global_mean
        var = (1 - w) * x.var(dims, unbiased=False) + w * self.global_var
        x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5)
        return self.weight.view(shape) * x_hat + self.bias.view(shape)


class _CopyWithCustomGradient(torch.autograd.Function):
    """Copies its input and passes the gradient through: a Python custom gradient, no math."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
        """Nothing to save."""

    @staticmethod
    def backward(ctx: object, dy: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - torch's signature
        return dy


class FunctionFloor(nn.Module):
    """What any layer with a Python custom gradient pays before it does any math."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` through :class:`_CopyWithCustomGradient`."""
        return _CopyWithCustomGradient.apply(x)


def make_norm(variant: str, num_features: int, ndim: int) -> nn.Module:
    """One normalisation layer of ``variant`` for inputs of rank ``ndim``."""
    if variant == "batchnorm":
        return nn.BatchNorm2d(num_features) if ndim == 4 else nn.BatchNorm1d(num_features)
    if variant == "hbn-autograd":
        return AutogradHybridBatchNorm(num_features)
    if variant == "function-floor":
        return FunctionFloor()
    layer = HybridBatchNorm2d(num_features) if ndim == 4 else HybridBatchNorm1d(num_features)
    layer.use_compiled_kernel = variant == "hbn"
    layer.use_fused_kernels = variant != "hbn-core"
    return layer


def training_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], object]:
    """One forward+backward of ``layer``: the gradients of ``x`` and of every parameter."""
    inputs = [x, *layer.parameters()]
    return lambda: torch.autograd.grad(layer(x), inputs, dy)


SECOND_ORDER = ["batchnorm", "hbn", "hbn-autograd"]


def gradient_penalty_step(
    layer: nn.Module, x: torch.Tensor, dy: torch.Tensor
) -> Callable[[], object]:
    """One step of a gradient penalty (WGAN-GP, input-gradient regularisers) through ``layer``.

    ``dL/dx`` with ``create_graph=True``, then the gradients of its squared norm with respect
    to ``x`` and every parameter: a double backward.
    """
    inputs = [x, *layer.parameters()]

    def step() -> object:
        (dx,) = torch.autograd.grad(layer(x), x, dy, create_graph=True)
        return torch.autograd.grad(dx.square().sum(), inputs, allow_unused=True)

    return step


def time_steps(
    make_step: Callable[[nn.Module, torch.Tensor, torch.Tensor], Callable[[], object]],
    variants: list[str],
    repeats: int,
) -> list[dict]:
    """Median time of ``make_step(layer, x, dy)`` for each variant's layer at each shape.

    All in one process; ``x`` and ``dy`` are drawn once per shape, the same for every variant.
    """
    rows = []
    for shape in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        steps = {
            variant: make_step(make_norm(variant, shape[1], len(shape)), x, dy)
            for variant in variants
        }
        rows.append({"shape": shape, **median_ms(steps, repeats)})
    return rows


def small_cnn(variant: str) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), make_norm(variant, 32, 4), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), make_norm(variant, 64, 4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), make_norm(variant, 64, 4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def memory_of_one_step(variant: str) -> dict:
    """Peak RSS added by one SGD step of the small CNN, and the bytes saved for backward."""
    torch.manual_seed(0)
    model = small_cnn(variant)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, labels = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    before = _current_rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = nn.functional.cross_entropy(model(x), labels)
    loss.backward()
    optimizer.step()
    return {"peak_added_bytes": _peak_rss_bytes() - before, "saved_bytes": sum(saved)}


def _peak_rss_bytes() -> int:
    """Peak resident memory of the current process (VmHWM), which a new program starts afresh.

    Not ``ru_maxrss``: Linux keeps it across ``exec``, so a child would inherit its parent's.
    """
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    msg = "/proc/self/status has no VmHWM line"
    raise RuntimeError(msg)


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def measure_memory(processes: int = 3) -> dict[str, dict]:
    """Run :func:`memory_of_one_step` for each variant in fresh processes, in turn; medians.

    Resident memory is noisy on a shared machine, so each variant runs ``processes`` times.
    """
    samples: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for _ in range(processes):
        for variant in VARIANTS:
            completed = subprocess.run(
                [sys.executable, __file__, "--memory", variant],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            samples[variant].append(json.loads(completed.stdout))
    return {
        variant: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
        for variant, runs in samples.items()
    }


def ratios_to_batchnorm(row: dict, variants: list[str]) -> dict[str, float]:
    """Each variant's time in ``row`` over BatchNorm's (``variants[0]``) in the same row."""
    return {variant: row[variant] / row["batchnorm"] for variant in variants[1:]}


def ratio_table(rows: list[dict], variants: list[str]) -> list[str]:
    """Markdown rows: per shape, BatchNorm's time, then each other variant's time and ratio."""
    lines = [
        "| shape | BatchNorm (ms) | "
        + " | ".join(f"{variant} (ms) | ratio" for variant in variants[1:])
        + " |",
        "|---|---:|" + "---:|---:|" * len(variants[1:]),
    ]
    for row in rows:
        ratios = ratios_to_batchnorm(row, variants)
        cells = [f"{row[v]:.3f} | {ratios[v]:.2f}" for v in variants[1:]]
        lines.append(f"| {row['shape']} | {row['batchnorm']:.3f} | " + " | ".join(cells) + " |")
    return lines


def markdown(
    rows: list[dict], second_order: list[dict], memory: dict[str, dict], repeats: int
) -> list[str]:
    """The section of docs/benchmarks.md for the torch layer."""
    lines = [
        "## backends.torch: HybridBatchNorm against nn.BatchNorm",
        "",
        f"Forward+backward, float32 CPU, median of {repeats} interleaved repeats after {WARMUP} "
        "warm-up runs, all in one process. Ratios are against `nn.BatchNorm2d` "
        "(`nn.BatchNorm1d` for (256, 128)) "
        "measured in the same run. `hbn` is the layer as it trains by default: its fast path "
        "(torch's fused batch-norm kernels fed with the core's statistics) as one C++ operator, "
        "`hbn::hybrid_batch_norm`; `hbn-python` is the same fast path as a Python "
        "`torch.autograd.Function` (`use_compiled_kernel = False`, and under `torch.compile` or "
        "`torch.func`); `hbn-core` is the layer with `use_fused_kernels = False`, calling "
        "hbn_core's forward and backward; `hbn-autograd` "
        "is HBN written as plain autograd ops, as the authors' layer is. `function-floor` is a "
        "layer whose custom `torch.autograd.Function` only copies its input and passes the "
        "gradient through: the least that any layer with a Python custom gradient costs.",
        "",
        *ratio_table(rows, TIMED),
    ]
    lines += [
        "",
        "Second order: one gradient-penalty step (`dL/dx` with `create_graph=True`, then the "
        "gradients of its squared norm for the input and every parameter), float32 CPU, same "
        "timing rule. `hbn` then takes its differentiable backward (hbn_core's forward and "
        "backward as torch ops, which autograd differentiates again) on every path.",
        "",
        *ratio_table(second_order, SECOND_ORDER),
    ]
    base = memory["batchnorm"]
    lines += [
        "",
        "One SGD step of a 3-conv CNN (64 images of 3x32x32), each variant in a fresh process, "
        "median of 3 processes: the peak resident memory the step adds, and the bytes autograd "
        "saves for backward.",
        "",
        "| variant | peak added (MiB) | ratio | saved for backward (MiB) | ratio |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {variant} | {m['peak_added_bytes'] / 2**20:.1f} | "
            f"{m['peak_added_bytes'] / base['peak_added_bytes']:.2f} | "
            f"{m['saved_bytes'] / 2**20:.1f} | {m['saved_bytes'] / base['saved_bytes']:.2f} |"
            for variant, m in memory.items()
        ),
        "",
    ]
    return lines


def run(repeats: int) -> list[str]:
    """Measure everything and return the markdown section."""
    rows = time_steps(training_step, TIMED, repeats)
    second_order = time_steps(gradient_penalty_step, SECOND_ORDER, repeats)
    for label, table, variants in [("", rows, TIMED), ("second order", second_order, SECOND_ORDER)]:
        for row in table:
            ratios = ratios_to_batchnorm(row, variants)
            print(row["shape"], label, {v: round(r, 2) for v, r in ratios.items()})
    memory = measure_memory()
    print(memory)
    return markdown(rows, second_order, memory, repeats)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        print(json.dumps(memory_of_one_step(sys.argv[2])))
    else:
        print("\n".join(run(repeats=30)))
