"""Keras 3 adapter: ``HybridBatchNormalization``, the HBN counterpart of BatchNormalization.

The training forward and backward are :func:`hbn_core.hbn_forward` and
:func:`hbn_core.hbn_backward`, wired with :func:`keras.ops.custom_gradient`; inference is
:func:`hbn_core.hbn_inference`. The core receives the backend's own tensors (TensorFlow tensors,
JAX arrays or torch tensors) and finds their namespace itself, so the layer runs on each of
Keras' TensorFlow, JAX and torch backends, eagerly and inside ``model.fit`` (compiled or not).
This module adds Keras' conventions (names, weights, configuration, errors) and the client side
of the statistics protocol: :func:`collect_statistics`, :func:`set_global_statistics` and
:func:`hbn_layers`.

Examples
--------
>>> import keras
>>> from backends.keras import HybridBatchNormalization
>>> layer = HybridBatchNormalization()
>>> tuple(layer(keras.ops.ones((8, 4, 4, 3)), training=True).shape)
(8, 4, 4, 3)
>>> [w.name for w in layer.trainable_weights], [w.name for w in layer.non_trainable_weights]
(['gamma', 'beta', 'alpha'], ['global_mean', 'global_var'])
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import ops

import hbn_core
from backends._collection import (
    CollectionMode,
    check_collection_mode,
    empty_moments,
    require_hbn_layers,
)
from backends._global_statistics import checked_global_statistics
from hbn_core import Moments

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

__all__ = [
    "HybridBatchNormalization",
    "collect_statistics",
    "hbn_layers",
    "hybrid_batch_norm",
    "set_global_statistics",
]


# During collect_statistics: id(layer) -> (mode, record(inputs)); empty otherwise.
_RECORDERS: dict[int, tuple[CollectionMode, Callable[[Any], None]]] = {}


def hybrid_batch_norm(
    x: Any,
    scale: Any,
    offset: Any,
    alpha: Any,
    global_mean: Any,
    global_var: Any,
    *,
    axis: int = -1,
    epsilon: float = 1e-3,
) -> Any:
    """:func:`hbn_core.hbn_forward` with :func:`hbn_core.hbn_backward` as its gradient.

    The arguments are tensors of the Keras backend (not ``keras.Variable`` objects), as
    :func:`keras.ops.custom_gradient` needs on the torch backend. The global statistics get zero
    gradients: the gradient never flows into them.
    """

    @ops.custom_gradient
    def forward(*args: Any) -> tuple[Any, Callable[..., tuple[Any, ...]]]:
        y, residuals = hbn_core.hbn_forward(*args, channel_axis=axis, eps=epsilon)

        def backward(*grads: Any, upstream: Any = None) -> tuple[Any, ...]:
            # TensorFlow and JAX pass the output gradient alone; torch passes the inputs
            # positionally and the output gradient as `upstream`.
            dy = grads[0] if upstream is None else upstream
            dx, dscale, doffset, dalpha = hbn_core.hbn_backward(dy, residuals)
            return dx, dscale, doffset, dalpha, ops.zeros_like(args[4]), ops.zeros_like(args[5])

        return y, backward

    return forward(x, scale, offset, alpha, global_mean, global_var)


@keras.saving.register_keras_serializable(package="hbn")
class HybridBatchNormalization(keras.layers.Layer):
    r"""Hybrid Batch Normalisation for Keras 3, mirroring ``keras.layers.BatchNormalization``.

    In training (``training=True`` on a trainable layer), with
    :math:`w = \operatorname{sigmoid}(\alpha)` per channel,

    .. math::

        \hat\mu = (1-w)\mu_B + w\mu_G, \qquad \hat\sigma^2 = (1-w)\sigma_B^2 + w\sigma_G^2,
        \qquad y = \gamma\,\frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} + \beta,

    with the batch mean :math:`\mu_B` and **biased** batch variance :math:`\sigma_B^2` over every
    axis but ``axis``, and the global statistics :math:`\mu_G` = ``global_mean`` and
    :math:`\sigma_G^2` = ``global_var`` (biased). In inference (``training=False``, or a layer
    with ``trainable=False``, as for BatchNormalization) :math:`w = 1`: only the global
    statistics are used. See ``docs/math.md``.

    Parameters
    ----------
    axis
        The channel axis (default -1, channels-last), one int.
    momentum
        Kept, checked and serialised so that a BatchNormalization's arguments carry over. HBN
        keeps no moving statistics, so it has no effect: the global statistics change only
        through :func:`set_global_statistics` (or ``set_weights``, or loading).
    epsilon
        :math:`\epsilon`, added to the variance. Keras' default is 1e-3; torch and Flax use 1e-5.
    center, scale
        Whether to learn :math:`\beta` (``beta``) and :math:`\gamma` (``gamma``).
    beta_initializer, gamma_initializer
        Initialisers of ``beta`` and ``gamma``.
    **kwargs
        Keras layer arguments (``name``, ``dtype``, ``trainable``, ...).

    Attributes
    ----------
    gamma, beta : keras.Variable or None
        Trainable, ``(C,)``; None when ``scale`` or ``center`` is False.
    alpha : keras.Variable
        The trainable hybrid factor :math:`\alpha`, zeros ``(C,)``: half batch, half global.
    global_mean, global_var : keras.Variable
        Non-trainable, zeros and ones ``(C,)``; ``global_var`` is a biased variance.

    Raises
    ------
    TypeError
        If ``axis`` is not one int.
    ValueError
        If ``momentum`` is outside [0, 1] or ``epsilon`` is negative; when the layer is built,
        if the input has fewer than 2 dimensions, ``axis`` is out of range or the channel size
        is unknown. After building, Keras rejects inputs of another rank or channel count.
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            msg = f"`axis` must be one int (the channel axis); got {axis!r}."
            raise TypeError(msg)
        if not 0 <= momentum <= 1:
            msg = f"`momentum` must lie in [0, 1]; got {momentum!r}."
            raise ValueError(msg)
        if not epsilon >= 0:
            msg = f"`epsilon` must be >= 0; got {epsilon!r}."
            raise ValueError(msg)
        self.axis = int(axis)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.gamma: keras.Variable | None = None
        self.beta: keras.Variable | None = None

    @property
    def num_features(self) -> int | None:
        """:math:`C`, the size of the channel axis; None until the layer is built."""
        return None if not self.built else int(self.alpha.shape[0])

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        """Create the weights for inputs of ``input_shape``."""
        shape = (self._channels(tuple(input_shape)),)
        if self.scale:
            self.gamma = self._weight("gamma", shape, self.gamma_initializer, trainable=True)
        if self.center:
            self.beta = self._weight("beta", shape, self.beta_initializer, trainable=True)
        self.alpha = self._weight("alpha", shape, "zeros", trainable=True)
        self.global_mean = self._weight("global_mean", shape, "zeros", trainable=False)
        self.global_var = self._weight("global_var", shape, "ones", trainable=False)
        self.input_spec = keras.InputSpec(ndim=len(input_shape), axes={self.axis: shape[0]})

    def _channels(self, input_shape: tuple[int | None, ...]) -> int:
        ndim = len(input_shape)
        if ndim < 2:
            msg = (
                f"{type(self).__name__} expects inputs of at least 2 dimensions (a batch axis "
                f"and a channel axis); got input shape {input_shape}."
            )
            raise ValueError(msg)
        if not -ndim <= self.axis < ndim:
            msg = (
                f"`axis` must lie in [{-ndim}, {ndim - 1}] for inputs of rank {ndim}; got "
                f"axis={self.axis} for input shape {input_shape}."
            )
            raise ValueError(msg)
        channels = input_shape[self.axis]
        if channels is None:
            msg = (
                f"{type(self).__name__} needs a known size on axis {self.axis} (the channel "
                f"axis); got input shape {input_shape}."
            )
            raise ValueError(msg)
        return int(channels)

    def _weight(self, name: str, shape: tuple[int], initializer: Any, *, trainable: bool) -> Any:
        # autocast=False, as in BatchNormalization: under mixed precision the weights stay in
        # the variable dtype, and the core computes in result_type(x, weights, float32).
        return self.add_weight(
            shape=shape, name=name, initializer=initializer, trainable=trainable, autocast=False
        )

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        """Normalise ``inputs``: the hybrid forward in training, the global statistics otherwise."""
        if not keras.backend.is_float_dtype(inputs.dtype):
            inputs = ops.cast(inputs, self.compute_dtype)
        inference = not (training and self.trainable)
        recorder = _RECORDERS.get(id(self))
        if recorder is not None:
            mode, record = recorder
            record(inputs)
            inference = mode == "global"
        scale, offset = self._affine()
        statistics = (self.global_mean.value, self.global_var.value)
        if inference:
            y = hbn_core.hbn_inference(
                inputs, scale, offset, *statistics, channel_axis=self.axis, eps=self.epsilon
            )
        else:
            y = hybrid_batch_norm(
                inputs,
                scale,
                offset,
                self.alpha.value,
                *statistics,
                axis=self.axis,
                epsilon=self.epsilon,
            )
        return ops.cast(y, self.compute_dtype)

    def _affine(self) -> tuple[Any, Any]:
        """The values of gamma and beta, or the constants 1 and 0 where they are not learnt."""
        alpha = self.alpha.value
        scale = ops.ones_like(alpha) if self.gamma is None else self.gamma.value
        offset = ops.zeros_like(alpha) if self.beta is None else self.beta.value
        return scale, offset

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        """The output has the shape of the input."""
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        """Every constructor argument, as ``from_config`` takes it back."""
        return {
            **super().get_config(),
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": keras.initializers.serialize(self.beta_initializer),
            "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
        }


