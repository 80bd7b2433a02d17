"""HBN's round protocol, written once: pure functions over NumPy that every engine runs.

An engine moves models and messages: the embedded :class:`federation.simulation.Simulation`
calls its clients in this process, and :class:`federation.flower.HBNStrategy` sends Flower
messages to nodes. Everything a round *decides* is here, and nothing here keeps state, mutates
its inputs or imports a framework:

- the schedule: the learning rate of a round, FixBN's switch, which rounds are evaluated, each
  client's framework, and the seeded random stream of every draw (:func:`seeded_rng`);
- client sampling;
- the model's HBN layers, found from a field of the layout's :class:`~federation.layout.TensorSpec`;
- checking reports and updates, and the fault policy (``clients.min_clients``);
- pooling the statistics (in float64, exactly), blending them into the global statistics,
  and converting statistics to state tensors and back, keeping the state's dtype;
- FedAvg and FedAvgM;
- the federation's state as one value, :class:`FederationState`, and the step from one round's
  state to the next (:func:`aggregate_round`).

A third engine plugs in by doing what the two do: sample (or let its framework sample), ask
each client for a :class:`StatisticsReport` and an :class:`Update` on the
:func:`model_state` it is due, keep those that pass :func:`check_report` and
:func:`check_update`, call :func:`require_enough` after each step, and commit
:func:`aggregate_round` (or, where its framework averages the weights, :func:`next_statistics`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

import hbn_core
from backends._global_statistics import checked_global_statistics
from federation.layout import HBNPart, Role, check_state, select
from federation.models import FRAMEWORKS
from federation.statistics_schedule import blend_momentum
from hbn_core import Moments

if TYPE_CHECKING:
    from collections.abc import Mapping

    from federation.config import ClientsConfig, Config, StatisticsConfig, TrainConfig
    from federation.layout import Layout, State

__all__ = [
    "Fault",
    "FederationState",
    "GlobalStatistics",
    "HBNLayer",
    "RoundFailedError",
    "RoundRecord",
    "StatisticsReport",
    "Stream",
    "Update",
    "aggregate_round",
    "assign_frameworks",
    "blend_statistics",
    "check_report",
    "check_update",
    "configured_aggregator",
    "evaluates",
    "exact_pool",
    "fedavg",
    "first_personal",
    "freezes_statistics",
    "fresh_evaluation_statistics",
    "global_statistics",
    "hbn_layers",
    "initial_state",
    "json_safe",
    "learning_rate",
    "local_test_split",
    "model_state",
    "next_statistics",
    "pool_statistics",
    "require_enough",
    "sample_clients",
    "seeded_rng",
    "sends_personal",
    "server_step",
    "statistics_momentum",
    "statistics_state",
    "train_loss",
    "with_record",
]

# Each HBN layer's (global_mean, global_var), float64, the variance biased unless configured.
GlobalStatistics = dict[str, tuple[np.ndarray, np.ndarray]]
# A pool of one layer's moments: the clients' parts, and their mixture weights (or None).
Aggregator = Callable[[Sequence[Moments], np.ndarray | None], Moments]


# -- random streams and failure -----------------------------------------------------------------


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

    Every engine draws from it, so that they sample, shuffle and split alike, and a checkpoint
    needs no random state.
    """
    return np.random.default_rng([seed, stream, round_index, client])


class RoundFailedError(RuntimeError):
    """Fewer than ``min_clients`` valid clients in a step: the round abandoned, state untouched."""


# -- the values a round exchanges and keeps -----------------------------------------------------


class StatisticsReport(NamedTuple):
    """One client's statistics step.

    Attributes
    ----------
    moments
        Each HBN layer's exact input moments: count of elements per channel, mean and m2.
    examples
        How many examples the client forwarded.
    dataset_size
        How many examples the client holds (the weight of ``weighting = "dataset"``).
    """

    moments: dict[str, Moments]
    examples: int
    dataset_size: int


