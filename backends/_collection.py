"""What every adapter's ``collect_statistics`` shares: the modes, their check, empty moments."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from hbn_core import Moments

if TYPE_CHECKING:
    from collections.abc import Sized

__all__ = ["CollectionMode", "check_collection_mode", "empty_moments", "require_hbn_layers"]

# How HBN layers normalise while statistics are collected: as in training, or with the global
# statistics, as in evaluation.
CollectionMode = Literal["hybrid", "global"]


def check_collection_mode(mode: object) -> None:
    """Raise a ``ValueError`` naming ``mode`` unless it is ``"hybrid"`` or ``"global"``."""
    if mode not in ("hybrid", "global"):
        msg = f"`mode` must be 'hybrid' or 'global'; got {mode!r}."
        raise ValueError(msg)


def empty_moments(num_features: int) -> Moments:
    """The moments of no data, on the host: int64 count 0, float64 zeros for mean and m2."""
    zeros = np.zeros(num_features)
    return Moments(np.asarray(0, np.int64), zeros, zeros)


def require_hbn_layers(layers: Sized, model: object, *, layer_type: str) -> None:
    """Raise a ``ValueError`` naming ``model``'s type when it has no HBN layer (``layers``)."""
    if not len(layers):
        msg = f"`model` has no HBN layer ({layer_type}); got a {type(model).__name__}."
        raise ValueError(msg)
