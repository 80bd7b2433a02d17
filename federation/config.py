"""The federation's configuration, declared once: every option, its range and its rules.

A configuration is a :class:`Config` of frozen sections. Each option is declared once, as a
field made by :func:`option`: its type (the annotation), default, allowed values or finite
range, and the line of documentation that ``docs/federation.md``'s table shows
(:func:`configuration_table` writes that table; a test keeps the two equal). The rules that
span options are the functions of :data:`RULES`. :func:`load_config` reads TOML, applies the
``method``'s defaults under the keys the file sets, applies overrides, and refuses unknown keys
and bad values before any training, naming the key, what it allows and what it got.

``method`` names the normalisation method and its federated protocol (:data:`METHODS`).
``"hbn"`` (the default) is this library's protocol: exact statistics of each client's whole
local data under the global model, pooled in float64. ``"hbn-authors"`` reproduces the choices
of the authors' public code (``docs/federation.md`` lists them with the spec's numbering
D1-D8), so both can be compared. The others are the baselines of ``docs/results.md``.

Adding an option is one :func:`option` field in its section (and, if the protocol reads it,
one pure function in :mod:`federation.protocol`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from federation.models import FRAMEWORKS, CollectionMode, ModelSpec, Norm
from federation.protocol import assign_frameworks

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "METHODS",
    "RULES",
    "AlphaConfig",
    "Bounds",
    "ClientsConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FixBNConfig",
    "Method",
    "ModelConfig",
    "ServerConfig",
    "StatisticsConfig",
    "TrainConfig",
    "build_section",
    "configuration_table",
    "load_config",
    "option",
    "parse_config",
]


class ConfigError(ValueError):
    """A configuration key is unknown or its value is not allowed."""


# -- how an option is declared ----------------------------------------------------------------


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The finite range of a numeric option.

    ``interval`` ranges are described as intervals (``in [0, 1)``); the others as a lower
    bound (``> 0``), their upper bound being a sanity cap that refuses absurd values (``inf``,
    ``1e400``) before any work starts. ``text`` replaces the description of a lower bound.
    """

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    interval: bool = True
    text: str = ""

    def above_low(self, value: float) -> bool:
        """Whether ``value`` satisfies the lower bound (NaN never does)."""
        return bool(value > self.low) if self.low_open else bool(value >= self.low)

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the range (NaN never does)."""
        below = value < self.high if self.high_open else value <= self.high
        return self.above_low(value) and bool(below)

    def _interval(self) -> str:
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{left}{_number(self.low)}, {_number(self.high)}{right}"

    def expected(self, value: float) -> str:
        """What a value must be, told for ``value``, which is out of range."""
        if self.interval:
            return f"in {self._interval()}"
        if not self.above_low(value):
            return self.text or f"{'>' if self.low_open else '>='} {_number(self.low)}"
        return f"{'<' if self.high_open else '<='} {_number(self.high)}"

    def describe(self) -> str:
        """The range as ``docs/federation.md``'s table shows it."""
        if self.interval:
            return self._interval()
        low = f"{'>' if self.low_open else '≥'} {_number(self.low)}"
        return f"{low} (at most {_number(self.high)})"


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Bounds:
    """An interval: ``[low, high]``, with either end open."""
    return Bounds(low, high, low_open, high_open)


def at_least(low: float, cap: float, *, strict: bool = False, text: str = "") -> Bounds:
    """``>= low`` (``> low`` if ``strict``), up to a sanity ``cap``."""
    return Bounds(low, cap, low_open=strict, interval=False, text=text)


COUNT_CAP = 10**6  # rounds, clients, epochs, evaluation periods: far beyond any run here
SIZE_CAP = 2**20  # batch sizes and widths


