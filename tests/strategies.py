"""Hypothesis strategies: layer inputs and chunked data as float64 NumPy arrays."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


class LayerInputs(NamedTuple):
    x: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    alpha: np.ndarray
    global_mean: np.ndarray
    global_var: np.ndarray
    channel_axis: int
    eps: float


def floats(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def shapes_and_axis(draw: st.DrawFn, *, max_channels: int = 5) -> tuple[tuple[int, ...], int]:
    """A 2-D to 4-D shape with a channel axis (1 or -1), at least one element per channel."""
    ndim = draw(st.integers(2, 4))
    channel_axis = draw(st.sampled_from([1, -1]))
    shape = [draw(st.integers(1, 6))] + [draw(st.integers(1, 4)) for _ in range(ndim - 1)]
    shape[channel_axis] = draw(st.integers(1, max_channels))
    return tuple(shape), channel_axis


@st.composite
def layer_inputs(
    draw: st.DrawFn, *, eps_values: tuple[float, ...] = (0.0, 1e-5, 1e-3, 0.1)
) -> LayerInputs:
    """Inputs of one HBN call; global_var + eps stays positive."""
    shape, channel_axis = draw(shapes_and_axis())
    channels = shape[channel_axis]

    def per_channel(low: float, high: float) -> np.ndarray:
        return draw(hnp.arrays(np.float64, (channels,), elements=floats(low, high)))

    return LayerInputs(
        x=draw(hnp.arrays(np.float64, shape, elements=floats(-100, 100))),
        scale=per_channel(-3, 3),
        offset=per_channel(-3, 3),
        alpha=per_channel(-6, 6),
        global_mean=per_channel(-5, 5),
        global_var=per_channel(0.05, 10),
        channel_axis=channel_axis,
        eps=draw(st.sampled_from(eps_values)),
    )


@st.composite
def chunks(
    draw: st.DrawFn, *, min_size: int = 2, max_size: int = 5, offset: float = 0.0
) -> list[np.ndarray]:
    """Arrays ``(n_i, C)`` of one channel count, some possibly empty, shifted by ``offset``."""
    channels = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(0, 7), min_size=min_size, max_size=max_size))
    return [
        offset + draw(hnp.arrays(np.float64, (n, channels), elements=floats(-1e3, 1e3)))
        for n in sizes
    ]


@st.composite
def axis_layer_cases(draw: st.DrawFn, *, offset_key: str = "offset") -> dict[str, Any]:
    """Float64 weights and a 2-D to 4-D input with its channel axis, -1 or 1, as a dict.

    ``offset_key`` names the offset as the framework under test does (Flax: ``"bias"``).
    """
    ndim = draw(st.integers(2, 4))
    axis = draw(st.sampled_from([-1, 1]))
    shape = [draw(st.integers(1, 5)) for _ in range(ndim)]
    channels = shape[axis] = draw(st.integers(1, 4))

    def vector(low: float, high: float) -> np.ndarray:
        return draw(hnp.arrays(np.float64, (channels,), elements=floats(low, high)))

    return {
        "x": draw(hnp.arrays(np.float64, tuple(shape), elements=floats(-20, 20))),
        "axis": axis,
        "scale": vector(-2, 2),
        offset_key: vector(-2, 2),
        "alpha": vector(-4, 4),
        "global_mean": vector(-3, 3),
        "global_var": vector(0.1, 5),
        "dy": draw(hnp.arrays(np.float64, tuple(shape), elements=floats(-1, 1))),
    }
