"""Flax NNX adapter: ``HybridBatchNorm``, a drop-in counterpart of ``nnx.BatchNorm``.

The training forward and backward are :func:`hbn_core.hbn_forward` and
:func:`hbn_core.hbn_backward`, wired with :func:`jax.custom_vjp`; inference is
:func:`hbn_core.hbn_inference`. The layer works under ``jax.jit``, ``jax.grad``, ``nnx.jit``,
``nnx.grad``, ``jax.vmap`` and ``nnx.vmap``, and ``nnx.view`` sets its mode as it sets
``nnx.BatchNorm``'s. Second-order gradients (reverse over reverse, and ``jax.hessian``) are exact.
Forward-mode autodiff of the training forward itself (``jax.jvp``, ``jax.jacfwd``) is not
available through a custom VJP: it raises a ``TypeError`` rather than returning wrong numbers.

Examples
--------
>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from backends.flax import HybridBatchNorm
>>> layer = HybridBatchNorm(3, rngs=nnx.Rngs(0))
>>> layer(jnp.ones((8, 4, 4, 3))).shape
(8, 4, 4, 3)
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.dtypes import canonicalize_dtype

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
    "GlobalStatistic",
    "HybridBatchNorm",
    "collect_statistics",
    "hbn_layers",
    "hybrid_batch_norm",
    "output_dtype",
    "set_global_statistics",
]

GLOBAL_STATS = "global_stats"
"""The Linen collection of ``global_mean`` and ``global_var``, :class:`GlobalStatistic`'s name."""


# During collect_statistics: id(layer) -> (mode, record(moments)); empty otherwise.
_RECORDERS: dict[int, tuple[CollectionMode, Callable[[Moments], None]]] = {}


class GlobalStatistic(nnx.BatchStat):
    """The Variable type of HBN's global statistics.

    ``nnx.state(model, GlobalStatistic)`` selects exactly the ``global_mean`` and ``global_var``
    of every HBN layer. Its Linen collection is ``"global_stats"`` (:data:`GLOBAL_STATS`), so
    ``nnx.bridge`` moves the global statistics between this layer and
    :class:`backends.flax.linen.HybridBatchNorm`, whose collection it is.
    """


nnx.register_variable_name(GLOBAL_STATS, GlobalStatistic, overwrite=True)


