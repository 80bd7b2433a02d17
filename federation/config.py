"""The federation's configuration: TOML sections, presets, ``--set`` overrides and checks.

A configuration is a :class:`Config` of frozen sections. :func:`load_config` reads TOML,
applies the ``method``'s defaults under the keys the file sets, applies overrides, and refuses
unknown keys and bad values before any training, naming the key and what it allows.

``method`` names the normalisation method and its federated protocol (:data:`METHODS`).
``"hbn"`` (the default) is this library's protocol: exact statistics of each client's whole
local data under the global model, pooled in float64. ``"hbn-authors"`` reproduces the choices
of the authors' public code (``docs/federation.md`` lists them with the spec's numbering
D1-D8), so both can be compared. The others are the baselines of ``docs/results.md``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from federation.models import FRAMEWORKS, ModelSpec

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "METHODS",
    "AlphaConfig",
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
    "load_config",
    "parse_config",
]


class ConfigError(ValueError):
    """A configuration key is unknown or its value is not allowed."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``[data]``: the data set and its split over clients."""

    name: Literal["digits", "fashion-mnist", "npz"] = "digits"
    path: str = ""
    num_clients: int = 10
    partition: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    beta: float = 0.5
    shards_per_client: int = 2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``[model]``: a reference model (see :class:`federation.models.ModelSpec`).

    Its normalisation follows from the top-level ``method``. ``dtype = "float64"`` serves
    checks that frameworks agree to rounding; float32 is the norm.
    """

    architecture: Literal["simple-cnn", "mlp"] = "simple-cnn"
    hidden: int = 128
    dtype: Literal["float32", "float64"] = "float32"


@dataclasses.dataclass(frozen=True)
class ClientsConfig:
    """``[clients]``: who trains, in which framework, and how many per round.

    ``frameworks`` maps a framework to its number of clients, assigned in that order (e.g.
    ``{torch = 4, jax = 3, keras = 3}``); their sum must equal ``data.num_clients``. An empty
    table means every client uses torch.
    """

    frameworks: dict[str, int] = dataclasses.field(default_factory=dict)
    fraction: float = 1.0
    min_clients: int = 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """``[train]``: local SGD (see :class:`federation.models.SGDConfig`) and its schedule.

    ``lr`` is multiplied by ``lr_decay`` every round. ``clip_norm = 0`` turns clipping off.
    ``drop_last`` drops each epoch's final partial batch, unless it is the client's only one.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    lr_decay: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_norm: float = 10.0
    drop_last: bool = False


@dataclasses.dataclass(frozen=True)
class StatisticsConfig:
    """``[statistics]``: the statistics step and how the server pools and blends it.

    - ``mode``: how HBN layers normalise while statistics are collected, ``"global"`` (with the
      current global statistics, as in evaluation; the pool then equals the statistics of all
      clients' data together) or ``"hybrid"`` (as in training, the authors' choice).
    - ``batch_size``, ``max_batches`` (0: all of the client's data) and ``shuffle``.
    - ``momentum``: ``global = (1 - momentum) * global + momentum * pooled``; 1 takes the pool.
      The default 0.1 smooths the one-round lag of the pool (it was measured on the model
      clients downloaded): with 1, HBN's training swung by up to 15 points between rounds on
      Fashion-MNIST (``docs/results-discussion.md``).
    - ``weighting``: ``"elements"`` pools exactly what was forwarded; ``"dataset"`` weights each
      client's moments by its data-set size, for when clients forward subsets (D4).
    - ``recorded``: ``"batch"`` reports the layer inputs' exact moments; ``"hybrid"`` reports
      the mixture of batch and global statistics, as the authors' code does (D2).
    - ``variance``: ``"population"`` (``m2 / count``, what HBN normalises with) or
      ``"bessel-examples"``, the authors' ``m2 / (count - count / examples)`` (D5).
    """

    mode: Literal["global", "hybrid"] = "global"
    batch_size: int = 64
    max_batches: int = 0
    shuffle: bool = True
    momentum: float = 0.1
    weighting: Literal["elements", "dataset"] = "elements"
    recorded: Literal["batch", "hybrid"] = "batch"
    variance: Literal["population", "bessel-examples"] = "population"