class Update(NamedTuple):
    """One client's training step.

    Attributes
    ----------
    sent
        What goes to the server: the ``shared`` tensors, and the personal ones only where the
        server averages them (:func:`sends_personal`).
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


@dataclasses.dataclass(frozen=True)
class Fault:
    """A client left out of a step of a round, and why; rounds count from 1.

    ``client`` is the engine's id of the participant: the client's index in the embedded
    simulation, the Flower node id on Flower.
    """

    round: int
    client: int
    step: str
    reason: str


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """What one committed round did and measured, on any engine; rounds count from 1.

    Client ids are the engine's participant ids: a client's index in the embedded simulation,
    the Flower node id on Flower (``HBNStrategy.client_ids`` maps a node to its partition).

    Attributes
    ----------
    round, lr
        The round's number and learning rate (:func:`learning_rate`).
    sampled, statistics_clients, trained_clients
        The clients sampled, those whose statistics report counted, those whose update counted.
    train_loss
        The clients' mean training loss, weighted by their examples (:func:`train_loss`);
        ``None`` on Flower when a counted reply reports none.
    accuracy, loss
        The global model's test accuracy and mean loss, in evaluated rounds (:func:`evaluates`).
        On Flower they are the nodes' evaluation, weighted by their test examples.
    personal_accuracy
        Embedded engine, ``eval.personal`` only: the trained clients' mean personalised accuracy.
    evaluation_error
        Embedded engine: why the round's evaluation failed (its training is committed all the
        same, and ``accuracy`` is then ``None``).
    seconds
        The wall time of each part of the round.
    faults
        The clients left out of a step, and why.
    statistics
        Flower only (empty on the embedded engine, whose state holds them): the global
        statistics the round left, float64 ``(mean, var)`` per HBN layer.
    evaluated_clients, evaluation_incomplete
        Flower only: the nodes whose evaluation counted, and whether they are fewer than
        ``data.num_clients``, so that the accuracy is not measured on the whole test set.
    """

    round: int
    lr: float
    sampled: tuple[int, ...]
    statistics_clients: tuple[int, ...] = ()
    trained_clients: tuple[int, ...] = ()
    train_loss: float | None = None
    accuracy: float | None = None
    loss: float | None = None
    personal_accuracy: float | None = None
    evaluation_error: str | None = None
    seconds: Mapping[str, float] = dataclasses.field(default_factory=dict)
    faults: tuple[Fault, ...] = ()
    statistics: GlobalStatistics = dataclasses.field(default_factory=dict)
    evaluated_clients: tuple[int, ...] = ()
    evaluation_incomplete: bool = False


class FederationState(NamedTuple):
    """The whole state of a federation between rounds, as one immutable value.

    A round maps it to the next (:func:`aggregate_round`, then :func:`with_record`); a
    checkpoint holds exactly this value.

    Attributes
    ----------
    global_state
        The global model: the ``shared`` and ``statistics`` tensors.
    personal_average
        The FedAvg of the personal tensors last sent (the authors' averaged alpha, FedBN's
        BatchNorm), or the initial personal state: the evaluation model's personal state.
    server_velocity
        FedAvgM's float64 velocity of the shared tensors; empty without ``server.momentum``.
    personal
        Each client's personal state, by client id; ``None`` before its first training.
    rounds_done
        Rounds committed.
    history
        The record of each committed round.
    """

    global_state: State
    personal_average: State
    server_velocity: State
    personal: tuple[State | None, ...]
    rounds_done: int
    history: tuple[RoundRecord, ...]


def initial_state(initial: State, layout: Layout, num_clients: int) -> FederationState:
    """The state before round 1, from a model's initial state."""
    return FederationState(
        global_state={k: initial[k] for k in select(layout, Role.SHARED, Role.STATISTICS)},
        personal_average={k: initial[k] for k in select(layout, Role.PERSONAL)},
        server_velocity={},
        personal=(None,) * num_clients,
        rounds_done=0,
        history=(),
    )


# -- the schedule -------------------------------------------------------------------------------


def learning_rate(train: TrainConfig, round_index: int) -> float:
    r"""The learning rate of round ``round_index`` (from 0): :math:`\eta\,\gamma^{t}`."""
    return train.lr * train.lr_decay**round_index


