"""HBN rounds on Flower's Message API: a strategy mixin over any FedAvg-family strategy.

Each round of :class:`HBNStrategy` does what :class:`federation.simulation.Simulation` does in
process, on the nodes the base strategy samples:

1. **statistics query**: a ``query.hbn_statistics`` message with the global model (shared
   tensors and global statistics) goes to the sampled nodes; each reports the exact moments of
   every HBN layer's input. The reports are checked with
   :func:`federation.aggregate.check_statistics_report`, pooled with
   :func:`federation.aggregate.pool_statistics` and blended into the global statistics with
   :func:`federation.aggregate.blend_statistics`, all in float64;
2. **training**: the base strategy's own train messages go to the same nodes, with the current
   global model (the statistics of the previous round, as in the embedded simulation);
3. **aggregation**: every reply is cut down to the ``shared`` tensors *before* the base
   strategy's ``aggregate_train`` sees it, so FedAvg, FedAdam, FedYogi or FedAvgM average and
   step only the weights. The new statistics join the result afterwards: a variance is never
   averaged nor moved by a server optimiser, and counters never travel.

A node that fails, does not reply, or replies with an invalid report or update is logged with
its reason (logger ``federation``) and left out of that step. With fewer than
``clients.min_clients`` valid nodes in a step, :class:`~federation.simulation.RoundFailedError`
is raised and the global state stays as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from federation import aggregate
from federation.config import ConfigError
from federation.flower.wire import (
    STATISTICS_MESSAGE_TYPE,
    read_report,
    state_from_record,
    state_record,
)
from federation.layout import Role, check_state, select
from federation.simulation import RoundFailedError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from flwr.app import ArrayRecord, MetricRecord
    from flwr.serverapp import Grid

    from federation.aggregate import GlobalStatistics, StatisticsReport
    from federation.config import Config
    from federation.layout import Layout, State

__all__ = ["FlowerRound", "HBNFedAvg", "HBNStrategy", "NodeFault"]

logger = logging.getLogger("federation")


@dataclasses.dataclass(frozen=True)
class NodeFault:
    """A node left out of a step of a round, and why."""

    round: int
    node_id: int
    step: str
    reason: str


@dataclasses.dataclass
class FlowerRound:
    """What one committed round did; rounds count from 1, nodes are Flower node ids.

    ``statistics`` is the global statistics the round left (float64 ``(mean, var)`` per HBN
    layer); ``accuracy`` and ``loss`` are the nodes' evaluation, weighted by test examples.
    ``seconds`` holds the wall time of each step, from its messages going out to its
    aggregate: ``statistics``, ``training`` and ``evaluation``.
    """

    round: int
    lr: float
    sampled: list[int]
    statistics_nodes: list[int] = dataclasses.field(default_factory=list)
    trained_nodes: list[int] = dataclasses.field(default_factory=list)
    statistics: GlobalStatistics = dataclasses.field(default_factory=dict)
    train_loss: float | None = None
    accuracy: float | None = None
    loss: float | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    faults: list[NodeFault] = dataclasses.field(default_factory=list)


class HBNStrategy:
    """Mixin that turns a Flower Message-API strategy into HBN rounds.

    Put it first among the bases: ``class HBNFedAdam(HBNStrategy, FedAdam): pass``. The base
    must be :class:`flwr.serverapp.strategy.FedAvg` or derive from it (FedProx, FedAdam,
    FedYogi, FedAvgM, FedAdagrad, ...). Start it with the global state of the canonical layout's
    ``shared`` and ``statistics`` tensors (:func:`federation.flower.wire.state_record`).

    Parameters
    ----------
    config
        The federation's configuration: its ``statistics``, ``train`` (lr schedule) and
        ``clients`` (sampling) sections apply. ``alpha.policy`` must be ``"personal"`` and
        ``eval.statistics`` ``"ema"``.
    layout
        The model's canonical layout (``FrameworkModel.layout``).
    query_timeout
        Seconds to wait for the statistics reports.
    **kwargs
        The base strategy's arguments. ``fraction_train``, ``min_train_nodes`` and
        ``min_available_nodes`` default to ``clients.fraction`` and ``clients.min_clients``.

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

    # What the mixin uses from the FedAvg family, declared for the type checker.
    weighted_by_key: str

    def __init__(
        self, *, config: Config, layout: Layout, query_timeout: float = 3600.0, **kwargs: Any
    ) -> None:
        _check_supported(config)
        kwargs.setdefault("fraction_train", config.clients.fraction)
        kwargs.setdefault("min_train_nodes", config.clients.min_clients)
        kwargs.setdefault("min_available_nodes", config.clients.min_clients)
        super().__init__(**kwargs)
        self.hbn_config = config
        self.layout = dict(layout)
        self.shared_names = select(layout, Role.SHARED)
        self.statistics_names = select(layout, Role.STATISTICS)
        self.hbn_layers = {
            name.removesuffix(".global_mean"): spec.shape[0]
            for name, spec in layout.items()
            if spec.role is Role.STATISTICS and name.endswith(".global_mean")
        }
        self.history: list[FlowerRound] = []
        self.client_ids: dict[int, int] = {}
        self._pending: FlowerRound | None = None
        self._clock = 0.0  # when the current step's messages went out
        self.query_timeout = query_timeout

    # -- the round ---------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (the base strategy), query their statistics, then send them training.

        The base strategy sees only the ``shared`` tensors, so a server optimiser keeps its
        state over weights alone. The train messages carry the whole global state, and the
        round's learning rate as ``lr`` in the config.
        """
        start = time.perf_counter()
        state = state_from_record(arrays)
        check_state(state, self.layout, names=self.shared_names + self.statistics_names)
        train = self.hbn_config.train
        lr = train.lr * train.lr_decay ** (server_round - 1)
        config["lr"] = lr
        shared = state_record({name: state[name] for name in self.shared_names})
        messages = list(super().configure_train(server_round, shared, config, grid))
        nodes = [m.metadata.dst_node_id for m in messages]
        record = FlowerRound(round=server_round, lr=lr, sampled=nodes)
        self._pending = None
        if self.hbn_layers and messages:
            reports = self._query_statistics(record, arrays, grid)
            pooled = aggregate.pool_statistics(list(reports.values()), self.hbn_config.statistics)
            record.statistics = aggregate.blend_statistics(
                _statistics(state, self.hbn_layers), pooled, self.hbn_config.statistics.momentum
            )
            record.statistics_nodes = sorted(reports)
        self._clock = time.perf_counter()
        record.seconds["statistics"] = self._clock - start
        self._pending = record
        for message in messages:
            message.content = _with_arrays(message.content, arrays)
        return messages

    def _query_statistics(
        self, record: FlowerRound, arrays: ArrayRecord, grid: Grid
    ) -> dict[int, StatisticsReport]:
        config = ConfigRecord({"server-round": record.round})
        content = RecordDict({"arrays": arrays, "config": config})
        queries = [
            Message(content=content, message_type=STATISTICS_MESSAGE_TYPE, dst_node_id=node)
            for node in record.sampled
        ]
        replies = list(grid.send_and_receive(queries, timeout=self.query_timeout))
        reports: dict[int, StatisticsReport] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                reports[node] = self._read_report(reply)
            except (ValueError, TypeError) as error:
                self._fault(record, node, "statistics", f"{type(error).__name__}: {error}")
        self._fault_missing(record, "statistics", replies)
        self._require_enough(record, "statistics", len(reports))
        return reports

    def _read_report(self, reply: Message) -> StatisticsReport:
        if reply.has_error():
            msg = f"the node replied with an error: {reply.error.reason}"
            raise ValueError(msg)
        report = read_report(reply.content, self.hbn_layers)
        aggregate.check_statistics_report(report, self.hbn_layers)
        client_id = reply.content.metric_records["hbn-report"].get("client-id")
        if isinstance(client_id, int):
            self.client_ids[reply.metadata.src_node_id] = client_id
        return report

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the valid replies' ``shared`` tensors (the base strategy), add statistics."""
        record = self._pending
        if record is None or record.round != server_round:
            msg = f"round {server_round}: aggregate_train without its configure_train."
            raise RuntimeError(msg)
        replies = list(replies)
        valid = []
        for reply in replies:
            try:
                reply.content = self._shared_only(reply)
            except (ValueError, TypeError) as error:
                reason = f"{type(error).__name__}: {error}"
                self._fault(record, reply.metadata.src_node_id, "training", reason)
            else:
                valid.append(reply)
        self._fault_missing(record, "training", replies)
        self._require_enough(record, "training", len(valid))
        shared, metrics = super().aggregate_train(server_round, valid)
        if shared is None:
            msg = f"round {server_round}: the base strategy aggregated nothing."
            raise RoundFailedError(msg)
        state = {name: shared[name].numpy().astype(np.float32) for name in self.shared_names}
        state |= _statistics_state(record.statistics)
        record.trained_nodes = sorted(r.metadata.src_node_id for r in valid)
        if metrics is not None and "train-loss" in metrics:
            record.train_loss = float(metrics["train-loss"])
        record.seconds["training"] = time.perf_counter() - self._clock
        self.history.append(record)
        self._pending = None
        return state_record(state), metrics

    def _shared_only(self, reply: Message) -> RecordDict:
        """The reply's content with its ArrayRecord cut down to the checked ``shared`` tensors.

        Statistics, alpha and counters (``num_batches_tracked``) a client may have sent are
        dropped here, before any averaging.
        """
        if reply.has_error():
            msg = f"the node replied with an error: {reply.error.reason}"
            raise ValueError(msg)
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
        check_state(shared, self.layout, names=self.shared_names)
        (metrics,) = content.metric_records.values()
        examples = metrics.get(self.weighted_by_key)
        if not isinstance(examples, int) or examples <= 0:
            key = self.weighted_by_key
            msg = f"the reply's `{key}` must be a positive integer; got {examples!r}."
            raise ValueError(msg)
        return _with_arrays(content, state_record(shared), key=array_key)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The base strategy's evaluation, every ``eval.every`` rounds and after the last."""
        every, last = self.hbn_config.eval.every, self.hbn_config.rounds
        if server_round % every and server_round != last:
            return []
        self._clock = time.perf_counter()
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The base strategy's weighted evaluation metrics, also kept in :attr:`history`."""
        metrics: MetricRecord | None = super().aggregate_evaluate(server_round, replies)
        if metrics is not None and self.history and self.history[-1].round == server_round:
            self.history[-1].accuracy = _metric(metrics, "accuracy")
            self.history[-1].loss = _metric(metrics, "loss")
            self.history[-1].seconds["evaluation"] = time.perf_counter() - self._clock
        return metrics

    # -- faults ------------------------------------------------------------------------------

    def _fault(self, record: FlowerRound, node: int, step: str, reason: str) -> None:
        logger.warning(
            "round %d: node %d left out of the %s step: %s", record.round, node, step, reason
        )
        record.faults.append(NodeFault(record.round, node, step, reason))

    def _fault_missing(self, record: FlowerRound, step: str, replies: list[Message]) -> None:
        answered = {reply.metadata.src_node_id for reply in replies}
        for node in record.sampled:
            if node not in answered:
                self._fault(record, node, step, "no reply before the timeout")

    def _require_enough(self, record: FlowerRound, step: str, valid: int) -> None:
        minimum = self.hbn_config.clients.min_clients
        if valid < minimum:
            self._pending = None
            reasons = "; ".join(f"node {f.node_id}: {f.reason}" for f in record.faults)
            msg = (
                f"round {record.round}: only {valid} valid nodes in the {step} step, fewer than "
                f"clients.min_clients = {minimum}; the global state is unchanged. "
                f"Faults: {reasons or 'none'}"
            )
            raise RoundFailedError(msg)