@dataclasses.dataclass(frozen=True)
class AlphaConfig:
    """``[alpha]``: what happens to HBN's hybrid factor alpha between rounds.

    ``"personal"``: each client keeps its own alpha, never sent; a new client starts at 0.
    ``"averaged"``: the authors' code (D8): alpha is sent and FedAvg-averaged; a returning client
    still uses its own, and a client's first round starts from the latest average. Under
    ``method = "fedbn"`` the same holds for the personal BatchNorm tensors.
    """

    policy: Literal["personal", "averaged"] = "personal"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """``[eval]``: evaluation on the global test set every ``every`` rounds.

    Every one of the ``final_rounds`` last rounds is evaluated too, as the reported metric (the
    mean over the last 10 evaluated rounds) needs.

    ``statistics``: ``"ema"`` (the default) evaluates with the global statistics the protocol
    left, an EMA over rounds of pools measured on earlier models; ``"sync"`` with a fresh
    statistics pass of the round's clients over the new model, as the authors' code does (D7).
    With ``statistics.momentum = 0.1``, ``ema`` scored 1.6 ± 0.6 points above ``sync`` on
    Fashion-MNIST: a pass over 10 non-IID clients is noisier than the average over rounds
    (``docs/results-discussion.md``).
    ``framework`` is the server's evaluation model (default: the first client framework).

    ``personal``: also evaluate each of the round's trained clients with its personal state
    on a local test split of ``personal_examples`` test examples drawn with the client's label
    proportions (FedBN's personalised evaluation); the record's ``personal_accuracy`` is their
    mean.
    """

    every: int = 1
    final_rounds: int = 10
    statistics: Literal["ema", "sync"] = "ema"
    batch_size: int = 256
    framework: str = ""
    personal: bool = False
    personal_examples: int = 500