def hbn_layers(model: keras.layers.Layer) -> list[tuple[str, HybridBatchNormalization]]:
    """The HBN layers inside ``model``, keyed by path, found by type, depth first.

    A layer's path is the ``/``-joined names of the layers that lead to it from ``model``
    (``model`` excluded): its plain name in a flat model, ``"block/norm"`` in a nested one. A
    layer shared at several places keeps its first path.

    Raises
    ------
    ValueError
        If two different HBN layers have the same path (sibling layers with one name).
    """
    found: list[tuple[str, HybridBatchNormalization]] = []
    seen: set[int] = set()

    def visit(parent: keras.layers.Layer, prefix: str) -> None:
        # Keras' own traversal of direct sublayers (what Model.layers returns), for any Layer.
        for layer in parent._flatten_layers(include_self=False, recursive=False):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            path = prefix + layer.name
            if isinstance(layer, HybridBatchNormalization):
                found.append((path, layer))
            visit(layer, path + "/")

    visit(model, "")
    paths = [path for path, _ in found]
    repeated = sorted({path for path in paths if paths.count(path) > 1})
    if repeated:
        msg = f"HBN layers must have unique paths (name them); got {repeated} more than once."
        raise ValueError(msg)
    return found


def _inference_call(model: keras.layers.Layer, batch: Any) -> Any:
    return model(batch, training=False)


