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


# During collect_statistics: id(layer) -> (mode, record(inputs, mask)); empty otherwise.
_RECORDERS: dict[int, tuple[CollectionMode, Callable[[Any, Any], None]]] = {}


def hybrid_batch_norm(
    x: Any,
    scale: Any,
    offset: Any,
    alpha: Any,
    global_mean: Any,
    global_var: Any,
    *,
    mask: Any = None,
    axis: int = -1,
    epsilon: float = 1e-3,
) -> Any:
    r""":func:`hbn_core.hbn_forward` with :func:`hbn_core.hbn_backward` as its gradient.

    The arguments are tensors of the Keras backend (not ``keras.Variable`` objects), as
    :func:`keras.ops.custom_gradient` needs on the torch backend. The global statistics get zero
    gradients: the gradient never flows into them. The gradient is itself differentiable, so
    second-order gradients (a loss on an input gradient) are exact on every backend.

    With a ``mask`` (boolean, of the shape of ``x``; True: the value enters the statistics),
    the batch statistics are, per channel, over the :math:`n = \sum m` kept positions,

    .. math::

        \mu_B = \frac{1}{n}\sum m\,x, \qquad \sigma_B^2 = \frac{1}{n}\sum m\,(x - \mu_B)^2,

    (:math:`\mu_B = \sigma_B^2 = 0` for a channel with no kept position, as the moments of
    an empty set), mixed with the global statistics as without a mask; every position, kept or
    not, is normalised with the mixed statistics by :func:`hbn_core.hbn_inference`. The
    backend's autodiff differentiates this composition (to any order); the global statistics
    get no gradient.
    """
    if mask is not None:
        x, mean, var = _masked_mixed_statistics(x, alpha, (global_mean, global_var), mask, axis)
        return hbn_core.hbn_inference(x, scale, offset, mean, var, channel_axis=axis, eps=epsilon)

    @ops.custom_gradient
    def forward(*args: Any) -> tuple[Any, Callable[..., tuple[Any, ...]]]:
        y, residuals = hbn_core.hbn_forward(*args, channel_axis=axis, eps=epsilon)

        def backward(*grads: Any, upstream: Any = None) -> tuple[Any, ...]:
            # TensorFlow and JAX pass the output gradient alone, and differentiate this
            # function through the residuals for second-order gradients. torch passes the
            # inputs positionally and the output gradient as `upstream`, and computed the
            # residuals without a graph: when the backward itself is differentiated
            # (create_graph=True, which turns grad mode on), recompute them from the inputs.
            dy = grads[0] if upstream is None else upstream
            saved = residuals
            if upstream is not None and _torch_grad_enabled():
                _, saved = hbn_core.hbn_forward(*grads, channel_axis=axis, eps=epsilon)
            dx, dscale, doffset, dalpha = hbn_core.hbn_backward(dy, saved)
            return dx, dscale, doffset, dalpha, ops.zeros_like(args[4]), ops.zeros_like(args[5])

        return y, backward

    return forward(x, scale, offset, alpha, global_mean, global_var)


def _torch_grad_enabled() -> bool:
    import torch  # Keras' torch backend: torch is installed

    return torch.is_grad_enabled()


def _masked_mixed_statistics(
    x: Any, alpha: Any, statistics: tuple[Any, Any], mask: Any, axis: int
) -> tuple[Any, Any, Any]:
    """``x`` in its compute dtype, and the hybrid mean and variance over what ``mask`` keeps.

    See :func:`hybrid_batch_norm`; the global ``statistics`` (mean, variance) get no gradient.
    """
    # float64 stays float64, and half precision computes in float32. (Keras' result_type
    # promotes float64 with float32 to float32.)
    compute = "float64" if keras.backend.standardize_dtype(x.dtype) == "float64" else "float32"
    x = ops.cast(x, compute)
    reduction = tuple(i for i in range(len(x.shape)) if i != axis % len(x.shape))
    count = ops.sum(ops.cast(mask, compute), axis=reduction, keepdims=True)
    count = ops.maximum(count, ops.ones_like(count))
    batch_mean = ops.sum(ops.where(mask, x, 0), axis=reduction, keepdims=True) / count
    centred = ops.where(mask, x - batch_mean, 0)
    batch_var = ops.sum(ops.square(centred), axis=reduction) / ops.reshape(count, (-1,))
    alpha = ops.cast(alpha, compute)
    global_weight, batch_weight = ops.sigmoid(alpha), ops.sigmoid(-alpha)
    mean_global, var_global = (ops.cast(ops.stop_gradient(s), compute) for s in statistics)
    mixed_mean = batch_weight * ops.reshape(batch_mean, (-1,)) + global_weight * mean_global
    mixed_var = batch_weight * batch_var + global_weight * var_global
    return x, mixed_mean, mixed_var


