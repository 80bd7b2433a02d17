"""HBN rounds on Flower's Message API: a strategy mixin over any FedAvg-family strategy.

Each round of :class:`HBNStrategy` runs :mod:`federation.protocol`, as the embedded
:class:`federation.simulation.Simulation` does, on the nodes the base strategy samples:

1. **statistics query**: a ``query.hbn_statistics`` message with the global model (shared
   tensors and global statistics) goes to the sampled nodes; each reports the exact moments of
   every HBN layer's input. The reports are checked (:func:`~federation.protocol.check_report`)
   and pooled and blended into the global statistics
   (:func:`~federation.protocol.next_statistics`), in float64;
2. **training**: the base strategy's own train messages go to the same nodes, with the current
   global model (the statistics of the previous round, as in the embedded simulation) and the
   round's learning rate (:func:`~federation.protocol.learning_rate`);
3. **aggregation**: every reply is checked (:func:`~federation.protocol.check_update`) and cut
   down to the ``shared`` tensors *before* the base strategy's ``aggregate_train`` sees it, so
   FedAvg, FedAdam, FedYogi or FedAvgM average and step only the weights. The new statistics
   join the result afterwards, in the global state's dtype: a variance is never averaged nor
   moved by a server optimiser, and counters never travel.

A node that fails, does not reply, or replies with an invalid report or update is logged with
its reason (logger ``federation``) and left out of that step (:func:`federation.steps.settle`,
as in the embedded engine); a node's second reply to one message is ignored. With fewer than
``clients.min_clients`` valid nodes in a step, :class:`~federation.protocol.RoundFailedError`
is raised and the global state stays as it was.

Each committed round leaves a :class:`~federation.protocol.RoundRecord`, the embedded engine's
type, whose client ids are Flower node ids. What crosses the wire, both ways, is read and
built in :mod:`federation.flower.wire`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Any, TypeVar

from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from federation import protocol, steps
from federation.flower.wire import (
    NodeSetupError,
    check_runs_on_flower,
    first_replies,
    raise_reply_error,
    read_replies,
    read_report,
    replies_train_loss,
    report_client_id,
    shared_train_reply,
    state_from_record,
    state_record,
    statistics_queries,
    travelling_state,
    with_arrays,
)
from federation.layout import Role, select
from federation.protocol import RoundFailedError, RoundRecord

if TYPE_CHECKING:
    from collections.abc import Iterable

    from flwr.app import ArrayRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Result

    from federation.config import Config
    from federation.layout import Layout, State
    from federation.protocol import Fault, GlobalStatistics, StatisticsReport
    from federation.steps import Settled

__all__ = ["HBNFedAvg", "HBNStrategy", "NodeSetupError"]

logger = logging.getLogger("federation")
Read = TypeVar("Read")


if TYPE_CHECKING:  # the type checker sees the base a mixin goes with
    _FedAvgFamily = FedAvg
else:
    _FedAvgFamily = object


class HBNStrategy(_FedAvgFamily):
    """Mixin that turns a Flower Message-API strategy into HBN rounds.

    Put it first among the bases: ``class HBNFedAdam(HBNStrategy, FedAdam): pass``. The base
    must be :class:`flwr.serverapp.strategy.FedAvg` or derive from it (FedProx, FedAdam,
    FedYogi, FedAvgM, FedAdagrad, ...). Start it with the global state of the canonical layout's
    ``shared`` and ``statistics`` tensors (:func:`federation.flower.wire.state_record`).

    Parameters
    ----------
    config
        The federation's configuration: its ``statistics``, ``train`` (lr schedule),
        ``clients`` (sampling, ``min_clients``) and ``eval`` (schedule) sections apply.
        ``alpha.policy`` must be ``"personal"`` and ``eval.statistics`` ``"ema"``.
    layout
        The model's canonical layout (``FrameworkModel.layout``).
    query_timeout
        Seconds to wait for the statistics reports; default: the ``timeout`` given to
        :meth:`start`, which bounds every other step too.
    **kwargs
        The base strategy's arguments. ``fraction_train``, ``min_train_nodes``,
        ``min_evaluate_nodes`` and ``min_available_nodes`` default to ``clients.fraction``
        and ``clients.min_clients`` (Flower waits for that many connected nodes, with no
        timeout, so a node that died must not stall evaluation).

    Attributes
    ----------
    history
        A :class:`~federation.protocol.RoundRecord` per committed round, its client ids node
        ids; it fills ``statistics``, ``evaluated_clients`` and ``evaluation_incomplete``.
    client_ids
        Each node's client index (its ``partition-id``), as its reports declared it.

    Raises
    ------
    federation.config.ConfigError
        If the configuration asks for what cannot run on Flower: ``alpha.policy = "averaged"``
        (alpha never leaves a node), ``eval.statistics = "sync"``, ``method = "fedbn"`` or
        ``"fixbn"``, or ``server.momentum`` (Flower's FedAvgM is the base strategy for that).
    """

    def __init__(
        self,
        *,
        config: Config,
        layout: Layout,
        query_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        check_runs_on_flower(config)
        kwargs.setdefault("fraction_train", config.clients.fraction)
        kwargs.setdefault("min_train_nodes", config.clients.min_clients)
        kwargs.setdefault("min_available_nodes", config.clients.min_clients)
        # FedAvg waits, without a timeout, for this many connected nodes before it evaluates.
        kwargs.setdefault("min_evaluate_nodes", config.clients.min_clients)
        super().__init__(**kwargs)
        self.hbn_config = config
        self.layout = dict(layout)
        self.shared_names = select(layout, Role.SHARED)
        self.hbn_layers = protocol.hbn_layers(layout)
        self.history: list[RoundRecord] = []
        self.client_ids: dict[int, int] = {}
        self.query_timeout = query_timeout
        self._timeout = 3600.0  # start's timeout (Flower's default), for the statistics query
        # The round between configure_train and aggregate_train, and the state it went out with.
        self._pending: RoundRecord | None = None
        self._sent: State = {}
        self._train_messages: list[Message] = []
        self._clock = 0.0  # when the current step's messages went out

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Result:
        """Flower's run loop; its ``timeout`` also bounds the statistics query of every round."""
        timeout = kwargs.get("timeout", args[1] if len(args) > 1 else 3600.0)
        self._timeout = float(timeout)
        result: Result = super().start(grid, initial_arrays, *args, **kwargs)
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (the base strategy), query their statistics, then send them training.

        The base strategy sees only the ``shared`` tensors, so a server optimiser keeps its
        state over weights alone. The train messages carry the whole global state, and the
        round's learning rate as ``lr`` in a copy of ``config`` (which is left as it is).
        """
        start = time.perf_counter()
        self._pending = None
        state = travelling_state(state_from_record(arrays), self.layout)
        arrays = state_record(state)
        lr = protocol.learning_rate(self.hbn_config.train, server_round - 1)
        train_config = ConfigRecord({**dict(config), "lr": lr})
        shared = state_record({name: state[name] for name in self.shared_names})
        messages = list(super().configure_train(server_round, shared, train_config, grid))
        nodes = tuple(m.metadata.dst_node_id for m in messages)
        settled: Settled[StatisticsReport] = steps.settle(
            {}, [], round_number=server_round, step="statistics"
        )
        statistics: GlobalStatistics = {}
        if self.hbn_layers and messages:
            settled = self._query_statistics(server_round, nodes, arrays, grid)
            reports = steps.require(settled, self.hbn_config.clients.min_clients)
            # The blend's index counts committed rounds (a failed round blends nothing), as
            # the embedded simulation's does: statistics.warmup schedules by it.
            statistics = protocol.next_statistics(
                state,
                _in_client_order(reports, self.client_ids),
                self.hbn_config.statistics,
                self.hbn_layers,
                len(self.history),
            )
        self._clock = time.perf_counter()
        self._pending = RoundRecord(
            round=server_round,
            lr=lr,
            sampled=nodes,
            statistics_clients=tuple(sorted(settled.valid)),
            statistics=statistics,
            seconds={"statistics": self._clock - start},
            faults=settled.faults,
        )
        self._sent, self._train_messages = state, messages  # the grid gives them their ids
        for message in messages:
            message.content = with_arrays(message.content, arrays)
        return messages

    def _query_statistics(
        self, server_round: int, nodes: tuple[int, ...], arrays: ArrayRecord, grid: Grid
    ) -> Settled[StatisticsReport]:
        """The nodes' settled statistics step: their checked reports and the faults."""
        queries = statistics_queries(nodes, arrays, server_round)
        timeout = self._timeout if self.query_timeout is None else self.query_timeout
        replies = first_replies(grid.send_and_receive(queries, timeout=timeout), nodes, queries)
        outcomes = read_replies(replies, self._read_report)
        return steps.settle(
            outcomes, nodes, round_number=server_round, step="statistics", participant="node"
        )

    def _read_report(self, node: int, reply: Message) -> StatisticsReport:
        raise_reply_error(reply)
        report = read_report(reply.content, self.hbn_layers)
        protocol.check_report(report, self.hbn_layers)
        client_id = report_client_id(reply.content)
        if client_id is not None:
            self.client_ids[node] = client_id
        return report

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the valid replies' ``shared`` tensors (the base strategy), add statistics."""
        record, self._pending = self._pending, None
        if record is None or record.round != server_round:
            msg = f"round {server_round}: aggregate_train without its configure_train."
            raise RuntimeError(msg)
        received = first_replies(replies, record.sampled, self._train_messages)
        settled = steps.settle(
            read_replies(received, self._shared_reply),
            record.sampled,
            round_number=server_round,
            step="training",
            participant="node",
        )
        faults = (*record.faults, *settled.faults)
        valid = steps.require(settled, self.hbn_config.clients.min_clients)
        shared, metrics = super().aggregate_train(server_round, list(valid.values()))
        _log_count(server_round, "training", len(valid), record.sampled, faults)
        if shared is None:
            msg = f"round {server_round}: the base strategy aggregated nothing."
            raise RoundFailedError(msg)
        sent = self._sent
        state = {name: shared[name].numpy().astype(sent[name].dtype) for name in self.shared_names}
        state |= protocol.statistics_state(record.statistics, self.hbn_layers, sent)
        self.history.append(
            dataclasses.replace(
                record,
                trained_clients=tuple(sorted(valid)),
                # In client-id order, as the embedded engine sums: the same loss to the bit.
                train_loss=replies_train_loss(
                    _in_client_order(valid, self.client_ids), self.weighted_by_key
                ),
                seconds={**record.seconds, "training": time.perf_counter() - self._clock},
                faults=faults,
            )
        )
        return state_record(state), metrics

    def _shared_reply(self, _node: int, reply: Message) -> Message:
        return shared_train_reply(
            reply, layout=self.layout, like=self._sent, weighted_by=self.weighted_by_key
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The base strategy's evaluation, in the rounds :func:`~federation.protocol.evaluates`."""
        if not protocol.evaluates(self.hbn_config, server_round - 1):
            return []
        self._clock = time.perf_counter()
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The base strategy's weighted evaluation metrics, also kept in :attr:`history`."""
        replies = list(replies)
        metrics: MetricRecord | None = super().aggregate_evaluate(server_round, replies)
        evaluated = tuple(sorted({r.metadata.src_node_id for r in replies if not r.has_error()}))
        incomplete = _incomplete(server_round, evaluated, self.hbn_config.data.num_clients)
        if metrics is not None and self.history and self.history[-1].round == server_round:
            last = self.history[-1]
            self.history[-1] = dataclasses.replace(
                last,
                accuracy=_metric(metrics, "accuracy"),
                loss=_metric(metrics, "loss"),
                seconds={**last.seconds, "evaluation": time.perf_counter() - self._clock},
                evaluated_clients=evaluated,
                evaluation_incomplete=incomplete,
            )
        return metrics


class HBNFedAvg(HBNStrategy, FedAvg):
    """HBN rounds over :class:`flwr.serverapp.strategy.FedAvg` (see :class:`HBNStrategy`)."""


def _in_client_order(by_node: dict[int, Read], client_ids: dict[int, int]) -> list[Read]:
    """The nodes' values in their client ids' order, the order the embedded engine pools in."""
    return [by_node[node] for node in sorted(by_node, key=lambda n: client_ids.get(n, n))]


def _incomplete(server_round: int, evaluated: tuple[int, ...], num_clients: int) -> bool:
    """Whether fewer nodes than ``num_clients`` evaluated (logged).

    The accuracy is then not measured on the whole test set.
    """
    if len(evaluated) >= num_clients:
        return False
    logger.warning(
        "round %d: the accuracy is measured on %d of %d clients' test shares, not on "
        "the whole test set",
        server_round,
        len(evaluated),
        num_clients,
    )
    return True


def _log_count(
    server_round: int, step: str, valid: int, sampled: tuple[int, ...], faults: tuple[Fault, ...]
) -> None:
    """HBN's own count of a step's replies, after the base strategy's log line.

    The base strategy counts only the replies HBN passed on ("Received 3 results and 0
    failures"); this line counts the nodes HBN left out too.
    """
    left_out = [fault for fault in faults if fault.step == step]
    logger.log(
        logging.WARNING if left_out else logging.INFO,
        "round %d: %s: %d of %d sampled nodes counted, %d left out%s",
        server_round,
        step,
        valid,
        len(sampled),
        len(left_out),
        "".join(f"; node {fault.client}: {fault.reason}" for fault in left_out),
    )


def _metric(metrics: MetricRecord, name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None
