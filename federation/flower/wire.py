"""What crosses Flower's wire: canonical state and statistics reports as named records.

Every array travels by name in an :class:`~flwr.app.ArrayRecord`, never by position:

- a model state is the canonical layout itself (``conv1.weight``, ``norm1.global_mean``, ...);
- a statistics report is one :class:`~flwr.app.ArrayRecord` under :data:`STATISTICS_KEY` with,
  per HBN layer, ``<layer>.count`` (int64, shape ``()``: elements per channel), ``<layer>.mean``
  and ``<layer>.m2`` (float64, shape ``(C,)``), beside a :class:`~flwr.app.MetricRecord` under
  :data:`REPORT_KEY` with ``examples``, ``dataset-size`` and ``client-id``.

The Flower run configuration is flat (``train.lr``, ``clients.frameworks.torch``); it maps onto
the same keys as an ``hbn-fed`` TOML file, except the reserved ``flower`` section, which holds
options of the Flower server app (see :class:`ServerOptions`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import tempfile
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from federation import protocol
from federation.config import ConfigError, at_least, build_section, option, parse_config
from federation.layout import Role, check_state, select
from federation.protocol import StatisticsReport, Update
from hbn_core import Moments

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from typing import BinaryIO

    from federation.config import Config
    from federation.layout import Layout, State

__all__ = [
    "FRAMEWORK_MISSING",
    "HBN_PREFIX",
    "REPORT_KEY",
    "STATISTICS_ACTION",
    "STATISTICS_KEY",
    "STATISTICS_MESSAGE_TYPE",
    "NodeSetupError",
    "ServerOptions",
    "check_runs_on_flower",
    "config_from_run_config",
    "first_replies",
    "raise_reply_error",
    "read_replies",
    "read_report",
    "replies_train_loss",
    "report_client_id",
    "report_content",
    "shared_train_reply",
    "sole_records",
    "state_from_record",
    "state_record",
    "statistics_queries",
    "train_reply_content",
    "travelling_state",
    "with_arrays",
    "write_atomically",
]

logger = logging.getLogger("federation")
Read = TypeVar("Read")

STATISTICS_ACTION = "hbn_statistics"
STATISTICS_MESSAGE_TYPE = f"query.{STATISTICS_ACTION}"
STATISTICS_KEY = "hbn-statistics"
REPORT_KEY = "hbn-report"
TRAIN_LOSS = "train-loss"
EXAMPLES = "num-examples"
FIELDS = ("count", "mean", "m2")
HBN_PREFIX = "hbn."
FRAMEWORK_MISSING = "lacks its framework"
"""In a node's error reply: the node cannot build its partition's model, a setup error that
ends the run (:class:`~federation.flower.strategy.HBNStrategy`) rather than a fault."""


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """The run configuration's ``flower`` section: options of the server app, not of HBN.

    Attributes
    ----------
    timeout
        Seconds to wait for the nodes' replies in each step.
    out_dir
        Where the server app writes ``results.json`` and ``global_state.npz``; empty: nowhere.
    """

    timeout: float = option(
        3600.0,
        "seconds to wait for the nodes' replies in each step",
        bounds=at_least(0, 10**6, strict=True, text="a positive number of seconds"),
    )
    out_dir: str = option("", "where the server app writes its results; empty: nowhere")


def state_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A canonical state as an :class:`~flwr.app.ArrayRecord`, one named array per tensor."""
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in state.items()})


def state_from_record(record: ArrayRecord) -> State:
    """The canonical state an :class:`~flwr.app.ArrayRecord` carries, as NumPy arrays."""
    return {name: array.numpy() for name, array in record.items()}


def report_content(report: StatisticsReport, client_id: int) -> RecordDict:
    """The content of a reply to the statistics query."""
    arrays = {
        f"{layer}.{field}": np.asarray(value)
        for layer, moments in report.moments.items()
        for field, value in zip(FIELDS, moments, strict=True)
    }
    metrics = MetricRecord(
        {
            "examples": int(report.examples),
            "dataset-size": int(report.dataset_size),
            "client-id": client_id,
        }
    )
    return RecordDict({STATISTICS_KEY: state_record(arrays), REPORT_KEY: metrics})


def statistics_queries(
    nodes: Iterable[int], arrays: ArrayRecord, server_round: int
) -> list[Message]:
    """The statistics query of round ``server_round`` to each node, with the global state."""
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    return [
        Message(content=content, message_type=STATISTICS_MESSAGE_TYPE, dst_node_id=node)
        for node in nodes
    ]


def report_client_id(content: RecordDict) -> int | None:
    """The client id a statistics reply declares, if it declares one."""
    client_id = content.metric_records[REPORT_KEY].get("client-id")
    return client_id if isinstance(client_id, int) else None


