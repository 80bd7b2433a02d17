"""One step of a round, settled alike by every engine: what counted, who is at fault, go or stop.

An engine asks each sampled participant (a client in this process, a Flower node) for its
report or update, and keeps per participant either the checked result or the error that ruled
it out. :func:`settle` turns those outcomes into the step's valid results and its
:class:`~federation.protocol.Fault` records, a participant that never answered included, and
logs one line per fault (logger ``federation``). :func:`require` then applies the fault policy
(:func:`federation.protocol.require_enough`). Both are pure but for that log line.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Generic, NamedTuple, TypeVar

from federation.protocol import Fault, require_enough

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["NO_REPLY", "Settled", "fault_reason", "require", "settle"]

logger = logging.getLogger("federation")
Result = TypeVar("Result")

NO_REPLY = "no reply before the timeout"
"""The reason recorded for a sampled participant that gave neither a result nor an error."""


class Settled(NamedTuple, Generic[Result]):
    """A settled step: its valid results by participant id, and its faults.

    ``round`` counts from 1; ``participant`` names what the ids count (``"client"``,
    ``"node"``), for the messages.
    """

    valid: dict[int, Result]
    faults: tuple[Fault, ...]
    round: int
    step: str
    participant: str


def fault_reason(error: BaseException | str) -> str:
    """The recorded reason of a fault: ``"ErrorType: message"``, or ``error`` if a string."""
    return error if isinstance(error, str) else f"{type(error).__name__}: {error}"


def settle(
    outcomes: Mapping[int, Result | BaseException],
    sampled: Sequence[int],
    *,
    round_number: int,
    step: str,
    participant: str = "client",
) -> Settled[Result]:
    """The step's valid results and faults, from each participant's result or error.

    Faults come in the order of ``outcomes``, then one per ``sampled`` participant missing
    from ``outcomes`` (:data:`NO_REPLY`). Each fault is logged as
    ``round R: <participant> K left out of the <step> step: <reason>``.
    """
    valid: dict[int, Result] = {}
    reasons: list[tuple[int, str]] = []
    for who, outcome in outcomes.items():
        if isinstance(outcome, BaseException):
            reasons.append((who, fault_reason(outcome)))
        else:
            valid[who] = outcome
    reasons += [(who, NO_REPLY) for who in sampled if who not in outcomes]
    for who, reason in reasons:
        logger.warning(
            "round %d: %s %d left out of the %s step: %s",
            round_number,
            participant,
            who,
            step,
            reason,
        )
    faults = tuple(Fault(round_number, who, step, reason) for who, reason in reasons)
    return Settled(valid, faults, round_number, step, participant)


def require(settled: Settled[Result], min_clients: int) -> dict[int, Result]:
    """The step's valid results, if at least ``min_clients``; the fault policy.

    Raises
    ------
    federation.protocol.RoundFailedError
        If fewer than ``min_clients`` are valid, naming the round, the step and every fault.
    """
    require_enough(
        len(settled.valid),
        min_clients,
        round_number=settled.round,
        step=settled.step,
        faults=[f"{settled.participant} {f.client}: {f.reason}" for f in settled.faults],
        participants=f"{settled.participant}s",
    )
    return settled.valid
