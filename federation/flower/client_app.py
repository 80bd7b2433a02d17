"""A Flower ClientApp around the federation's backend-neutral :class:`~federation.client.Client`.

:func:`make_client_app` answers the three messages of an HBN round with the same client code
the embedded simulation runs, on a torch, Flax NNX or Keras model:

- ``query.hbn_statistics``: the exact moments of every HBN layer's input over the node's data,
  under the global model and the node's own alpha (:meth:`Client.collect_statistics`);
- ``train``: local SGD from the global model (:meth:`Client.fit`); the reply holds the
  ``shared`` tensors and ``num-examples``. The new alpha goes to ``context.state`` and never
  leaves the node;
- ``evaluate``: the global model in inference mode on the node's share of the test set.

A node is client ``partition-id`` of ``num-partitions`` (its ``node_config``, which Flower's
simulation sets and ``flower-supernode --node-config`` sets in a deployment). Its framework,
data and random streams are those of that client in :class:`federation.simulation.Simulation`
with the same configuration, so a Flower run and an embedded run train the same federation.
"""

from __future__ import annotations

import functools
import importlib
import pathlib
import zipfile
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federation import protocol
from federation.client import Client, load_state
from federation.data import batches, load_dataset, partition
from federation.flower.wire import (
    FRAMEWORK_MISSING,
    STATISTICS_ACTION,
    config_from_run_config,
    report_content,
    sole_records,
    state_from_record,
    state_record,
    train_reply_content,
    write_atomically,
)
from federation.layout import Role, check_state, select
from federation.models import ModelSpec, build_model
from federation.protocol import StatisticsReport, Stream, seeded_rng

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from flwr.app import Context
    from flwr.clientapp.typing import Mod

    from federation.config import Config
    from federation.data import Dataset
    from federation.layout import Layout, State
    from federation.models import CollectionMode, FrameworkModel

__all__ = [
    "PERSONAL_KEY",
    "STATE_DIR_KEY",
    "load_personal_state",
    "make_client_app",
    "personal_state_path",
    "received",
    "register_statistics_query",
    "save_personal_state",
]

PERSONAL_KEY = "hbn-personal"
STATE_DIR_KEY = "hbn-state-dir"
"""The ``node_config`` key of the folder where a node keeps its personal state on its disk."""


class _Node:
    """One node's client, model and data, rebuilt from its context for every message."""

    def __init__(
        self,
        context: Context,
        config: Config | None,
        dataset: Dataset | None,
        models: Callable[[str], FrameworkModel] | None,
    ) -> None:
        self.config = (
            config if config is not None else config_from_run_config(context.run_config)[0]
        )
        self.client_id, self.num_clients = _partition_id(context, self.config)
        data = self.config.data
        self.data = (
            dataset if dataset is not None else _dataset(data.name, self.config.seed, data.path)
        )
        indices = partition(
            self.data.y_train,
            self.num_clients,
            method=self.config.data.partition,
            rng=self.rng(Stream.PARTITION, 0, client=0),
            beta=self.config.data.beta,
            shards_per_client=self.config.data.shards_per_client,
        )
        framework = self.config.client_frameworks[self.client_id]
        self.client = Client(self.client_id, framework, indices[self.client_id])
        try:
            if models is None:
                self.model, self.initial_personal = _reference_model(
                    framework,
                    self.config.model_spec(self.data.input_shape, self.data.num_classes),
                    self.config.seed,
                )
            else:
                self.model = models(framework)
                self.initial_personal = _personal(self.model)
        except ImportError as error:
            msg = f"partition {self.client_id} {FRAMEWORK_MISSING} {framework!r}: {error}"
            raise ImportError(msg) from error
        self.store = personal_state_path(context, self.client_id, self.num_clients)
        self.personal: State | None = None
        if PERSONAL_KEY in context.state.array_records:
            self.personal = state_from_record(context.state.array_records[PERSONAL_KEY])
        elif self.store is not None and self.store.is_file():
            self.personal = load_personal_state(self.store, self.model.layout)

    def keep_personal(self, context: Context, personal: State) -> None:
        """Keep this node's new personal state in ``context.state`` and, if set, on disk."""
        context.state[PERSONAL_KEY] = state_record(personal)
        if self.store is not None:
            save_personal_state(self.store, personal)

    def rng(
        self, stream: Stream, round_index: int, *, client: int | None = None
    ) -> np.random.Generator:
        """The generator :class:`~federation.simulation.Simulation` uses for this draw."""
        client = self.client_id if client is None else client
        return seeded_rng(self.config.seed, stream, round_index, client)

    def received(self, message: Message) -> tuple[State, int, dict[str, object]]:
        """The message's global state (checked), round index (from 0) and config."""
        return received(message, self.model.layout)

    def model_state(self, global_state: State) -> State:
        """The global state with this node's alpha (or the initial one)."""
        return protocol.model_state(global_state, self.personal, self.initial_personal)


