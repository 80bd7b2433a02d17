"""A backend-neutral federated client: its data and the two client steps of a round.

A :class:`Client` holds no framework object and no state that changes: its personal state
lives in the federation's state (:class:`federation.protocol.FederationState`), and it drives a
:class:`~federation.models.FrameworkModel` that the engine lends it (one per framework, shared
by that framework's clients), loading a *copy* of the state it is due before each step
(:func:`load_state`). That is how Flower's ephemeral clients work as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from federation.data import batches
from federation.layout import Role, select
from federation.models import SGDConfig
from federation.protocol import StatisticsReport, Update, hbn_layers
from hbn_core import Moments

if TYPE_CHECKING:
    from collections.abc import Mapping

    from federation.config import StatisticsConfig, TrainConfig
    from federation.data import Dataset
    from federation.layout import State
    from federation.models import FrameworkModel
    from federation.protocol import HBNLayer

__all__ = ["Client", "load_state"]


def load_state(model: FrameworkModel, state: Mapping[str, np.ndarray]) -> None:
    """Load a copy of ``state`` into ``model``.

    Whatever the model does to the arrays it receives never reaches the caller's, so a model
    that writes into them, then fails, cannot corrupt a global state.
    """
    model.set_state({name: np.array(value, copy=True) for name, value in state.items()})


class Client:
    """One client: its id, its framework and its example indices.

    Parameters
    ----------
    client_id
        Its index in the federation.
    framework
        The framework of its model: ``"torch"``, ``"jax"`` or ``"keras"``.
    indices
        Its examples in the data set's train split.
    """

    def __init__(self, client_id: int, framework: str, indices: np.ndarray) -> None:
        self.client_id = client_id
        self.framework = framework
        self.indices = indices

    def __repr__(self) -> str:
        return f"Client({self.client_id}, {self.framework!r}, {len(self.indices)} examples)"

    def collect_statistics(
        self,
        model: FrameworkModel,
        state: State,
        data: Dataset,
        settings: StatisticsConfig,
        rng: np.random.Generator,
    ) -> StatisticsReport:
        r"""The statistics step: every HBN layer's input moments under ``state``.

        With ``settings.recorded = "hybrid"`` (the authors' code, D2), each layer reports the
        hybrid statistics it trains with instead, :math:`\hat\mu = (1-w)\mu_B + w\mu_G` and
        :math:`\hat\sigma^2 = (1-w)\sigma^2_B + w\sigma^2_G` with :math:`w =
        \operatorname{sigmoid}(\alpha)` of this client.
        """
        inputs = [
            x
            for x, _ in batches(
                data.x_train,
                data.y_train,
                self.indices,
                batch_size=settings.batch_size,
                rng=rng if settings.shuffle else None,
                max_batches=settings.max_batches or None,
            )
        ]
        load_state(model, state)
        moments = model.collect_statistics(inputs, settings.mode)
        if settings.recorded == "hybrid":
            layers = hbn_layers(model.layout)
            moments = {name: _hybrid(m, layers[name], state) for name, m in moments.items()}
        return StatisticsReport(moments, sum(len(x) for x in inputs), len(self.indices))

    def fit(
        self,
        model: FrameworkModel,
        state: State,
        data: Dataset,
        settings: TrainConfig,
        *,
        lr: float,
        send_personal: bool,
        rng: np.random.Generator,
        freeze_statistics: bool = False,
    ) -> Update:
        """The training step: ``settings.epochs`` epochs of local SGD from ``state``.

        ``send_personal`` sends the personal tensors too; ``freeze_statistics`` trains with
        frozen BatchNorm statistics (FixBN's second stage). The client's new personal state is
        returned in the update; the engine commits it once the round succeeds.
        """
        layout = model.layout
        sgd = SGDConfig(lr, settings.momentum, settings.weight_decay, settings.clip_norm or None)
        epochs = [
            batch
            for _ in range(settings.epochs)
            for batch in batches(
                data.x_train,
                data.y_train,
                self.indices,
                batch_size=settings.batch_size,
                rng=rng,
                drop_last=settings.drop_last,
            )
        ]
        load_state(model, state)
        result = model.train(epochs, sgd, freeze_statistics=freeze_statistics)
        trained = model.get_state()
        sent_roles = (Role.SHARED, Role.PERSONAL) if send_personal else (Role.SHARED,)
        return Update(
            sent={name: trained[name] for name in select(layout, *sent_roles)},
            personal={name: trained[name] for name in select(layout, Role.PERSONAL)},
            examples=len(self.indices),
            train_loss=result.loss_sum / max(result.examples, 1),
        )


def _hybrid(moments: Moments, layer: HBNLayer, state: State) -> Moments:
    if layer.alpha is None:
        msg = "hybrid recorded statistics need a learned alpha; this HBN layer has none."
        raise ValueError(msg)
    weight = 1 / (1 + np.exp(-state[layer.alpha].astype(np.float64)))
    count, mean, m2 = moments
    global_mean = state[layer.global_mean].astype(np.float64)
    global_var = state[layer.global_var].astype(np.float64)
    var = (1 - weight) * m2 / count + weight * global_var
    return Moments(count, (1 - weight) * mean + weight * global_mean, var * count)
