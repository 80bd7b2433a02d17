"""A backend-neutral federated client: its data, its personal state and the two client steps.

A :class:`Client` holds no framework object. It drives a :class:`~federation.models.FrameworkModel`
that the simulation lends it (one per framework, shared by that framework's clients), loading
the global state plus its own personal state before each step. That is how Flower's
ephemeral clients work as well: the personal state (``alpha``) is what persists.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from federation.aggregate import StatisticsReport
from federation.data import batches
from federation.layout import Role, select
from federation.models import SGDConfig
from hbn_core import Moments

if TYPE_CHECKING:
    from federation.config import StatisticsConfig, TrainConfig
    from federation.data import Dataset
    from federation.layout import State
    from federation.models import FrameworkModel

__all__ = ["Client", "Update"]


class Update(NamedTuple):
    """One client's training step.

    Attributes
    ----------
    sent
        What goes to the server: the ``shared`` tensors, and the personal ones only where the
        server averages them (the authors' ``alpha.policy = "averaged"``; FedBN, whose average
        serves evaluation only).
    personal
        The client's new personal state, which it keeps.
    examples
        The number of training examples (the FedAvg weight).
    train_loss
        The mean training loss over the local epochs.
    """

    sent: State
    personal: State
    examples: int
    train_loss: float


class Client:
    """One client: its example indices, its framework, and the personal state it keeps.

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
        self.personal: State | None = None
        self.compute_seconds = 0.0

    def __repr__(self) -> str:
        return f"Client({self.client_id}, {self.framework!r}, {len(self.indices)} examples)"

    def model_state(self, global_state: State, first_personal: State) -> State:
        """The state its model runs with: the global state and its personal state.

        ``first_personal`` is the personal state of a client that has not trained yet.
        """
        return {**global_state, **(self.personal if self.personal is not None else first_personal)}

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
        start = time.perf_counter()
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
        model.set_state(state)
        moments = model.collect_statistics(inputs, settings.mode)
        if settings.recorded == "hybrid":
            moments = {name: _hybrid(m, name, state) for name, m in moments.items()}
        self.compute_seconds += time.perf_counter() - start
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
        frozen BatchNorm statistics (FixBN's second stage).

        The client's personal state is returned, not kept: the simulation commits it once the
        round succeeds, so that a failed round leaves every client as it was.
        """
        start = time.perf_counter()
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
        model.set_state(state)
        result = model.train(epochs, sgd, freeze_statistics=freeze_statistics)
        trained = model.get_state()
        sent_roles = (Role.SHARED, Role.PERSONAL) if send_personal else (Role.SHARED,)
        self.compute_seconds += time.perf_counter() - start
        return Update(
            sent={name: trained[name] for name in select(layout, *sent_roles)},
            personal={name: trained[name] for name in select(layout, Role.PERSONAL)},
            examples=len(self.indices),
            train_loss=result.loss_sum / max(result.examples, 1),
        )


def _hybrid(moments: Moments, layer: str, state: State) -> Moments:
    weight = 1 / (1 + np.exp(-state[f"{layer}.alpha"].astype(np.float64)))
    count, mean, m2 = moments
    global_mean = state[f"{layer}.global_mean"].astype(np.float64)
    global_var = state[f"{layer}.global_var"].astype(np.float64)
    var = (1 - weight) * m2 / count + weight * global_var
    return Moments(count, (1 - weight) * mean + weight * global_mean, var * count)