def collect_statistics(
    model: keras.layers.Layer,
    batches: Iterable[Any],
    *,
    mode: CollectionMode = "hybrid",
    forward: Callable[[keras.layers.Layer, Any], Any] = _inference_call,
) -> dict[str, Moments]:
    """Return the exact input moments of every HBN layer over ``batches``.

    The client side of the statistics protocol: load the global model, then call this on the
    local data. Each batch runs eagerly through ``forward(model, batch)``, by default
    ``model(batch, training=False)``, so that no other layer changes or drops anything. Each HBN
    layer's per-batch input moments are merged, in float64 NumPy, with
    :func:`hbn_core.merge_moments`. No weight changes.

    Parameters
    ----------
    model
        A Keras model (or layer) with HBN layers.
    batches
        The client's local inputs, batch by batch, in the layout the model takes (NumPy arrays
        or backend tensors).
    mode
        How the HBN layers normalise during collection, whatever ``training`` says: ``"hybrid"``
        as in training (the authors' choice) or ``"global"`` with the current global
        statistics, as in inference. It shapes the inputs that deeper layers see.
    forward
        How to run one batch, for models whose call takes more than the batch (for example a
        dataset that yields ``(x, y)`` pairs: ``lambda model, b: model(b[0], training=False)``).

    Returns
    -------
    dict[str, hbn_core.Moments]
        Each HBN layer's path (:func:`hbn_layers`) mapped to NumPy moments: an int64 ``count``
        of elements per channel and float64 ``mean`` and ``m2``. Layers that saw no batch hold
        count 0 (and no channel when they are not built yet).

    Raises
    ------
    ValueError
        If ``mode`` is neither ``"hybrid"`` nor ``"global"``, or ``model`` has no HBN layer.
    """
    check_collection_mode(mode)
    layers = hbn_layers(model)
    require_hbn_layers(layers, model, layer_type="backends.keras.HybridBatchNormalization")
    totals: dict[str, Moments] = {}

    def recorder(name: str, axis: int) -> Callable[[Any], None]:
        def record(inputs: Any) -> None:
            data = np.asarray(ops.convert_to_numpy(inputs), np.float64)
            total = totals.get(name, empty_moments(data.shape[axis]))
            totals[name] = hbn_core.merge_moments(total, hbn_core.moments(data, channel_axis=axis))

        return record

    _RECORDERS.update({id(layer): (mode, recorder(name, layer.axis)) for name, layer in layers})
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for _, layer in layers:
            _RECORDERS.pop(id(layer), None)
    return {
        name: totals.get(name, empty_moments(layer.num_features or 0)) for name, layer in layers
    }


def set_global_statistics(model: keras.layers.Layer, statistics: Mapping[str, Moments]) -> None:
    """Write pooled statistics into the HBN layers' ``global_mean`` and ``global_var``.

    ``global_mean`` becomes ``mean`` and ``global_var`` the population (biased) variance
    ``m2 / count``, the one HBN normalises with. All or nothing: every check passes before any
    layer changes.

    Parameters
    ----------
    model
        A Keras model (or layer) with built HBN layers.
    statistics
        One :class:`hbn_core.Moments` per HBN layer, keyed by path (as
        :func:`collect_statistics` returns them), from any array library.

    Raises
    ------
    ValueError
        If an HBN layer is not built, the names do not match the model's HBN layers exactly, a
        count is not positive, a shape does not match the layer, or a value is not finite.
    """
    layers = dict(hbn_layers(model))
    unbuilt = sorted(name for name, layer in layers.items() if not layer.built)
    if unbuilt:
        msg = f"HBN layers {unbuilt} are not built; call the model on a batch first."
        raise ValueError(msg)
    checked = checked_global_statistics(
        statistics, {name: layer.num_features for name, layer in layers.items()}
    )
    for name, (mean, var) in checked.items():
        layer = layers[name]
        layer.global_mean.assign(mean.astype(layer.global_mean.dtype))
        layer.global_var.assign(var.astype(layer.global_var.dtype))