def read_report(content: RecordDict, layers: Iterable[str]) -> StatisticsReport:
    """The :class:`~federation.protocol.StatisticsReport` a statistics reply carries.

    Only the structure is read here; :func:`federation.protocol.check_report`
    checks the values.

    Raises
    ------
    ValueError
        If a record or a layer's ``count``, ``mean`` or ``m2`` is missing, a layer is unknown,
        or the counts are not integers.
    """
    if STATISTICS_KEY not in content.array_records or REPORT_KEY not in content.metric_records:
        msg = (
            f"a statistics reply must hold the ArrayRecord {STATISTICS_KEY!r} and the "
            f"MetricRecord {REPORT_KEY!r}; got {sorted(content)}."
        )
        raise ValueError(msg)
    arrays = state_from_record(content.array_records[STATISTICS_KEY])
    layers = list(layers)
    expected = {f"{layer}.{field}" for layer in layers for field in FIELDS}
    if set(arrays) != expected:
        missing, unknown = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        msg = f"the statistics report's arrays are missing {missing}, unknown {unknown}."
        raise ValueError(msg)
    moments = {}
    for layer in layers:
        count = arrays[f"{layer}.count"]
        if not np.issubdtype(count.dtype, np.integer):
            msg = f"`{layer}.count` must be an integer array; got {count.dtype}."
            raise ValueError(msg)
        moments[layer] = Moments(count, arrays[f"{layer}.mean"], arrays[f"{layer}.m2"])
    metrics = content.metric_records[REPORT_KEY]
    examples, dataset_size = metrics.get("examples"), metrics.get("dataset-size")
    if not isinstance(examples, int) or not isinstance(dataset_size, int):
        msg = (
            "the report's `examples` and `dataset-size` must be integers; "
            f"got {examples!r} and {dataset_size!r}."
        )
        raise ValueError(msg)
    return StatisticsReport(moments, examples, dataset_size)


def train_reply_content(update: Update) -> RecordDict:
    """The content of a reply to a train message: the tensors sent, examples and loss."""
    metrics = MetricRecord({EXAMPLES: update.examples, TRAIN_LOSS: update.train_loss})
    return RecordDict({"arrays": state_record(update.sent), "metrics": metrics})


def sole_records(
    content: RecordDict, other: Literal["config", "metric"], what: str
) -> tuple[str, ArrayRecord, ConfigRecord | MetricRecord]:
    """The key and record of ``content``'s one ArrayRecord, and its one config or metric record.

    Raises
    ------
    ValueError
        If ``content`` holds other than one ArrayRecord and one record of kind ``other``;
        the message names ``what`` the content is.
    """
    others = content.config_records if other == "config" else content.metric_records
    if len(content.array_records) != 1 or len(others) != 1:
        msg = (
            f"{what} must hold one ArrayRecord and one {other.capitalize()}Record; got "
            f"{len(content.array_records)} and {len(others)}."
        )
        raise ValueError(msg)
    ((key, arrays),) = content.array_records.items()
    (record,) = others.values()
    return key, arrays, record


def shared_train_reply(reply: Message, *, layout: Layout, like: State, weighted_by: str) -> Message:
    """A train reply, checked, its ArrayRecord cut down to the ``shared`` tensors.

    Statistics, alpha and counters (``num_batches_tracked``) a client may have sent are
    dropped here, before any averaging; the shared tensors, the example count
    (``weighted_by``) and the training loss are checked
    (:func:`federation.protocol.check_update`, against ``like``, the state sent).

    Raises
    ------
    ValueError, TypeError
        If the reply is an error, is not one ArrayRecord and one MetricRecord, or does not
        check; :class:`NodeSetupError` for a node without its framework.
    """
    raise_reply_error(reply)
    key, arrays, metrics = sole_records(reply.content, "metric", "a train reply")
    received = state_from_record(arrays)
    names = select(layout, Role.SHARED)
    shared = {name: received[name] for name in names if name in received}
    protocol.check_update(
        shared,
        metrics.get(weighted_by),
        layout,
        names,
        like=like,
        train_loss=metrics.get(TRAIN_LOSS),
    )
    reply.content = with_arrays(reply.content, state_record(shared), key=key)
    return reply


def replies_train_loss(replies: Iterable[Message], weighted_by: str) -> float | None:
    """The round's training loss (:func:`federation.protocol.train_loss`) from train replies.

    The replies are checked ones (:func:`sole_records`, :func:`federation.protocol.check_update`):
    each ``train-loss`` weighs its reply's ``weighted_by`` examples. ``None`` if a reply
    reports no training loss.
    """
    losses, examples = [], []
    for reply in replies:
        (metrics,) = reply.content.metric_records.values()
        loss, count = metrics.get(TRAIN_LOSS), metrics.get(weighted_by)
        if not isinstance(loss, int | float) or not isinstance(count, int):
            return None
        losses.append(float(loss))
        examples.append(count)
    return protocol.train_loss(losses, examples)


