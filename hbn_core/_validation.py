"""Checks of static properties (dtype, shape, axis) at the public boundary of the core.

Each check raises with a message that names the argument, says what was expected and echoes
what was received.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hbn_core._typing import Array, ArrayNamespace

__all__ = [
    "ChannelAxisError",
    "check_eps",
    "check_floating",
    "check_ndim",
    "check_per_channel",
    "check_same_dtype",
    "normalize_channel_axis",
]


class ChannelAxisError(ValueError, IndexError):
    """``channel_axis`` is out of range for the input's rank.

    It subclasses both :class:`ValueError` and :class:`IndexError`, as NumPy's ``AxisError`` does.
    """


def check_floating(name: str, x: Array, xp: ArrayNamespace) -> None:
    """Raise :class:`TypeError` unless ``x`` has a real floating dtype."""
    if not xp.isdtype(x.dtype, "real floating"):
        msg = f"`{name}` must have a real floating dtype; got dtype {x.dtype}."
        raise TypeError(msg)


def check_ndim(name: str, x: Array, minimum: int) -> None:
    """Raise :class:`ValueError` unless ``x`` has at least ``minimum`` dimensions."""
    if x.ndim < minimum:
        msg = (
            f"`{name}` must have at least {minimum} dimension(s) (a batch axis and a channel "
            f"axis); got shape {tuple(x.shape)}."
        )
        raise ValueError(msg)


def normalize_channel_axis(channel_axis: int, ndim: int) -> int:
    """Return ``channel_axis`` as a non-negative axis index of an array of rank ``ndim``."""
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, numbers.Integral):
        msg = f"`channel_axis` must be an int; got {type(channel_axis).__name__} {channel_axis!r}."
        raise TypeError(msg)
    if not -ndim <= channel_axis < ndim:
        msg = (
            f"`channel_axis` must lie in [{-ndim}, {ndim - 1}] for an input of rank {ndim}; "
            f"got {channel_axis}."
        )
        raise ChannelAxisError(msg)
    return int(channel_axis) % ndim


def check_per_channel(name: str, v: Array, num_channels: int, channel_axis: int) -> None:
    """Raise :class:`ValueError` unless ``v`` has shape ``(num_channels,)``."""
    if tuple(v.shape) != (num_channels,):
        msg = (
            f"`{name}` must have shape ({num_channels},) to match x.shape[{channel_axis}] "
            f"(the channel axis); got shape {tuple(v.shape)}."
        )
        raise ValueError(msg)


def check_same_dtype(names: tuple[str, ...], arrays: tuple[Array, ...]) -> None:
    """Raise :class:`TypeError` unless all ``arrays`` share the dtype of the first."""
    for name, array in zip(names[1:], arrays[1:], strict=True):
        if array.dtype != arrays[0].dtype:
            msg = (
                f"`{name}` must have the dtype of `{names[0]}` ({arrays[0].dtype}), because the "
                f"learnable parameters share one dtype; got dtype {array.dtype}."
            )
            raise TypeError(msg)


def check_eps(eps: float) -> float:
    """Return ``eps`` as a float after checking that it is a finite, non-negative real number."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        msg = f"`eps` must be a real number; got {type(eps).__name__} {eps!r}."
        raise TypeError(msg)
    if not (math.isfinite(eps) and eps >= 0):
        msg = f"`eps` must be finite and >= 0; got {eps!r}."
        raise ValueError(msg)
    return float(eps)