def output_dtype(
    x: jax.Array,
    scale: jax.Array | None,
    offset: jax.Array | None,
    *,
    dtype: Any,
    float32_statistics: bool,
) -> Any:
    """The dtype Flax's BatchNorm returns for these arguments; HBN's layers return it too.

    ``dtype`` when it is given. Otherwise ``jnp.result_type(x, scale, offset)``, made inexact,
    with float32 among the arguments when ``float32_statistics``: ``nnx.BatchNorm`` promotes its
    input with its running statistics, which are float32 whatever ``param_dtype``, so that
    bfloat16 or float16 inputs give float32 outputs. ``flax.linen.BatchNorm`` does not
    (``float32_statistics=False``): half-precision inputs keep their dtype there when the
    parameters are half-precision too, or absent. None stands for an absent parameter.
    """
    statistics = (np.zeros((), np.float32),) if float32_statistics else ()
    return canonicalize_dtype(x, scale, offset, *statistics, dtype=dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def hybrid_batch_norm(
    x: jax.Array,
    scale: jax.Array,
    offset: jax.Array,
    alpha: jax.Array,
    global_mean: jax.Array,
    global_var: jax.Array,
    channel_axis: int,
    eps: float,
) -> jax.Array:
    """:func:`hbn_core.hbn_forward` with :func:`hbn_core.hbn_backward` as its VJP.

    The global statistics get zero cotangents: the gradient never flows into them.
    """
    y, _ = _forward(x, scale, offset, alpha, global_mean, global_var, channel_axis, eps)
    return y


def _forward(
    x: jax.Array,
    scale: jax.Array,
    offset: jax.Array,
    alpha: jax.Array,
    global_mean: jax.Array,
    global_var: jax.Array,
    channel_axis: int,
    eps: float,
) -> tuple[jax.Array, tuple[Any, ...]]:
    y, residuals = hbn_core.hbn_forward(
        x, scale, offset, alpha, global_mean, global_var, channel_axis=channel_axis, eps=eps, xp=jnp
    )
    return y, (residuals, global_mean, global_var)


def _backward(
    channel_axis: int, eps: float, saved: tuple[Any, ...], dy: jax.Array
) -> tuple[jax.Array, ...]:
    del channel_axis, eps  # carried by the residuals
    residuals, global_mean, global_var = saved
    dx, dscale, doffset, dalpha = hbn_core.hbn_backward(dy, residuals, xp=jnp)
    return dx, dscale, doffset, dalpha, jnp.zeros_like(global_mean), jnp.zeros_like(global_var)


hybrid_batch_norm.defvjp(_forward, _backward)


class HybridBatchNorm(nnx.Module):
    r"""Hybrid Batch Normalisation for Flax NNX, mirroring :class:`flax.nnx.BatchNorm`.

    In training (``use_running_average=False``), with :math:`w = \operatorname{sigmoid}(\alpha)`,
    :math:`\hat\mu = (1-w)\mu_B + w\mu_G` and :math:`\hat\sigma^2 = (1-w)\sigma_B^2 + w\sigma_G^2`
    (biased batch variance), :math:`y = \gamma (x - \hat\mu)/\sqrt{\hat\sigma^2+\epsilon} + \beta`.
    With ``use_running_average=True`` (``model.eval()``) only the global statistics are used.
    See ``docs/math.md``.

    Parameters
    ----------
    num_features
        :math:`C`, the size of the feature axis.
    use_running_average
        Inference (True) or the hybrid training forward (False). ``model.eval()`` and
        ``model.train()`` set it, as for ``nnx.BatchNorm``; ``__call__`` can override it.
    axis
        The feature axis (default -1, channels-last).
    epsilon
        Added to the variance.
    dtype
        The dtype of the output, as for ``nnx.BatchNorm``: by default
        ``result_type(x, float32, scale, bias)`` (:func:`output_dtype`), so half-precision
        inputs give float32. The input is cast to it before normalisation, which computes in
        at least float32.
    param_dtype
        The dtype of ``scale``, ``bias``, ``alpha`` and the global statistics.
    use_bias, use_scale
        Whether to learn :math:`\beta` (``bias``) and :math:`\gamma` (``scale``).
    rngs
        Accepted for the signature of ``nnx.BatchNorm``; HBN's initialisers are constant.

    Attributes
    ----------
    scale, bias : nnx.Param or None
        Ones and zeros, ``(C,)``.
    alpha : nnx.Param
        The hybrid factor, zeros ``(C,)``: half batch, half global.
    global_mean, global_var : GlobalStatistic
        Zeros and ones, ``(C,)``; ``global_var`` is a biased variance.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        axis: int = -1,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        rngs: nnx.Rngs,
    ) -> None:
        del rngs  # constant initialisers
        if not isinstance(axis, int):
            msg = f"`axis` must be one int (the feature axis); got {axis!r}."
            raise TypeError(msg)
        shape = (num_features,)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones(shape, param_dtype)) if use_scale else None
        self.bias = nnx.Param(jnp.zeros(shape, param_dtype)) if use_bias else None
        self.alpha = nnx.Param(jnp.zeros(shape, param_dtype))
        self.global_mean = GlobalStatistic(jnp.zeros(shape, param_dtype))
        self.global_var = GlobalStatistic(jnp.ones(shape, param_dtype))

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Normalise ``x``: the hybrid forward in training, the global statistics otherwise.

        The output has :func:`output_dtype`, the dtype ``nnx.BatchNorm`` returns.
        """
        inference = self.use_running_average if use_running_average is None else use_running_average
        self._check_input(x)
        recorder = _RECORDERS.get(id(self))
        if recorder is not None:
            mode, record = recorder
            record(hbn_core.moments(x, channel_axis=self.axis, xp=jnp))
            inference = mode == "global"
        scale = None if self.scale is None else self.scale[...]
        offset = None if self.bias is None else self.bias[...]
        x = x.astype(output_dtype(x, scale, offset, dtype=self.dtype, float32_statistics=True))
        alpha = self.alpha[...]
        scale = jnp.ones_like(alpha) if scale is None else scale
        offset = jnp.zeros_like(alpha) if offset is None else offset
        statistics = (self.global_mean[...], self.global_var[...])
        if inference:
            return hbn_core.hbn_inference(
                x, scale, offset, *statistics, channel_axis=self.axis, eps=self.epsilon, xp=jnp
            )
        return hybrid_batch_norm(x, scale, offset, alpha, *statistics, self.axis, self.epsilon)

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Set the mode for :func:`flax.nnx.view`, as ``nnx.BatchNorm.set_view`` does.

        ``nnx.view(model, use_running_average=True)`` returns a view of ``model`` whose HBN
        layers (and BatchNorms) use the global statistics only; ``False`` gives the hybrid
        training forward; None leaves the mode as it is.

        Args:
          use_running_average: if True, the global statistics are used instead of the hybrid
            of batch and global statistics.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def _check_input(self, x: jax.Array) -> None:
        if (
            x.ndim < 2
            or not -x.ndim <= self.axis < x.ndim
            or x.shape[self.axis] != self.num_features
        ):
            msg = (
                f"HybridBatchNorm({self.num_features}) expected an input of at least 2 "
                f"dimensions with {self.num_features} features on axis {self.axis}; got shape "
                f"{tuple(x.shape)}."
            )
            raise ValueError(msg)

    @classmethod
    def from_batchnorm(cls, batchnorm: nnx.BatchNorm) -> HybridBatchNorm:
        """An HBN layer that starts from a trained ``nnx.BatchNorm``.

        It keeps the BatchNorm's axis, epsilon, dtypes, ``scale`` and ``bias``, and starts the
        global statistics from its running ``mean`` and ``var`` (Flax keeps the biased variance,
        which is what ``global_var`` holds), so its inference equals the BatchNorm's.
        """
        mean = batchnorm.mean[...]
        layer = cls(
            mean.shape[0],
            use_running_average=batchnorm.use_running_average,
            axis=batchnorm.axis,
            epsilon=batchnorm.epsilon,
            dtype=batchnorm.dtype,
            param_dtype=mean.dtype,
            use_bias=batchnorm.bias is not None,
            use_scale=batchnorm.scale is not None,
            rngs=nnx.Rngs(0),
        )
        if layer.scale is not None:
            layer.scale[...] = batchnorm.scale[...]
        if layer.bias is not None:
            layer.bias[...] = batchnorm.bias[...]
        layer.global_mean[...] = mean
        layer.global_var[...] = batchnorm.var[...]
        return layer


def hbn_layers(model: nnx.Module) -> list[tuple[str, HybridBatchNorm]]:
    """The HBN layers of ``model`` with their dotted paths, found by type, in graph order."""
    return [
        (".".join(map(str, path)), module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, HybridBatchNorm)
    ]


def collect_statistics(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    mode: CollectionMode = "hybrid",
    forward: Callable[[nnx.Module, Any], Any] | None = None,
) -> dict[str, Moments]:
    """Return the exact input moments of every HBN layer over ``batches``.

    The client side of the statistics protocol, the JAX way: the moments are returned, and the
    model is left as it was (its whole state is restored afterwards). Each batch runs eagerly
    through ``forward(model, batch)`` (default ``model(batch)``); each HBN layer's per-batch
    moments are merged, in float64 on the host, with :func:`hbn_core.merge_moments`.

    Parameters
    ----------
    model
        A module with HBN layers.
    batches
        The client's local data, batch by batch.
    mode
        How the HBN layers normalise during collection: ``"hybrid"`` as in training (the
        authors' choice) or ``"global"`` with the current global statistics, as in evaluation.
    forward
        How to run one batch, for models whose call takes more than the batch.

    Returns
    -------
    dict[str, hbn_core.Moments]
        Each HBN layer's dotted path mapped to NumPy moments: an int64 ``count`` of elements per
        channel and float64 ``mean`` and ``m2``. Layers that saw no batch hold count 0.

    Raises
    ------
    ValueError
        If ``mode`` is neither ``"hybrid"`` nor ``"global"``, or ``model`` has no HBN layer.
    """
    check_collection_mode(mode)
    layers = hbn_layers(model)
    require_hbn_layers(layers, model, layer_type="backends.flax.HybridBatchNorm")
    totals = {name: empty_moments(layer.num_features) for name, layer in layers}

    def recorder(name: str) -> Callable[[Moments], None]:
        def record(batch: Moments) -> None:
            as_numpy = Moments(
                np.asarray(batch.count, np.int64),
                np.asarray(batch.mean, np.float64),
                np.asarray(batch.m2, np.float64),
            )
            totals[name] = hbn_core.merge_moments(totals[name], as_numpy)

        return record

    run = forward if forward is not None else (lambda module, batch: module(batch))
    snapshot = nnx.state(model)
    _RECORDERS.update({id(layer): (mode, recorder(name)) for name, layer in layers})
    try:
        for batch in batches:
            run(model, batch)
    finally:
        for _, layer in layers:
            _RECORDERS.pop(id(layer), None)
        nnx.update(model, snapshot)
    return totals


def set_global_statistics(model: nnx.Module, statistics: Mapping[str, Moments]) -> None:
    """Write pooled statistics into the HBN layers' ``global_mean`` and ``global_var``.

    ``global_mean`` becomes ``mean`` and ``global_var`` the biased variance ``m2 / count``. All
    or nothing: every check passes before any layer changes.

    Raises
    ------
    ValueError
        If the names do not match the model's HBN layers exactly, a count is not positive, a
        shape does not match the layer, or a value is not finite.
    """
    layers = dict(hbn_layers(model))
    checked = checked_global_statistics(
        statistics, {name: layer.num_features for name, layer in layers.items()}
    )
    for name, (mean, var) in checked.items():
        layer = layers[name]
        layer.global_mean[...] = jnp.asarray(mean, layer.global_mean[...].dtype)
        layer.global_var[...] = jnp.asarray(var, layer.global_var[...].dtype)
