"""Independent float64 NumPy references for HBN, written from the paper's equations."""

from __future__ import annotations

import numpy as np


def sigmoid(a: np.ndarray) -> np.ndarray:
    """The logistic function; exact 0 and 1 at -inf and +inf."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-a))


def _layout(x: np.ndarray, channel_axis: int) -> tuple[tuple[int, ...], list[int]]:
    axis = channel_axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return tuple(i for i in range(x.ndim) if i != axis), shape


def hbn_forward(
    x, scale, offset, alpha, global_mean, global_var, *, channel_axis: int, eps: float
) -> np.ndarray:
    """Y = scale * (x - mu) / sqrt(var + eps) + offset with hybrid mu and var (float64)."""
    axes, shape = _layout(x, channel_axis)
    x = np.asarray(x, np.float64)
    w = sigmoid(np.asarray(alpha, np.float64))
    mu = (1 - w) * x.mean(axis=axes) + w * global_mean
    var = (1 - w) * x.var(axis=axes) + w * global_var
    normalized = (x - mu.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return np.reshape(scale, shape) * normalized + np.reshape(offset, shape)


def inference(x, scale, offset, global_mean, global_var, *, channel_axis: int, eps: float):
    """Y = scale * (x - global_mean) / sqrt(global_var + eps) + offset (float64)."""
    _, shape = _layout(x, channel_axis)
    normalized = (np.asarray(x, np.float64) - np.reshape(global_mean, shape)) / np.sqrt(
        np.reshape(global_var, shape) + eps
    )
    return np.reshape(scale, shape) * normalized + np.reshape(offset, shape)


def batch_norm(x, scale, offset, *, channel_axis: int, eps: float) -> np.ndarray:
    """Plain batch normalisation with the biased batch variance (float64)."""
    axes, shape = _layout(x, channel_axis)
    x = np.asarray(x, np.float64)
    normalized = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(
        x.var(axis=axes, keepdims=True) + eps
    )
    return np.reshape(scale, shape) * normalized + np.reshape(offset, shape)


def directional_derivative(f, point: np.ndarray, direction: np.ndarray, h: float = 1e-5) -> float:
    """d/dt f(point + t*direction) at t=0, by the fourth-order central difference."""

    def at(t: float) -> float:
        return float(f(point + t * direction))

    return (8 * (at(h) - at(-h)) - (at(2 * h) - at(-2 * h))) / (12 * h)
