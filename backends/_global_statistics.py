"""Framework-neutral checks shared by the adapters' ``set_global_statistics``.

Pooled statistics arrive as :class:`hbn_core.Moments` keyed by layer name, from any library.
They are checked here, as float64 NumPy, before any layer changes, so that a corrupt or
mismatched report never half-updates a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import array_api_compat.numpy
import numpy as np

import hbn_core
from hbn_core import Moments

# array-api-compat >= 1.16 types its NumPy namespace with its own stubs, whose signatures mypy
# does not match structurally to hbn_core's protocol; at run time it provides every function.
numpy_xp = cast("ArrayNamespace", array_api_compat.numpy)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from hbn_core._typing import ArrayNamespace

__all__ = ["checked_global_statistics"]


def checked_global_statistics(
    statistics: Mapping[str, Moments],
    num_features: Mapping[str, int],
    *,
    to_numpy: Callable[[Any], np.ndarray] = np.asarray,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Check pooled moments against a model's HBN layers; return their global statistics.

    Parameters
    ----------
    statistics
        One :class:`hbn_core.Moments` per HBN layer, keyed by the layer's name.
    num_features
        The model's HBN layers: name to number of channels.
    to_numpy
        How to read one array of the moments as NumPy (tensors on a GPU need a copy to host).

    Returns
    -------
    dict[str, tuple[numpy.ndarray, numpy.ndarray]]
        Each layer's float64 ``(global_mean, global_var)``, ``global_var`` being the population
        (biased) variance ``m2 / count`` that HBN normalises with.

    Raises
    ------
    ValueError
        If the names do not match the layers exactly, or a layer's moments have the wrong
        shapes, a count that is not positive, or values that are not finite (or a negative
        variance). The message names the layer.
    """
    if set(statistics) != set(num_features):
        missing = sorted(set(num_features) - set(statistics))
        unknown = sorted(set(statistics) - set(num_features))
        msg = (
            f"`statistics` must hold exactly the model's HBN layers; missing {missing}, "
            f"unknown {unknown}."
        )
        raise ValueError(msg)
    return {
        name: _global_pair(name, num_features[name], Moments(*map(to_numpy, m)))
        for name, m in statistics.items()
    }


def _global_pair(name: str, channels: int, m: Moments) -> tuple[np.ndarray, np.ndarray]:
    count, mean, m2 = m
    if count.shape != () or mean.shape != (channels,) or m2.shape != (channels,):
        msg = (
            f"`statistics[{name!r}]` must have a 0-d count and ({channels},) mean and m2 for "
            f"this layer; got shapes {count.shape}, {mean.shape}, {m2.shape}."
        )
        raise ValueError(msg)
    if not count > 0:
        msg = f"`statistics[{name!r}]` must have a positive count; got {count}."
        raise ValueError(msg)
    moments = Moments(count.astype(np.int64), mean.astype(np.float64), m2.astype(np.float64))
    var = hbn_core.variance(moments, xp=numpy_xp)  # xp given: no namespace lookup per call
    if not (np.isfinite(moments.mean).all() and np.isfinite(var).all() and (var >= 0).all()):
        msg = f"`statistics[{name!r}]` must hold finite means and non-negative finite variances."
        raise ValueError(msg)
    return moments.mean, var
