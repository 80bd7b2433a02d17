"""Flax Linen adapter: ``HybridBatchNorm``, the Linen counterpart of ``flax.linen.BatchNorm``.

``scale``, ``bias`` and ``alpha`` live in the ``params`` collection. ``global_mean`` and
``global_var`` live in the ``global_stats`` collection (:data:`GLOBAL_STATS`), apart from
``batch_stats``: HBN keeps no running statistics, so training needs no mutable collection.
The math is the same ``jax.custom_vjp`` over :mod:`hbn_core` as the NNX layer's.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> from backends.flax.linen import HybridBatchNorm
>>> layer = HybridBatchNorm(use_running_average=False)
>>> variables = layer.init(jax.random.key(0), jnp.ones((4, 3)))
>>> sorted(variables), sorted(variables["params"])
(['global_stats', 'params'], ['alpha', 'bias', 'scale'])
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import hbn_core
from backends._collection import CollectionMode, check_collection_mode, empty_moments
from backends._global_statistics import checked_global_statistics
from backends.flax import GLOBAL_STATS, hybrid_batch_norm, output_dtype
from hbn_core import Moments

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

__all__ = [
    "GLOBAL_STATS",
    "MOMENTS",
    "HybridBatchNorm",
    "collect_statistics",
    "global_stats_from_batch_stats",
    "set_global_statistics",
]

MOMENTS = "hbn_moments"
"""The collection the layers sow their input moments into during :func:`collect_statistics`."""

_COLLECTION_MODE: contextvars.ContextVar[CollectionMode | None] = contextvars.ContextVar(
    "hbn_collection_mode", default=None
)


class HybridBatchNorm(nn.Module):
    r"""Hybrid Batch Normalisation for Flax Linen, mirroring :class:`flax.linen.BatchNorm`.

    In training (``use_running_average=False``) the output is
    :math:`\gamma (x - \hat\mu)/\sqrt{\hat\sigma^2+\epsilon} + \beta` with
    :math:`\hat\mu = (1-w)\mu_B + w\mu_G`, :math:`\hat\sigma^2 = (1-w)\sigma_B^2 + w\sigma_G^2`
    and :math:`w = \operatorname{sigmoid}(\alpha)`; with ``use_running_average=True`` only the
    global statistics are used. See ``docs/math.md``.

    Attributes
    ----------
    use_running_average
        Inference (True) or the hybrid training forward (False); may be given at call time.
    axis
        The feature axis (default -1).
    epsilon
        Added to the variance.
    dtype
        The dtype of the output, as for ``flax.linen.BatchNorm``: by default
        ``result_type(x, scale, bias)`` (:func:`backends.flax.output_dtype`). The input is cast
        to it before normalisation, which computes in at least float32.
    param_dtype
        The dtype of the parameters and the global statistics.
    use_bias, use_scale
        Whether to learn ``bias`` (:math:`\beta`) and ``scale`` (:math:`\gamma`).
    """

    use_running_average: bool | None = None
    axis: int = -1
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Normalise ``x``: the hybrid forward in training, the global statistics otherwise."""
        inference = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        if not isinstance(self.axis, int) or x.ndim < 2 or not -x.ndim <= self.axis < x.ndim:
            msg = (
                f"HybridBatchNorm expected an input of at least 2 dimensions with its features "
                f"on axis {self.axis!r}; got shape {tuple(x.shape)}."
            )
            raise ValueError(msg)
        shape = (x.shape[self.axis],)
        alpha = self.param("alpha", nn.initializers.zeros, shape, self.param_dtype)
        scale = (
            self.param("scale", nn.initializers.ones, shape, self.param_dtype)
            if self.use_scale
            else None
        )
        offset = (
            self.param("bias", nn.initializers.zeros, shape, self.param_dtype)
            if self.use_bias
            else None
        )
        global_mean = self.variable(GLOBAL_STATS, "global_mean", jnp.zeros, shape, self.param_dtype)
        global_var = self.variable(GLOBAL_STATS, "global_var", jnp.ones, shape, self.param_dtype)
        mode = _COLLECTION_MODE.get()
        if mode is not None and self.is_mutable_collection(MOMENTS):
            self.sow(MOMENTS, "input_moments", hbn_core.moments(x, channel_axis=self.axis, xp=jnp))
            inference = mode == "global"
        x = x.astype(output_dtype(x, scale, offset, dtype=self.dtype, float32_statistics=False))
        scale = jnp.ones_like(alpha) if scale is None else scale
        offset = jnp.zeros_like(alpha) if offset is None else offset
        statistics = (global_mean.value, global_var.value)
        if inference:
            return hbn_core.hbn_inference(
                x, scale, offset, *statistics, channel_axis=self.axis, eps=self.epsilon, xp=jnp
            )
        return hybrid_batch_norm(x, scale, offset, alpha, *statistics, self.axis, self.epsilon)


