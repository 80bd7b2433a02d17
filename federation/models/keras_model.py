"""The reference models in Keras 3, behind :class:`federation.models.FrameworkModel`.

The network is a functional ``keras.Model`` that takes canonical NCHW images and transposes
them to NHWC in its first layer (``to_channels_last``, a ``Permute``); every tensor crosses the
boundary through :func:`federation.layout.to_channels_last` and
:func:`federation.layout.from_channels_last` (HWIO conv kernels, ``(in, out)`` dense kernels,
and the flatten permutation of the first dense layer after a flatten). Its layers carry the
canonical layer names (``conv1``, ``norm1``, ``fc1``, ...), and weights are exchanged by their
Keras path (``"conv1/kernel"``), never by position. Within a layer, Keras' names map to the
canonical ones as below.

==============================  ====================================================
canonical                       Keras
==============================  ====================================================
conv and dense ``weight``       ``kernel``
norm ``weight``, ``bias``       ``gamma``, ``beta``
BatchNorm ``running_mean/var``  ``moving_mean``, ``moving_variance``
HBN ``alpha``                   ``alpha`` (trainable; +inf and non-trainable for FBN)
HBN ``global_mean/var``         ``global_mean``, ``global_var`` (non-trainable)
==============================  ====================================================

Every layer is in the spec's dtype and channels-last whatever Keras' global settings say. The
convolutions use ``padding="same"``, which at stride 1 and with a 3x3 kernel pads one pixel on
each side: torch's ``padding=1``. Training and evaluation are Keras' own compiled steps
(``train_on_batch`` with an optimiser of ours, ``predict_on_batch``, whose logits give the
cross-entropy in float64 NumPy), compiled once per model: the optimiser's hyperparameters are
variables, so a new learning rate or a new state does not retrace; training with frozen
BatchNorm statistics (FixBN) has a train step of its own, compiled once too. They run on every
Keras backend; CI and the federation use TensorFlow, Keras' default.

Warnings
--------
A BatchNorm baseline's canonical ``running_var`` is what each framework tracks: Keras averages
the biased batch variance into it, torch the unbiased one (``n / (n - 1)`` larger). The
difference is left as it is; the running statistics only serve inference.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import ops

from backends import keras as hbn_keras
from federation.layout import HBNPart, HBNTensor, Layout, from_channels_last, to_channels_last
from federation.models import (
    GROUPS,
    Batch,
    CollectionMode,
    EvalResult,
    ModelSpec,
    SGDConfig,
    TrainResult,
    check_known_names,
    native_tensor_spec,
    trainable_batches,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    from federation.models import LayerSpec
    from hbn_core import Moments

__all__ = [
    "FeatureNormalization",
    "FreezableBatchNormalization",
    "KerasModel",
    "build",
    "keras_layout",
    "keras_moments",
]

# Keras' weight name for each canonical tensor name that differs from it, by layer kind.
_KERAS_NAMES = {
    "conv": {"weight": "kernel"},
    "dense": {"weight": "kernel"},
    "norm": {
        "weight": "gamma",
        "bias": "beta",
        "running_mean": "moving_mean",
        "running_var": "moving_variance",
    },
}
# torch's BatchNorm momentum 0.1 weights the new batch; Keras' momentum weights the old average.
_BATCHNORM_MOMENTUM = 1.0 - 0.1
_CHANNELS_LAST = "channels_last"


@keras.saving.register_keras_serializable(package="hbn")
class FeatureNormalization(keras.layers.Layer):
    r"""FedFN's feature normalisation of flat features :math:`z \in \mathbb{R}^d` per example.

    :math:`\sqrt{d}\, z / \max(\lVert z \rVert_2, 10^{-12})` over the last axis, in training
    and inference, in the layer's dtype; no weights.
    """

    def call(self, inputs: Any) -> Any:
        r"""Scale each example of ``(N, d)`` ``inputs`` to the norm :math:`\sqrt{d}`."""
        norm = ops.sqrt(ops.sum(ops.square(inputs), axis=-1, keepdims=True))
        return inputs / ops.maximum(norm, 1e-12) * math.sqrt(inputs.shape[-1])

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        """The output has the shape of the input."""
        return tuple(input_shape)


@keras.saving.register_keras_serializable(package="hbn")
class FreezableBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose statistics can be frozen while it trains.

    With ``frozen_statistics`` (False at first) the layer normalises with its moving statistics
    and leaves them unchanged, as in inference, even in training; gamma and beta still get
    gradients. (``trainable=False`` would freeze them too.) A compiled train step reads the
    flag when it is traced: each value needs its own.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frozen_statistics = False

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        """BatchNormalization's forward, in inference mode while the statistics are frozen."""
        return super().call(inputs, training=training and not self.frozen_statistics, mask=mask)