class HBNFedAvg(HBNStrategy, FedAvg):
    """HBN rounds over :class:`flwr.serverapp.strategy.FedAvg` (see :class:`HBNStrategy`)."""


# Methods whose rounds need more than the HBN round of this strategy.
_EMBEDDED_ONLY_METHODS = {
    "fedbn": "its evaluation averages personal BatchNorm tensors",
    "fixbn": "its clients switch to frozen statistics at a round",
}


def _check_supported(config: Config) -> None:
    if config.method in _EMBEDDED_ONLY_METHODS:
        msg = (
            f"`method` {config.method!r} runs in the embedded simulation only, not on Flower: "
            f"{_EMBEDDED_ONLY_METHODS[config.method]}."
        )
        raise ConfigError(msg)
    if config.server.momentum:
        msg = (
            "`server.momentum` must be 0 on Flower: use Flower's FedAvgM as the base strategy "
            f"instead; got {config.server.momentum!r}."
        )
        raise ConfigError(msg)
    if config.alpha.policy != "personal":
        msg = (
            "`alpha.policy` must be 'personal' on Flower: alpha stays on its node; "
            f"got {config.alpha.policy!r}."
        )
        raise ConfigError(msg)
    if config.eval.statistics != "ema":
        msg = (
            "`eval.statistics` must be 'ema' on Flower (nodes evaluate the global model as "
            f"sent): set it in the configuration; got {config.eval.statistics!r}."
        )
        raise ConfigError(msg)


def _with_arrays(content: RecordDict, arrays: ArrayRecord, *, key: str | None = None) -> RecordDict:
    """``content`` with its (single) ArrayRecord replaced by ``arrays``."""
    if key is None:
        (key,) = content.array_records
    return RecordDict({**{k: v for k, v in content.items() if k != key}, key: arrays})


def _statistics(state: State, layers: dict[str, int]) -> GlobalStatistics:
    return {
        name: (
            state[f"{name}.global_mean"].astype(np.float64),
            state[f"{name}.global_var"].astype(np.float64),
        )
        for name in layers
    }


def _statistics_state(statistics: GlobalStatistics) -> State:
    state: State = {}
    for name, (mean, var) in statistics.items():
        state[f"{name}.global_mean"] = mean.astype(np.float32)
        state[f"{name}.global_var"] = var.astype(np.float32)
    return state


def _metric(metrics: MetricRecord, name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None