def freezes_statistics(config: Config, round_index: int) -> bool:
    """Whether clients train with frozen BatchNorm statistics (FixBN, from its switch round)."""
    switch = math.floor(config.fixbn.switch_fraction * config.rounds)
    return config.method == "fixbn" and round_index >= switch


def evaluates(config: Config, round_index: int) -> bool:
    """Whether round ``round_index`` (from 0) is evaluated.

    Every ``eval.every`` rounds are, and each of the last ``eval.final_rounds``.
    """
    final = round_index >= config.rounds - config.eval.final_rounds
    return final or (round_index + 1) % config.eval.every == 0


def assign_frameworks(frameworks: Mapping[str, int], num_clients: int) -> list[str]:
    """Each client's framework, by client id: the counts of ``frameworks`` in canonical order.

    The order is that of :data:`federation.models.FRAMEWORKS` (torch, jax, keras), never the
    table's key order, which Flower's run configuration does not keep: a client's framework is
    a function of its id alone, in every engine and process. An empty table gives every
    client torch.
    """
    counts = frameworks or {"torch": num_clients}
    order = sorted(counts, key=lambda name: (_framework_rank(name), name))
    return [name for name in order for _ in range(counts[name])]


def _framework_rank(name: str) -> int:
    """A framework's place in :data:`~federation.models.FRAMEWORKS`; unknown names go last."""
    return FRAMEWORKS.index(name) if name in FRAMEWORKS else len(FRAMEWORKS)


def sample_clients(
    eligible: Sequence[int], num_clients: int, clients: ClientsConfig, rng: np.random.Generator
) -> list[int]:
    """The round's clients: ``max(floor(fraction * K), min_clients)`` of ``eligible``, sorted.

    ``eligible`` are the ids of the clients that hold data, of ``num_clients`` (``K``).
    """
    wanted = math.floor(clients.fraction * num_clients)
    count = min(max(wanted, clients.min_clients), len(eligible))
    chosen = rng.choice(len(eligible), count, replace=False)
    return [eligible[i] for i in sorted(chosen)]


# -- the layout's HBN layers --------------------------------------------------------------------


class HBNLayer(NamedTuple):
    """One HBN layer of a layout: its channels and the state names of its tensors.

    ``positions`` is its values per channel per example where the layout declares it
    (:class:`~federation.layout.HBNTensor`), else ``None``.
    """

    channels: int
    global_mean: str
    global_var: str
    alpha: str | None
    positions: int | None = None


def hbn_layers(layout: Layout) -> dict[str, HBNLayer]:
    """The layout's HBN layers, by layer name, from the ``hbn`` field of its tensor specs.

    Raises
    ------
    ValueError
        If a ``statistics`` tensor does not declare its ``hbn`` layer and part, or a layer
        lacks its global mean or variance, or their shapes differ.
    """
    found: dict[str, dict[HBNPart, str]] = {}
    for name, spec in layout.items():
        if spec.role is Role.STATISTICS and spec.hbn is None:
            msg = f"the layout's statistics tensor `{name}` must declare its `hbn` layer and part."
            raise ValueError(msg)
        if spec.hbn is not None:
            found.setdefault(spec.hbn.layer, {})[spec.hbn.part] = name
    layers = {}
    for layer, names in found.items():
        mean, var = names.get(HBNPart.GLOBAL_MEAN), names.get(HBNPart.GLOBAL_VAR)
        if mean is None or var is None or layout[mean].shape != layout[var].shape:
            msg = (
                f"HBN layer {layer!r} must have a global mean and variance of one shape (C,) "
                f"in the layout; got {sorted(names.values())}."
            )
            raise ValueError(msg)
        (channels,) = layout[mean].shape
        positions = layout[mean].hbn.positions  # type: ignore[union-attr]
        layers[layer] = HBNLayer(channels, mean, var, names.get(HBNPart.ALPHA), positions)
    return layers


# -- checks and the fault policy ----------------------------------------------------------------


