"""The embedded, in-process federation: rounds of the HBN protocol over every client.

One round (``docs/federation.md`` has the details):

1. sample clients (a fraction, at least ``min_clients``), seeded;
2. **statistics step**: each sampled client loads the global model with its own alpha and
   reports the exact input moments of every HBN layer over its data;
3. **training step**: each trains locally and sends its ``shared`` tensors;
4. **server**: FedAvg of the shared tensors, weighted by example count; pooling of the moments
   in float64, then an EMA into the global statistics; lr decay;
5. **evaluation** every ``eval.every`` rounds on the global test set.

A client that raises or sends a malformed report is left out of the round and the fault is
recorded; with fewer than ``min_clients`` valid clients the round fails with
:class:`RoundFailedError` and nothing changes. Every random draw comes from a generator seeded
by ``(seed, round, purpose, client)``, so a run is reproducible and a checkpoint needs no RNG
state beyond the seed and the round.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from federation import aggregate
from federation.client import Client
from federation.config import METHODS
from federation.data import Dataset, batches, load_dataset, partition
from federation.layout import Role, check_state, select
from federation.models import build_model

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from federation.aggregate import GlobalStatistics, StatisticsReport
    from federation.client import Update
    from federation.config import Config
    from federation.layout import Layout, State
    from federation.models import Batch, FrameworkModel

__all__ = ["Fault", "RoundFailedError", "RoundRecord", "Simulation", "Stream", "seeded_rng"]

logger = logging.getLogger("federation")
Result = TypeVar("Result")


class Stream(enum.IntEnum):
    """The purposes random draws serve; each gets its own seeded generator."""

    PARTITION = 0
    SAMPLING = 1
    STATISTICS = 2
    TRAINING = 3
    SYNC_STATISTICS = 4
    LOCAL_TEST = 5


def seeded_rng(seed: int, stream: Stream, round_index: int, client: int) -> np.random.Generator:
    """The generator of one draw: seeded by the run's seed, its purpose, the round, the client.

    Every engine that runs this protocol (this simulation, :mod:`federation.flower`) draws from
    it, so that they sample, shuffle and split alike.
    """
    return np.random.default_rng([seed, stream, round_index, client])


class _NextState(NamedTuple):
    """What a round commits besides the clients' personal states."""

    global_state: State
    personal_average: State
    server_velocity: State


class RoundFailedError(RuntimeError):
    """Fewer than ``min_clients`` valid clients: the round was abandoned, state untouched."""


@dataclasses.dataclass(frozen=True)
class Fault:
    """A client left out of a round, and why."""

    round: int
    client: int
    step: str
    reason: str


