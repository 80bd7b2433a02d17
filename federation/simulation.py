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

import time
from typing import TYPE_CHECKING, Any, TypeVar

from federation import evaluation, protocol, steps
from federation.layout import Role, select
from federation.protocol import FederationState, RoundFailedError, RoundRecord, Stream
from federation.repro.statistics import Summary, summarize
from federation.setup import client_model_state, set_up

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from federation.client import Client
    from federation.config import Config
    from federation.data import Dataset
    from federation.layout import State
    from federation.models import FrameworkModel
    from federation.protocol import Fault, GlobalStatistics, StatisticsReport, Update
    from federation.setup import Setup
    from federation.steps import Settled

    Progress = Callable[[str, Client], None]

__all__ = ["RoundFailedError", "Simulation"]

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
    setup
        The run's fixed parts (:class:`federation.setup.Setup`): ``config``, ``data``,
        ``models``, ``layout``, ``hbn_layers``, ``initial_personal`` and ``clients``, each
        also an attribute of its own.
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
        setup = set_up(config, dataset=dataset, models=models)
        self.setup = setup
        self.config, self.data, self.models = setup.config, setup.data, setup.models
        self.layout, self.hbn_layers = setup.layout, setup.hbn_layers
        self.initial_personal, self.clients = setup.initial_personal, setup.clients
        self.state = protocol.initial_state(setup.initial, setup.layout, len(setup.clients))

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
        return _sample(self.setup, round_index)

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
        round_index, clock = state.rounds_done, [time.perf_counter()]
        lr = protocol.learning_rate(self.config.train, round_index)
        sampled = self.sample_clients(round_index)
        statistics, statistics_compute = _statistics_step(
            self.setup, state, round_index, Stream.STATISTICS, sampled, progress
        )
        reports = self._require(statistics) if self.hbn_layers else {}
        clock.append(time.perf_counter())
        training, training_compute = _training_step(
            self.setup, state, round_index, sampled, lr, progress
        )
        updates = self._require(training)
        clock.append(time.perf_counter())
        trained = protocol.aggregate_round(
            state,
            updates,
            list(reports.values()),
            config=self.config,
            layout=self.layout,
            layers=self.hbn_layers,
        )
        clock.append(time.perf_counter())
        faults: list[Fault] = [*statistics.faults, *training.faults]
        measured: dict[str, Any] = {}
        ids = sorted(updates)
        if protocol.evaluates(self.config, round_index):
            measured = evaluation.evaluation_fields(
                round_index + 1,
                lambda: self.evaluate(trained, round_index, sampled, faults),
                (lambda: evaluation.personal_accuracy(self.setup, trained, round_index, ids))
                if self.config.eval.personal
                else None,
            )
        clock.append(time.perf_counter())
        record = RoundRecord(
            round=round_index + 1,
            lr=lr,
            sampled=tuple(c.client_id for c in sampled),
            statistics_clients=tuple(sorted(reports)),
            trained_clients=tuple(sorted(updates)),
            train_loss=protocol.train_loss(
                [u.train_loss for u in updates.values()], [u.examples for u in updates.values()]
            ),
            **measured,
            seconds=_seconds(clock, statistics_compute + training_compute),
            faults=tuple(faults),
        )
        return protocol.with_record(trained, record), record

    def evaluate(
        self,
        state: FederationState,
        round_index: int,
        sampled: list[Client],
        faults: list[Fault],
        *,
        config: Config | None = None,
    ) -> tuple[float, float]:
        """Accuracy and mean loss of ``state``'s global model on the test set.

        The model and its statistics are those of :mod:`federation.evaluation`, as ``config``
        (by default the run's) configures them. The faults of the evaluation's statistics pass
        (``eval.statistics = "sync"`` or ``"fresh"``) join ``faults``, a ``"fresh"`` pass's
        under the next round's number, the round whose step it is; with fewer than
        ``min_clients`` valid clients in that pass it raises
        :class:`~federation.protocol.RoundFailedError`.
        """
        setup = self.setup if config is None else self.setup._replace(config=config)
        reports: list[StatisticsReport] = []
        step = evaluation.statistics_pass(setup.config, round_index, has_hbn=bool(self.hbn_layers))
        if step is not None:
            # "sync" asks the round's own clients, "fresh" the next round's.
            own = step.round_index == round_index
            asked = sampled if own else _sample(setup, step.round_index)
            settled, _ = _statistics_step(
                setup,
                state,
                step.round_index,
                step.stream,
                asked,
                None,
                name="evaluation statistics",
            )
            faults += settled.faults
            reports = list(steps.require(settled, setup.config.clients.min_clients).values())
        return evaluation.global_accuracy(
            setup, evaluation.evaluation_weights(setup, state, reports)
        )

    def _require(self, settled: Settled[Result]) -> dict[int, Result]:
        return steps.require(settled, self.config.clients.min_clients)