def check_report(report: StatisticsReport, layers: Mapping[str, HBNLayer]) -> None:
    r"""Check a client's statistics report against the model's HBN layers before pooling.

    A report must describe what the client can hold: ``examples`` forwarded, at most its
    ``dataset_size``, and for each layer an integer count of exactly ``examples`` times the
    layer's ``positions`` (a multiple of ``examples`` where the layout does not declare
    them), with finite means and (biased) variances :math:`M_2/n` that float32 can hold
    (:func:`hbn_core.check_moments`). A lying client can still report any values in that
    range; a robust ``statistics.aggregator`` bounds what those do.

    Raises
    ------
    ValueError
        If the layer names differ, a count is not the integer the examples imply, a shape is
        wrong, a value is not finite or beyond float32's range, or ``examples`` or
        ``dataset_size`` is not a positive integer, or ``examples > dataset_size``.
    TypeError
        If a count is not an integer, or a mean or m2 is not floating-point.
    """
    for name in ("examples", "dataset_size"):
        _check_positive_integer(f"the report's `{name}`", getattr(report, name))
    if report.examples > report.dataset_size:
        msg = (
            f"the report's `examples` must be at most its `dataset_size` = "
            f"{report.dataset_size}; got {report.examples}."
        )
        raise ValueError(msg)
    checked_global_statistics(
        report.moments, {name: layer.channels for name, layer in layers.items()}
    )
    for name, layer in layers.items():
        moments = report.moments[name]
        expected = None if layer.positions is None else report.examples * layer.positions
        hbn_core.check_moments(
            moments, name=f"the report of layer {name!r}", expected_count=expected
        )
        if expected is None and int(moments.count) % report.examples:
            msg = (
                f"the report of layer {name!r} must count a multiple of its "
                f"{report.examples} examples; got {int(moments.count)}."
            )
            raise ValueError(msg)


def check_update(
    sent: State,
    examples: object,
    layout: Layout,
    names: Sequence[str],
    *,
    like: Mapping[str, np.ndarray],
    train_loss: object = None,
) -> None:
    """Check a client's training update: exactly ``names``, of the layout's shapes, finite.

    Each tensor must have the dtype of its tensor in ``like`` (the state the client was sent),
    so that averaging never changes a global tensor's dtype; ``train_loss``, when given, must
    be a finite number.

    Raises
    ------
    ValueError, TypeError
        As :func:`federation.layout.check_state`, or if ``examples`` is not a positive integer,
        a dtype differs from ``like``'s, or ``train_loss`` is not a finite number.
    """
    check_state(sent, layout, names=list(names))
    _check_positive_integer("the update's `examples`", examples)
    for name in names:
        if sent[name].dtype != like[name].dtype:
            msg = (
                f"the update's `{name}` must be {like[name].dtype}, the global model's dtype; "
                f"got {sent[name].dtype}."
            )
            raise TypeError(msg)
    if train_loss is not None and not (
        isinstance(train_loss, int | float | np.floating)
        and not isinstance(train_loss, bool)
        and math.isfinite(train_loss)
    ):
        msg = f"the update's training loss must be a finite number; got {train_loss!r}."
        raise ValueError(msg)