@dataclasses.dataclass
class RoundRecord:
    """What one round did and measured; rounds count from 1."""

    round: int
    lr: float
    sampled: list[int]
    statistics_clients: list[int]
    trained_clients: list[int]
    train_loss: float
    accuracy: float | None = None
    loss: float | None = None
    personal_accuracy: float | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    faults: list[Fault] = dataclasses.field(default_factory=list)


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
        needed = list(dict.fromkeys([config.eval_framework, *frameworks]))
        self.models = dict(models) if models is not None else self._reference_models(needed)
        self.layout = _common_layout(self.models, needed)
        self.hbn_layers = {
            name.removesuffix(".global_mean"): spec.shape[0]
            for name, spec in self.layout.items()
            if spec.role is Role.STATISTICS and name.endswith(".global_mean")
        }
        initial = self.models[config.eval_framework].get_state()
        self.global_state: State = {
            k: initial[k] for k in select(self.layout, Role.SHARED, Role.STATISTICS)
        }
        self.initial_personal: State = {k: initial[k] for k in select(self.layout, Role.PERSONAL)}
        # The FedAvg of the personal tensors last sent (alpha under the authors' policy,
        # FedBN's BatchNorm); the evaluation model's personal state.
        self.personal_average: State = dict(self.initial_personal)
        self.sends_personal = config.alpha.policy == "averaged" or METHODS[config.method].local_norm
        # FedAvgM's velocity of the shared tensors (``server.momentum``).
        self.server_velocity: State = {}
        indices = partition(
            self.data.y_train,
            config.data.num_clients,
            method=config.data.partition,
            rng=self._rng(Stream.PARTITION, 0),
            beta=config.data.beta,
            shards_per_client=config.data.shards_per_client,
        )
        self.clients = [
            Client(i, fw, idx) for i, (fw, idx) in enumerate(zip(frameworks, indices, strict=True))
        ]
        self.rounds_done = 0
        self.history: list[RoundRecord] = []
        eligible = [c for c in self.clients if len(c.indices)]
        if len(eligible) < config.clients.min_clients:
            msg = (
                f"only {len(eligible)} clients hold data, fewer than clients.min_clients = "
                f"{config.clients.min_clients}; lower it or change the partition."
            )
            raise ValueError(msg)

    def _reference_models(self, frameworks: list[str]) -> dict[str, FrameworkModel]:
        spec = self.config.model_spec(self.data.input_shape, self.data.num_classes)
        return {name: build_model(name, spec, seed=self.config.seed) for name in frameworks}

    def _rng(self, stream: Stream, round_index: int, client: int = 0) -> np.random.Generator:
        return seeded_rng(self.config.seed, stream, round_index, client)

    # -- sampling ---------------------------------------------------------------------------

    def sample_clients(self, round_index: int) -> list[Client]:
        """The round's clients: ``max(floor(fraction * K), min_clients)`` of those with data."""
        eligible = [c for c in self.clients if len(c.indices)]
        wanted = math.floor(self.config.clients.fraction * len(self.clients))
        count = min(max(wanted, self.config.clients.min_clients), len(eligible))
        chosen = self._rng(Stream.SAMPLING, round_index).choice(len(eligible), count, replace=False)
        return [eligible[i] for i in sorted(chosen)]

    # -- one round --------------------------------------------------------------------------

    def run_round(self, progress: Callable[[str, Client], None] | None = None) -> RoundRecord:
        """Run the next round and commit it; return its record.

        ``progress(step, client)`` is called after each client step. Raises
        :class:`RoundFailedError` (the federation unchanged) if too few clients are valid.
        """
        round_index = self.rounds_done
        start = time.perf_counter()
        lr = self.config.train.lr * self.config.train.lr_decay**round_index
        sampled = self.sample_clients(round_index)
        for client in sampled:
            client.compute_seconds = 0.0
        faults: list[Fault] = []
        reports = self._statistics_step(round_index, sampled, faults, progress)
        statistics_done = time.perf_counter()
        updates = self._training_step(round_index, sampled, lr, faults, progress)
        training_done = time.perf_counter()
        self._commit(round_index, updates, self._aggregate(updates, reports))
        record = RoundRecord(
            round=round_index + 1,
            lr=lr,
            sampled=[c.client_id for c in sampled],
            statistics_clients=sorted(reports),
            trained_clients=sorted(updates),
            train_loss=float(np.mean([u.train_loss for u in updates.values()])),
            faults=faults,
        )
        server_done = time.perf_counter()
        # Before evaluation, whose synchronous statistics pass (if any) is the server's.
        client_compute = sum(c.compute_seconds for c in sampled)
        if self._evaluates(round_index):
            record.accuracy, record.loss = self.evaluate(round_index, sampled)
            if self.config.eval.personal:
                trained = [self.clients[i] for i in sorted(updates)]
                record.personal_accuracy = self.personal_accuracy(round_index, trained)
        end = time.perf_counter()
        record.seconds = {
            "statistics": statistics_done - start,
            "training": training_done - statistics_done,
            "server": server_done - training_done,
            "evaluation": end - server_done,
            "client_compute": client_compute,
            "total": end - start,
        }
        self.history.append(record)
        return record

    def _statistics_step(
        self,
        round_index: int,
        sampled: list[Client],
        faults: list[Fault],
        progress: Callable[[str, Client], None] | None,
        *,
        stream: Stream = Stream.STATISTICS,
        minimum: int | None = None,
    ) -> dict[int, StatisticsReport]:
        """Every sampled client's checked statistics report on the current global state."""
        if not self.hbn_layers:
            return {}

        def collect(client: Client) -> StatisticsReport:
            report = client.collect_statistics(
                self.models[client.framework],
                client.model_state(self.global_state, self._first_personal()),
                self.data,
                self.config.statistics,
                self._rng(stream, round_index, client.client_id),
            )
            aggregate.check_statistics_report(report, self.hbn_layers)
            return report

        return self._each_client(
            round_index, "statistics", sampled, collect, faults, progress, minimum=minimum
        )

    def _training_step(
        self,
        round_index: int,
        sampled: list[Client],
        lr: float,
        faults: list[Fault],
        progress: Callable[[str, Client], None] | None,
    ) -> dict[int, Update]:
        """Every sampled client's checked update from local training on the global state."""
        sent_roles = (Role.SHARED, Role.PERSONAL) if self.sends_personal else (Role.SHARED,)
        sent_names = select(self.layout, *sent_roles)
        freeze_statistics = self.config.freezes_statistics(round_index)

        def fit(client: Client) -> Update:
            update = client.fit(
                self.models[client.framework],
                client.model_state(self.global_state, self._first_personal()),
                self.data,
                self.config.train,
                lr=lr,
                send_personal=self.sends_personal,
                freeze_statistics=freeze_statistics,
                rng=self._rng(Stream.TRAINING, round_index, client.client_id),
            )
            check_state(update.sent, self.layout, names=sent_names)
            _check_examples(update.examples)
            return update

        return self._each_client(round_index, "training", sampled, fit, faults, progress)

    def _each_client(
        self,
        round_index: int,
        step: str,
        sampled: list[Client],
        work: Callable[[Client], Result],
        faults: list[Fault],
        progress: Callable[[str, Client], None] | None,
        *,
        minimum: int | None = None,
    ) -> dict[int, Result]:
        """``work`` for each client; a client that raises is recorded in ``faults`` and left out.

        Raises
        ------
        RoundFailedError
            If fewer than ``minimum`` (default ``min_clients``) clients succeed.
        """
        results: dict[int, Result] = {}
        for client in sampled:
            try:
                results[client.client_id] = work(client)
            except Exception as error:  # a client's failure must not end the run
                faults.append(self._fault(round_index, client, step, error))
            if progress is not None:
                progress(step, client)
        self._require_enough(round_index, step, len(results), faults, minimum)
        return results

    def _first_personal(self) -> State:
        """The personal state of a client in its first round."""
        if self.config.alpha.policy == "averaged":
            return self.personal_average
        return self.initial_personal

    def _fault(self, round_index: int, client: Client, step: str, error: Exception) -> Fault:
        reason = f"{type(error).__name__}: {error}"
        logger.warning(
            "round %d: client %d left out of the %s step: %s",
            round_index + 1,
            client.client_id,
            step,
            reason,
        )
        return Fault(round_index + 1, client.client_id, step, reason)

    def _require_enough(
        self, round_index: int, step: str, valid: int, faults: list[Fault], minimum: int | None
    ) -> None:
        minimum = self.config.clients.min_clients if minimum is None else minimum
        if valid < minimum:
            reasons = "; ".join(f"client {f.client}: {f.reason}" for f in faults)
            msg = (
                f"round {round_index + 1}: only {valid} valid clients in the {step} step, fewer "
                f"than clients.min_clients = {minimum}; the global state is unchanged. "
                f"Faults: {reasons}"
            )
            raise RoundFailedError(msg)

    def _aggregate(
        self, updates: dict[int, Update], reports: dict[int, StatisticsReport]
    ) -> _NextState:
        """The next global state, personal average and server velocity; nothing is committed."""
        sent = aggregate.fedavg(
            [u.sent for u in updates.values()], [u.examples for u in updates.values()]
        )
        shared, velocity = self._server_step({n: sent[n] for n in select(self.layout, Role.SHARED)})
        new_global = dict(shared)
        if self.hbn_layers:
            pooled = aggregate.pool_statistics(list(reports.values()), self.config.statistics)
            blended = aggregate.blend_statistics(
                self.global_statistics(), pooled, self.config.statistics.momentum
            )
            new_global |= _statistics_state(blended, self.global_state)
        personal_average = self.personal_average
        if self.sends_personal:
            personal_average = {n: sent[n] for n in select(self.layout, Role.PERSONAL)}
        return _NextState(new_global, personal_average, velocity)

    def _server_step(self, averaged: State) -> tuple[State, State]:
        r"""The shared tensors after the server's update, and FedAvgM's velocity.

        With ``server.momentum`` :math:`\mu`: :math:`v \leftarrow \mu v + (w - \bar w)` and
        :math:`w \leftarrow w - v`, in float64; plain FedAvg (:math:`w \leftarrow \bar w`)
        otherwise.
        """
        momentum = self.config.server.momentum
        if not momentum:
            return averaged, {}
        velocity: State = {}
        updated: State = {}
        for name, average in averaged.items():
            current = self.global_state[name].astype(np.float64)
            previous = self.server_velocity.get(name, np.zeros_like(current))
            velocity[name] = momentum * previous + (current - average.astype(np.float64))
            updated[name] = (current - velocity[name]).astype(average.dtype)
        return updated, velocity

    def _commit(self, round_index: int, updates: dict[int, Update], step: _NextState) -> None:
        self.global_state = step.global_state
        self.personal_average = step.personal_average
        self.server_velocity = step.server_velocity
        for client_id, update in updates.items():
            self.clients[client_id].personal = update.personal
        self.rounds_done = round_index + 1

    def global_statistics(self) -> GlobalStatistics:
        """The current global statistics per HBN layer, float64."""
        return {
            name: (
                self.global_state[f"{name}.global_mean"].astype(np.float64),
                self.global_state[f"{name}.global_var"].astype(np.float64),
            )
            for name in self.hbn_layers
        }

    # -- evaluation -------------------------------------------------------------------------

    def _evaluates(self, round_index: int) -> bool:
        final = round_index >= self.config.rounds - self.config.eval.final_rounds
        return final or (round_index + 1) % self.config.eval.every == 0

    def evaluate(self, round_index: int, sampled: list[Client]) -> tuple[float, float]:
        """Accuracy and mean loss of the global model on the test set.

        The model runs with the personal average (alpha has no effect in inference; FedBN's
        BatchNorm tensors are averaged for this). With ``eval.statistics = "sync"`` it runs
        with statistics pooled afresh (momentum 1) from ``sampled`` on the new global model;
        the protocol's own global statistics are left as they are. If no client answers that
        pass, the protocol's statistics are used and a warning is logged.
        """
        state = {**self.global_state, **self.personal_average}
        if self.config.eval.statistics == "sync" and self.hbn_layers:
            state |= self._sync_statistics(round_index, sampled)
        model = self.models[self.config.eval_framework]
        model.set_state(state)
        result = model.evaluate(self._test_batches(np.arange(len(self.data.y_test))))
        return result.correct / result.examples, result.loss_sum / result.examples

    def _sync_statistics(self, round_index: int, sampled: list[Client]) -> State:
        """Global statistics pooled afresh from ``sampled`` on the current global model."""
        faults: list[Fault] = []
        try:
            reports = self._statistics_step(
                round_index, sampled, faults, None, stream=Stream.SYNC_STATISTICS, minimum=1
            )
        except RoundFailedError as error:
            logger.warning("evaluation with the protocol's statistics: %s", error)
            return {}
        pooled = aggregate.pool_statistics(list(reports.values()), self.config.statistics)
        return _statistics_state(pooled, self.global_state)

    def personal_accuracy(self, round_index: int, clients: list[Client]) -> float:
        """The mean accuracy of ``clients``' personalised models on their local test splits.

        A client's local test split is ``eval.personal_examples`` test examples drawn, without
        replacement where the class allows, with the label proportions of its training data.
        """
        model = self.models[self.config.eval_framework]
        accuracies = []
        for client in clients:
            model.set_state(client.model_state(self.global_state, self._first_personal()))
            indices = self._local_test_split(round_index, client)
            result = model.evaluate(self._test_batches(indices))
            accuracies.append(result.correct / result.examples)
        return float(np.mean(accuracies))

    def _local_test_split(self, round_index: int, client: Client) -> np.ndarray:
        labels = self.data.y_test
        classes, counts = np.unique(self.data.y_train[client.indices], return_counts=True)
        wanted = np.round(counts / counts.sum() * self.config.eval.personal_examples)
        rng = self._rng(Stream.LOCAL_TEST, round_index, client.client_id)
        parts = []
        for label, size in zip(classes, wanted.astype(np.int64), strict=True):
            members = np.flatnonzero(labels == label)
            parts.append(rng.choice(members, size, replace=size > len(members)))
        return np.concatenate(parts)

    def _test_batches(self, indices: np.ndarray) -> Iterator[Batch]:
        return batches(
            self.data.x_test,
            self.data.y_test,
            indices,
            batch_size=self.config.eval.batch_size,
            rng=None,
        )

    # -- whole runs -------------------------------------------------------------------------

    def run(self, on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
        """Run the remaining rounds; ``on_round(record)`` after each one."""
        while self.rounds_done < self.config.rounds:
            record = self.run_round()
            if on_round is not None:
                on_round(record)
        return self.history

    def summary(self) -> dict[str, Any]:
        r"""Final figures: last accuracy, and the mean of the last 10 evaluated rounds ± 95% CI.

        The CI half-width is :math:`1.96\, s / \sqrt{n}` with the population deviation
        :math:`s` of those :math:`n \le 10` accuracies, as the authors' ``SaveMyResult``.
        ``last10_mean_personal_accuracy`` is there when ``eval.personal`` is on.
        """
        accuracies = [r.accuracy for r in self.history if r.accuracy is not None]
        mean, half_width = _last10(accuracies)
        summary = {
            "rounds": self.rounds_done,
            "final_accuracy": accuracies[-1] if accuracies else None,
            "last10_mean_accuracy": mean,
            "last10_ci95": half_width,
            "faults": sum(len(r.faults) for r in self.history),
        }
        personal = [r.personal_accuracy for r in self.history if r.personal_accuracy is not None]
        if personal:
            summary["last10_mean_personal_accuracy"] = _last10(personal)[0]
        return summary


def _last10(values: list[float]) -> tuple[float | None, float | None]:
    """The mean of the last 10 values and its 95% CI half-width; ``None`` without values."""
    last = np.asarray(values[-10:])
    if not len(last):
        return None, None
    return float(last.mean()), float(1.96 * last.std() / math.sqrt(len(last)))


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


def _statistics_state(statistics: GlobalStatistics, current: State) -> State:
    """The global statistics as state tensors, in the dtype of the ``current`` ones."""
    state: State = {}
    for name, (mean, var) in statistics.items():
        state[f"{name}.global_mean"] = mean.astype(current[f"{name}.global_mean"].dtype)
        state[f"{name}.global_var"] = var.astype(current[f"{name}.global_var"].dtype)
    return state


def _check_examples(examples: Any) -> None:
    if not isinstance(examples, int | np.integer) or examples <= 0:
        msg = f"the update's `examples` must be a positive integer; got {examples!r}."
        raise ValueError(msg)