@contextlib.contextmanager
def _collection_mode(mode: CollectionMode) -> Iterator[None]:
    token = _COLLECTION_MODE.set(mode)
    try:
        yield
    finally:
        _COLLECTION_MODE.reset(token)


def collect_statistics(
    module: nn.Module,
    variables: Any,
    batches: Iterable[Any],
    *,
    mode: CollectionMode = "hybrid",
    apply: Callable[..., Any] | None = None,
) -> dict[str, Moments]:
    """Return the exact input moments of every Linen HBN layer of ``module`` over ``batches``.

    The same semantics as :func:`backends.flax.collect_statistics`: each batch runs through
    ``module.apply(variables, batch, mutable=[MOMENTS])`` (or ``apply(variables, batch)``, a
    function that must pass ``mutable=[MOMENTS]`` and return ``(output, state)``); the layers
    sow their input moments, which are merged in float64 on the host. ``variables`` are not
    changed: the JAX way, the moments are returned.

    Returns
    -------
    dict[str, hbn_core.Moments]
        Each HBN layer's path in the variables (joined with ``/``, as in ``params``) mapped to
        NumPy moments: int64 ``count`` of elements per channel, float64 ``mean`` and ``m2``.

    Raises
    ------
    ValueError
        If ``mode`` is neither ``"hybrid"`` nor ``"global"``, or no HBN layer sowed moments.
    """
    check_collection_mode(mode)
    run = apply or (lambda v, batch: module.apply(v, batch, mutable=[MOMENTS]))
    totals: dict[str, Moments] = {}
    with _collection_mode(mode):
        for batch in batches:
            _, state = run(variables, batch)
            for path, sown in _sown_moments(state[MOMENTS]):
                batch_moments = Moments(
                    np.asarray(sown.count, np.int64),
                    np.asarray(sown.mean, np.float64),
                    np.asarray(sown.m2, np.float64),
                )
                previous = totals.get(path, empty_moments(batch_moments.mean.shape[0]))
                totals[path] = hbn_core.merge_moments(previous, batch_moments)
    if not totals:
        msg = f"`module` has no HBN layer that saw a batch; got a {type(module).__name__}."
        raise ValueError(msg)
    return totals


def _sown_moments(tree: Any, prefix: str = "") -> Iterator[tuple[str, Moments]]:
    """``(path, moments)`` for every layer's ``input_moments`` in a sown collection."""
    for key, value in tree.items():
        if key == "input_moments":
            for moments in value:
                yield prefix, moments
        else:
            yield from _sown_moments(value, f"{prefix}/{key}" if prefix else key)


def set_global_statistics(variables: Any, statistics: dict[str, Moments]) -> dict[str, Any]:
    """Return ``variables`` with pooled statistics in the ``global_stats`` collection.

    ``global_mean`` becomes ``mean`` and ``global_var`` the biased variance ``m2 / count``, for
    every layer path of :func:`collect_statistics`; ``variables`` itself is not changed. All
    or nothing: every check passes before anything is built.

    Raises
    ------
    ValueError
        If the paths do not match the HBN layers in ``variables[GLOBAL_STATS]`` exactly, a
        count is not positive, a shape does not match, or a value is not finite.
    """
    layers = dict(_global_stats_layers(variables[GLOBAL_STATS]))
    checked = checked_global_statistics(
        statistics, {path: layer["global_mean"].shape[0] for path, layer in layers.items()}
    )
    updated = dict(variables[GLOBAL_STATS])
    for path, (mean, var) in checked.items():
        node = updated
        for key in path.split("/"):
            node[key] = dict(node[key])
            node = node[key]
        node["global_mean"] = jnp.asarray(mean, node["global_mean"].dtype)
        node["global_var"] = jnp.asarray(var, node["global_var"].dtype)
    return {**variables, GLOBAL_STATS: updated}


def _global_stats_layers(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if "global_mean" in value:
            yield path, value
        else:
            yield from _global_stats_layers(value, path)


def global_stats_from_batch_stats(batch_stats: Any) -> dict[str, Any]:
    """The ``global_stats`` collection that starts HBN layers from ``flax.linen.BatchNorm``'s.

    Swap ``nn.BatchNorm`` for :class:`HybridBatchNorm` under the same names, then use
    ``{**variables, "global_stats": global_stats_from_batch_stats(variables["batch_stats"])}``:
    each layer's running ``mean`` and ``var`` become its ``global_mean`` and ``global_var``.
    Flax keeps the biased variance, which is what ``global_var`` holds, so inference is
    unchanged (``scale`` and ``bias`` keep their names in ``params``).
    """
    if "mean" in batch_stats and "var" in batch_stats:
        return {"global_mean": batch_stats["mean"], "global_var": batch_stats["var"]}
    return {name: global_stats_from_batch_stats(sub) for name, sub in batch_stats.items()}
