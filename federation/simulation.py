"""The embedded engine: rounds of :mod:`federation.protocol` over clients in this process.

One round (``docs/federation.md`` has the details), each decision made by the protocol:

1. sample clients (a fraction, at least ``min_clients``), seeded;
2. **statistics step**: each sampled client loads the global model with its own alpha and
   reports the exact input moments of every HBN layer over its data;
3. **training step**: each trains locally and sends its ``shared`` tensors;
4. **server**: :func:`~federation.protocol.aggregate_round`: FedAvg (or FedAvgM) of the shared
   tensors, pooled statistics blended into the global ones;
5. **evaluation** every ``eval.every`` rounds and in the last ``eval.final_rounds``.

A client that raises or sends a malformed report is left out of the step and the fault is
recorded (:func:`federation.steps.settle`, as on Flower); with fewer than ``min_clients``
valid clients the round fails with :class:`~federation.protocol.RoundFailedError` and nothing
changes. An evaluation that fails does not undo the round's training: the round is committed
with the failure in its record.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from federation import protocol, steps
from federation.client import Client, load_state
from federation.data import batches, check_clients_with_data, load_dataset, partition
from federation.layout import Role, select
from federation.models import build_model
from federation.protocol import Fault, FederationState, RoundFailedError, RoundRecord, Stream
from federation.repro.statistics import Summary, summarize

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from federation.config import Config
    from federation.data import Dataset
    from federation.layout import Layout, State
    from federation.models import FrameworkModel
    from federation.protocol import GlobalStatistics, StatisticsReport, Update
    from federation.steps import Settled

    Progress = Callable[[str, Client], None]

__all__ = ["RoundFailedError", "Simulation"]

logger = logging.getLogger("federation")
Result = TypeVar("Result")


class Simulation:
    """A federation run in this process.

    Parameters
    ----------
    config
        The checked configuration (:func:`federation.config.load_config`).
    dataset
        The data; by default the configured data set is loaded.
    models
        A model per framework the clients use, for models of your own (``config.model`` is
        then ignored); by default the reference model is built in each framework. Every model
        must have the same canonical layout.

    Attributes
    ----------
    state
        The federation's :class:`~federation.protocol.FederationState`. :meth:`run_round`
        replaces it with the next round's; set it to resume from a checkpoint's.

    Raises
    ------
    ValueError
        If fewer than ``min_clients`` clients hold data, or ``models`` disagree on the layout
        or lack a framework the configuration uses.
    """

    def __init__(
        self,
        config: Config,
        *,
        dataset: Dataset | None = None,
        models: Mapping[str, FrameworkModel] | None = None,
    ) -> None:
        self.config = config
        self.data = (
            dataset
            if dataset is not None
            else load_dataset(config.data.name, seed=config.seed, path=config.data.path)
        )
        frameworks = config.client_frameworks
        indices = partition(
            self.data.y_train,
            config.data.num_clients,
            method=config.data.partition,
            rng=self._rng(Stream.PARTITION, 0),
            beta=config.data.beta,
            shards_per_client=config.data.shards_per_client,
        )
        check_clients_with_data(indices, config.clients.min_clients)
        needed = list(dict.fromkeys([config.eval_framework, *frameworks]))
        self.models = dict(models) if models is not None else self._reference_models(needed)
        self.layout = _common_layout(self.models, needed)
        self.hbn_layers = protocol.hbn_layers(self.layout)
        initial = self.models[config.eval_framework].get_state()
        self.initial_personal: State = {k: initial[k] for k in select(self.layout, Role.PERSONAL)}
        self.clients = tuple(
            Client(i, fw, idx) for i, (fw, idx) in enumerate(zip(frameworks, indices, strict=True))
        )
        self.state = protocol.initial_state(initial, self.layout, len(self.clients))

    def _reference_models(self, frameworks: list[str]) -> dict[str, FrameworkModel]:
        spec = self.config.model_spec(self.data.input_shape, self.data.num_classes)
        return {name: build_model(name, spec, seed=self.config.seed) for name in frameworks}

    def _rng(self, stream: Stream, round_index: int, client: int = 0) -> np.random.Generator:
        return protocol.seeded_rng(self.config.seed, stream, round_index, client)

    # -- the state, read -------------------------------------------------------------------

    @property
    def global_state(self) -> State:
        """The global model: ``shared`` and ``statistics`` tensors."""
        return self.state.global_state

    @property
    def personal_average(self) -> State:
        """The evaluation model's personal state (:class:`~federation.protocol.FederationState`)."""
        return self.state.personal_average

    @property
    def rounds_done(self) -> int:
        """Rounds committed."""
        return self.state.rounds_done

    @property
    def history(self) -> tuple[RoundRecord, ...]:
        """The record of each committed round."""
        return self.state.history

    def global_statistics(self) -> GlobalStatistics:
        """The current global statistics per HBN layer, float64."""
        return protocol.global_statistics(self.state.global_state, self.hbn_layers)

    def summary(self) -> Summary:
        """Final figures of the rounds so far (:func:`federation.repro.statistics.summarize`)."""
        return summarize(self.state.history)

    def sample_clients(self, round_index: int) -> list[Client]:
        """The round's clients (:func:`federation.protocol.sample_clients`)."""
        eligible = [c.client_id for c in self.clients if len(c.indices)]
        rng = self._rng(Stream.SAMPLING, round_index)
        chosen = protocol.sample_clients(eligible, len(self.clients), self.config.clients, rng)
        return [self.clients[i] for i in chosen]

    # -- rounds ----------------------------------------------------------------------------

    def run(self, on_round: Callable[[RoundRecord], None] | None = None) -> tuple[RoundRecord, ...]:
        """Run the remaining rounds; ``on_round(record)`` after each one."""
        while self.state.rounds_done < self.config.rounds:
            record = self.run_round()
            if on_round is not None:
                on_round(record)
        return self.state.history

    def run_round(self, progress: Progress | None = None) -> RoundRecord:
        """Run the next round and commit it to :attr:`state`; return its record.

        ``progress(step, client)`` is called after each client step. Raises
        :class:`~federation.protocol.RoundFailedError` (the state unchanged) if too few clients
        are valid.
        """
        self.state, record = self.step(self.state, progress)
        return record

    def step(
        self, state: FederationState, progress: Progress | None = None
    ) -> tuple[FederationState, RoundRecord]:
        """The round after ``state``: the next state and the round's record.

        Raises
        ------
        federation.protocol.RoundFailedError
            If a step has fewer than ``min_clients`` valid clients.
        """
        round_index = state.rounds_done
        start = time.perf_counter()
        lr = protocol.learning_rate(self.config.train, round_index)
        sampled = self.sample_clients(round_index)
        statistics, statistics_compute = self._statistics_step(
            state, round_index, sampled, progress
        )
        min_clients = self.config.clients.min_clients
        reports = steps.require(statistics, min_clients) if self.hbn_layers else {}
        statistics_done = time.perf_counter()
        training, training_compute = self._training_step(state, round_index, sampled, lr, progress)
        updates = steps.require(training, min_clients)
        training_done = time.perf_counter()
        trained = protocol.aggregate_round(
            state,
            updates,
            list(reports.values()),
            config=self.config,
            layout=self.layout,
            layers=self.hbn_layers,
        )
        server_done = time.perf_counter()
        evaluation, evaluation_faults = self._evaluation(trained, round_index, sampled, updates)
        end = time.perf_counter()
        record = RoundRecord(
            round=round_index + 1,
            lr=lr,
            sampled=tuple(c.client_id for c in sampled),
            statistics_clients=tuple(sorted(reports)),
            trained_clients=tuple(sorted(updates)),
            train_loss=float(np.mean([u.train_loss for u in updates.values()])),
            **evaluation,
            seconds={
                "statistics": statistics_done - start,
                "training": training_done - statistics_done,
                "server": server_done - training_done,
                "evaluation": end - server_done,
                "client_compute": statistics_compute + training_compute,
                "total": end - start,
            },
            faults=statistics.faults + training.faults + evaluation_faults,
        )
        return protocol.with_record(trained, record), record

    def _client_state(self, state: FederationState, client: Client) -> State:
        first = protocol.first_personal(state, self.initial_personal, self.config)
        return protocol.model_state(state.global_state, state.personal[client.client_id], first)

    def _statistics_step(
        self,
        state: FederationState,
        round_index: int,
        sampled: list[Client],
        progress: Progress | None,
        *,
        stream: Stream = Stream.STATISTICS,
        step: str = "statistics",
    ) -> tuple[Settled[StatisticsReport], float]:
        """Every sampled client's checked statistics report on ``state``'s global model.

        A model without HBN layers has no statistics step: nothing is asked, nothing fails.
        """
        if not self.hbn_layers:
            return steps.settle({}, [], round_number=round_index + 1, step=step), 0.0

        def collect(client: Client) -> StatisticsReport:
            return client.collect_statistics(
                self.models[client.framework],
                self._client_state(state, client),
                self.data,
                self.config.statistics,
                self._rng(stream, round_index, client.client_id),
            )

        def check(report: StatisticsReport) -> None:
            protocol.check_report(report, self.hbn_layers)

        return self._each_client(round_index, step, sampled, collect, check, progress)

    def _training_step(
        self,
        state: FederationState,
        round_index: int,
        sampled: list[Client],
        lr: float,
        progress: Progress | None,
    ) -> tuple[Settled[Update], float]:
        """Every sampled client's checked update from local training on ``state``."""
        send_personal = protocol.sends_personal(self.config)
        roles = (Role.SHARED, Role.PERSONAL) if send_personal else (Role.SHARED,)
        sent_names = select(self.layout, *roles)
        sent_like = {**state.global_state, **state.personal_average}

        def fit(client: Client) -> Update:
            return client.fit(
                self.models[client.framework],
                self._client_state(state, client),
                self.data,
                self.config.train,
                lr=lr,
                send_personal=send_personal,
                freeze_statistics=protocol.freezes_statistics(self.config, round_index),
                rng=self._rng(Stream.TRAINING, round_index, client.client_id),
            )

        def check(update: Update) -> None:
            protocol.check_update(
                update.sent,
                update.examples,
                self.layout,
                sent_names,
                like=sent_like,
                train_loss=update.train_loss,
            )

        return self._each_client(round_index, "training", sampled, fit, check, progress)

    def _each_client(
        self,
        round_index: int,
        step: str,
        sampled: list[Client],
        work: Callable[[Client], Result],
        check: Callable[[Result], None],
        progress: Progress | None,
    ) -> tuple[Settled[Result], float]:
        """``work`` for each client, its result checked, settled; and the seconds of ``work``.

        A client whose work or check raises is a fault of the step
        (:func:`federation.steps.settle`).
        """
        outcomes: dict[int, Result | Exception] = {}
        seconds = 0.0
        for client in sampled:
            try:
                start = time.perf_counter()
                result = work(client)
                seconds += time.perf_counter() - start
                check(result)
                outcomes[client.client_id] = result
            except Exception as error:  # a client's failure must not end the run
                outcomes[client.client_id] = error
            if progress is not None:
                progress(step, client)
        ids = [c.client_id for c in sampled]
        return steps.settle(outcomes, ids, round_number=round_index + 1, step=step), seconds

    # -- evaluation -------------------------------------------------------------------------

    def _evaluation(
        self,
        state: FederationState,
        round_index: int,
        sampled: list[Client],
        trained: Mapping[int, Update],
    ) -> tuple[dict[str, Any], tuple[Fault, ...]]:
        """The round's evaluation fields of its record, and the faults of its statistics pass.

        A failure is recorded (``evaluation_error``), not raised: the round's training stands.
        """
        if not protocol.evaluates(self.config, round_index):
            return {}, ()
        measured: dict[str, Any] = {}
        faults: list[Fault] = []
        try:
            measured["accuracy"], measured["loss"] = self.evaluate(
                state, round_index, sampled, faults
            )
            if self.config.eval.personal:
                accuracies = [
                    self._personal_accuracy(state, round_index, i) for i in sorted(trained)
                ]
                measured["personal_accuracy"] = float(np.mean(accuracies))
        except Exception as error:  # the round's training stands; its record says why
            reason = steps.fault_reason(error)
            logger.warning(
                "round %d: evaluation failed (the round's training is kept): %s",
                round_index + 1,
                reason,
            )
            measured["evaluation_error"] = reason
        return measured, tuple(faults)

    def evaluate(
        self, state: FederationState, round_index: int, sampled: list[Client], faults: list[Fault]
    ) -> tuple[float, float]:
        """Accuracy and mean loss of ``state``'s global model on the test set.

        The model runs with the personal average (alpha has no effect in inference; FedBN's
        BatchNorm tensors are averaged for this). With ``eval.statistics = "sync"`` it runs
        with statistics pooled afresh (momentum 1) from ``sampled`` on this model; the faults
        of that pass join ``faults``, and with fewer than ``min_clients`` valid clients it
        raises :class:`~federation.protocol.RoundFailedError`. With ``"fresh"`` it runs with
        :func:`~federation.protocol.fresh_evaluation_statistics`: the next round's statistics
        step (its clients and streams) on this model, blended in by ``eval.fresh_weight``; the
        faults of that pass join ``faults`` under the next round's number, the round whose
        step it is.
        """
        weights = {**state.global_state, **state.personal_average}
        if self.config.eval.statistics == "fresh" and self.hbn_layers:
            following = round_index + 1
            settled, _ = self._statistics_step(
                state, following, self.sample_clients(following), None, step="evaluation statistics"
            )
            faults += settled.faults
            reports = steps.require(settled, self.config.clients.min_clients)
            pooled = protocol.pool_statistics(list(reports.values()), self.config.statistics)
            fresh = protocol.fresh_evaluation_statistics(
                protocol.global_statistics(state.global_state, self.hbn_layers),
                pooled,
                self.config.eval.fresh_weight,
            )
            weights |= protocol.statistics_state(fresh, self.hbn_layers, state.global_state)
        if self.config.eval.statistics == "sync" and self.hbn_layers:
            synced, _ = self._statistics_step(
                state,
                round_index,
                sampled,
                None,
                stream=Stream.SYNC_STATISTICS,
                step="evaluation statistics",
            )
            faults += synced.faults
            reports = steps.require(synced, self.config.clients.min_clients)
            pooled = protocol.pool_statistics(list(reports.values()), self.config.statistics)
            weights |= protocol.statistics_state(pooled, self.hbn_layers, state.global_state)
        return self._accuracy(weights, np.arange(len(self.data.y_test)))

    def _accuracy(self, weights: State, indices: np.ndarray) -> tuple[float, float]:
        """Accuracy and mean loss of the evaluation model with ``weights`` on test examples."""
        model = self.models[self.config.eval_framework]
        load_state(model, weights)
        result = model.evaluate(
            batches(
                self.data.x_test,
                self.data.y_test,
                indices,
                batch_size=self.config.eval.batch_size,
                rng=None,
            )
        )
        return result.correct / result.examples, result.loss_sum / result.examples

    def _personal_accuracy(self, state: FederationState, round_index: int, client: int) -> float:
        """A client's personalised model's accuracy on its local test split (FedBN's)."""
        chosen = self.clients[client]
        split = self._local_test_split(round_index, chosen)
        return self._accuracy(self._client_state(state, chosen), split)[0]

    def _local_test_split(self, round_index: int, client: Client) -> np.ndarray:
        return protocol.local_test_split(
            self.data.y_train[client.indices],
            self.data.y_test,
            self.config.eval.personal_examples,
            self._rng(Stream.LOCAL_TEST, round_index, client.client_id),
        )


def _common_layout(models: Mapping[str, FrameworkModel], frameworks: list[str]) -> Layout:
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