def _norm(spec: ModelSpec, name: str) -> keras.layers.Layer:
    options: dict[str, Any] = {"epsilon": spec.eps, "name": name, "dtype": spec.dtype}
    if spec.norm == "hbn":
        return hbn_keras.HybridBatchNormalization(**options)
    if spec.norm == "bn":
        return FreezableBatchNormalization(momentum=_BATCHNORM_MOMENTUM, **options)
    # "ln" is GroupNorm with one group (channels and space per example), not LayerNormalization,
    # whose affine would be per element rather than per channel.
    return keras.layers.GroupNormalization(groups=GROUPS[spec.norm], **options)


def _layer(spec: ModelSpec, layer: LayerSpec, seed: int) -> keras.layers.Layer:
    if layer.kind == "norm":
        return _norm(spec, layer.name)
    options: dict[str, Any] = {
        "name": layer.name,
        "dtype": spec.dtype,
        "kernel_initializer": keras.initializers.LecunNormal(seed=seed),
    }
    if layer.kind == "conv":
        return keras.layers.Conv2D(
            layer.out_features, 3, padding="same", data_format=_CHANNELS_LAST, **options
        )
    return keras.layers.Dense(layer.out_features, **options)


def _network(spec: ModelSpec, *, seed: int) -> keras.Model:
    """Simple-CNN or MLP on canonical NCHW images, its layers named as the spec's."""
    # One seed per layer, drawn from `seed` without touching any global random state.
    specs = spec.layers()
    seeds = np.random.SeedSequence(seed).generate_state(len(specs))
    layers = {
        layer.name: _layer(spec, layer, int(s)) for layer, s in zip(specs, seeds, strict=True)
    }
    dtype = spec.dtype
    images = keras.Input(spec.input_shape, dtype=dtype, name="images")
    x = keras.layers.Permute((2, 3, 1), dtype=dtype, name="to_channels_last")(images)
    if spec.architecture == "mlp":
        x = _features(spec, x)
        x = _relu(_norm_or_identity(layers, "norm1", layers["fc1"](x)), "relu1", dtype)
        return keras.Model(images, layers["fc2"](x), name="mlp")
    for index in range(1, len(spec.channels) + 1):
        x = layers[f"conv{index}"](x)
        x = _relu(_norm_or_identity(layers, f"norm{index}", x), f"relu{index}", dtype)
        x = keras.layers.MaxPooling2D(
            2, data_format=_CHANNELS_LAST, dtype=dtype, name=f"pool{index}"
        )(x)
    x = _relu(layers["fc1"](_features(spec, x)), "relu_fc1", dtype)
    return keras.Model(images, layers["fc2"](x), name="simple_cnn")


def _norm_or_identity(layers: dict[str, keras.layers.Layer], name: str, x: Any) -> Any:
    return layers[name](x) if name in layers else x


def _relu(x: Any, name: str, dtype: str) -> Any:
    return keras.layers.ReLU(dtype=dtype, name=name)(x)


