"""The embedded engine's evaluation of a round, as functions of values.

Each takes the run's :class:`~federation.setup.Setup` and a
:class:`~federation.protocol.FederationState`.

The global model is evaluated on the whole test set by the evaluation framework's model, with
the personal average as its personal state (alpha has no effect in inference; FedBN's
BatchNorm tensors are averaged for this) and the statistics ``eval.statistics`` names:

- ``"ema"``: the global statistics the round committed;
- ``"sync"``: statistics pooled afresh (momentum 1) by the round's clients on this model
  (:data:`~federation.protocol.Stream.SYNC_STATISTICS`);
- ``"fresh"``: :func:`~federation.protocol.fresh_evaluation_statistics`, the next round's
  statistics step on this model blended in by ``eval.fresh_weight``.

With ``eval.personal`` each trained client's personalised model is evaluated on a local test
split with its own label proportions (FedBN's protocol).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from federation import protocol, steps
from federation.client import load_state
from federation.data import batches
from federation.protocol import Stream
from federation.setup import client_model_state

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from federation.config import Config
    from federation.layout import State
    from federation.protocol import FederationState, StatisticsReport
    from federation.setup import Setup

__all__ = [
    "StatisticsPass",
    "accuracy",
    "evaluation_fields",
    "evaluation_weights",
    "global_accuracy",
    "local_test_split",
    "personal_accuracy",
    "statistics_pass",
]

logger = logging.getLogger("federation")


class StatisticsPass(NamedTuple):
    """The statistics step an evaluation runs before it measures: its round and stream."""

    round_index: int
    stream: Stream


def statistics_pass(config: Config, round_index: int, *, has_hbn: bool) -> StatisticsPass | None:
    """The statistics step evaluating round ``round_index`` needs, or ``None`` (``"ema"``).

    ``"sync"`` reruns the round's own step on its own stream; ``"fresh"`` runs the next
    round's step (its clients and streams), the round whose step it is.
    """
    if not has_hbn or config.eval.statistics == "ema":
        return None
    if config.eval.statistics == "fresh":
        return StatisticsPass(round_index + 1, Stream.STATISTICS)
    return StatisticsPass(round_index, Stream.SYNC_STATISTICS)


def evaluation_weights(
    setup: Setup, state: FederationState, reports: Sequence[StatisticsReport] = ()
) -> State:
    """The evaluated model's state: global, personal average, and the pass's statistics.

    Without ``reports`` the global statistics stand (``"ema"``). With the reports of the
    evaluation's statistics pass they are replaced by their pool (``"sync"``), or by
    :func:`~federation.protocol.fresh_evaluation_statistics` of the pool (``"fresh"``).
    """
    weights = {**state.global_state, **state.personal_average}
    if not reports:
        return weights
    config, layers = setup.config, setup.hbn_layers
    pooled = protocol.pool_statistics(reports, config.statistics)
    if config.eval.statistics == "fresh":
        committed = protocol.global_statistics(state.global_state, layers)
        pooled = protocol.fresh_evaluation_statistics(committed, pooled, config.eval.fresh_weight)
    return weights | protocol.statistics_state(pooled, layers, state.global_state)


def accuracy(setup: Setup, weights: State, indices: np.ndarray) -> tuple[float, float]:
    """Accuracy and mean loss of the evaluation model with ``weights`` on test examples."""
    model = setup.models[setup.config.eval_framework]
    load_state(model, weights)
    data = setup.data
    result = model.evaluate(
        batches(
            data.x_test, data.y_test, indices, batch_size=setup.config.eval.batch_size, rng=None
        )
    )
    return result.correct / result.examples, result.loss_sum / result.examples


def global_accuracy(setup: Setup, weights: State) -> tuple[float, float]:
    """Accuracy and mean loss of the evaluation model with ``weights`` on the whole test set."""
    return accuracy(setup, weights, np.arange(len(setup.data.y_test)))


def local_test_split(setup: Setup, round_index: int, client_id: int) -> np.ndarray:
    """A client's local test split in a round (:func:`federation.protocol.local_test_split`)."""
    return protocol.local_test_split(
        setup.data.y_train[setup.clients[client_id].indices],
        setup.data.y_test,
        setup.config.eval.personal_examples,
        protocol.seeded_rng(setup.config.seed, Stream.LOCAL_TEST, round_index, client_id),
    )


def personal_accuracy(
    setup: Setup, state: FederationState, round_index: int, client_ids: Sequence[int]
) -> float:
    """The mean accuracy of the clients' personalised models on their local test splits."""
    return float(
        np.mean(
            [
                accuracy(
                    setup,
                    client_model_state(setup, state, client),
                    local_test_split(setup, round_index, client),
                )[0]
                for client in client_ids
            ]
        )
    )


def evaluation_fields(
    round_number: int,
    measure: Callable[[], tuple[float, float]],
    personal: Callable[[], float] | None,
) -> dict[str, Any]:
    """A round's evaluation fields of its :class:`~federation.protocol.RoundRecord`.

    ``accuracy`` and ``loss`` from ``measure()``, ``personal_accuracy`` from ``personal()``
    where given. A failure is recorded as ``evaluation_error``, not raised: the round's
    training stands.
    """
    fields: dict[str, Any] = {}
    try:
        fields["accuracy"], fields["loss"] = measure()
        if personal is not None:
            fields["personal_accuracy"] = personal()
    except Exception as error:  # the round's training stands; its record says why
        reason = steps.fault_reason(error)
        logger.warning(
            "round %d: evaluation failed (the round's training is kept): %s", round_number, reason
        )
        fields["evaluation_error"] = reason
    return fields
