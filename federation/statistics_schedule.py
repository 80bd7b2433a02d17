r"""The momentum schedule of the global statistics' EMA (``statistics.warmup``): scalar math.

The protocol blends each round's exact pool :math:`p_t` (the statistics of round :math:`t`'s
clients' data under the model they downloaded) into the global statistics,

.. math::

    g_t = (1 - m_t)\, g_{t-1} + m_t\, p_t, \qquad g_0 = (0, 1),

mean and (population) variance alike, channel by channel
(:func:`federation.protocol.next_statistics`). The warm-up chooses the momentum :math:`m_t` of
the :math:`t`-th blend from ``statistics.momentum`` :math:`m` (:func:`blend_momentum`). With
``"none"`` the arbitrary prior :math:`g_0` keeps the weight :math:`(1 - m)^t` (35% after 10
blends at :math:`m = 0.1`); every other warm-up gives it weight 0, so :math:`g_t` is a convex
combination of exact pools only.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["WARMUPS", "Warmup", "blend_momentum"]

Warmup = Literal["none", "first", "cumulative", "debias"]
WARMUPS: tuple[Warmup, ...] = ("none", "first", "cumulative", "debias")


def _check(momentum: float, blend: int) -> None:
    if not 0 < momentum <= 1:
        msg = f"`momentum` must be in (0, 1]; got {momentum!r}."
        raise ValueError(msg)
    if isinstance(blend, bool) or not isinstance(blend, int | np.integer) or blend < 1:
        msg = f"`blend` must be an integer >= 1 (the blend being made counts); got {blend!r}."
        raise ValueError(msg)


def blend_momentum(momentum: float, blend: int, warmup: Warmup) -> float:
    r"""The momentum :math:`m_t` of the ``blend``-th blend (:math:`t` = ``blend``, from 1).

    Parameters
    ----------
    momentum
        ``statistics.momentum`` :math:`m \in (0, 1]`.
    blend
        :math:`t \ge 1`: the number of pools blended so far, this one included (the number of
        committed rounds plus one).
    warmup
        - ``"none"``: :math:`m_t = m`. After :math:`t` blends the prior :math:`g_0 = (0, 1)`
          weighs :math:`(1 - m)^t` and pool :math:`s` weighs :math:`m (1 - m)^{t - s}`.
        - ``"first"``: :math:`m_1 = 1`, then :math:`m`. The first pool replaces the prior and
          weighs :math:`(1 - m)^{t - 1}`.
        - ``"cumulative"``: :math:`m_t = \max(m, 1/t)`, as torch's BatchNorm with
          ``momentum=None`` until :math:`1/t` falls below :math:`m`: up to
          :math:`t = \lfloor 1/m \rfloor` the statistics are the plain mean of all pools.
        - ``"debias"``: :math:`m_t = m / (1 - (1 - m)^t)`, Adam's bias correction. With
          :math:`e_t = (1 - m)\, e_{t-1} + m\, p_t` from :math:`e_0 = 0`, the statistics are
          :math:`g_t = e_t / (1 - (1 - m)^t)`.

    Returns
    -------
    float
        :math:`m_t \in [m, 1]`; :math:`m_1 = 1` for every warm-up but ``"none"``.

    Raises
    ------
    ValueError
        If ``momentum`` is not in (0, 1], ``blend`` is not an integer >= 1, or ``warmup`` is
        not one of :data:`WARMUPS`.
    """
    _check(momentum, blend)
    if warmup not in WARMUPS:
        msg = f"`warmup` must be one of {list(WARMUPS)}; got {warmup!r}."
        raise ValueError(msg)
    if warmup == "none":
        return momentum
    if blend == 1:  # exactly 1, so that the prior is gone (debias's ratio could round below)
        return 1.0
    if warmup == "cumulative":
        return max(momentum, 1.0 / blend)
    if warmup == "debias":
        return min(1.0, momentum / (1.0 - (1.0 - momentum) ** blend))
    return momentum