def _features(spec: ModelSpec, x: Any) -> Any:
    """``x`` flattened for ``fc1``, then normalised by FedFN if the spec asks for it."""
    x = keras.layers.Flatten(data_format=_CHANNELS_LAST, dtype=spec.dtype, name="flatten")(x)
    if not spec.feature_norm:
        return x
    return FeatureNormalization(dtype=spec.dtype, name="feature_norm")(x)


def _fix_alphas(network: keras.Model) -> None:
    r"""FBN: every HBN layer's alpha at :math:`+\infty` and not trainable.

    The training forward then weighs the global statistics by
    :math:`\operatorname{sigmoid}(+\infty) = 1`: it normalises with them only. The optimiser
    and the train step take ``network.trainable_variables``, which leave alpha out.
    """
    for _, layer in hbn_keras.hbn_layers(network):
        layer.alpha.assign(ops.full(layer.alpha.shape, math.inf, layer.alpha.dtype))
        layer.alpha.trainable = False


class _TorchSGD(keras.optimizers.Optimizer):
    r"""The update of :class:`SGDConfig`: ``torch.optim.SGD`` after ``clip_grad_norm_``.

    Per step, over all trainable variables: :math:`g \leftarrow g \cdot \min(1, c/\lVert g
    \rVert_2)`, :math:`g \leftarrow g + \lambda w` (coupled weight decay, unlike Keras' SGD),
    :math:`b \leftarrow \mu b + g` and :math:`w \leftarrow w - \eta b` (torch's momentum form,
    not Keras'). The hyperparameters are variables, set by :meth:`reset`, so that new values
    reuse the compiled train step.
    """

    def __init__(self, dtype: str) -> None:
        super().__init__(learning_rate=0.0, name="torch_sgd")
        self.hyperparameter_dtype = dtype

    def build(self, variables: list[keras.Variable]) -> None:
        """Create the hyperparameters and one momentum buffer per variable."""
        if self.built:
            return
        super().build(variables)
        dtype = self.hyperparameter_dtype
        # Our own step size: Keras keeps `learning_rate` in float32 whatever the model's dtype.
        self.step_size = self.add_variable((), name="step_size", dtype=dtype)
        self.momentum = self.add_variable((), name="momentum", dtype=dtype)
        self.coupled_weight_decay = self.add_variable((), name="weight_decay", dtype=dtype)
        self.clip_norm = self.add_variable((), name="clip_norm", dtype=dtype)
        self.buffers = [self.add_variable_from_reference(v, "momentum_buffer") for v in variables]

    def reset(self, sgd: SGDConfig) -> None:
        """Take the hyperparameters of ``sgd`` and zero the momentum buffers: a fresh optimiser."""
        self.step_size.assign(sgd.lr)
        self.momentum.assign(sgd.momentum)
        self.coupled_weight_decay.assign(sgd.weight_decay)
        self.clip_norm.assign(np.inf if sgd.clip_norm is None else sgd.clip_norm)
        for buffer in self.buffers:
            buffer.assign(ops.zeros(buffer.shape, buffer.dtype))

    def apply(self, grads: list[Any], trainable_variables: list[Any] | None = None) -> None:
        """Clip ``grads`` by their global norm, then update the variables."""
        norm = ops.sqrt(sum(ops.sum(ops.square(g)) for g in grads))
        scale = ops.where(norm > self.clip_norm, self.clip_norm / norm, 1.0)
        super().apply([g * scale for g in grads], trainable_variables)

    def update_step(self, gradient: Any, variable: keras.Variable, learning_rate: Any) -> None:  # noqa: ARG002 - Keras' API
        """Coupled weight decay, momentum and the step of one variable."""
        buffer = self.buffers[self._get_variable_index(variable)]
        gradient = gradient + self.coupled_weight_decay * variable
        self.assign(buffer, self.momentum * buffer + gradient)
        self.assign_sub(variable, self.step_size * buffer)


def _cross_entropy_sum(logits: np.ndarray, labels: np.ndarray) -> float:
    """Summed softmax cross-entropy of ``logits`` against integer ``labels``, in float64."""
    logits = logits.astype(np.float64)
    peak = logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
    return float((log_norm - logits[np.arange(len(labels)), labels]).sum())


