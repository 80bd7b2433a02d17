"""Reference models, one definition of their canonical state, and the client-side model protocol.

:class:`ModelSpec` describes a reference model (the paper's Simple-CNN, or an MLP) once, without
a framework: its layers and its canonical :data:`~federation.layout.Layout`. Each framework
builds the same model from the spec (:func:`build_model`) behind the :class:`FrameworkModel`
protocol, which is all the federation needs from a framework: load and export canonical state,
collect HBN statistics, train with SGD and evaluate. Batches are NumPy in canonical layout:
images ``(N, C, H, W)`` float32 (a model casts them to its dtype), labels ``(N,)`` int64.

Importing this module imports no framework; :func:`build_model` imports the one it needs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, get_args

from federation.layout import HBNPart, HBNTensor, Kind, Layout, Role, TensorSpec

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    import numpy as np

    from hbn_core import Moments

__all__ = [
    "FRAMEWORKS",
    "Batch",
    "EvalResult",
    "FrameworkModel",
    "ModelSpec",
    "SGDConfig",
    "TrainResult",
    "build_model",
    "check_known_names",
    "native_tensor_spec",
    "trainable_batches",
]

Architecture = Literal["simple-cnn", "mlp"]
Norm = Literal["hbn", "bn", "gn", "ln", "none"]
Framework = Literal["torch", "jax", "keras"]
CollectionMode = Literal["hybrid", "global"]
FRAMEWORKS: tuple[str, ...] = get_args(Framework)
Batch = tuple["np.ndarray", "np.ndarray"]  # images (N, C, H, W) float, labels (N,) int64
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
NORMS: tuple[str, ...] = get_args(Norm)

# Group counts of the GroupNorm variants, as in the authors' code: GN has 2 groups, LN is 1 group.
GROUPS = {"gn": 2, "ln": 1}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of a reference model, in forward order.

    ``kind`` is ``"conv"`` (3x3, padding 1, then ``norm``, ReLU and 2x2 max-pool), ``"dense"``
    or ``"norm"``. A dense layer with ``flatten_from`` flattens its ``(C, H, W)`` input first.
    """

    name: str
    kind: Literal["conv", "dense", "norm"]
    in_features: int
    out_features: int
    flatten_from: tuple[int, int, int] | None = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    r"""A reference model, described once for every framework.

    Attributes
    ----------
    architecture
        ``"simple-cnn"``: the paper's Simple-CNN, three blocks of conv 3x3 (padding 1) -> norm ->
        ReLU -> max-pool 2x2 with ``channels`` (16, 32, 64), then flatten -> ``fc1`` (``hidden``
        units) -> ReLU -> ``fc2``. The flatten size follows from ``input_shape``.
        ``"mlp"``: flatten -> ``fc1`` -> norm -> ReLU -> ``fc2``.
    norm
        The normalisation after each conv (Simple-CNN) or after ``fc1`` (MLP): ``"hbn"``,
        ``"bn"`` (BatchNorm), ``"gn"`` (GroupNorm, 2 groups), ``"ln"`` (GroupNorm with 1 group:
        LayerNorm over channels and space, as in the paper's code) or ``"none"``.
    input_shape
        One example's canonical shape ``(C, H, W)``.
    num_classes
        The number of classes.
    hidden
        The width of ``fc1``.
    channels
        The Simple-CNN's conv widths.
    eps
        The norm layers' epsilon; 1e-5 in every framework, so that they agree.
    dtype
        The parameters' and activations' dtype, ``"float32"`` or ``"float64"`` (for checking
        that frameworks agree to rounding; JAX needs ``jax_enable_x64`` for it).
    feature_norm
        FedFN's feature normalisation: the flattened features :math:`z \in \mathbb{R}^d` that
        enter ``fc1`` become :math:`\sqrt{d}\, z / \max(\lVert z \rVert_2, 10^{-12})` per
        example, in training and inference (the flatten order does not change the norm).
    hybrid
        How HBN layers mix statistics in training: ``"learned"``, with the learnable per-channel
        ``alpha`` (HBN), or ``"global"``, with the global statistics only (alpha fixed at
        :math:`+\infty`, not trained and not part of the layout): FBN, normalisation with
        exactly pooled global statistics.
    local_norm
        FedBN: every tensor of the norm layers is ``personal`` (kept by its client) rather
        than ``shared``.
    """

    architecture: Architecture
    norm: Norm
    input_shape: tuple[int, int, int]
    num_classes: int
    hidden: int = 128
    channels: tuple[int, ...] = (16, 32, 64)
    eps: float = 1e-5
    dtype: Literal["float32", "float64"] = "float32"
    feature_norm: bool = False
    hybrid: Literal["learned", "global"] = "learned"
    local_norm: bool = False

    def layers(self) -> list[LayerSpec]:
        """The layers, in forward order, with their canonical names."""
        if self.architecture == "mlp":
            return self._mlp_layers()
        return self._cnn_layers()

    def _mlp_layers(self) -> list[LayerSpec]:
        flat = self.input_shape[0] * self.input_shape[1] * self.input_shape[2]
        layers = [LayerSpec("fc1", "dense", flat, self.hidden, flatten_from=self.input_shape)]
        if self.norm != "none":
            layers.append(LayerSpec("norm1", "norm", self.hidden, self.hidden))
        return [*layers, LayerSpec("fc2", "dense", self.hidden, self.num_classes)]

    def _cnn_layers(self) -> list[LayerSpec]:
        layers = []
        channels, height, width = self.input_shape
        for index, out in enumerate(self.channels, start=1):
            layers.append(LayerSpec(f"conv{index}", "conv", channels, out))
            if self.norm != "none":
                layers.append(LayerSpec(f"norm{index}", "norm", out, out))
            channels, height, width = out, height // 2, width // 2
        if height == 0 or width == 0:
            msg = (
                f"`input_shape` {self.input_shape} is too small for {len(self.channels)} "
                f"2x2 max-pools; each side must be at least {2 ** len(self.channels)}."
            )
            raise ValueError(msg)
        flat = (channels, height, width)
        return [
            *layers,
            LayerSpec("fc1", "dense", channels * height * width, self.hidden, flatten_from=flat),
            LayerSpec("fc2", "dense", self.hidden, self.num_classes),
        ]

    def norm_layers(self) -> list[str]:
        """The canonical names of the norm layers."""
        return [layer.name for layer in self.layers() if layer.kind == "norm"]

    def norm_positions(self) -> dict[str, int]:
        r"""Each norm layer's values per channel for one example, by canonical name.

        1 for the MLP's norm, which follows a dense layer; :math:`H_k \times W_k` for the
        Simple-CNN's ``norm{k}``, the size of the map of ``conv{k}``
        (:math:`\lfloor H / 2^{k-1} \rfloor` by :math:`\lfloor W / 2^{k-1} \rfloor`). An HBN
        layer's element count for ``e`` examples is ``e`` times this.
        """
        if self.architecture == "mlp" or self.norm == "none":
            return dict.fromkeys(self.norm_layers(), 1)
        _, height, width = self.input_shape
        return {
            f"norm{k}": (height >> (k - 1)) * (width >> (k - 1))
            for k in range(1, len(self.channels) + 1)
        }

    def layout(self) -> Layout:
        """Every canonical tensor of the model, with its shape, role and layout kind."""
        layout: Layout = {}
        for layer in self.layers():
            layout.update(self._layer_tensors(layer))
        return layout

    def _layer_tensors(self, layer: LayerSpec) -> Layout:
        vector = TensorSpec((layer.out_features,), Role.SHARED)
        if layer.kind == "conv":
            conv_shape = (layer.out_features, layer.in_features, 3, 3)
            kernel = TensorSpec(conv_shape, Role.SHARED, Kind.CONV_KERNEL)
            return {f"{layer.name}.weight": kernel, f"{layer.name}.bias": vector}
        if layer.kind == "dense":
            dense_shape = (layer.out_features, layer.in_features)
            kernel = TensorSpec(dense_shape, Role.SHARED, Kind.DENSE_KERNEL, layer.flatten_from)
            return {f"{layer.name}.weight": kernel, f"{layer.name}.bias": vector}
        if self.local_norm:
            vector = TensorSpec((layer.out_features,), Role.PERSONAL)
        tensors = {f"{layer.name}.weight": vector, f"{layer.name}.bias": vector}
        if self.norm == "hbn":
            shape = (layer.out_features,)
            positions = self.norm_positions()[layer.name]
            if self.hybrid == "learned":
                alpha = HBNTensor(layer.name, HBNPart.ALPHA)
                tensors[f"{layer.name}.alpha"] = TensorSpec(shape, Role.PERSONAL, hbn=alpha)
            for part in (HBNPart.GLOBAL_MEAN, HBNPart.GLOBAL_VAR):
                hbn = HBNTensor(layer.name, part, positions)
                tensors[f"{layer.name}.{part}"] = TensorSpec(shape, Role.STATISTICS, hbn=hbn)
        elif self.norm == "bn":
            tensors[f"{layer.name}.running_mean"] = vector
            tensors[f"{layer.name}.running_var"] = vector
        return tensors