def read_replies(
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


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[Config, ServerOptions]:
    """The HBN configuration and the server options a flat Flower run configuration holds.

    ``{"rounds": 3, "train.lr": 0.1, "clients.frameworks.torch": 4, "flower.timeout": 600}``
    is the TOML table ``hbn-fed`` reads plus a ``[flower]`` section; see
    :func:`federation.config.parse_config`.

    With any key under ``hbn.`` (a ``[tool.flwr.app.config.hbn]`` section), HBN reads only
    those keys, prefix removed (``hbn.train.lr``, ``hbn.flower.timeout``), and leaves every
    other key (``num-server-rounds``, an app's own) to the app.

    Raises
    ------
    federation.config.ConfigError
        If a key is unknown or a value is not allowed; the message names the key.
    """
    if any(key.startswith(HBN_PREFIX) for key in run_config):
        run_config = {
            key.removeprefix(HBN_PREFIX): value
            for key, value in run_config.items()
            if key.startswith(HBN_PREFIX)
        }
    table: dict[str, Any] = {}
    for key, value in run_config.items():
        *sections, leaf = key.split(".")
        cursor = table
        for section in sections:
            cursor = cursor.setdefault(section, {})
        cursor[leaf] = value
    options: ServerOptions = build_section(ServerOptions, table.pop("flower", {}), prefix="flower.")
    return parse_config(table), options


def write_atomically(path: pathlib.Path, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace ``path`` with what ``write`` writes to a stream, all or nothing.

    ``write`` fills a temporary file in the same folder, which then replaces ``path`` in one
    rename: a reader, or a process killed meanwhile, never sees half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


class NodeSetupError(RuntimeError):
    """A node cannot build its partition's model (its framework is missing): the run stops.

    A fault of one message would recur in every message to that node, so it is not left out
    round after round; the run fails at the first step, naming the node and the framework.
    """


def raise_reply_error(reply: Message) -> None:
    """Raise if ``reply`` is an error.

    :class:`NodeSetupError` for a node without its framework, :class:`ValueError` (a fault of
    this node and step) otherwise.
    """
    if not reply.has_error():
        return
    reason = reply.error.reason or ""
    if FRAMEWORK_MISSING in reason:
        msg = f"node {reply.metadata.src_node_id} cannot run: {reason}"
        raise NodeSetupError(msg)
    msg = f"the node replied with an error: {reason}"
    raise ValueError(msg)


def first_replies(
    replies: Iterable[Message], nodes: tuple[int, ...], sent: Iterable[Message]
) -> dict[int, Message]:
    """Each sampled node's first reply, by node: a reply delivered twice counts once.

    An error the SuperLink sends on a node's behalf (node unavailable, message expired) comes
    from the SuperLink's own node id; it is the node's reply to the ``sent`` message it
    answers (``reply_to_message_id``). Replies from nodes that were not sent the message are
    left out and logged.
    """
    recipients = {
        m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id
    }
    first: dict[int, Message] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in nodes and reply.has_error():
            node = recipients.get(reply.metadata.reply_to_message_id, node)
        if node not in nodes:
            logger.warning("a reply from node %d, which was not sampled, is ignored", node)
        elif node in first:
            logger.warning("a second reply from node %d is ignored", node)
        else:
            first[node] = reply
    return first


def with_arrays(content: RecordDict, arrays: ArrayRecord, *, key: str | None = None) -> RecordDict:
    """``content`` with its (single) ArrayRecord replaced by ``arrays``."""
    if key is None:
        (key,) = content.array_records
    return RecordDict({**{k: v for k, v in content.items() if k != key}, key: arrays})


def travelling_state(state: State, layout: Layout) -> State:
    """The ``shared`` and ``statistics`` tensors of ``state``, checked against ``layout``.

    A whole model state is accepted (``ArrayRecord(model.state_dict())``): the layout's
    roles decide what travels, so ``personal`` tensors (alpha, local running statistics)
    and integer counters outside the layout (``num_batches_tracked``) are left out. Any
    other tensor the layout does not know is refused, as a missing one is.

    Raises
    ------
    ValueError, TypeError
        If ``state`` holds a floating tensor the layout does not know, or lacks or misshapes
        one that travels (:func:`federation.layout.check_state`).
    """
    names = select(layout, Role.SHARED, Role.STATISTICS)
    unknown = [
        name
        for name in state
        if name not in layout and not np.issubdtype(state[name].dtype, np.integer)
    ]
    if unknown:
        msg = f"the global state holds tensors the layout does not know: {sorted(unknown)}."
        raise ValueError(msg)
    travelling = {name: state[name] for name in names if name in state}
    check_state(travelling, layout, names=names)
    return travelling


# Methods whose rounds need more than the HBN round of the Flower strategy.
_EMBEDDED_ONLY_METHODS = {
    "fedbn": "its evaluation averages personal BatchNorm tensors",
    "fixbn": "its clients switch to frozen statistics at a round",
}


def check_runs_on_flower(config: Config) -> None:
    """Refuse what :class:`~federation.flower.strategy.HBNStrategy` cannot run.

    Raises
    ------
    federation.config.ConfigError
        For ``method = "fedbn"`` or ``"fixbn"``, ``server.momentum``, ``alpha.policy =
        "averaged"`` or ``eval.statistics = "sync"``, naming the option.
    """
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