class KerasModel:
    """A reference model in Keras 3 (in the spec's dtype), driven by the federation.

    HBN layers are :class:`backends.keras.HybridBatchNormalization`; BatchNorm is
    :class:`FreezableBatchNormalization` with momentum 0.9 (torch's 0.1); ``"gn"`` and ``"ln"``
    are ``keras.layers.GroupNormalization`` with 2 and 1 groups. All use ``spec.eps``, not
    Keras' default 1e-3. Initial kernels are LeCun-normal (truncated), as Flax initialises them
    (Keras' default, Glorot-uniform, trained the GroupNorm Simple-CNN less reliably), seeded per
    layer from ``seed``; biases are zero.
    """

    def __init__(self, spec: ModelSpec, *, seed: int) -> None:
        self.spec = spec
        self.layout = spec.layout()
        self._kinds = {layer.name: layer.kind for layer in spec.layers()}
        self.network = _network(spec, seed=seed)
        if spec.hybrid == "global":
            _fix_alphas(self.network)
        self._weights = {weight.path: weight for weight in self.network.weights}
        self._batchnorms = [
            layer for layer in self.network.layers if isinstance(layer, FreezableBatchNormalization)
        ]
        # The compiled train step of the other value of the BatchNorm layers' flag, once built.
        self._other_train_function: Any = None
        self._optimizer = _TorchSGD(spec.dtype)
        self.network.compile(
            optimizer=self._optimizer,
            # In the model's dtype: a Keras loss computes in floatx (float32) by default.
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=spec.dtype),
        )
        self._optimizer.build(self.network.trainable_variables)

    def _variable(self, name: str) -> keras.Variable:
        layer, leaf = name.split(".")
        return self._weights[f"{layer}/{_KERAS_NAMES[self._kinds[layer]].get(leaf, leaf)}"]

    def get_state(self) -> dict[str, np.ndarray]:
        """Every canonical tensor, copied to NumPy in canonical layout."""
        dtype = self.spec.dtype
        return {
            name: from_channels_last(np.asarray(self._variable(name)).astype(dtype), spec)
            for name, spec in self.layout.items()
        }

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load every canonical tensor into its variable (Keras keeps no local counters)."""
        for name, spec in self.layout.items():
            value = np.asarray(state[name], self.spec.dtype)
            self._variable(name).assign(to_channels_last(value, spec))

    def collect_statistics(
        self, inputs: Iterable[np.ndarray], mode: CollectionMode
    ) -> dict[str, Moments]:
        """HBN input moments over ``inputs``, by :func:`backends.keras.collect_statistics`.

        The batches run eagerly. The HBN layers' paths in the network are their canonical names.
        """
        batches = (np.asarray(images, self.spec.dtype) for images in inputs)
        return hbn_keras.collect_statistics(self.network, batches, mode=mode)

    def train(
        self, batches: Iterable[Batch], sgd: SGDConfig, *, freeze_statistics: bool = False
    ) -> TrainResult:
        """SGD on ``batches`` with a fresh optimiser, as :class:`SGDConfig` says.

        ``freeze_statistics`` freezes the BatchNorm layers' statistics for this call
        (:class:`FreezableBatchNormalization`): they normalise with their moving statistics and
        leave them unchanged; gamma and beta still train.
        """
        self._optimizer.reset(sgd)
        loss_sum, examples, steps = 0.0, 0, 0
        self._freeze_statistics(freeze_statistics)
        try:
            for images, labels in trainable_batches(
                batches, self.spec, freeze_statistics=freeze_statistics
            ):
                loss = self.network.train_on_batch(
                    np.asarray(images, self.spec.dtype), np.asarray(labels, np.int64)
                )
                loss_sum += float(loss) * len(labels)
                examples += len(labels)
                steps += 1
        finally:
            self._freeze_statistics(False)
        return TrainResult(loss_sum, examples, steps)

    def _freeze_statistics(self, frozen: bool) -> None:
        """Set the BatchNorm layers' flag, and swap in the train step compiled for its value.

        Keras builds a missing train step (None) on the next ``train_on_batch``.
        """
        if not self._batchnorms or self._batchnorms[0].frozen_statistics == frozen:
            return
        for layer in self._batchnorms:
            layer.frozen_statistics = frozen
        network = self.network
        network.train_function, self._other_train_function = (
            self._other_train_function,
            network.train_function,
        )

    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        """Summed cross-entropy and correct predictions in inference mode."""
        loss_sum, correct, examples = 0.0, 0, 0
        for images, labels in batches:
            logits = np.asarray(self.network.predict_on_batch(np.asarray(images, self.spec.dtype)))
            loss_sum += _cross_entropy_sum(logits, labels)
            correct += int((logits.argmax(axis=1) == labels).sum())
            examples += len(labels)
        return EvalResult(loss_sum, correct, examples)


def build(spec: ModelSpec, *, seed: int) -> KerasModel:
    """Build ``spec`` in Keras 3, its initial weights drawn from ``seed``."""
    return KerasModel(spec, seed=seed)


def _keras_variables(model: keras.layers.Layer) -> dict[str, keras.Variable]:
    """``model``'s floating-point weights by their Keras path (``"sequential/hbn/alpha"``).

    Raises
    ------
    ValueError
        If two weights share a path (name the layers).
    """
    variables: dict[str, keras.Variable] = {}
    for variable in model.weights:
        if not np.issubdtype(np.dtype(variable.dtype), np.floating):
            continue
        if variable.path in variables:
            msg = (
                "the model's weights must have unique paths (name the layers); got "
                f"{variable.path!r} twice."
            )
            raise ValueError(msg)
        variables[variable.path] = variable
    return variables


def keras_layout(model: keras.layers.Layer) -> Layout:
    """The canonical layout of a built Keras 3 model of your own with HBN layers.

    Names are the weights' Keras paths (``"sequential/hbn/alpha"``), shapes are Keras'
    (channels-last kernels: the layout serves Keras nodes). Each
    :class:`backends.keras.HybridBatchNormalization`'s ``global_mean`` and ``global_var`` are
    ``statistics``, its ``alpha`` ``personal``, every other floating weight ``shared``
    (:func:`federation.models.native_tensor_spec`). The HBN layers take their names from
    :func:`backends.keras.hbn_layers`, as the statistics they report do.
    """
    parts = {
        id(getattr(layer, part.value)): HBNTensor(name, part)
        for name, layer in hbn_keras.hbn_layers(model)
        for part in HBNPart
    }
    return {
        name: native_tensor_spec(tuple(variable.shape), hbn=parts.get(id(variable)))
        for name, variable in _keras_variables(model).items()
    }


def keras_moments(
    model: keras.layers.Layer,
    state: Mapping[str, np.ndarray],
    batches: Iterable[Any],
    *,
    mode: CollectionMode = "hybrid",
) -> tuple[dict[str, Moments], int]:
    """The statistics step on a Keras 3 model of your own: each HBN layer's input moments.

    ``state`` (tensors by the paths of :func:`keras_layout`) is assigned to ``model``'s
    weights first, each cast to its weight's dtype; the other weights (its alpha) stay.
    ``batches`` (model inputs) then run through :func:`backends.keras.collect_statistics`.

    Returns the moments and examples and raises as :func:`~federation.models.check_known_names`
    describes.
    """
    variables = _keras_variables(model)
    check_known_names(state, variables, "floating weights of the model")
    for name, value in state.items():
        variables[name].assign(np.asarray(value, variables[name].dtype))
    examples = 0

    def counted() -> Iterator[Any]:
        nonlocal examples
        for batch in batches:
            examples += len(batch)
            yield batch

    return hbn_keras.collect_statistics(model, counted(), mode=mode), examples