def _check_positive_integer(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        msg = f"{what} must be a positive integer; got {value!r}."
        raise ValueError(msg)


def require_enough(
    valid: int,
    minimum: int,
    *,
    round_number: int,
    step: str,
    faults: Sequence[str],
    participants: str = "clients",
) -> None:
    """The fault policy: a step with fewer than ``minimum`` valid participants fails the round.

    Raises
    ------
    RoundFailedError
        Naming the round, the step and each fault (``faults``: one line per fault).
    """
    if valid < minimum:
        msg = (
            f"round {round_number}: only {valid} valid {participants} in the {step} step, "
            f"fewer than clients.min_clients = {minimum}; the global state is unchanged. "
            f"Faults: {'; '.join(faults) or 'none'}"
        )
        raise RoundFailedError(msg)


# -- statistics ---------------------------------------------------------------------------------


def global_statistics(state: State, layers: Mapping[str, HBNLayer]) -> GlobalStatistics:
    """Each HBN layer's ``(global_mean, global_var)`` in ``state``, as float64."""
    return {
        name: (
            state[layer.global_mean].astype(np.float64),
            state[layer.global_var].astype(np.float64),
        )
        for name, layer in layers.items()
    }


def statistics_state(
    statistics: GlobalStatistics, layers: Mapping[str, HBNLayer], like: State
) -> State:
    """The statistics as state tensors, each in the dtype of its tensor in ``like``."""
    state: State = {}
    for name, (mean, var) in statistics.items():
        layer = layers[name]
        state[layer.global_mean] = mean.astype(like[layer.global_mean].dtype)
        state[layer.global_var] = var.astype(like[layer.global_var].dtype)
    return state


def exact_pool(parts: Sequence[Moments], weights: np.ndarray | None) -> Moments:
    """The exact pool of one layer's moments (:func:`hbn_core.pool_moments`, Chan's merge).

    Without ``weights`` it is the moments of all the elements together; with them, the
    mixture whose components weigh ``weights``.
    """
    return hbn_core.pool_moments(parts, weights=weights)


def _trimmed(parts: Sequence[Moments], weights: np.ndarray | None, *, trim: int) -> Moments:
    del weights  # the configuration allows no mixture weights with a robust pool
    return hbn_core.trimmed_pool(parts, trim=trim)


def _median_of_means(
    parts: Sequence[Moments], weights: np.ndarray | None, *, groups: int
) -> Moments:
    del weights
    return hbn_core.median_of_means_pool(parts, groups=groups)


def configured_aggregator(settings: StatisticsConfig) -> Aggregator:
    """The pool that ``statistics.aggregator`` names, with its parameter.

    ``"exact"``: :func:`exact_pool`; ``"trimmed"``: :func:`hbn_core.trimmed_pool` with
    ``statistics.trim``; ``"median-of-means"``: :func:`hbn_core.median_of_means_pool` with
    ``statistics.groups`` (``docs/robustness.md``).
    """
    if settings.aggregator == "trimmed":
        return functools.partial(_trimmed, trim=settings.trim)
    if settings.aggregator == "median-of-means":
        return functools.partial(_median_of_means, groups=settings.groups)
    return exact_pool


def pool_statistics(
    reports: Sequence[StatisticsReport],
    settings: StatisticsConfig,
    *,
    aggregator: Aggregator | None = None,
) -> GlobalStatistics:
    """Pool the clients' moments per HBN layer into global ``(mean, var)``, in float64.

    ``aggregator`` merges one layer's moments; by default it is the configured one
    (:func:`configured_aggregator`), the exact pool unless ``statistics.aggregator`` says
    otherwise. With
    ``weighting = "elements"`` it is then the moments of all forwarded elements together; with
    ``"dataset"`` each client's moments are a mixture component of weight proportional to its
    data-set size. The variance is ``m2 / count`` (``"population"``), or the authors'
    ``m2 / (count - count / examples)``, their Bessel correction over examples
    (``"bessel-examples"``, D5).
    """
    pool = aggregator if aggregator is not None else configured_aggregator(settings)
    weights = None
    if settings.weighting == "dataset":
        weights = np.asarray([r.dataset_size for r in reports], np.float64)
    examples = sum(r.examples for r in reports)
    pooled: GlobalStatistics = {}
    for name in reports[0].moments:
        parts = [_float64(r.moments[name]) for r in reports]
        total = pool(parts, weights)
        count = float(total.count)
        if settings.variance == "bessel-examples":
            denominator = count - count / examples if examples > 1 else count
        else:
            denominator = count
        pooled[name] = (np.asarray(total.mean), np.asarray(total.m2) / denominator)
    return pooled


def _float64(moments: Moments) -> Moments:
    count, mean, m2 = moments
    return Moments(
        np.asarray(count, np.int64), np.asarray(mean, np.float64), np.asarray(m2, np.float64)
    )


def blend_statistics(
    previous: GlobalStatistics, pooled: GlobalStatistics, momentum: float
) -> GlobalStatistics:
    r"""The EMA :math:`g \leftarrow (1 - m)\,g + m\,p` of mean and variance, layer by layer."""
    return {
        name: (
            (1 - momentum) * previous[name][0] + momentum * mean,
            (1 - momentum) * previous[name][1] + momentum * var,
        )
        for name, (mean, var) in pooled.items()
    }


def statistics_momentum(settings: StatisticsConfig, round_index: int) -> float:
    """The EMA weight of the pool blended after ``round_index`` committed rounds.

    ``statistics.momentum`` as ``statistics.warmup`` schedules it for blend number
    ``round_index + 1`` (:func:`federation.statistics_schedule.blend_momentum`).
    """
    return blend_momentum(settings.momentum, round_index + 1, settings.warmup)


def fresh_evaluation_statistics(
    committed: GlobalStatistics, fresh: GlobalStatistics, weight: float
) -> GlobalStatistics:
    r"""The statistics that ``eval.statistics = "fresh"`` evaluates round :math:`t`'s model with.

    They are :math:`(1 - \lambda)\,g_t + \lambda\,p_{t+1}`: ``committed`` is :math:`g_t`, the
    global statistics round :math:`t` committed; ``fresh`` is :math:`p_{t+1}`, the pool of the
    statistics step that round :math:`t + 1` makes on the evaluated model :math:`w_t` (its
    clients, random streams and state); ``weight`` is :math:`\lambda` = ``eval.fresh_weight``.
    Evaluation only: nothing is committed.
    """
    return blend_statistics(committed, fresh, weight)


def next_statistics(
    state: State,
    reports: Sequence[StatisticsReport],
    settings: StatisticsConfig,
    layers: Mapping[str, HBNLayer],
    round_index: int,
) -> GlobalStatistics:
    """The global statistics after round ``round_index``: ``state``'s, blended with the pool.

    The pool of ``reports`` (:func:`pool_statistics`) is blended with the weight of
    :func:`statistics_momentum`.
    """
    pooled = pool_statistics(reports, settings)
    momentum = statistics_momentum(settings, round_index)
    return blend_statistics(global_statistics(state, layers), pooled, momentum)


# -- weights ------------------------------------------------------------------------------------


def fedavg(states: Sequence[State], weights: Sequence[int]) -> State:
    r"""The weighted average :math:`\sum_k n_k w_k / \sum_k n_k` of each tensor, in float64.

    Each tensor keeps its dtype. ``states`` must share keys, shapes and dtypes (checked upstream).

    Raises
    ------
    ValueError
        If there is no state, the lengths differ, or the total weight is not positive.
    """
    if not states or len(states) != len(weights):
        msg = (
            "`states` and `weights` must be non-empty and of one length; "
            f"got {len(states)} and {len(weights)}."
        )
        raise ValueError(msg)
    total = float(sum(weights))
    if not total > 0:
        msg = f"`weights` must have a positive sum; got {list(weights)}."
        raise ValueError(msg)
    fractions = np.asarray(weights, np.float64) / total
    return {
        name: np.tensordot(
            fractions, np.stack([s[name] for s in states]).astype(np.float64), 1
        ).astype(states[0][name].dtype)
        for name in states[0]
    }


def server_step(
    current: State, averaged: State, velocity: State, momentum: float
) -> tuple[State, State]:
    r"""The shared tensors after the server's update, and FedAvgM's velocity.

    With ``momentum`` :math:`\mu`: :math:`v \leftarrow \mu v + (w - \bar w)` and
    :math:`w \leftarrow w - v`, in float64, from the ``current`` :math:`w` and the round's
    FedAvg ``averaged`` :math:`\bar w`; plain FedAvg (:math:`w \leftarrow \bar w`, no velocity)
    without momentum.
    """
    if not momentum:
        return averaged, {}
    new_velocity: State = {}
    updated: State = {}
    for name, average in averaged.items():
        weights = current[name].astype(np.float64)
        previous = velocity.get(name, np.zeros_like(weights))
        new_velocity[name] = momentum * previous + (weights - average.astype(np.float64))
        updated[name] = (weights - new_velocity[name]).astype(average.dtype)
    return updated, new_velocity


# -- personal state -----------------------------------------------------------------------------


def sends_personal(config: Config) -> bool:
    """Whether clients send their personal tensors for averaging (averaged alpha, FedBN)."""
    return config.alpha.policy == "averaged" or config.method_spec.local_norm


def first_personal(state: FederationState, initial: State, config: Config) -> State:
    """The personal state of a client in its first round: the average, or ``initial``."""
    return state.personal_average if config.alpha.policy == "averaged" else initial


def model_state(global_state: State, personal: State | None, first: State) -> State:
    """What a client's model runs with: the global state and its personal state (or ``first``)."""
    return {**global_state, **(personal if personal is not None else first)}


# -- a round ------------------------------------------------------------------------------------


def aggregate_round(
    state: FederationState,
    updates: Mapping[int, Update],
    reports: Sequence[StatisticsReport],
    *,
    config: Config,
    layout: Layout,
    layers: Mapping[str, HBNLayer],
) -> FederationState:
    """The state after a round whose checked ``updates`` (by client id) and ``reports`` came in.

    FedAvg of what the clients sent, weighted by examples, then the server step of the shared
    tensors; the global statistics from :func:`next_statistics`, in their dtype; the personal
    average where personal tensors are sent; each trained client's personal state; one more
    round done. ``history`` is left for :func:`with_record`. Nothing is mutated.
    """
    sent = fedavg([u.sent for u in updates.values()], [u.examples for u in updates.values()])
    shared, velocity = server_step(
        state.global_state,
        {name: sent[name] for name in select(layout, Role.SHARED)},
        state.server_velocity,
        config.server.momentum,
    )
    global_state = dict(shared)
    if layers:
        statistics = next_statistics(
            state.global_state, reports, config.statistics, layers, state.rounds_done
        )
        global_state |= statistics_state(statistics, layers, state.global_state)
    personal_average = state.personal_average
    if sends_personal(config):
        personal_average = {name: sent[name] for name in select(layout, Role.PERSONAL)}
    personal = tuple(
        updates[client].personal if client in updates else kept
        for client, kept in enumerate(state.personal)
    )
    return FederationState(
        global_state, personal_average, velocity, personal, state.rounds_done + 1, state.history
    )


def train_loss(losses: Sequence[float], examples: Sequence[int]) -> float:
    r"""The round's training loss: the clients' losses weighted by their examples, in float64.

    :math:`\sum_k n_k \ell_k / \sum_k n_k`, the FedAvg weighting, on every engine.

    Raises
    ------
    ValueError
        If there is no loss, the lengths differ, or the total of ``examples`` is not positive.
    """
    if not losses or len(losses) != len(examples) or not sum(examples) > 0:
        msg = (
            "`losses` and `examples` must be non-empty, of one length, with examples summing "
            f"to a positive number; got {len(losses)} losses and examples {list(examples)}."
        )
        raise ValueError(msg)
    weights = np.asarray(examples, np.float64)
    return float(np.dot(weights, np.asarray(losses, np.float64)) / weights.sum())


def with_record(state: FederationState, record: RoundRecord) -> FederationState:
    """``state`` with ``record`` appended to its history."""
    return state._replace(history=(*state.history, record))


def json_safe(value: object) -> object:
    """``value`` with every non-finite float as ``None``: what strict JSON can hold.

    Results files are written with ``json.dumps(json_safe(document), allow_nan=False)``, so
    they never hold the bare ``NaN`` or ``Infinity`` tokens that strict parsers reject.
    """
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def local_test_split(
    train_labels: np.ndarray, test_labels: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
    """A client's local test split for FedBN's personalised evaluation (test-set indices).

    About ``size`` test examples, and at least one, drawn with the label proportions of the
    client's ``train_labels`` (each class's share rounded), without replacement where the
    class allows.
    """
    classes, counts = np.unique(train_labels, return_counts=True)
    wanted = np.round(counts / counts.sum() * size).astype(np.int64)
    if not wanted.sum():
        wanted[np.argmax(counts)] = 1
    parts = []
    for label, count in zip(classes, wanted, strict=True):
        members = np.flatnonzero(test_labels == label)
        parts.append(rng.choice(members, count, replace=count > len(members)))
    return np.concatenate(parts)
