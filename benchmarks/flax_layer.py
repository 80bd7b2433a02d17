"""Benchmark backends.flax.HybridBatchNorm against nnx.BatchNorm under jit.

Forward+backward (the gradients of the input and of every parameter) of one layer, in training
mode, compiled with ``nnx.jit``, float32 on CPU, channels-last; interleaved medians after
warm-up, in one process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx
from timing import WARMUP, median_ms

from backends.flax import HybridBatchNorm

if TYPE_CHECKING:
    from collections.abc import Callable

SHAPES = [(32, 32, 32, 64), (4, 32, 32, 64), (256, 128)]


def training_step(layer: nnx.Module, x: jax.Array, dy: jax.Array) -> Callable[[], object]:
    """A compiled forward+backward of ``layer`` on ``x``, blocking until the result is ready."""

    @nnx.jit
    def step(layer: nnx.Module, x: jax.Array) -> object:
        def loss(layer: nnx.Module, x: jax.Array) -> jax.Array:
            return jnp.sum(layer(x) * dy)

        return nnx.grad(loss, argnums=(0, 1))(layer, x)

    return lambda: jax.block_until_ready(step(layer, x))


def time_layers(repeats: int) -> list[dict]:
    """Median milliseconds of each layer at each shape."""
    rows = []
    for shape in SHAPES:
        keys = jax.random.split(jax.random.key(0))
        x = jax.random.normal(keys[0], shape, jnp.float32)
        dy = jax.random.normal(keys[1], shape, jnp.float32)
        layers = {
            "batchnorm": nnx.BatchNorm(shape[-1], rngs=nnx.Rngs(0)),
            "hbn": HybridBatchNorm(shape[-1], rngs=nnx.Rngs(0)),
        }
        steps = {name: training_step(layer, x, dy) for name, layer in layers.items()}
        rows.append({"shape": shape, **median_ms(steps, repeats)})
    return rows


def run(repeats: int) -> list[str]:
    """Measure and return the markdown section of docs/benchmarks.md."""
    rows = time_layers(repeats)
    lines = [
        "## backends.flax: HybridBatchNorm against nnx.BatchNorm under jit",
        "",
        f"Forward+backward under `nnx.jit`, training mode, float32 CPU, channels-last, median of "
        f"{repeats} interleaved repeats after {WARMUP} warm-up runs, in one process (jax "
        f"{jax.__version__}).",
        "",
        "| shape | nnx.BatchNorm (ms) | HybridBatchNorm (ms) | ratio |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row["hbn"] / row["batchnorm"]
        print(row["shape"], round(ratio, 2))
        lines.append(
            f"| {row['shape']} | {row['batchnorm']:.3f} | {row['hbn']:.3f} | {ratio:.2f} |"
        )
    return [*lines, ""]


if __name__ == "__main__":
    print("\n".join(run(repeats=30)))