@dataclasses.dataclass(frozen=True)
class SGDConfig:
    r"""Local SGD, the same in every framework; a fresh optimiser (zero momentum) per call.

    Per step, with gradient :math:`g` of the mean cross-entropy over the batch:
    :math:`g \leftarrow g \cdot \min(1, c / \lVert g \rVert_2)` over all trainable tensors
    (if ``clip_norm`` :math:`c` is set), then :math:`g \leftarrow g + \lambda w` (coupled
    weight decay, as ``torch.optim.SGD``), :math:`b \leftarrow \mu b + g`,
    :math:`w \leftarrow w - \eta b`. The trainable tensors are the ``shared`` parameters and
    HBN's ``alpha``; BatchNorm running statistics follow their framework's update rule.
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    clip_norm: float | None = None


class TrainResult(NamedTuple):
    """What one local training call did: summed batch-mean losses times batch sizes."""

    loss_sum: float
    examples: int
    steps: int


class EvalResult(NamedTuple):
    """Summed cross-entropy, the number of correct predictions and of examples."""

    loss_sum: float
    correct: int
    examples: int


class FrameworkModel(Protocol):
    """A reference model in one framework, as the federation drives it.

    ``get_state`` and ``set_state`` speak the canonical ``layout``: every tensor, NumPy in the
    model's dtype (float32 unless the spec says float64). ``set_state`` resets framework-local
    buffers (``counter`` tensors such as torch's ``num_batches_tracked``), so nothing leaks
    from one client to the next. The reference
    models implement it for every framework (:func:`build_model`); a model of your own needs
    only these five methods and its ``layout`` (see ``docs/federation.md``).
    """

    layout: Layout

    def get_state(self) -> dict[str, np.ndarray]:
        """Every tensor of the canonical layout, as NumPy in the model's dtype."""
        ...

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load every tensor of the canonical layout."""
        ...

    def collect_statistics(
        self, inputs: Iterable[np.ndarray], mode: CollectionMode
    ) -> dict[str, Moments]:
        """Each HBN layer's exact input moments over ``inputs``, keyed by canonical layer name.

        NumPy moments: int64 count of elements per channel, float64 mean and m2. The model's
        state is unchanged.
        """
        ...

    def train(
        self, batches: Iterable[Batch], sgd: SGDConfig, *, freeze_statistics: bool = False
    ) -> TrainResult:
        """Train on ``batches`` with a fresh :class:`SGDConfig` optimiser, in training mode.

        ``freeze_statistics``: BatchNorm layers normalise with their running statistics and
        leave them unchanged, while their weight and bias still train (FixBN's second stage).
        Other layers are unaffected. The reference models skip the batches that
        :func:`trainable_batches` leaves out.
        """
        ...

    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        """Cross-entropy and accuracy in inference mode (HBN: global statistics only)."""
        ...


def trainable_batches(
    batches: Iterable[Batch], spec: ModelSpec, *, freeze_statistics: bool
) -> Iterator[Batch]:
    """The batches a reference model trains on: all, but one that BatchNorm cannot normalise.

    A BatchNorm layer in training normalises a batch with its own statistics, and a batch that
    gives it a single value per channel has none: torch refuses it ("Expected more than 1 value
    per channel when training"), while Flax and Keras map every value to the layer's bias and
    pull the running variance toward 0. So, with ``norm = "bn"`` and statistics that train
    (not ``freeze_statistics``), a batch of one example is **skipped** where one example gives
    a norm layer one value per channel (the MLP; the Simple-CNN's maps hold at least 4). The
    same batches are skipped in every framework. It happens to the last batch of a client
    whose data is one more than a multiple of the batch size, and to every batch of a client
    with one example, which then does not train: it returns the state it received, with no
    step and no example counted. HBN layers train on any batch (the global half of their
    mixture normalises it), and FBN and frozen statistics use no batch statistics.
    """
    skips_single = (
        spec.norm == "bn" and not freeze_statistics and min(spec.norm_positions().values()) == 1
    )
    for batch in batches:
        if not (skips_single and len(batch[1]) == 1):
            yield batch


def check_known_names(state: Mapping[str, object], known: Iterable[str], what: str) -> None:
    """Refuse a ``state`` to write into a model of your own that names what it lacks.

    The ``*_moments`` functions of the framework modules (``torch_moments``, ``flax_moments``,
    ``keras_moments``) write ``state`` into your model, then run its statistics step; they
    return each HBN layer's moments (NumPy) and the number of examples forwarded.

    Raises
    ------
    ValueError
        If ``state`` names a tensor not among ``known``; ``what`` says what ``known`` holds.
    """
    unknown = sorted(set(state) - set(known))
    if unknown:
        msg = f"`state` must name {what}; unknown: {unknown}."
        raise ValueError(msg)


def build_model(framework: str, spec: ModelSpec, *, seed: int) -> FrameworkModel:
    """Build ``spec`` in ``framework`` (``"torch"``, ``"jax"`` or ``"keras"``), seeded.

    Raises
    ------
    ValueError
        If ``framework`` is not one of them.
    ImportError
        If the framework is not installed; the message names the extra to install.
    """
    if framework not in FRAMEWORKS:
        msg = f"`framework` must be one of {list(FRAMEWORKS)}; got {framework!r}."
        raise ValueError(msg)
    extra = {"torch": "torch", "jax": "jax", "keras": "tf"}[framework]
    try:
        module = importlib.import_module(f"federation.models.{framework}_model")
    except ImportError as error:
        msg = f"the {framework} clients need their framework: pip install 'hbn[{extra}]' ({error})."
        raise ImportError(msg) from error
    model: FrameworkModel = module.build(spec, seed=seed)
    return model


_KINDS = {4: Kind.CONV_KERNEL, 2: Kind.DENSE_KERNEL}


def native_tensor_spec(
    shape: tuple[int, ...], *, hbn: HBNTensor | None = None, personal: bool = False
) -> TensorSpec:
    """The spec of one tensor of a model of your own, named and shaped as its framework does.

    What the layouts of your own models (``torch_layout``, ``flax_layout``, ``keras_layout``)
    give each tensor: an HBN layer's ``global_mean`` and ``global_var`` (``hbn``) are
    ``statistics`` and its ``alpha`` is ``personal``; ``personal`` marks any other tensor that
    stays on its node (an HBN layer's local running statistics); every other tensor is
    ``shared``. 4-D tensors are conv kernels and 2-D ones dense kernels, the rest vectors; the
    shapes stay the framework's, so such a layout serves nodes of that framework.
    """
    kind = _KINDS.get(len(shape), Kind.VECTOR)
    if hbn is not None:
        role = Role.PERSONAL if hbn.part is HBNPart.ALPHA else Role.STATISTICS
        return TensorSpec(shape, role, kind, hbn=hbn)
    return TensorSpec(shape, Role.PERSONAL if personal else Role.SHARED, kind)