def _sample(setup: Setup, round_index: int) -> list[Client]:
    """The clients of round ``round_index`` (:func:`federation.protocol.sample_clients`)."""
    clients = setup.clients
    eligible = [c.client_id for c in clients if len(c.indices)]
    rng = protocol.seeded_rng(setup.config.seed, Stream.SAMPLING, round_index, 0)
    return [
        clients[i]
        for i in protocol.sample_clients(eligible, len(clients), setup.config.clients, rng)
    ]


def _each_client(
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


def _statistics_step(
    setup: Setup,
    state: FederationState,
    round_index: int,
    stream: Stream,
    sampled: list[Client],
    progress: Progress | None,
    *,
    name: str = "statistics",
) -> tuple[Settled[StatisticsReport], float]:
    """Every sampled client's checked statistics report on ``state``'s global model.

    A model without HBN layers has no statistics step: nothing is asked, nothing fails.
    """
    if not setup.hbn_layers:
        return steps.settle({}, [], round_number=round_index + 1, step=name), 0.0

    def collect(client: Client) -> StatisticsReport:
        rng = protocol.seeded_rng(setup.config.seed, stream, round_index, client.client_id)
        model, model_state = _model_of(setup, state, client)
        return client.collect_statistics(
            model, model_state, setup.data, setup.config.statistics, rng
        )

    def check(report: StatisticsReport) -> None:
        protocol.check_report(report, setup.hbn_layers)

    return _each_client(round_index, name, sampled, collect, check, progress)


def _training_step(
    setup: Setup,
    state: FederationState,
    round_index: int,
    sampled: list[Client],
    lr: float,
    progress: Progress | None,
) -> tuple[Settled[Update], float]:
    """Every sampled client's checked update from local training on ``state``."""
    send_personal = protocol.sends_personal(setup.config)
    roles = (Role.SHARED, Role.PERSONAL) if send_personal else (Role.SHARED,)
    sent_names = select(setup.layout, *roles)
    sent_like = {**state.global_state, **state.personal_average}

    def fit(client: Client) -> Update:
        model, model_state = _model_of(setup, state, client)
        return client.fit(
            model,
            model_state,
            setup.data,
            setup.config.train,
            lr=lr,
            send_personal=send_personal,
            freeze_statistics=protocol.freezes_statistics(setup.config, round_index),
            rng=protocol.seeded_rng(
                setup.config.seed, Stream.TRAINING, round_index, client.client_id
            ),
        )

    def check(update: Update) -> None:
        protocol.check_update(
            update.sent,
            update.examples,
            setup.layout,
            sent_names,
            like=sent_like,
            train_loss=update.train_loss,
        )

    return _each_client(round_index, "training", sampled, fit, check, progress)


def _model_of(setup: Setup, state: FederationState, client: Client) -> tuple[FrameworkModel, State]:
    """A client's model (its framework's) and the state it runs with after ``state``."""
    return setup.models[client.framework], client_model_state(setup, state, client.client_id)


def _seconds(clock: list[float], client_compute: float) -> dict[str, float]:
    """A round's ``seconds`` from the times its parts ended, the first entry its start."""
    start, statistics, training, server, end = clock
    return {
        "statistics": statistics - start,
        "training": training - statistics,
        "server": server - training,
        "evaluation": end - server,
        "client_compute": client_compute,
        "total": end - start,
    }