@dataclasses.dataclass(frozen=True)
class FixBNConfig:
    """``[fixbn]``: FixBN's switch from FedAvg+BN to frozen BatchNorm statistics.

    From round ``floor(switch_fraction * rounds) + 1`` on, clients train with the global
    running statistics frozen (``method = "fixbn"`` only; the FixBN code switches at half).
    """

    switch_fraction: float = 0.5


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    r"""``[server]``: the server's update of the shared tensors.

    ``momentum`` :math:`\mu > 0` keeps momentum across rounds on the server (FedAvgM): with
    :math:`\Delta = w - \bar w` (the round's FedAvg :math:`\bar w`), :math:`v \leftarrow \mu v
    + \Delta` and :math:`w \leftarrow w - v`. FixBN recommends keeping SGD momentum across
    rounds; local optimisers are rebuilt every round here, so this is how it is kept. 0 is
    plain FedAvg.
    """

    momentum: float = 0.0


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole federation: top-level ``seed``, ``rounds`` and ``method``, then the sections."""

    seed: int = 0
    rounds: int = 10
    method: Literal[
        "hbn", "hbn-authors", "fbn", "bn", "fedbn", "fixbn", "gn", "ln", "fedfn", "none"
    ] = "hbn"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    clients: ClientsConfig = dataclasses.field(default_factory=ClientsConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    statistics: StatisticsConfig = dataclasses.field(default_factory=StatisticsConfig)
    alpha: AlphaConfig = dataclasses.field(default_factory=AlphaConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    fixbn: FixBNConfig = dataclasses.field(default_factory=FixBNConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)

    def model_spec(self, input_shape: tuple[int, int, int], num_classes: int) -> ModelSpec:
        """The reference model of this ``method`` for a data set's examples and classes."""
        method = METHODS[self.method]
        return ModelSpec(
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

    def freezes_statistics(self, round_index: int) -> bool:
        """Whether clients train with frozen BatchNorm statistics in round ``round_index``."""
        switch = math.floor(self.fixbn.switch_fraction * self.rounds)
        return self.method == "fixbn" and round_index >= switch

    @property
    def client_frameworks(self) -> list[str]:
        """Each client's framework, by client id."""
        frameworks = self.clients.frameworks or {"torch": self.data.num_clients}
        return [name for name, count in frameworks.items() for _ in range(count)]

    @property
    def eval_framework(self) -> str:
        """The framework of the server's evaluation model."""
        return self.eval.framework or self.client_frameworks[0]

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain TOML/JSON-able values."""
        return dataclasses.asdict(self)


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

    norm: Literal["hbn", "bn", "gn", "ln", "none"]
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


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML file and apply ``overrides`` (``"train.lr=0.1"``); see :func:`parse_config`."""
    with open(path, "rb") as file:
        try:
            table = tomllib.load(file)
        except tomllib.TOMLDecodeError as error:
            msg = f"{path} is not valid TOML: {error}."
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
        If a key is unknown, a value has the wrong type or is out of range; the message names
        the key and what is allowed.
    """
    table = _merged(table, [_parse_override(o) for o in overrides])
    method = table.get("method", "hbn")
    if method not in METHODS:
        msg = f"`method` must be one of {list(METHODS)}; got {method!r}."
        raise ConfigError(msg)
    table = _merged(METHODS[method].defaults, [table])
    config: Config = _build(Config, table, prefix="")
    _check(config)
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

    Sections merge key by key. ``clients.frameworks`` is one value, the assignment of clients to
    frameworks, so an update replaces it whole.
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


def _build(cls: type[Any], table: Any, *, prefix: str) -> Any:
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
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, prefix=f"{prefix}{name}.")
        else:
            values[name] = _coerce(f"{prefix}{name}", value, hint)
    return cls(**values)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            msg = f"`{key}` must be one of {list(allowed)}; got {value!r}."
            raise ConfigError(msg)
        return value
    if origin is dict:
        if not isinstance(value, dict):
            msg = f"`{key}` must be a table such as {{torch = 2, jax = 2}}; got {value!r}."
            raise ConfigError(msg)
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        msg = f"`{key}` must be a {hint.__name__}; got {value!r} ({type(value).__name__})."
        raise ConfigError(msg)
    return value


def _require(condition: bool, key: str, expected: str, value: Any) -> None:
    if not condition:
        msg = f"`{key}` must be {expected}; got {value!r}."
        raise ConfigError(msg)


def _check(config: Config) -> None:
    """Ranges and the rules that span keys."""
    _require(config.rounds >= 1, "rounds", ">= 1", config.rounds)
    _require(config.data.num_clients >= 1, "data.num_clients", ">= 1", config.data.num_clients)
    _require(config.data.beta > 0, "data.beta", "> 0", config.data.beta)
    _require(config.model.hidden >= 1, "model.hidden", ">= 1", config.model.hidden)
    clients = config.clients
    _require(0 < clients.fraction <= 1, "clients.fraction", "in (0, 1]", clients.fraction)
    _require(
        1 <= clients.min_clients <= config.data.num_clients,
        "clients.min_clients",
        f"in [1, data.num_clients = {config.data.num_clients}]",
        clients.min_clients,
    )
    for name, count in clients.frameworks.items():
        _require(name in FRAMEWORKS, "clients.frameworks", f"keyed by {list(FRAMEWORKS)}", name)
        _require(isinstance(count, int) and count >= 0, f"clients.frameworks.{name}", ">= 0", count)
    if clients.frameworks:
        total = sum(clients.frameworks.values())
        _require(
            total == config.data.num_clients,
            "clients.frameworks",
            f"counts summing to data.num_clients = {config.data.num_clients}",
            clients.frameworks,
        )
    train = config.train
    _require(train.epochs >= 1, "train.epochs", ">= 1", train.epochs)
    _require(train.batch_size >= 1, "train.batch_size", ">= 1", train.batch_size)
    _require(train.lr > 0, "train.lr", "> 0", train.lr)
    _require(0 < train.lr_decay <= 1, "train.lr_decay", "in (0, 1]", train.lr_decay)
    _require(0 <= train.momentum < 1, "train.momentum", "in [0, 1)", train.momentum)
    _require(train.weight_decay >= 0, "train.weight_decay", ">= 0", train.weight_decay)
    _require(train.clip_norm >= 0, "train.clip_norm", ">= 0 (0: no clipping)", train.clip_norm)
    stats = config.statistics
    _require(stats.batch_size >= 1, "statistics.batch_size", ">= 1", stats.batch_size)
    _require(stats.max_batches >= 0, "statistics.max_batches", ">= 0 (0: all)", stats.max_batches)
    _require(0 < stats.momentum <= 1, "statistics.momentum", "in (0, 1]", stats.momentum)
    _require(config.eval.every >= 1, "eval.every", ">= 1", config.eval.every)
    final = config.eval.final_rounds
    _require(final >= 1, "eval.final_rounds", ">= 1", final)
    _require(config.eval.batch_size >= 1, "eval.batch_size", ">= 1", config.eval.batch_size)
    examples = config.eval.personal_examples
    _require(examples >= 1, "eval.personal_examples", ">= 1", examples)
    switch = config.fixbn.switch_fraction
    _require(0 <= switch <= 1, "fixbn.switch_fraction", "in [0, 1]", switch)
    momentum = config.server.momentum
    _require(0 <= momentum < 1, "server.momentum", "in [0, 1) (0: plain FedAvg)", momentum)
    _require(
        config.eval_framework in FRAMEWORKS,
        "eval.framework",
        f"one of {list(FRAMEWORKS)} or empty",
        config.eval.framework,
    )
