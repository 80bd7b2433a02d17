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
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from federation import aggregate
from federation.client import Client
from federation.data import Dataset, batches, load_dataset, partition
from federation.layout import Role, check_state, select
from federation.models import ModelSpec, build_model

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from federation.aggregate import GlobalStatistics, StatisticsReport
    from federation.client import Update
    from federation.config import Config
    from federation.layout import Layout, State
    from federation.models import FrameworkModel

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


def seeded_rng(seed: int, stream: Stream, round_index: int, client: int) -> np.random.Generator:
    """The generator of one draw: seeded by the run's seed, its purpose, the round, the client.

    Every engine that runs this protocol (this simulation, :mod:`federation.flower`) draws from
    it, so that they sample, shuffle and split alike.
    """
    return np.random.default_rng([seed, stream, round_index, client])


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
        self.alpha_average: State = dict(self.initial_personal)
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
        model = self.config.model
        spec = ModelSpec(
            model.architecture,
            model.norm,
            self.data.input_shape,
            self.data.num_classes,
            hidden=model.hidden,
            dtype=model.dtype,
        )
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
        new_global = self._aggregate(updates, reports)
        self._commit(round_index, updates, new_global)
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

        return self._each_client(round_index, "statistics", sampled, collect, faults, progress)

    def _training_step(
        self,
        round_index: int,
        sampled: list[Client],
        lr: float,
        faults: list[Fault],
        progress: Callable[[str, Client], None] | None,
    ) -> dict[int, Update]:
        """Every sampled client's checked update from local training on the global state."""
        send_alpha = self.config.alpha.policy == "averaged"
        sent_names = select(self.layout, Role.SHARED, *((Role.PERSONAL,) if send_alpha else ()))

        def fit(client: Client) -> Update:
            update = client.fit(
                self.models[client.framework],
                client.model_state(self.global_state, self._first_personal()),
                self.data,
                self.config.train,
                lr=lr,
                send_alpha=send_alpha,
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
    ) -> dict[int, Result]:
        """``work`` for each client; a client that raises is recorded in ``faults`` and left out.

        Raises
        ------
        RoundFailedError
            If fewer than ``min_clients`` clients succeed.
        """
        results: dict[int, Result] = {}
        for client in sampled:
            try:
                results[client.client_id] = work(client)
            except Exception as error:  # a client's failure must not end the run
                faults.append(self._fault(round_index, client, step, error))
            if progress is not None:
                progress(step, client)
        self._require_enough(round_index, step, len(results), faults)
        return results

    def _first_personal(self) -> State:
        """The personal state of a client in its first round."""
        if self.config.alpha.policy == "averaged":
            return self.alpha_average
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

    def _require_enough(self, round_index: int, step: str, valid: int, faults: list[Fault]) -> None:
        minimum = self.config.clients.min_clients
        if valid < minimum:
            reasons = "; ".join(f"client {f.client}: {f.reason}" for f in faults)
            msg = (
                f"round {round_index + 1}: only {valid} valid clients in the {step} step, fewer "
                f"than clients.min_clients = {minimum}; the global state is unchanged. "
                f"Faults: {reasons}"
            )
            raise RoundFailedError(msg)

    def _aggregate(self, updates: dict[int, Update], reports: dict[int, StatisticsReport]) -> State:
        """The next global state (and alpha average); nothing is committed here."""
        shared = aggregate.fedavg(
            [u.sent for u in updates.values()], [u.examples for u in updates.values()]
        )
        new_global = {name: shared[name] for name in select(self.layout, Role.SHARED)}
        if self.hbn_layers:
            pooled = aggregate.pool_statistics(list(reports.values()), self.config.statistics)
            blended = aggregate.blend_statistics(
                self.global_statistics(), pooled, self.config.statistics.momentum
            )
            new_global |= _statistics_state(blended, self.global_state)
        if self.config.alpha.policy == "averaged":
            new_global |= {name: shared[name] for name in select(self.layout, Role.PERSONAL)}
        return new_global

    def _commit(self, round_index: int, updates: dict[int, Update], new_global: State) -> None:
        personal_names = select(self.layout, Role.PERSONAL)
        self.alpha_average = {n: new_global.pop(n) for n in personal_names if n in new_global} or (
            self.alpha_average
        )
        self.global_state = new_global
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
        last = round_index + 1 == self.config.rounds
        return last or (round_index + 1) % self.config.eval.every == 0

    def evaluate(self, round_index: int, sampled: list[Client]) -> tuple[float, float]:
        """Accuracy and mean loss of the global model on the test set.

        With ``eval.statistics = "sync"`` the model is evaluated with statistics pooled afresh
        (momentum 1) from ``sampled`` on the new global model; the protocol's own global
        statistics are left as they are.
        """
        state = self.global_state
        if self.config.eval.statistics == "sync" and self.hbn_layers:
            faults: list[Fault] = []
            reports = self._statistics_step(
                round_index, sampled, faults, None, stream=Stream.SYNC_STATISTICS
            )
            pooled = aggregate.pool_statistics(list(reports.values()), self.config.statistics)
            state = {**state, **_statistics_state(pooled, state)}
        model = self.models[self.config.eval_framework]
        model.set_state({**state, **self.initial_personal})
        result = model.evaluate(
            batches(
                self.data.x_test,
                self.data.y_test,
                np.arange(len(self.data.y_test)),
                batch_size=self.config.eval.batch_size,
                rng=None,
            )
        )
        return result.correct / result.examples, result.loss_sum / result.examples

    # -- whole runs -------------------------------------------------------------------------

    def run(self, on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
        """Run the remaining rounds; ``on_round(record)`` after each one."""
        while self.rounds_done < self.config.rounds:
            record = self.run_round()
            if on_round is not None:
                on_round(record)
        return self.history

    def summary(self) -> dict[str, Any]:
        """Final figures: last accuracy, and the mean of the last 10 evaluated rounds ± 95% CI."""
        accuracies = [r.accuracy for r in self.history if r.accuracy is not None]
        last = np.asarray(accuracies[-10:])
        half_width = 1.96 * last.std() / math.sqrt(len(last)) if len(last) else math.nan
        return {
            "rounds": self.rounds_done,
            "final_accuracy": accuracies[-1] if accuracies else None,
            "last10_mean_accuracy": float(last.mean()) if len(last) else None,
            "last10_ci95": float(half_width) if len(last) else None,
            "faults": sum(len(r.faults) for r in self.history),
        }


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