def received(message: Message, layout: Layout) -> tuple[State, int, dict[str, object]]:
    """A server message's global state, round index (from 0) and config, checked.

    The state must hold exactly the layout's ``shared`` and ``statistics`` tensors, in their
    shapes; the config an integer ``server-round`` of at least 1.

    Raises
    ------
    ValueError, TypeError
        If the message does not hold one ArrayRecord and one ConfigRecord, or they do not
        check.
    """
    _, arrays, config = sole_records(message.content, "config", "an HBN message")
    state = state_from_record(arrays)
    check_state(state, layout, names=select(layout, Role.SHARED, Role.STATISTICS))
    server_round = config.get("server-round")
    if not isinstance(server_round, int) or server_round < 1:
        msg = f"the message's `server-round` must be an integer >= 1; got {server_round!r}."
        raise ValueError(msg)
    return state, server_round - 1, dict(config)


# Each framework's layout and statistics step for a model of your own, in federation.models.
_NATIVE = {
    "torch": ("torch_model", "torch"),
    "jax": ("jax_model", "flax"),
    "keras": ("keras_model", "keras"),
}


def register_statistics_query(
    app: ClientApp,
    *,
    framework: str,
    model: Callable[[Context], Any],
    batches: Callable[[Context], Iterable[Any]],
    mode: CollectionMode = "hybrid",
) -> None:
    """Answer HBN's statistics query in a ClientApp of your own, with your model and data.

    One call registers a ``query.hbn_statistics`` handler on ``app``. For each query it takes
    ``model(context)`` (your torch module, Flax NNX module or Keras model with HBN layers,
    holding this node's alpha), writes the global state the message carries into it, runs
    ``batches(context)`` (your local model inputs, batch by batch) through it, and replies
    with the exact moments of every HBN layer's input. The model's layout is
    ``torch_layout``, ``flax_layout`` or ``keras_layout`` (:mod:`federation.models`), the one
    to start :class:`~federation.flower.strategy.HBNStrategy` with. The node's client id in
    the report is its ``partition-id`` where its ``node_config`` sets one, else its node id.

    Parameters
    ----------
    app
        Your ClientApp; your own ``train`` and ``evaluate`` handlers stay yours.
    framework
        ``"torch"``, ``"jax"`` (Flax NNX) or ``"keras"``.
    model, batches
        Called with the message's context for every query.
    mode
        How the HBN layers normalise while collecting (``statistics.mode``): ``"hybrid"``
        as in training, or ``"global"``.

    Raises
    ------
    ValueError
        If ``framework`` or ``mode`` is not one of those.
    """
    if framework not in _NATIVE:
        msg = f"`framework` must be one of {sorted(_NATIVE)}; got {framework!r}."
        raise ValueError(msg)
    if mode not in ("hybrid", "global"):
        msg = f"`mode` must be 'hybrid' or 'global'; got {mode!r}."
        raise ValueError(msg)
    module_name, prefix = _NATIVE[framework]

    @app.query(STATISTICS_ACTION)
    def statistics(message: Message, context: Context) -> Message:
        native = importlib.import_module(f"federation.models.{module_name}")
        network = model(context)
        state, _, _ = received(message, getattr(native, f"{prefix}_layout")(network))
        moments, examples = getattr(native, f"{prefix}_moments")(
            network, state, batches(context), mode=mode
        )
        client_id = context.node_config.get("partition-id", context.node_id)
        report = StatisticsReport(moments, examples, examples)
        return Message(report_content(report, int(client_id)), reply_to=message)


