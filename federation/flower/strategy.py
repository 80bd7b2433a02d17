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
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Any, TypeVar

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from federation import protocol, steps
from federation.flower.wire import (
    STATISTICS_MESSAGE_TYPE,
    NodeSetupError,
    check_runs_on_flower,
    first_replies,
    raise_reply_error,
    read_report,
    state_from_record,
    state_record,
    travelling_state,
    with_arrays,
)
from federation.layout import Role, select
from federation.protocol import RoundFailedError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from flwr.app import ArrayRecord, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Result

    from federation.config import Config
    from federation.layout import Layout, State
    from federation.protocol import GlobalStatistics, StatisticsReport
    from federation.steps import Settled

__all__ = ["FlowerRound", "HBNFedAvg", "HBNStrategy", "NodeFault", "NodeSetupError"]

logger = logging.getLogger("federation")
Read = TypeVar("Read")


@dataclasses.dataclass(frozen=True)
class NodeFault:
    """A node left out of a step of a round, and why."""

    round: int
    node_id: int
    step: str
    reason: str


@dataclasses.dataclass(frozen=True)
class FlowerRound:
    """What one committed round did; rounds count from 1, nodes are Flower node ids.

    ``statistics`` is the global statistics the round left (float64 ``(mean, var)`` per HBN
    layer); ``accuracy`` and ``loss`` are the nodes' evaluation, weighted by test examples.
    ``seconds`` holds the wall time of each step, from its messages going out to its
    aggregate: ``statistics``, ``training`` and ``evaluation``. ``evaluated_nodes`` are the
    nodes whose evaluation counted; ``evaluation_incomplete`` flags an accuracy measured on
    fewer than ``data.num_clients`` nodes, so not on the whole test set.
    """

    round: int
    lr: float
    sampled: tuple[int, ...]
    statistics_nodes: tuple[int, ...] = ()
    trained_nodes: tuple[int, ...] = ()
    statistics: GlobalStatistics = dataclasses.field(default_factory=dict)
    train_loss: float | None = None
    accuracy: float | None = None
    loss: float | None = None
    seconds: Mapping[str, float] = dataclasses.field(default_factory=dict)
    faults: tuple[NodeFault, ...] = ()
    evaluated_nodes: tuple[int, ...] = ()
    evaluation_incomplete: bool = False


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
        A :class:`FlowerRound` per committed round.
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
        self.statistics_names = select(layout, Role.STATISTICS)
        self.hbn_layers = protocol.hbn_layers(layout)
        self.history: list[FlowerRound] = []
        self.client_ids: dict[int, int] = {}
        self.query_timeout = query_timeout
        self._timeout = 3600.0  # start's timeout (Flower's default), for the statistics query
        # The round between configure_train and aggregate_train, and the state it went out with.
        self._pending: FlowerRound | None = None
        self._sent: State = {}
        self._train_messages: list[Message] = []
        self._clock = 0.0  # when the current step's messages went out

    # -- the round ---------------------------------------------------------------------------

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
        faults: tuple[NodeFault, ...] = ()
        statistics: GlobalStatistics = {}
        reports: dict[int, StatisticsReport] = {}
        if self.hbn_layers and messages:
            reports, faults = self._query_statistics(server_round, nodes, arrays, grid)
            settings = self.hbn_config.statistics
            # The blend's index counts committed rounds (a failed round blends nothing), as
            # the embedded simulation's does: statistics.warmup schedules by it.
            statistics = protocol.next_statistics(
                state, list(reports.values()), settings, self.hbn_layers, len(self.history)
            )
        self._clock = time.perf_counter()
        self._pending = FlowerRound(
            round=server_round,
            lr=lr,
            sampled=nodes,
            statistics_nodes=tuple(sorted(reports)),
            statistics=statistics,
            seconds={"statistics": self._clock - start},
            faults=faults,
        )
        self._sent = state
        self._train_messages = messages  # the grid gives them their ids as it sends them
        for message in messages:
            message.content = with_arrays(message.content, arrays)
        return messages

    def _query_statistics(
        self,
        server_round: int,
        nodes: tuple[int, ...],
        arrays: ArrayRecord,
        grid: Grid,
    ) -> tuple[dict[int, StatisticsReport], tuple[NodeFault, ...]]:
        """The nodes' checked reports, by client id (the embedded pool's order); the faults."""
        content = RecordDict(
            {"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}
        )
        queries = [
            Message(content=content, message_type=STATISTICS_MESSAGE_TYPE, dst_node_id=node)
            for node in nodes
        ]
        timeout = self._timeout if self.query_timeout is None else self.query_timeout
        replies = first_replies(grid.send_and_receive(queries, timeout=timeout), nodes, queries)
        settled = steps.settle(
            _outcomes(replies, self._read_report),
            nodes,
            round_number=server_round,
            step="statistics",
            participant="node",
        )
        reports = steps.require(settled, self.hbn_config.clients.min_clients)
        ordered = sorted(reports.items(), key=lambda item: self.client_ids.get(item[0], item[0]))
        return dict(ordered), _node_faults(settled)

    def _read_report(self, node: int, reply: Message) -> StatisticsReport:
        raise_reply_error(reply)
        report = read_report(reply.content, self.hbn_layers)
        protocol.check_report(report, self.hbn_layers)
        client_id = reply.content.metric_records["hbn-report"].get("client-id")
        if isinstance(client_id, int):
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
            _outcomes(received, self._shared_reply),
            record.sampled,
            round_number=server_round,
            step="training",
            participant="node",
        )
        faults = [*record.faults, *_node_faults(settled)]
        valid = steps.require(settled, self.hbn_config.clients.min_clients)
        shared, metrics = super().aggregate_train(server_round, list(valid.values()))
        _log_count(server_round, "training", len(valid), record.sampled, faults)
        if shared is None:
            msg = f"round {server_round}: the base strategy aggregated nothing."
            raise RoundFailedError(msg)
        sent = self._sent
        state = {name: shared[name].numpy().astype(sent[name].dtype) for name in self.shared_names}
        state |= protocol.statistics_state(record.statistics, self.hbn_layers, sent)
        loss = None if metrics is None else metrics.get("train-loss")
        train_loss = float(loss) if isinstance(loss, int | float) else None
        self.history.append(
            dataclasses.replace(
                record,
                trained_nodes=tuple(sorted(valid)),
                train_loss=train_loss,
                seconds={**record.seconds, "training": time.perf_counter() - self._clock},
                faults=tuple(faults),
            )
        )
        return state_record(state), metrics

    def _shared_reply(self, _node: int, reply: Message) -> Message:
        """The reply, its ArrayRecord cut down to the checked ``shared`` tensors.

        Statistics, alpha and counters (``num_batches_tracked``) a client may have sent are
        dropped here, before any averaging.
        """
        raise_reply_error(reply)
        content = reply.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            msg = (
                "a train reply must hold one ArrayRecord and one MetricRecord; got "
                f"{len(content.array_records)} and {len(content.metric_records)}."
            )
            raise ValueError(msg)
        ((array_key, arrays),) = content.array_records.items()
        received = state_from_record(arrays)
        shared = {name: received[name] for name in self.shared_names if name in received}
        (metrics,) = content.metric_records.values()
        examples = metrics.get(self.weighted_by_key)
        protocol.check_update(
            shared,
            examples,
            self.layout,
            self.shared_names,
            like=self._sent,
            train_loss=metrics.get("train-loss"),
        )
        reply.content = with_arrays(content, state_record(shared), key=array_key)
        return reply

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
        incomplete = len(evaluated) < self.hbn_config.data.num_clients
        if incomplete:
            logger.warning(
                "round %d: the accuracy is measured on %d of %d clients' test shares, not on "
                "the whole test set",
                server_round,
                len(evaluated),
                self.hbn_config.data.num_clients,
            )
        if metrics is not None and self.history and self.history[-1].round == server_round:
            last = self.history[-1]
            self.history[-1] = dataclasses.replace(
                last,
                accuracy=_metric(metrics, "accuracy"),
                loss=_metric(metrics, "loss"),
                seconds={**last.seconds, "evaluation": time.perf_counter() - self._clock},
                evaluated_nodes=evaluated,
                evaluation_incomplete=incomplete,
            )
        return metrics


def _outcomes(
    replies: Mapping[int, Message], read: Callable[[int, Message], Read]
) -> dict[int, Read | Exception]:
    """Each node's reply as ``read(node, reply)`` reads and checks it, or its fault's error.

    A :class:`NodeSetupError` is not caught: it ends the run.
    """
    outcomes: dict[int, Read | Exception] = {}
    for node, reply in replies.items():
        try:
            outcomes[node] = read(node, reply)
        except (ValueError, TypeError) as error:
            outcomes[node] = error
    return outcomes


def _node_faults(settled: Settled[Any]) -> tuple[NodeFault, ...]:
    return tuple(NodeFault(f.round, f.client, f.step, f.reason) for f in settled.faults)


def _log_count(
    server_round: int, step: str, valid: int, sampled: tuple[int, ...], faults: list[NodeFault]
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
        "".join(f"; node {fault.node_id}: {fault.reason}" for fault in left_out),
    )


class HBNFedAvg(HBNStrategy, FedAvg):
    """HBN rounds over :class:`flwr.serverapp.strategy.FedAvg` (see :class:`HBNStrategy`)."""


def _metric(metrics: MetricRecord, name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None