def option(
    default: Any,
    doc: str,
    *,
    bounds: Bounds | None = None,
    allowed: Sequence[str] | None = None,
    keys: Sequence[str] | None = None,
) -> Any:
    """Declare an option: its default, documentation and, by kind, what it allows.

    Parameters
    ----------
    default
        The default value (a ``dict`` default is copied for every configuration).
    doc
        One line: the option's meaning, as the documentation's table shows it.
    bounds
        A numeric option's finite range (every numeric option has one); for a table of counts,
        each count's range.
    allowed
        A string option's allowed values, when its annotation is not a ``Literal``.
    keys
        A table option's allowed keys.
    """
    metadata = {"doc": doc, "bounds": bounds, "allowed": allowed, "keys": keys}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# -- methods ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """A normalisation method: its model and the defaults it puts under the configuration.

    Attributes
    ----------
    norm, feature_norm, hybrid, local_norm
        The :class:`~federation.models.ModelSpec` fields it sets.
    defaults
        Configuration keys it sets unless the file or an override does.
    summary
        One line for ``docs`` and the command line.
    """

    norm: Norm
    summary: str
    feature_norm: bool = False
    hybrid: Literal["learned", "global"] = "learned"
    local_norm: bool = False
    defaults: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


# The authors' public code (paper-spec §2-§4 and §7), as the defaults of "hbn-authors".
_AUTHORS_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"momentum": 0.9, "clip_norm": 10.0, "drop_last": True, "lr_decay": 0.998},
    "statistics": {
        "mode": "hybrid",
        "batch_size": 64,
        "max_batches": 1,
        "shuffle": False,
        "momentum": 0.002,
        "weighting": "elements",
        "recorded": "hybrid",
        "variance": "bessel-examples",
    },
    "alpha": {"policy": "averaged"},
    "eval": {"statistics": "sync"},
}

# Every method, in report order: ours first, then the baselines of paper-spec §6.
METHODS: dict[str, Method] = {
    "hbn": Method("hbn", "HBN, exact: whole-data statistics under the global model, pooled"),
    "hbn-authors": Method(
        "hbn", "HBN as the authors' code runs it (D2-D8)", defaults=_AUTHORS_DEFAULTS
    ),
    "fbn": Method(
        "hbn",
        "FBN: BatchNorm normalising with exactly pooled global statistics in training",
        hybrid="global",
        # FBN's running statistics, an EMA with momentum 0.1 of each round's exact pool (D10),
        # are what it trains and evaluates with.
        defaults={"statistics": {"momentum": 0.1}},
    ),
    "bn": Method("bn", "FedAvg+BN: running statistics averaged like weights"),
    "fedbn": Method(
        "bn",
        "FedBN: BatchNorm layers kept local; evaluated personalised and with their average",
        local_norm=True,
        defaults={"eval": {"personal": True}},
    ),
    "fixbn": Method("bn", "FixBN: FedAvg+BN, then frozen global statistics from the switch"),
    "gn": Method("gn", "GroupNorm, 2 groups"),
    "ln": Method("ln", "LayerNorm as GroupNorm with 1 group"),
    "fedfn": Method(
        "none", "FedFN: no normalisation layers; sqrt(d)-scaled unit features", feature_norm=True
    ),
    "none": Method("none", "FedAvg without normalisation"),
}


# -- the sections -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``[data]``: the data set and its split over clients."""

    name: Literal["digits", "fashion-mnist", "npz"] = option(
        "digits",
        "`fashion-mnist` reads Debian's `dataset-fashion-mnist`; `npz` reads `data.path` "
        "(`x_train`, `y_train`, `x_test`, `y_test`) without pickle",
    )
    path: str = option("", 'the `.npz` file of `data.name = "npz"`')
    num_clients: int = option(10, "clients in the federation", bounds=at_least(1, COUNT_CAP))
    partition: Literal["iid", "dirichlet", "shards"] = option(
        "dirichlet", "how the train split is divided over clients; seeded"
    )
    beta: float = option(
        0.5, "Dirichlet concentration over labels", bounds=at_least(0, 10**6, strict=True)
    )
    shards_per_client: int = option(
        2, "label-sorted shards per client (`shards`)", bounds=at_least(1, COUNT_CAP)
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``[model]``: a reference model (see :class:`federation.models.ModelSpec`).

    Its normalisation follows from the top-level ``method``.
    """

    architecture: Literal["simple-cnn", "mlp"] = option("simple-cnn", "the reference model")
    hidden: int = option(128, "width of `fc1`", bounds=at_least(1, SIZE_CAP))
    dtype: Literal["float32", "float64"] = option(
        "float32", "`float64` serves checks that frameworks agree to rounding"
    )


@dataclasses.dataclass(frozen=True)
class ClientsConfig:
    """``[clients]``: who trains, in which framework, and how many per round."""

    frameworks: dict[str, int] = option(
        {},
        "clients per framework, summing to `data.num_clients`, assigned in the order torch, "
        "jax, keras whatever the key order; empty: every client uses torch",
        keys=FRAMEWORKS,
        bounds=at_least(0, COUNT_CAP),
    )
    fraction: float = option(
        1.0, "clients per round, at least `min_clients`", bounds=between(0, 1, low_open=True)
    )
    min_clients: int = option(
        2,
        "at most `data.num_clients`; a step with fewer valid clients fails the round",
        bounds=at_least(1, COUNT_CAP),
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """``[train]``: local SGD (see :class:`federation.models.SGDConfig`) and its schedule."""

    epochs: int = option(1, "local epochs", bounds=at_least(1, 10**4))
    batch_size: int = option(32, "local batch size", bounds=at_least(1, SIZE_CAP))
    lr: float = option(0.05, "learning rate", bounds=at_least(0, 1000, strict=True))
    lr_decay: float = option(1.0, "per-round factor of `lr`", bounds=between(0, 1, low_open=True))
    momentum: float = option(
        0.9, "SGD momentum; a fresh optimiser each round", bounds=between(0, 1, high_open=True)
    )
    weight_decay: float = option(0.0, "coupled, as `torch.optim.SGD`", bounds=at_least(0, 1000))
    clip_norm: float = option(
        10.0, "global gradient norm; 0 turns clipping off", bounds=at_least(0, 10**6)
    )
    drop_last: bool = option(
        False, "drops each epoch's partial last batch unless it is the client's only one"
    )


@dataclasses.dataclass(frozen=True)
class StatisticsConfig:
    """``[statistics]``: the statistics step and how the server pools and blends it.

    ``docs/federation.md`` explains the choices (and the authors' D2-D6 among them).
    """

    mode: CollectionMode = option(
        "global",
        "how HBN layers normalise in the statistics step: with the global statistics, or "
        "as in training (the authors')",
    )
    batch_size: int = option(64, "statistics pass batch size", bounds=at_least(1, SIZE_CAP))
    max_batches: int = option(
        0, "batches per client; 0: all of the client's data", bounds=at_least(0, 10**9)
    )
    shuffle: bool = option(True, "shuffle the statistics pass")
    momentum: float = option(
        0.1,
        "EMA weight of the fresh pool: `global = (1 - m) global + m pooled`; 1 takes it whole",
        bounds=between(0, 1, low_open=True),
    )
    weighting: Literal["elements", "dataset"] = option(
        "elements", "exact pooling, or mixture weights ∝ client data-set size (D4)"
    )
    recorded: Literal["batch", "hybrid"] = option(
        "batch",
        "exact input moments, or the authors' hybrid statistics (D2; needs a learned alpha)",
    )
    variance: Literal["population", "bessel-examples"] = option(
        "population", "`m2/count`, or the authors' `m2/(count - count/examples)` (D5)"
    )
    aggregator: Literal["exact", "trimmed", "median-of-means"] = option(
        "exact",
        "how each layer's reports are pooled: exactly, or robustly against lying clients "
        "(`docs/robustness.md`)",
    )
    trim: int = option(
        1,
        "`trimmed`: the reports dropped per channel, the lying clients tolerated",
        bounds=at_least(0, COUNT_CAP),
    )
    groups: int = option(
        3,
        "`median-of-means`: groups pooled exactly before their median; 2f + 1 tolerates f",
        bounds=at_least(1, COUNT_CAP),
    )
    warmup: Literal["none", "first", "cumulative", "debias"] = option(
        "none",
        "the EMA's momentum in its first blends, so that the initial (0, 1) does not linger: "
        "`m` from the start, the first pool whole, `max(m, 1/t)` at the t-th blend, or Adam's "
        "bias correction `m / (1 - (1 - m)^t)` (`federation.statistics_schedule`)",
    )


@dataclasses.dataclass(frozen=True)
class AlphaConfig:
    """``[alpha]``: what happens to HBN's hybrid factor alpha between rounds."""

    policy: Literal["personal", "averaged"] = option(
        "personal",
        "alpha stays on its client, or is sent and FedAvg-averaged, a new client starting "
        "from the average (the authors', D8)",
    )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """``[eval]``: evaluation on the global test set, and FedBN's personalised evaluation."""

    every: int = option(1, "evaluate every this many rounds", bounds=at_least(1, COUNT_CAP))
    final_rounds: int = option(
        10,
        "each of the last rounds is evaluated too (the reported metric averages the last 10)",
        bounds=at_least(1, COUNT_CAP),
    )
    statistics: Literal["ema", "sync", "fresh"] = option(
        "ema",
        "the protocol's statistics; a fresh pass of the round's clients (D7); or `fresh`: "
        "the pass the next round makes on this model, blended in by `eval.fresh_weight`",
    )
    fresh_weight: float = option(
        1.0,
        "`fresh`: evaluate with `(1 - w) global + w fresh`; must stay 1 unless `fresh`",
        bounds=between(0, 1, low_open=True),
    )
    batch_size: int = option(256, "evaluation batch size", bounds=at_least(1, SIZE_CAP))
    framework: str = option(
        "",
        "the server's evaluation model; empty: client 0's framework",
        allowed=("", *FRAMEWORKS),
    )
    personal: bool = option(
        False, "also evaluate each round's clients on local test splits (FedBN)"
    )
    personal_examples: int = option(
        500, "size of a local test split", bounds=at_least(1, COUNT_CAP)
    )


@dataclasses.dataclass(frozen=True)
class FixBNConfig:
    """``[fixbn]``: FixBN's switch from FedAvg+BN to frozen BatchNorm statistics."""

    switch_fraction: float = option(
        0.5,
        "FixBN freezes the statistics from round ⌊fraction · rounds⌋ + 1",
        bounds=between(0, 1),
    )


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """``[server]``: the server's update of the shared tensors."""

    momentum: float = option(
        0.0, "FedAvgM on the shared tensors; 0 is FedAvg", bounds=between(0, 1, high_open=True)
    )


def _section(cls: type[Any]) -> Any:
    return dataclasses.field(default_factory=cls, metadata={"section": True})


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole federation: top-level ``seed``, ``rounds`` and ``method``, then the sections."""

    seed: int = option(0, "every random draw derives from it", bounds=between(0, 2**32 - 1))
    rounds: int = option(10, "rounds to run", bounds=at_least(1, COUNT_CAP))
    method: str = option(
        "hbn", "the model and its defaults (see Methods); keys you set win", allowed=list(METHODS)
    )
    data: DataConfig = _section(DataConfig)
    model: ModelConfig = _section(ModelConfig)
    clients: ClientsConfig = _section(ClientsConfig)
    train: TrainConfig = _section(TrainConfig)
    statistics: StatisticsConfig = _section(StatisticsConfig)
    alpha: AlphaConfig = _section(AlphaConfig)
    eval: EvalConfig = _section(EvalConfig)
    fixbn: FixBNConfig = _section(FixBNConfig)
    server: ServerConfig = _section(ServerConfig)

    @property
    def method_spec(self) -> Method:
        """The :class:`Method` that ``method`` names."""
        return METHODS[self.method]

    def model_spec(self, input_shape: tuple[int, int, int], num_classes: int) -> ModelSpec:
        """The reference model of this ``method`` for a data set's examples and classes.

        Raises
        ------
        ConfigError
            If ``model.architecture`` cannot take the data set's examples (the Simple-CNN's
            pools need images of at least 8x8).
        """
        try:
            return self._model_spec(input_shape, num_classes)
        except ValueError as error:
            msg = (
                f"`model.architecture` = {self.model.architecture!r} cannot take the data "
                f"set's examples of shape {input_shape}: {error}"
            )
            raise ConfigError(msg) from error

    def _model_spec(self, input_shape: tuple[int, int, int], num_classes: int) -> ModelSpec:
        method = self.method_spec
        spec = ModelSpec(
            self.model.architecture,
            method.norm,
            input_shape,
            num_classes,
            hidden=self.model.hidden,
            dtype=self.model.dtype,
            feature_norm=method.feature_norm,
            hybrid=method.hybrid,
            local_norm=method.local_norm,
        )
        spec.layout()  # raises ValueError where the architecture cannot take the input shape
        return spec

    @property
    def client_frameworks(self) -> list[str]:
        """Each client's framework, by client id (:func:`federation.protocol.assign_frameworks`)."""
        return assign_frameworks(self.clients.frameworks, self.data.num_clients)

    @property
    def eval_framework(self) -> str:
        """The framework of the server's evaluation model."""
        return self.eval.framework or self.client_frameworks[0]

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain TOML/JSON-able values."""
        return dataclasses.asdict(self)


# -- the rules that span options ----------------------------------------------------------------


def _require(condition: bool, key: str, expected: str, value: Any) -> None:
    if not condition:
        msg = f"`{key}` must be {expected}; got {value!r}."
        raise ConfigError(msg)


def _min_clients_within_the_federation(config: Config) -> None:
    clients = config.data.num_clients
    _require(
        config.clients.min_clients <= clients,
        "clients.min_clients",
        f"in [1, data.num_clients = {clients}]",
        config.clients.min_clients,
    )


def _frameworks_cover_every_client(config: Config) -> None:
    frameworks = config.clients.frameworks
    if frameworks:
        clients = config.data.num_clients
        _require(
            sum(frameworks.values()) == clients,
            "clients.frameworks",
            f"counts summing to data.num_clients = {clients}",
            frameworks,
        )


def _hybrid_reports_need_a_learned_alpha(config: Config) -> None:
    method = config.method_spec
    if config.statistics.recorded == "hybrid" and method.norm == "hbn":
        _require(
            method.hybrid == "learned",
            "statistics.recorded",
            f"'batch' with method {config.method!r}, whose HBN layers have no alpha to mix "
            "batch and global statistics with",
            config.statistics.recorded,
        )


def _robust_pools_fit_the_fewest_reports(config: Config) -> None:
    """A robust pool must work on the fewest reports a round pools: ``clients.min_clients``."""
    statistics, fewest = config.statistics, config.clients.min_clients
    if statistics.aggregator == "trimmed":
        _require(
            2 * statistics.trim < fewest,
            "statistics.trim",
            f"below half of clients.min_clients = {fewest} (a round may pool that few reports)",
            statistics.trim,
        )
    if statistics.aggregator == "median-of-means":
        _require(
            statistics.groups <= fewest,
            "statistics.groups",
            f"at most clients.min_clients = {fewest} (a round may pool that few reports)",
            statistics.groups,
        )
    if statistics.aggregator != "exact":
        _require(
            statistics.weighting == "elements",
            "statistics.weighting",
            f"'elements' with statistics.aggregator = {statistics.aggregator!r}, whose pool "
            "has no mixture weights",
            statistics.weighting,
        )


def _fresh_weight_only_with_fresh_evaluation(config: Config) -> None:
    _require(
        config.eval.fresh_weight == 1 or config.eval.statistics == "fresh",
        "eval.fresh_weight",
        '1 unless eval.statistics = "fresh" (it weighs the fresh pool)',
        config.eval.fresh_weight,
    )


# Each rule raises ConfigError naming the key it refuses.
RULES: tuple[Callable[[Config], None], ...] = (
    _min_clients_within_the_federation,
    _frameworks_cover_every_client,
    _hybrid_reports_need_a_learned_alpha,
    _robust_pools_fit_the_fewest_reports,
    _fresh_weight_only_with_fresh_evaluation,
)


# -- reading a configuration --------------------------------------------------------------------


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML file and apply ``overrides`` (``"train.lr=0.1"``); see :func:`parse_config`."""
    with open(path, "rb") as file:
        try:
            table = tomllib.load(file)
        except tomllib.TOMLDecodeError as error:
            msg = f"{path} is not valid TOML: {error}."
            raise ConfigError(msg) from error
        except UnicodeDecodeError as error:
            msg = f"{path} must be UTF-8 TOML; byte {error.start} is not UTF-8 ({error.reason})."
            raise ConfigError(msg) from error
    return parse_config(table, overrides)


def parse_config(table: dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Build a checked :class:`Config` from a TOML-like table and ``key=value`` overrides.

    Override values are TOML values (``train.lr=0.1``, ``clients.frameworks={torch=2}``); a bare
    word is read as a string (``method=bn``). The ``method``'s defaults fill the keys that
    neither the table nor the overrides set.

    Raises
    ------
    ConfigError
        If a key is unknown, a value has the wrong type or is out of range, or a rule of
        :data:`RULES` is broken; the message names the key and what is allowed.
    """
    table = _merged(table, [_parse_override(o) for o in overrides])
    method = table.get("method", "hbn")
    _require(method in METHODS, "method", f"one of {list(METHODS)}", method)
    table = _merged(METHODS[method].defaults, [table])
    config: Config = build_section(Config, table, prefix="")
    for rule in RULES:
        rule(config)
    return config


def _parse_override(override: str) -> dict[str, Any]:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        msg = f"an override must look like key=value (e.g. train.lr=0.1); got {override!r}."
        raise ConfigError(msg)
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    nested: dict[str, Any] = {}
    *sections, leaf = key.strip().split(".")
    cursor = nested
    for section in sections:
        cursor = cursor.setdefault(section, {})
    cursor[leaf] = value
    return nested


def _merged(base: dict[str, Any], updates: list[dict[str, Any]]) -> dict[str, Any]:
    """``base`` with each update applied in turn; nothing is mutated.

    Sections merge key by key. A table option (``clients.frameworks``) is one value, so an
    update replaces it whole.
    """
    result = dict(base)
    for update in updates:
        for key, value in update.items():
            if (
                isinstance(value, dict)
                and isinstance(result.get(key), dict)
                and key != "frameworks"
            ):
                result[key] = _merged(result[key], [value])
            else:
                result[key] = value
    return result


def build_section(cls: type[Any], table: Any, *, prefix: str) -> Any:
    """A checked section ``cls`` from ``table``; keys are named ``prefix + key`` in errors.

    Raises
    ------
    ConfigError
        If a key is unknown or a value is not what its declaration allows.
    """
    if not isinstance(table, dict):
        msg = f"`{prefix.rstrip('.')}` must be a table; got {table!r}."
        raise ConfigError(msg)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        msg = f"unknown key(s) {[prefix + k for k in unknown]}; {where} allows {sorted(fields)}."
        raise ConfigError(msg)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if fields[name].metadata.get("section"):
            values[name] = build_section(hints[name], value, prefix=f"{key}.")
        else:
            values[name] = _checked(key, value, hints[name], fields[name].metadata)
    return cls(**values)


def _checked(key: str, value: Any, hint: Any, declared: typing.Mapping[str, Any]) -> Any:
    """``value`` of the option ``key``, checked against its type and declaration."""
    if get_origin(hint) is dict:
        _require(isinstance(value, dict), key, "a table such as {torch = 2, jax = 2}", value)
        for name, count in value.items():
            _require(name in declared["keys"], key, f"keyed by {list(declared['keys'])}", name)
            _checked(f"{key}.{name}", count, int, {"bounds": declared["bounds"]})
        return dict(value)
    allowed = get_args(hint) if get_origin(hint) is Literal else declared.get("allowed")
    if allowed is not None:
        _require(value in allowed, key, f"one of {list(allowed)}", value)
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        msg = f"`{key}` must be a {hint.__name__}; got {value!r} ({type(value).__name__})."
        raise ConfigError(msg)
    bounds: Bounds | None = declared.get("bounds")
    if bounds is not None:
        if isinstance(value, float):
            _require(math.isfinite(value), key, "a finite number", value)
        _require(bounds.contains(value), key, bounds.expected(value), value)
    return value


# -- the documentation's table ------------------------------------------------------------------


def configuration_table() -> str:
    """The Markdown table of every option, as ``docs/federation.md`` shows it."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        if field.metadata.get("section"):
            section = hints[field.name]
            section_hints = typing.get_type_hints(section)
            lines += [
                _row(f"{field.name}.{f.name}", f, section_hints[f.name])
                for f in dataclasses.fields(section)
            ]
        else:
            lines.append(_row(field.name, field, hints[field.name]))
    return "\n".join(lines) + "\n"


def _row(key: str, field: dataclasses.Field[Any], hint: Any) -> str:
    declared = field.metadata
    default = field.default_factory() if callable(field.default_factory) else field.default
    if isinstance(default, bool):
        shown = str(default).lower()
    elif isinstance(default, str):
        shown = f'`"{default}"`'
    elif isinstance(default, dict):
        shown = "`{}`"
    else:
        shown = str(default)
    if get_origin(hint) is dict:
        keys = ", ".join(f"`{k}`" for k in declared["keys"])
        allowed = f"table of {keys} counts, each {declared['bounds'].describe()}"
    elif get_origin(hint) is Literal or declared.get("allowed") is not None:
        values = get_args(hint) if get_origin(hint) is Literal else declared["allowed"]
        allowed = ", ".join(f"`{v}`" if v else '`""`' for v in values)
    elif declared.get("bounds") is not None:
        allowed = declared["bounds"].describe()
    else:
        allowed = hint.__name__
    return f"| `{key}` | {shown} | {allowed} | {declared['doc']} |"
