"""Benchmark backends.keras.HybridBatchNormalization against keras.layers.BatchNormalization.

Forward+backward (the gradients of the input and of every trainable weight) of one layer, in
training mode, inside a ``tf.function`` (with and without XLA), float32 on CPU, channels-last,
on Keras' TensorFlow backend; interleaved medians after warm-up, in one process.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # before Keras is imported: the TensorFlow backend

from typing import TYPE_CHECKING

import keras
import tensorflow as tf
from timing import WARMUP, median_ms

from backends.keras import HybridBatchNormalization

if TYPE_CHECKING:
    from collections.abc import Callable

SHAPES = [(32, 32, 32, 64), (4, 32, 32, 64), (256, 128)]
COMPILERS = {"tf.function": False, "tf.function + XLA": True}


def training_step(
    layer: keras.layers.Layer, x: tf.Tensor, dy: tf.Tensor, *, jit_compile: bool
) -> Callable[[], object]:
    """A compiled forward+backward of ``layer`` on ``x``; the result is ready when it returns."""

    @tf.function(jit_compile=jit_compile)
    def step(x: tf.Tensor) -> object:
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * dy)
        return tape.gradient(loss, [x, *layer.trainable_weights])

    return lambda: [g.numpy() for g in step(x)]


def time_layers(repeats: int) -> list[dict]:
    """Median milliseconds of each layer at each shape, under each compiler."""
    rows = []
    for shape in SHAPES:
        x = tf.random.stateless_normal(shape, seed=(0, 0))
        dy = tf.random.stateless_normal(shape, seed=(0, 1))
        for compiler, jit_compile in COMPILERS.items():
            layers = {
                "batchnorm": keras.layers.BatchNormalization(),
                "hbn": HybridBatchNormalization(),
            }
            steps = {
                name: training_step(layer, x, dy, jit_compile=jit_compile)
                for name, layer in layers.items()
            }
            rows.append({"shape": shape, "compiler": compiler, **median_ms(steps, repeats)})
    return rows


def run(repeats: int) -> list[str]:
    """Measure and return the markdown section of docs/benchmarks.md."""
    rows = time_layers(repeats)
    lines = [
        "## backends.keras: HybridBatchNormalization against keras.layers.BatchNormalization",
        "",
        f"Forward+backward (gradients of the input and of every trainable weight) inside a "
        f"`tf.function`, without and with XLA (`jit_compile=True`), training mode, float32 CPU, "
        f"channels-last, median of {repeats} interleaved repeats after {WARMUP} warm-up runs, in "
        f"one process (Keras {keras.__version__} on TensorFlow {tf.__version__}). "
        "BatchNormalization's step includes its moving-statistics update, as in `model.fit`; HBN "
        "has none. The target (ratio <= 1.3) is for `tf.function`, what `model.fit` compiles on a "
        "CPU-only machine (there Keras' default `jit_compile` is off); the XLA rows are for "
        "information.",
        "",
        "| shape | compiled with | BatchNormalization (ms) | HybridBatchNormalization (ms) "
        "| ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row["hbn"] / row["batchnorm"]
        print(row["shape"], row["compiler"], round(ratio, 2))
        lines.append(
            f"| {row['shape']} | {row['compiler']} | {row['batchnorm']:.3f} | {row['hbn']:.3f} "
            f"| {ratio:.2f} |"
        )
    return [*lines, ""]


if __name__ == "__main__":
    print("\n".join(run(repeats=30)))
