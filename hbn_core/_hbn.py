r"""Hybrid Batch Normalisation: the training forward, its analytic backward, and inference.

Notation (each symbol is an argument or a computed quantity, per channel):

- :math:`x`: the input, :math:`n` elements per channel (all axes but ``channel_axis``);
- :math:`\mu_B, \sigma_B^2`: the batch mean and the **biased** batch variance of :math:`x`;
- :math:`\mu_G, \sigma_G^2`: ``global_mean`` and ``global_var``;
- :math:`w = \operatorname{sigmoid}(\alpha)`: the weight on the **global** statistics;
- :math:`\gamma, \beta`: ``scale`` and ``offset``; :math:`\epsilon`: ``eps``.

The derivation of the backward is in ``docs/math.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from hbn_core._moments import broadcast_shape, channel_moments, element_count
from hbn_core._namespace import namespace_of
from hbn_core._validation import (
    check_eps,
    check_floating,
    check_ndim,
    check_per_channel,
    check_same_dtype,
    normalize_channel_axis,
)

if TYPE_CHECKING:
    from hbn_core._typing import Array, ArrayNamespace, DType

__all__ = ["HBNResiduals", "hbn_backward", "hbn_forward", "hbn_inference"]


class HBNResiduals(NamedTuple):
    r"""What :func:`hbn_backward` needs from :func:`hbn_forward`.

    The per-channel fields have the input's rank, with size 1 on every axis but the channel
    axis (for example ``(1, C, 1, 1)``), so that they broadcast against ``x`` and carry the
    channel axis for the backward. All are arrays, so the record is a valid residual for
    ``jax.custom_vjp`` and ``torch.autograd.Function``.

    Attributes
    ----------
    x_hat
        :math:`\hat x = (x - \hat\mu)/\sqrt{\hat\sigma^2 + \epsilon}`, shape of ``x``, in the
        compute dtype ``result_type(x, scale, offset, alpha, global_mean, global_var, float32)``.
    inv_std
        :math:`r = 1/\sqrt{\hat\sigma^2 + \epsilon}`.
    global_weight
        :math:`w = \operatorname{sigmoid}(\alpha)`.
    batch_weight
        :math:`1 - w`, computed as :math:`\operatorname{sigmoid}(-\alpha)`, which keeps its
        relative precision where :math:`w` rounds to 1 (``alpha >= 16`` in float32) and
        ``1 - global_weight`` loses it.
    scale
        :math:`\gamma`, in the dtype of the learnable parameters (which the gradients take).
    mean_gap
        :math:`\mu_G - \mu_B`.
    var_gap
        :math:`\sigma_G^2 - \sigma_B^2`.
    """

    x_hat: Array
    inv_std: Array
    global_weight: Array
    batch_weight: Array
    scale: Array
    mean_gap: Array
    var_gap: Array


def hbn_forward(
    x: Array,
    scale: Array,
    offset: Array,
    alpha: Array,
    global_mean: Array,
    global_var: Array,
    /,
    *,
    channel_axis: int = 1,
    eps: float = 1e-5,
    xp: ArrayNamespace | None = None,
) -> tuple[Array, HBNResiduals]:
    r"""Training forward of Hybrid Batch Normalisation.

    .. math::

        w &= \operatorname{sigmoid}(\alpha), \\
        \hat\mu &= (1 - w)\,\mu_B + w\,\mu_G, \qquad
        \hat\sigma^2 = (1 - w)\,\sigma_B^2 + w\,\sigma_G^2, \\
        y &= \gamma\,\frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} + \beta,

    with :math:`\mu_B` and :math:`\sigma_B^2` the mean and the **biased** (population) variance
    of ``x`` over every axis but ``channel_axis``. :math:`\alpha = 0` mixes half and half,
    :math:`\alpha \to -\infty` is plain batch normalisation and :math:`\alpha \to +\infty`
    normalises with the global statistics (``alpha = ±inf`` gives these limits exactly).

    Parameters
    ----------
    x
        Input, real floating, at least 2-D: ``(N, C)`` or ``(N, C, ...)`` with
        ``channel_axis=1``, ``(N, ..., C)`` with ``channel_axis=-1``.
    scale, offset, alpha
        :math:`\gamma`, :math:`\beta` and :math:`\alpha`: the learnable ``(C,)`` parameters, of
        one real floating dtype.
    global_mean, global_var
        :math:`\mu_G` and the **biased** global variance :math:`\sigma_G^2`, ``(C,)``.
    channel_axis
        The axis of the channels: 1 for PyTorch layouts, -1 for Flax and Keras.
    eps
        :math:`\epsilon`, added to the variance. Frameworks differ: 1e-5 in PyTorch and Flax,
        1e-3 in Keras.
    xp
        The array namespace. By default it is inferred from the arrays, which must all come
        from one library.

    Returns
    -------
    y : Array
        The output, of the shape and dtype of ``x``. It is computed in
        ``result_type(x, ..., float32)``, so half-precision input is normalised in float32.
    residuals : HBNResiduals
        What :func:`hbn_backward` needs.

    Raises
    ------
    TypeError
        If an argument is not an array of the namespace of ``x``, not real floating, or the
        learnable parameters differ in dtype, or ``channel_axis`` or ``eps`` has a wrong type.
    ValueError
        If ``x`` has fewer than 2 dimensions or no element per channel, a ``(C,)`` argument has
        another shape, ``channel_axis`` is out of range, or ``eps`` is negative.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.0], [2.0]])
    >>> one, zero = np.ones(1), np.zeros(1)
    >>> y, _ = hbn_forward(x, one, zero, zero, zero, 4 * one, eps=0.0)
    >>> # batch mean 1, variance 1; mixed: mean 0.5*1 + 0.5*0, variance 0.5*1 + 0.5*4
    >>> (y * np.sqrt(2.5)).round(12).tolist()
    [[-0.5], [1.5]]
    """
    arrays = {
        "x": x,
        "scale": scale,
        "offset": offset,
        "alpha": alpha,
        "global_mean": global_mean,
        "global_var": global_var,
    }
    xp = namespace_of(arrays, xp)
    axis, compute = _check_layer_inputs(arrays, channel_axis, xp=xp)
    eps = check_eps(eps)
    if 0 in x.shape:
        msg = f"`x` must have at least one element per channel; got shape {tuple(x.shape)}."
        raise ValueError(msg)

    shape = broadcast_shape(x.ndim, axis, -1)
    x_compute = xp.astype(x, compute, copy=False)
    mean_global = xp.astype(global_mean, compute, copy=False)
    var_global = xp.astype(global_var, compute, copy=False)
    count, batch_mean, batch_m2 = channel_moments(x_compute, axis, xp=xp)
    batch_var = batch_m2 / count
    global_weight, batch_weight = _sigmoid_pair(xp.astype(alpha, compute, copy=False), xp=xp)
    mean_gap = mean_global - batch_mean
    var_gap = var_global - batch_var
    # (1-w)*mu_B + w*mu_G, written so that w in {0, 1} gives each limit exactly.
    mixed_mean = batch_weight * batch_mean + global_weight * mean_global
    mixed_var = batch_weight * batch_var + global_weight * var_global
    inv_std = 1 / xp.sqrt(mixed_var + eps)

    x_hat = (x_compute - xp.reshape(mixed_mean, shape)) * xp.reshape(inv_std, shape)
    y = xp.reshape(xp.astype(scale, compute, copy=False), shape) * x_hat + xp.reshape(
        xp.astype(offset, compute, copy=False), shape
    )
    residuals = HBNResiduals(
        x_hat=x_hat,
        inv_std=xp.reshape(inv_std, shape),
        global_weight=xp.reshape(global_weight, shape),
        batch_weight=xp.reshape(batch_weight, shape),
        scale=xp.reshape(scale, shape),
        mean_gap=xp.reshape(mean_gap, shape),
        var_gap=xp.reshape(var_gap, shape),
    )
    return xp.astype(y, x.dtype, copy=False), residuals


def hbn_backward(
    dy: Array, residuals: HBNResiduals, /, *, xp: ArrayNamespace | None = None
) -> tuple[Array, Array, Array, Array]:
    r"""Analytic gradient of :func:`hbn_forward` with respect to ``x``, scale, offset and alpha.

    With :math:`g = \partial L/\partial y`, sums :math:`\sum` over the :math:`n` elements of a
    channel, :math:`S_1 = \gamma \sum g` and :math:`S_2 = \gamma \sum g\,\hat x`:

    .. math::

        \frac{\partial L}{\partial \beta} &= \sum g, \qquad
        \frac{\partial L}{\partial \gamma} = \sum g\,\hat x, \\
        \frac{\partial L}{\partial x} &= r\left[\gamma g - \frac{1 - w}{n}\left(S_1
            + S_2\,\hat x + w\,r\,S_2\,(\mu_G - \mu_B)\right)\right], \\
        \frac{\partial L}{\partial \alpha} &= w(1 - w)\left[-r\,S_1\,(\mu_G - \mu_B)
            - \tfrac12 r^2 S_2\,(\sigma_G^2 - \sigma_B^2)\right],

    with :math:`r = 1/\sqrt{\hat\sigma^2 + \epsilon}`. The gradient flows through the batch
    statistics :math:`\mu_B, \sigma_B^2` (as in batch normalisation), never into the global
    statistics, which get none. ``docs/math.md`` derives these formulas.

    Parameters
    ----------
    dy
        :math:`g`, the gradient of the loss with respect to the forward's output ``y``: the
        shape and dtype of ``y``.
    residuals
        The second output of :func:`hbn_forward`.
    xp
        The array namespace. By default it is inferred from the arrays.

    Returns
    -------
    dx, dscale, doffset, dalpha : Array
        ``dx`` has the shape and dtype of ``dy``; the others have shape ``(C,)`` and the dtype
        of the learnable parameters.

    Raises
    ------
    TypeError
        If ``residuals`` is not a :class:`HBNResiduals` or ``dy`` is not a real floating array
        of its namespace.
    ValueError
        If ``dy`` does not have the shape of the forward's input.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.0], [2.0]])
    >>> one, zero = np.ones(1), np.zeros(1)
    >>> y, res = hbn_forward(x, one, zero, zero, zero, one)
    >>> dx, dscale, doffset, dalpha = hbn_backward(np.ones_like(y), res)
    >>> doffset.tolist()
    [2.0]
    """
    if not isinstance(residuals, HBNResiduals):
        msg = (
            "`residuals` must be the HBNResiduals that hbn_forward returned; "
            f"got {type(residuals).__name__}."
        )
        raise TypeError(msg)
    xp = namespace_of(
        {"dy": dy, **{f"residuals.{k}": v for k, v in residuals._asdict().items()}}, xp
    )
    check_floating("dy", dy, xp)
    x_hat, inv_std, w, batch_weight, scale, mean_gap, var_gap = residuals
    if tuple(dy.shape) != tuple(x_hat.shape):
        msg = (
            f"`dy` must have the shape of the forward's input {tuple(x_hat.shape)}; "
            f"got shape {tuple(dy.shape)}."
        )
        raise ValueError(msg)

    axes = tuple(i for i, size in enumerate(inv_std.shape) if size == 1)
    count = element_count(x_hat, axes, xp=xp)
    g = xp.astype(dy, x_hat.dtype, copy=False)
    doffset = xp.sum(g, axis=axes, keepdims=True)
    dscale = xp.sum(g * x_hat, axis=axes, keepdims=True)
    gamma = xp.astype(scale, x_hat.dtype, copy=False)
    s1, s2 = gamma * doffset, gamma * dscale
    # dx = r*gamma*g - r*(1-w)/n*S2*x_hat - r*(1-w)/n*(S1 + w*r*S2*(mu_G - mu_B)): per-channel
    # coefficients first, so that only three passes touch arrays of the input's size.
    batch_share = inv_std * batch_weight / count
    dx = (inv_std * gamma) * g - (batch_share * s2) * x_hat
    dx = dx - batch_share * (s1 + w * inv_std * s2 * mean_gap)
    dweight = -inv_std * s1 * mean_gap - 0.5 * inv_std * inv_std * s2 * var_gap
    dalpha = w * batch_weight * dweight
    return (
        xp.astype(dx, dy.dtype, copy=False),
        _per_channel(dscale, scale.dtype, xp=xp),
        _per_channel(doffset, scale.dtype, xp=xp),
        _per_channel(dalpha, scale.dtype, xp=xp),
    )


def hbn_inference(
    x: Array,
    scale: Array,
    offset: Array,
    global_mean: Array,
    global_var: Array,
    /,
    *,
    channel_axis: int = 1,
    eps: float = 1e-5,
    xp: ArrayNamespace | None = None,
) -> Array:
    r"""Inference of Hybrid Batch Normalisation: normalise with the global statistics only.

    .. math::

        y = \gamma\,\frac{x - \mu_G}{\sqrt{\sigma_G^2 + \epsilon}} + \beta .

    :math:`\alpha` plays no part. The result equals :func:`hbn_forward` with
    ``alpha = +inf``. Parameters, return value and errors are those of :func:`hbn_forward`,
    without ``alpha``; ``x`` may have any number of elements per channel, even none.

    Examples
    --------
    >>> import numpy as np
    >>> one, zero = np.ones(1), np.zeros(1)
    >>> hbn_inference(np.array([[3.0]]), one, zero, one, 4 * one, eps=0.0).tolist()
    [[1.0]]
    """
    arrays = {
        "x": x,
        "scale": scale,
        "offset": offset,
        "global_mean": global_mean,
        "global_var": global_var,
    }
    xp = namespace_of(arrays, xp)
    axis, compute = _check_layer_inputs(arrays, channel_axis, xp=xp)
    eps = check_eps(eps)
    shape = broadcast_shape(x.ndim, axis, -1)
    inv_std = 1 / xp.sqrt(xp.astype(global_var, compute, copy=False) + eps)
    factor = xp.astype(scale, compute, copy=False) * inv_std
    shift = (
        xp.astype(offset, compute, copy=False)
        - xp.astype(global_mean, compute, copy=False) * factor
    )
    y = xp.astype(x, compute, copy=False) * xp.reshape(factor, shape) + xp.reshape(shift, shape)
    return xp.astype(y, x.dtype, copy=False)


def _check_layer_inputs(
    arrays: dict[str, Array], channel_axis: int, *, xp: ArrayNamespace
) -> tuple[int, DType]:
    """Check the arguments of a layer call; return the channel axis and the compute dtype."""
    x = arrays["x"]
    for name, array in arrays.items():
        check_floating(name, array, xp)
    check_ndim("x", x, 2)
    axis = normalize_channel_axis(channel_axis, x.ndim)
    for name, array in arrays.items():
        if name != "x":
            check_per_channel(name, array, x.shape[axis], channel_axis)
    learnable = tuple(name for name in ("scale", "offset", "alpha") if name in arrays)
    check_same_dtype(learnable, tuple(arrays[name] for name in learnable))
    return axis, xp.result_type(*arrays.values(), xp.float32)


def _sigmoid_pair(alpha: Array, *, xp: ArrayNamespace) -> tuple[Array, Array]:
    """Return ``(sigmoid(alpha), sigmoid(-alpha))`` without overflow, exact at ``±inf``.

    ``exp(-|alpha|)`` never overflows. It is written with ``where`` rather than ``abs`` so that
    autodiff through this function is right at ``alpha = 0`` too (the derivative of ``abs`` at 0
    is 0 in every framework).
    """
    positive = alpha >= 0
    decay = xp.exp(xp.where(positive, -alpha, alpha))
    small, large = decay / (1 + decay), 1 / (1 + decay)
    return xp.where(positive, large, small), xp.where(positive, small, large)


def _per_channel(v: Array, dtype: DType, *, xp: ArrayNamespace) -> Array:
    return xp.astype(xp.reshape(v, (-1,)), dtype, copy=False)
