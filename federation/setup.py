"""What the embedded engine runs on, built once from the configuration: one frozen value.

:func:`set_up` loads the data, partitions it among the clients (seeded), builds a model per
framework in use (or takes yours) and checks that they share one canonical layout. The result,
a :class:`Setup`, does not change over a run; the rounds change only the
:class:`~federation.protocol.FederationState`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from federation import protocol
from federation.client import Client
from federation.data import check_clients_with_data, load_dataset, partition
from federation.layout import Role, select
from federation.models import build_model
from federation.protocol import Stream

if TYPE_CHECKING:
    from collections.abc import Mapping

    from federation.config import Config
    from federation.data import Dataset
    from federation.layout import Layout, State
    from federation.models import FrameworkModel
    from federation.protocol import FederationState, HBNLayer

__all__ = ["Setup", "client_model_state", "common_layout", "set_up"]


class Setup(NamedTuple):
    """The fixed parts of an embedded run.

    Attributes
    ----------
    config
        The checked configuration.
    data
        The data set.
    models
        A model per framework in use (the clients' and the evaluation's), by framework name.
    layout
        Their common canonical layout.
    hbn_layers
        The layout's HBN layers (:func:`federation.protocol.hbn_layers`).
    initial
        The evaluation model's initial state, the whole layout.
    initial_personal
        Its ``personal`` tensors: a client's personal state before its first training.
    clients
        The clients, by client id: framework and training-data indices.
    """

    config: Config
    data: Dataset
    models: dict[str, FrameworkModel]
    layout: Layout
    hbn_layers: dict[str, HBNLayer]
    initial: State
    initial_personal: State
    clients: tuple[Client, ...]


def set_up(
    config: Config,
    *,
    dataset: Dataset | None = None,
    models: Mapping[str, FrameworkModel] | None = None,
) -> Setup:
    """The data, partition, models and layout of a run of ``config``.

    ``dataset`` defaults to the configured data set; ``models`` to the reference model built
    in each framework in use (``config.model`` is ignored where they are given).

    Raises
    ------
    ValueError
        If fewer than ``min_clients`` clients hold data, or ``models`` disagree on the layout
        or lack a framework the configuration uses.
    """
    data = (
        dataset
        if dataset is not None
        else load_dataset(config.data.name, seed=config.seed, path=config.data.path)
    )
    frameworks = config.client_frameworks
    indices = partition(
        data.y_train,
        config.data.num_clients,
        method=config.data.partition,
        rng=protocol.seeded_rng(config.seed, Stream.PARTITION, 0, 0),
        beta=config.data.beta,
        shards_per_client=config.data.shards_per_client,
    )
    check_clients_with_data(indices, config.clients.min_clients)
    needed = list(dict.fromkeys([config.eval_framework, *frameworks]))
    if models is None:
        spec = config.model_spec(data.input_shape, data.num_classes)
        models = {name: build_model(name, spec, seed=config.seed) for name in needed}
    layout = common_layout(models, needed)
    initial = models[config.eval_framework].get_state()
    return Setup(
        config=config,
        data=data,
        models=dict(models),
        layout=layout,
        hbn_layers=protocol.hbn_layers(layout),
        initial=initial,
        initial_personal={k: initial[k] for k in select(layout, Role.PERSONAL)},
        clients=tuple(
            Client(i, fw, idx) for i, (fw, idx) in enumerate(zip(frameworks, indices, strict=True))
        ),
    )


def common_layout(models: Mapping[str, FrameworkModel], frameworks: list[str]) -> Layout:
    """The canonical layout the models of ``frameworks`` share.

    Raises
    ------
    ValueError
        If a framework has no model, or two layouts differ.
    """
    missing = [name for name in frameworks if name not in models]
    if missing:
        msg = f"`models` must hold a model for every framework in use; missing {missing}."
        raise ValueError(msg)
    layout = models[frameworks[0]].layout
    for name in frameworks[1:]:
        if models[name].layout != layout:
            msg = (
                f"`models` must share one canonical layout; {name}'s differs from "
                f"{frameworks[0]}'s."
            )
            raise ValueError(msg)
    return layout


def client_model_state(setup: Setup, state: FederationState, client_id: int) -> State:
    """What client ``client_id``'s model runs with in the round after ``state``.

    The global state and the client's personal state, or in its first round the one
    :func:`federation.protocol.first_personal` gives.
    """
    first = protocol.first_personal(state, setup.initial_personal, setup.config)
    return protocol.model_state(state.global_state, state.personal[client_id], first)