def make_client_app(
    config: Config | None = None,
    *,
    dataset: Dataset | None = None,
    models: Callable[[str], FrameworkModel] | None = None,
    mods: Sequence[Mod] = (),
) -> ClientApp:
    """A Flower ClientApp that runs the federation's clients.

    Parameters
    ----------
    config
        The federation's configuration; by default each node reads it from its run
        configuration (:func:`federation.flower.wire.config_from_run_config`).
    dataset
        The data; by default the configured data set, loaded once per process.
    models
        ``models(framework)`` returns a model of your own for that framework, as
        :class:`~federation.simulation.Simulation`'s ``models`` (called for every message: cache
        it yourself). By default the reference model, built once per process and framework.
    mods
        Flower client mods, applied to every message.

    Returns
    -------
    flwr.clientapp.ClientApp
        Answers ``query.hbn_statistics``, ``train`` and ``evaluate``.
    """
    app = ClientApp(mods=list(mods))

    def node(context: Context) -> _Node:
        return _Node(context, config, dataset, models)

    @app.query(STATISTICS_ACTION)
    def statistics(message: Message, context: Context) -> Message:
        here = node(context)
        state, round_index, _ = here.received(message)
        report = here.client.collect_statistics(
            here.model,
            here.model_state(state),
            here.data,
            here.config.statistics,
            here.rng(Stream.STATISTICS, round_index),
        )
        return Message(report_content(report, here.client_id), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        here = node(context)
        state, round_index, settings = here.received(message)
        lr = settings.get("lr")
        if not isinstance(lr, float) or not lr > 0:
            msg = f"the train message's config must hold a positive float `lr`; got {lr!r}."
            raise ValueError(msg)
        update = here.client.fit(
            here.model,
            here.model_state(state),
            here.data,
            here.config.train,
            lr=lr,
            send_personal=False,
            rng=here.rng(Stream.TRAINING, round_index),
        )
        here.keep_personal(context, update.personal)
        return Message(train_reply_content(update), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        here = node(context)
        state, _, _ = here.received(message)
        load_state(here.model, {**state, **here.initial_personal})
        shares = np.array_split(np.arange(len(here.data.y_test)), here.num_clients)
        result = here.model.evaluate(
            batches(
                here.data.x_test,
                here.data.y_test,
                shares[here.client_id],
                batch_size=here.config.eval.batch_size,
                rng=None,
            )
        )
        if result.examples == 0:
            msg = f"client {here.client_id} has no test examples to evaluate on."
            raise ValueError(msg)
        metrics = MetricRecord(
            {
                "num-examples": result.examples,
                "accuracy": result.correct / result.examples,
                "loss": result.loss_sum / result.examples,
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app


def _partition_id(context: Context, config: Config) -> tuple[int, int]:
    """The node's client index and the number of clients, from its ``node_config``."""
    node_config = context.node_config
    partition_id, num_partitions = (
        node_config.get("partition-id"),
        node_config.get("num-partitions"),
    )
    if not isinstance(num_partitions, int) or num_partitions != config.data.num_clients:
        msg = (
            f"the node's `num-partitions` must equal data.num_clients = "
            f"{config.data.num_clients}; got {num_partitions!r}."
        )
        raise ValueError(msg)
    if not isinstance(partition_id, int) or not 0 <= partition_id < num_partitions:
        msg = f"the node's `partition-id` must be in [0, {num_partitions}); got {partition_id!r}."
        raise ValueError(msg)
    return partition_id, num_partitions


@functools.cache
def _dataset(name: str, seed: int, path: str) -> Dataset:
    """A data set, loaded once per process (a node's process serves many nodes)."""
    return load_dataset(name, seed=seed, path=path)


@functools.cache
def _reference_model(framework: str, spec: ModelSpec, seed: int) -> tuple[FrameworkModel, State]:
    """One reference model per framework and process, as the embedded simulation shares one.

    Its initial personal state is what a node's first round starts from.
    """
    model = build_model(framework, spec, seed=seed)
    return model, _personal(model)


def _personal(model: FrameworkModel) -> State:
    state = model.get_state()
    return {name: state[name] for name in select(model.layout, Role.PERSONAL)}


def personal_state_path(context: Context, client_id: int, num_clients: int) -> pathlib.Path | None:
    """Where the node keeps its personal state on its disk, or ``None``.

    The file is ``<hbn-state-dir>/run-<run id>/partition-<k>-of-<K>.npz``.
    Keyed by the Flower run and the node's partition, not by its node id, so a SuperNode
    restarted with the same ``--node-config`` continues the alpha it had. ``None`` when the
    node's ``node_config`` sets no ``hbn-state-dir`` (the state then lives in memory only).
    """
    folder = context.node_config.get(STATE_DIR_KEY)
    if folder is None or folder == "":
        return None
    if not isinstance(folder, str):
        msg = f"the node's `{STATE_DIR_KEY}` must be a folder path; got {folder!r}."
        raise ValueError(msg)
    name = f"partition-{client_id}-of-{num_clients}.npz"
    return pathlib.Path(folder).expanduser() / f"run-{context.run_id}" / name


def save_personal_state(path: pathlib.Path, personal: State) -> None:
    """Write ``personal`` to ``path`` as ``.npz``, atomically (a temporary file, then a rename).

    A node killed while it writes leaves the previous file whole.
    """
    write_atomically(path, lambda stream: np.savez(stream, allow_pickle=False, **personal))


def load_personal_state(path: pathlib.Path, layout: Layout) -> State:
    """The personal state ``path`` holds, read without pickle and checked against ``layout``.

    Raises
    ------
    ValueError
        If the file is not an ``.npz`` readable without pickle, or its tensors are not the
        layout's personal ones (names, shapes, dtypes); the message names the file.
    """
    names = select(layout, Role.PERSONAL)
    try:
        with np.load(path, allow_pickle=False) as stored:
            state = {name: stored[name] for name in stored.files}
        check_state(state, layout, names=names)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
        msg = f"the node's personal state {str(path)!r} cannot be used: {error}"
        raise ValueError(msg) from error
    return state
