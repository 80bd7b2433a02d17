"""What every adapter's ``collect_statistics`` shares: the modes, their check, empty moments."""

from __future__ import annotations

from typing import Literal

import numpy as np

from hbn_core import Moments

__all__ = ["CollectionMode", "check_collection_mode", "empty_moments"]

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