# BatchNormalization's arguments that HBN does not support, with the default values at which
# they are accepted (what a BatchNormalization configuration holds when they are unused).
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "momentum": 0.99,
    "renorm": False,
    "renorm_clipping": None,
    "renorm_momentum": 0.99,
    "synchronized": False,
}
_UNSUPPORTED_WHY = {
    "momentum": (
        "HBN keeps no moving statistics: its global statistics change only through "
        "set_global_statistics, set_weights or loading"
    ),
    "renorm": "HBN does not implement Batch Renormalization; alpha mixes in global statistics",
    "renorm_clipping": "it applies only with renorm=True, which HBN does not support",
    "renorm_momentum": "it applies only with renorm=True, which HBN does not support",
    "synchronized": (
        "HBN's batch statistics are each replica's own; cross-replica statistics would need a "
        "synchronised gradient"
    ),
}


@keras.saving.register_keras_serializable(package="hbn")
class HybridBatchNormalization(keras.layers.Layer):
    r"""Hybrid Batch Normalisation for Keras 3, mirroring ``keras.layers.BatchNormalization``.

    In training (``training=True`` on a trainable layer), with
    :math:`w = \operatorname{sigmoid}(\alpha)` per channel,

    .. math::

        \hat\mu = (1-w)\mu_B + w\mu_G, \qquad \hat\sigma^2 = (1-w)\sigma_B^2 + w\sigma_G^2,
        \qquad y = \gamma\,\frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} + \beta,

    with the batch mean :math:`\mu_B` and **biased** batch variance :math:`\sigma_B^2` over every
    axis but ``axis`` (over the positions the ``mask`` keeps, when there is one), and the global
    statistics :math:`\mu_G` = ``global_mean`` and :math:`\sigma_G^2` = ``global_var`` (biased).
    In inference (``training=False``, or a layer with ``trainable=False``, as for
    BatchNormalization) :math:`w = 1`: only the global statistics are used. See ``docs/math.md``.

    The arguments are BatchNormalization's, in its order, then ``alpha``'s.

    Parameters
    ----------
    axis
        The channel axis (default -1, channels-last), one int.
    momentum
        Refused unless 0.99, BatchNormalization's default, accepted so that its configurations
        load: HBN keeps no moving statistics, so a momentum has nothing to act on. The global
        statistics change only through :func:`set_global_statistics` (or ``set_weights``, or
        loading).
    epsilon
        :math:`\epsilon`, added to the variance. Keras' default is 1e-3; torch and Flax use 1e-5.
    center, scale
        Whether to learn :math:`\beta` (``beta``) and :math:`\gamma` (``gamma``).
    beta_initializer, gamma_initializer
        Initialisers of ``beta`` and ``gamma``.
    moving_mean_initializer, moving_variance_initializer
        Initialisers of ``global_mean`` and ``global_var``, the statistics that take the place
        of BatchNormalization's moving ones in inference.
    beta_regularizer, gamma_regularizer, beta_constraint, gamma_constraint
        Regularisers and constraints of ``beta`` and ``gamma``, as in BatchNormalization.
    renorm, renorm_clipping, renorm_momentum, synchronized
        Not supported: accepted only at BatchNormalization's defaults (False, None, 0.99,
        False), refused otherwise with a ``ValueError`` that says why.
    alpha_initializer, alpha_regularizer, alpha_constraint
        Initialiser (default zeros: half batch, half global), regulariser and constraint of
        ``alpha``. ``alpha_initializer=keras.initializers.Constant(-math.inf)`` makes the
        training forward plain batch normalisation.
    **kwargs
        Keras layer arguments (``name``, ``dtype``, ``trainable``, ...).

    Attributes
    ----------
    gamma, beta : keras.Variable or None
        Trainable, ``(C,)``; None when ``scale`` or ``center`` is False.
    alpha : keras.Variable
        The trainable hybrid factor :math:`\alpha`, ``(C,)``.
    global_mean, global_var : keras.Variable
        Non-trainable, ``(C,)``; ``global_var`` is a biased variance.

    Raises
    ------
    TypeError
        If ``axis`` is not one int.
    ValueError
        If ``epsilon`` is negative, or an unsupported argument is not at its default; when the
        layer is built, if the input has fewer than 2 dimensions, ``axis`` is out of range or
        the channel size is unknown; when it is called, if a ``mask`` does not have one
        dimension less than the input. After building, Keras rejects inputs of another rank or
        channel count.
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
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: Any = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        alpha_initializer: Any = "zeros",
        alpha_regularizer: Any = None,
        alpha_constraint: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            msg = f"`axis` must be one int (the channel axis); got {axis!r}."
            raise TypeError(msg)
        if not epsilon >= 0:
            msg = f"`epsilon` must be >= 0; got {epsilon!r}."
            raise ValueError(msg)
        unsupported = {
            "momentum": momentum,
            "renorm": renorm,
            "renorm_clipping": renorm_clipping,
            "renorm_momentum": renorm_momentum,
            "synchronized": synchronized,
        }
        for name, value in unsupported.items():
            if value != _UNSUPPORTED_DEFAULTS[name]:
                shown = f"`{name}={value!r}`" if isinstance(value, bool) else f"`{name}`"
                msg = (
                    f"{shown} is not supported by {type(self).__name__}: "
                    f"{_UNSUPPORTED_WHY[name]}. Leave it at BatchNormalization's default "
                    f"{_UNSUPPORTED_DEFAULTS[name]!r}; got {value!r}."
                )
                raise ValueError(msg)
        self.axis = int(axis)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.alpha_initializer = keras.initializers.get(alpha_initializer)
        self.alpha_regularizer = keras.regularizers.get(alpha_regularizer)
        self.alpha_constraint = keras.constraints.get(alpha_constraint)
        self.supports_masking = True
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
            self.gamma = self._weight("gamma", shape)
        if self.center:
            self.beta = self._weight("beta", shape)
        self.alpha = self._weight("alpha", shape)
        self.global_mean = self._statistic("global_mean", shape, self.moving_mean_initializer)
        self.global_var = self._statistic("global_var", shape, self.moving_variance_initializer)
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

    def _weight(self, name: str, shape: tuple[int]) -> Any:
        """A trainable weight with its initializer, regularizer and constraint."""
        return self.add_weight(
            shape=shape,
            name=name,
            initializer=getattr(self, f"{name}_initializer"),
            regularizer=getattr(self, f"{name}_regularizer"),
            constraint=getattr(self, f"{name}_constraint"),
            trainable=True,
            autocast=False,  # as in BatchNormalization, below
        )

    def _statistic(self, name: str, shape: tuple[int], initializer: Any) -> Any:
        # autocast=False, as in BatchNormalization: under mixed precision the weights stay in
        # the variable dtype, and the core computes in result_type(x, weights, float32).
        return self.add_weight(
            shape=shape, name=name, initializer=initializer, trainable=False, autocast=False
        )

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        """Normalise ``inputs``: the hybrid forward in training, the global statistics otherwise.

        ``inputs`` may be a NumPy array (as in ``stateless_call``). ``mask``, as for
        BatchNormalization, has one dimension less than ``inputs`` and is broadcast against
        them without their last axis (a Masking layer's mask of timesteps); its True positions
        enter the batch statistics in training, and those that ``collect_statistics``
        measures. Every position is normalised.
        """
        inputs = ops.convert_to_tensor(inputs)
        if not keras.backend.is_float_dtype(inputs.dtype):
            inputs = ops.cast(inputs, self.compute_dtype)
        kept = None if mask is None else _broadcast_mask(mask, inputs)
        inference = not (training and self.trainable)
        recorder = _RECORDERS.get(id(self))
        if recorder is not None:
            mode, record = recorder
            record(inputs, kept)
            inference = mode == "global"
        scale, offset = self._affine()
        statistics = (self.global_mean.value, self.global_var.value)
        options = {"axis": self.axis, "epsilon": self.epsilon}
        if inference:
            y = hbn_core.hbn_inference(
                inputs, scale, offset, *statistics, channel_axis=self.axis, eps=self.epsilon
            )
        else:
            alpha = self.alpha.value
            y = hybrid_batch_norm(inputs, scale, offset, alpha, *statistics, mask=kept, **options)
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
        """Every constructor argument, as ``from_config`` takes it back.

        The unsupported arguments (``renorm``, ``renorm_clipping``, ``renorm_momentum``,
        ``synchronized``) are left out: they can only hold their defaults.
        """
        initializers = ("beta", "gamma", "moving_mean", "moving_variance", "alpha")
        weights = {
            **{
                f"{name}_initializer": keras.initializers.serialize(
                    getattr(self, f"{name}_initializer")
                )
                for name in initializers
            },
            **{
                f"{name}_regularizer": keras.regularizers.serialize(
                    getattr(self, f"{name}_regularizer")
                )
                for name in ("beta", "gamma", "alpha")
            },
            **{
                f"{name}_constraint": keras.constraints.serialize(
                    getattr(self, f"{name}_constraint")
                )
                for name in ("beta", "gamma", "alpha")
            },
        }
        return {
            **super().get_config(),
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            **weights,
        }


def _broadcast_mask(mask: Any, inputs: Any) -> Any:
    """BatchNormalization's mask convention: a boolean mask of the shape of ``inputs``.

    ``mask`` has one dimension less than ``inputs``; it gains a last axis of size 1 and is
    broadcast to the inputs' shape.
    """
    mask = ops.convert_to_tensor(mask)
    if len(mask.shape) != len(inputs.shape) - 1:
        msg = (
            f"`mask` must have one dimension less than the inputs (it is broadcast against "
            f"them without their last axis, as for BatchNormalization); got mask.shape="
            f"{tuple(mask.shape)} for inputs.shape={tuple(inputs.shape)}."
        )
        raise ValueError(msg)
    return ops.broadcast_to(ops.expand_dims(ops.cast(mask, "bool"), -1), ops.shape(inputs))


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

    def recorder(name: str, axis: int) -> Callable[[Any, Any], None]:
        def record(inputs: Any, mask: Any) -> None:
            data = kept_rows(inputs, mask, axis=axis, name=name)
            total = totals.get(name, empty_moments(data.shape[-1]))
            totals[name] = hbn_core.merge_moments(total, hbn_core.moments(data, channel_axis=-1))

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


def kept_rows(inputs: Any, mask: Any, *, axis: int, name: str) -> np.ndarray:
    """The values of ``inputs`` that enter the statistics, as float64 ``(n, C)`` rows.

    ``mask`` (None, or boolean of the shape of ``inputs``) keeps positions; it must be the same
    for every channel, so that every channel has the same count, as :class:`hbn_core.Moments`
    holds one count for all channels.

    Raises
    ------
    ValueError
        If the mask differs between channels (a BatchNormalization mask, which is broadcast
        against the inputs without their last axis, with ``axis`` other than the last).
    """
    data = np.moveaxis(np.asarray(ops.convert_to_numpy(inputs), np.float64), axis, -1)
    if mask is None:
        return data.reshape(-1, data.shape[-1])
    kept = np.moveaxis(np.asarray(ops.convert_to_numpy(mask), bool), axis, -1)
    if not (kept == kept[..., :1]).all():
        msg = (
            f"collect_statistics needs the same mask for every channel of HBN layer {name!r} "
            f"(one count per channel); its mask differs between channels on axis {axis}."
        )
        raise ValueError(msg)
    return data[kept[..., 0]]


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
