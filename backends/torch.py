"""PyTorch adapter: ``HybridBatchNorm1d/2d/3d`` as drop-in replacements for torch's BatchNorm.

The math is :mod:`hbn_core`'s. In training mode the layer calls :func:`hbn_core.hbn_forward`
inside a :class:`torch.autograd.Function` whose backward is :func:`hbn_core.hbn_backward`, or,
by default, the same math on torch's fused batch-norm kernels (the fast path: a C++ operator on
CPU, see :func:`compiled_kernel_available`, a Python ``autograd.Function`` elsewhere); in eval
mode it calls :func:`hbn_core.hbn_inference`. This module adds torch's conventions (names,
buffers, shapes, errors) and the client side of the statistics protocol:
:func:`collect_statistics`, :func:`set_global_statistics`, :func:`hbn_layers` and
:func:`convert_batchnorm`.

Examples
--------
>>> import torch
>>> from backends.torch import HybridBatchNorm2d
>>> layer = HybridBatchNorm2d(3)
>>> layer(torch.randn(8, 3, 4, 4)).shape
torch.Size([8, 3, 4, 4])
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import array_api_compat.torch as torch_xp
import numpy as np
import torch
from torch import nn

import hbn_core
from backends._collection import CollectionMode, check_collection_mode, require_hbn_layers
from backends._global_statistics import checked_global_statistics
from hbn_core import HBNResiduals, Moments

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = [
    "HybridBatchNorm",
    "HybridBatchNorm1d",
    "HybridBatchNorm2d",
    "HybridBatchNorm3d",
    "collect_statistics",
    "compiled_kernel_available",
    "convert_batchnorm",
    "hbn_layers",
    "set_global_statistics",
]


class _HybridBatchNormFunction(torch.autograd.Function):
    """The core's forward, with the core's analytic backward (autograd never sees inside)."""

    @staticmethod
    def forward(
        x: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        alpha: torch.Tensor,
        global_mean: torch.Tensor,
        global_var: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, ...]:
        y, residuals = hbn_core.hbn_forward(
            x, scale, offset, alpha, global_mean, global_var, channel_axis=1, eps=eps, xp=torch_xp
        )
        return (y, *residuals)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:  # noqa: ARG004 - torch's signature
        residuals = output[1:]
        ctx.save_for_backward(*residuals)
        ctx.mark_non_differentiable(*residuals)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        residuals = HBNResiduals(*ctx.saved_tensors)
        dx, dscale, doffset, dalpha = hbn_core.hbn_backward(dy, residuals, xp=torch_xp)
        return dx, dscale, doffset, dalpha, None, None, None


class _FusedHybridBatchNormFunction(torch.autograd.Function):
    r"""The core's math on torch's fused batch-norm kernels: the measured fast path.

    Forward: given the exact batch mean :math:`\mu_B` and biased variance :math:`\sigma_B^2`
    (the caller takes them from ``torch.batch_norm_update_stats``, one fused pass), the output is
    torch's fused inference-mode batch norm fed with the hybrid statistics
    :math:`\hat\mu, \hat\sigma^2`.

    Backward: torch's fused backward reduction gives :math:`\sum g` and :math:`\sum g\hat x`,
    hence :math:`S_1 = \gamma\sum g` and :math:`S_2 = \gamma\sum g\hat x`. With
    :math:`x_i - \mu_B = \hat x_i/r + w(\mu_G - \mu_B)`, the core's :math:`\partial L/\partial x`
    (``docs/math.md``) becomes

    .. math::

        \frac{\partial L}{\partial x_i} = \gamma r\,g_i
        - (1-w)\,\frac{r}{n}\,\bigl[S_1 + r S_2\,(x_i - \mu_B)\bigr],

    a per-channel affine map of :math:`x` (torch's fused inference kernel) plus
    :math:`\gamma r\,g`. Like torch's BatchNorm it saves ``x``, not :math:`\hat x`; the
    per-channel statistics are recomputed from the saved inputs.
    """

    @staticmethod
    def forward(
        x: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        alpha: torch.Tensor,
        batch_mean: torch.Tensor,
        batch_var: torch.Tensor,
        global_mean: torch.Tensor,
        global_var: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        mixed_mean, mixed_var, _ = _mixed_statistics(
            alpha, batch_mean, batch_var, global_mean, global_var
        )
        return torch.batch_norm(x, scale, offset, mixed_mean, mixed_var, False, 0.0, eps, True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:  # noqa: ARG004 - torch's signature
        x, scale, _, *statistics, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(x, scale, *statistics)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, alpha, batch_mean, batch_var, global_mean, global_var = ctx.saved_tensors
        mixed_mean, mixed_var, w = _mixed_statistics(
            alpha, batch_mean, batch_var, global_mean, global_var
        )
        inv_std = torch.rsqrt(mixed_var + ctx.eps)
        _, dscale, doffset = torch.ops.aten.native_batch_norm_backward(
            dy, x, None, None, None, mixed_mean, inv_std, True, 0.0, [False, True, True]
        )
        s1, s2 = scale * doffset, scale * dscale
        minus_share = (w - 1) * inv_std * (x.shape[1] / x.numel())  # -(1-w) r / n
        r_s2 = inv_std * s2
        # -(1-w)(r/n)[S1 + r S2 (x - mu_B)]: torch's inference kernel with mean mu_B, variance 1.
        dx = torch.batch_norm(
            x, minus_share * r_s2, minus_share * s1, batch_mean, torch.ones_like(s1),
            False, 0.0, 0.0, True,
        )  # fmt: skip
        dx = dx.addcmul_(dy, (scale * inv_std).view((1, -1) + (1,) * (x.dim() - 2)))
        # dL/dw = r [S1 (mu_B - mu_G) + r S2 (sigma_B^2 - sigma_G^2) / 2]
        dweight = torch.addcmul(
            s1 * (batch_mean - global_mean), r_s2, batch_var - global_var, value=0.5
        )
        dalpha = dweight.mul_(inv_std * w * (1 - w))
        return dx, dscale, doffset, dalpha, None, None, None, None, None


def _mixed_statistics(
    alpha: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    global_mean: torch.Tensor,
    global_var: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r""":math:`\hat\mu`, :math:`\hat\sigma^2` and :math:`w = \operatorname{sigmoid}(\alpha)`.

    ``lerp(batch, global, w)`` is :math:`(1-w)\,\mathrm{batch} + w\,\mathrm{global}`, exact at
    :math:`w = 0` and :math:`w = 1`.
    """
    w = torch.sigmoid(alpha)
    return torch.lerp(batch_mean, global_mean, w), torch.lerp(batch_var, global_var, w), w


_KERNEL_SOURCE = pathlib.Path(__file__).parent / "csrc" / "hybrid_batch_norm.cpp"


@functools.cache
def compiled_kernel_available() -> bool:
    """Whether ``hbn::hybrid_batch_norm``, the layer's C++ training operator, is loaded.

    The first call builds it with :func:`torch.utils.cpp_extension.load` (a C++ compiler and
    ``ninja``; about 10 seconds, once per machine and torch version, cached by torch) and loads
    it. Where it cannot be built, it warns once and returns False, and the layers train on the
    Python fast path: the same math and kernels, with a higher fixed cost per call.
    """
    from torch.utils import cpp_extension  # imports setuptools: only when a layer trains

    try:
        cpp_extension.load(
            name="hbn_torch_kernels",
            sources=[str(_KERNEL_SOURCE)],
            extra_cflags=["-O3"],
            is_python_module=False,
        )
    except (RuntimeError, OSError, ImportError) as error:
        warnings.warn(
            f"HBN's C++ operator could not be built ({error}); HybridBatchNorm trains on its "
            "Python fast path, which costs more per call on small tensors.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


class HybridBatchNorm(nn.Module):
    r"""Hybrid Batch Normalisation over the channel axis 1 of an ``(N, C, *)`` input.

    In training mode, with :math:`w = \operatorname{sigmoid}(\alpha)` per channel,

    .. math::

        \hat\mu = (1-w)\mu_B + w\mu_G, \qquad \hat\sigma^2 = (1-w)\sigma_B^2 + w\sigma_G^2,
        \qquad y = \gamma\,\frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} + \beta,

    with the batch mean :math:`\mu_B` and **biased** batch variance :math:`\sigma_B^2`, and
    the global statistics :math:`\mu_G` = ``global_mean`` and :math:`\sigma_G^2` =
    ``global_var`` (biased). In eval mode :math:`w = 1`: only the global statistics are used.
    See ``docs/math.md``.

    Parameters mirror :class:`torch.nn.BatchNorm2d`:

    Parameters
    ----------
    num_features
        :math:`C`, the number of channels.
    eps
        Added to the variance.
    momentum
        Weight of the new batch in the running statistics,
        ``running = (1 - momentum) * running + momentum * batch``, as in torch; ``None`` gives
        the cumulative average.
    affine
        Whether the layer has the learnable ``weight`` (:math:`\gamma`) and ``bias``
        (:math:`\beta`). ``alpha`` is learnable either way.
    track_running_stats
        Whether training updates the buffers ``running_mean``, ``running_var`` (Bessel-corrected,
        as torch keeps it) and ``num_batches_tracked``, exactly as torch's BatchNorm does. They
        are for monitoring and for seeding ``global_*`` in centralised training; HBN never
        normalises with them.
    device, dtype
        Where and in which dtype to create the parameters and buffers.

    Attributes
    ----------
    weight, bias : torch.nn.Parameter or None
        :math:`\gamma` (ones) and :math:`\beta` (zeros), ``(C,)``; None when ``affine=False``.
    alpha : torch.nn.Parameter
        The hybrid factor :math:`\alpha` (zeros: half batch, half global), ``(C,)``.
    global_mean, global_var : torch.Tensor
        Buffers, zeros and ones, ``(C,)``; ``global_var`` is a biased variance. Set them with
        :func:`set_global_statistics`.

    Notes
    -----
    Unlike torch's BatchNorm, a training batch with one value per channel is allowed: its
    batch variance is 0, and the global half of the mixture still normalises it.
    """

    _input_ranks: ClassVar[tuple[int, ...] | None] = None
    use_fused_kernels: bool = True
    """Train with torch's fused batch-norm kernels fed with the core's statistics (the fast
    path) where they apply: float32 or float64 input with parameters and buffers of its dtype,
    on CPU or CUDA. Otherwise, or when set to False, the layer calls hbn_core's forward and
    backward directly. All paths compute the same math and pass the same tests."""
    use_compiled_kernel: bool = True
    """On the fast path, run it as one C++ operator, ``hbn::hybrid_batch_norm`` (see
    :func:`compiled_kernel_available`), in eager mode. Under ``torch.compile`` and ``torch.func``
    transforms, when the operator cannot be built, or when set to False, the fast path runs as
    a Python ``torch.autograd.Function``: the same kernels and math, more overhead per call."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.alpha = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("global_mean", torch.zeros(num_features, **factory))
        self.register_buffer("global_var", torch.ones(num_features, **factory))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._collector: _Collector | None = None

    def extra_repr(self) -> str:
        """The constructor arguments, as torch's BatchNorm shows them."""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )

    def _check_input(self, x: torch.Tensor) -> None:
        ranks = self._input_ranks
        if ranks is not None and x.dim() not in ranks:
            expected = " or ".join(f"{r}D" for r in ranks)
            msg = f"expected {expected} input (got {x.dim()}D input)"
            raise ValueError(msg)
        if x.dim() < 2 or x.shape[1] != self.num_features:
            msg = (
                f"{type(self).__name__}({self.num_features}) expected an input of shape "
                f"(N, {self.num_features}, ...) with the channels on dim 1; got shape "
                f"{tuple(x.shape)}"
            )
            raise ValueError(msg)

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self.weight, self.bias
        if weight is not None and bias is not None:
            return weight, bias
        return torch.ones_like(self.alpha), torch.zeros_like(self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x``: hybrid statistics in training mode, global ones in eval mode."""
        self._check_input(x)
        if self._collector is not None:
            return self._collector.record(self, x)
        if self.training:
            return self._hybrid(x, update_running_stats=self.track_running_stats)
        return self._inference(x)

    def _hybrid(self, x: torch.Tensor, *, update_running_stats: bool) -> torch.Tensor:
        if self._compiled_kernel_applies(x):
            return self._compiled_hybrid(x, update_running_stats=update_running_stats)
        scale, offset = self._affine()
        if self._fused_kernels_apply(x):
            batch_mean, batch_var = torch.batch_norm_update_stats(x.detach(), None, None, 0.0)
            y = _FusedHybridBatchNormFunction.apply(
                x, scale, offset, self.alpha, batch_mean, batch_var,
                self.global_mean, self.global_var, self.eps,
            )  # fmt: skip
        else:
            y, *residuals = _HybridBatchNormFunction.apply(
                x, scale, offset, self.alpha, self.global_mean, self.global_var, self.eps
            )
            gaps = HBNResiduals(*residuals)
            batch_mean = self.global_mean - gaps.mean_gap.reshape(-1)
            batch_var = self.global_var - gaps.var_gap.reshape(-1)
        if update_running_stats:
            self._update_running_stats(batch_mean, batch_var, x.numel() // self.num_features)
        return y

    # The fast paths read parameters and buffers from nn.Module's dicts: its __getattr__ costs
    # about 0.4 us a name, and the compiled path's whole fixed cost is a few tens of us.
    def _fused_kernels_apply(self, x: torch.Tensor) -> bool:
        """Whether torch's fused batch-norm kernels serve this call (one float dtype, CPU/CUDA)."""
        dtype, parameters, buffers = x.dtype, self._parameters, self._buffers
        return (
            self.use_fused_kernels
            and dtype in (torch.float32, torch.float64)
            and x.device.type in ("cpu", "cuda")
            and parameters["alpha"].dtype is dtype
            and buffers["global_mean"].dtype is dtype
            and buffers["global_var"].dtype is dtype
        )

    def _compiled_kernel_applies(self, x: torch.Tensor) -> bool:
        """Whether the C++ operator serves this call: the fast path on CPU, eager, no functorch."""
        weight, running_mean = self._parameters["weight"], self._buffers["running_mean"]
        return (
            self.use_compiled_kernel
            and x.is_cpu
            and self._fused_kernels_apply(x)
            and (weight is None or weight.dtype is x.dtype)
            and (running_mean is None or running_mean.dtype is x.dtype)
            and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
            and compiled_kernel_available()
        )

    def _compiled_hybrid(self, x: torch.Tensor, *, update_running_stats: bool) -> torch.Tensor:
        """``hbn::hybrid_batch_norm``, which also updates the running statistics if asked."""
        parameters, buffers = self._parameters, self._buffers
        weight, bias = parameters["weight"], parameters["bias"]
        if weight is None or bias is None:
            weight, bias = self._affine()
        running = ("running_mean", "running_var", "num_batches_tracked")
        return torch.ops.hbn.hybrid_batch_norm.default(
            x, weight, bias, parameters["alpha"], buffers["global_mean"], buffers["global_var"],
            *(buffers[name] if update_running_stats else None for name in running),
            self.momentum, self.eps,
        )  # fmt: skip

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        scale, offset = self._affine()
        return hbn_core.hbn_inference(
            x, scale, offset, self.global_mean, self.global_var, eps=self.eps, xp=torch_xp
        )

    @torch.no_grad()
    def _update_running_stats(
        self, batch_mean: torch.Tensor, batch_var: torch.Tensor, count: int
    ) -> None:
        """Torch's running-statistics update from the forward's batch statistics.

        ``batch_var`` is biased; ``running_var`` averages Bessel-corrected variances, as in torch.
        """
        self.num_batches_tracked.add_(1)
        factor: float | torch.Tensor = self.momentum
        if factor is None:  # the cumulative average, as torch's momentum=None
            factor = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
        unbiased = batch_var * (count / max(count - 1, 1))
        torch._foreach_lerp_(
            [self.running_mean, self.running_var],
            [batch_mean.to(self.running_mean.dtype), unbiased.to(self.running_var.dtype)],
            factor,
        )


class HybridBatchNorm1d(HybridBatchNorm):
    """Hybrid Batch Normalisation for ``(N, C)`` or ``(N, C, L)`` input.

    See :class:`HybridBatchNorm`.
    """

    _input_ranks = (2, 3)


class HybridBatchNorm2d(HybridBatchNorm):
    """Hybrid Batch Normalisation for ``(N, C, H, W)`` input; see :class:`HybridBatchNorm`."""

    _input_ranks = (4,)


class HybridBatchNorm3d(HybridBatchNorm):
    """Hybrid Batch Normalisation for ``(N, C, D, H, W)`` input; see :class:`HybridBatchNorm`."""

    _input_ranks = (5,)


def hbn_layers(model: nn.Module) -> list[tuple[str, HybridBatchNorm]]:
    """The HBN layers of ``model`` with their qualified names, found by type, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, HybridBatchNorm)]


class _Collector:
    """Accumulates each layer's exact input moments in float64 with the core's merge."""

    def __init__(self, layers: list[tuple[str, HybridBatchNorm]], mode: CollectionMode) -> None:
        self.mode = mode
        self.names = {id(layer): name for name, layer in layers}
        self.moments: dict[str, Moments] = {name: _empty_moments(layer) for name, layer in layers}

    def record(self, layer: HybridBatchNorm, x: torch.Tensor) -> torch.Tensor:
        name = self.names[id(layer)]
        with torch.no_grad():
            batch = hbn_core.moments(x.detach().to(torch.float64), channel_axis=1, xp=torch_xp)
            self.moments[name] = hbn_core.merge_moments(self.moments[name], batch, xp=torch_xp)
        if self.mode == "hybrid":
            return layer._hybrid(x, update_running_stats=False)
        return layer._inference(x)


def _empty_moments(layer: HybridBatchNorm) -> Moments:
    zeros = torch.zeros(layer.num_features, dtype=torch.float64, device=layer.alpha.device)
    return Moments(torch.tensor(0, dtype=torch.int64, device=zeros.device), zeros, zeros)


@contextlib.contextmanager
def collect_statistics(
    model: nn.Module, mode: CollectionMode = "hybrid"
) -> Iterator[dict[str, Moments]]:
    """Record the exact input moments of every HBN layer during the forward passes inside.

    The client side of the statistics protocol: load the global model, then run forward passes
    over local data inside this context. Each HBN layer accumulates the moments of its input,
    over every batch, in float64, with :func:`hbn_core.merge_moments`. Nothing else changes: no
    parameter, no buffer (not even the running statistics).

    Parameters
    ----------
    model
        A module with HBN layers.
    mode
        How the HBN layers normalise during collection, whatever ``model.training`` says:
        ``"hybrid"`` as in training (the authors' choice), or ``"global"`` with the current
        global statistics, as in evaluation. It shapes the inputs that deeper layers see. Other
        layers (dropout, say) follow ``model.training``: call ``model.eval()`` to switch them off.

    Yields
    ------
    dict[str, hbn_core.Moments]
        Each HBN layer's qualified name mapped to its moments (float64 ``mean`` and ``m2``, int64
        ``count`` of elements per channel), on the layer's device. It is filled as batches run;
        layers that saw no batch hold count 0.

    Raises
    ------
    ValueError
        If ``mode`` is neither ``"hybrid"`` nor ``"global"``, or ``model`` has no HBN layer.
    RuntimeError
        If a collection is already running on one of the layers.

    Examples
    --------
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), HybridBatchNorm2d(4))
    >>> with torch.no_grad(), collect_statistics(model, mode="global") as stats:
    ...     for batch in torch.randn(3, 8, 1, 6, 6):
    ...         _ = model(batch)
    >>> int(stats["1"].count)  # 3 batches of 8 images of 4x4
    384
    """
    check_collection_mode(mode)
    layers = hbn_layers(model)
    require_hbn_layers(layers, model, layer_type="HybridBatchNorm*")
    busy = [name for name, layer in layers if layer._collector is not None]
    if busy:
        msg = (
            f"statistics are already being collected on {busy}; nested collection is not supported."
        )
        raise RuntimeError(msg)
    collector = _Collector(layers, mode)
    for _, layer in layers:
        layer._collector = collector
    try:
        yield collector.moments
    finally:
        for _, layer in layers:
            layer._collector = None


@torch.no_grad()
def set_global_statistics(model: nn.Module, statistics: Mapping[str, Moments]) -> None:
    """Write pooled statistics into the HBN layers' ``global_mean`` and ``global_var``.

    ``global_mean`` becomes ``mean`` and ``global_var`` the population (biased) variance
    ``m2 / count``, the one HBN normalises with. The write is all or nothing: every check
    passes before any layer changes.

    Parameters
    ----------
    model
        A module with HBN layers.
    statistics
        One :class:`hbn_core.Moments` per HBN layer, keyed by qualified name (as
        :func:`collect_statistics` yields them), from any array library.

    Raises
    ------
    ValueError
        If the names do not match the model's HBN layers exactly, a count is not positive, a
        shape does not match the layer, or a value is not finite.
    """
    layers = dict(hbn_layers(model))
    checked = checked_global_statistics(
        statistics, {name: layer.num_features for name, layer in layers.items()}, to_numpy=_numpy
    )
    for name, (mean, var) in checked.items():
        layers[name].global_mean.copy_(torch.from_numpy(mean))
        layers[name].global_var.copy_(torch.from_numpy(var))


def _numpy(value: Any) -> np.ndarray:
    """A tensor copied to host, or any other array, as NumPy."""
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


_BATCHNORM_TO_HBN: dict[type[nn.Module], type[HybridBatchNorm]] = {
    nn.BatchNorm1d: HybridBatchNorm1d,
    nn.BatchNorm2d: HybridBatchNorm2d,
    nn.BatchNorm3d: HybridBatchNorm3d,
    nn.SyncBatchNorm: HybridBatchNorm,
}


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every torch BatchNorm in ``module`` with its HBN counterpart, in place.

    ``nn.BatchNorm1d/2d/3d`` become ``HybridBatchNorm1d/2d/3d``, and ``nn.SyncBatchNorm``
    becomes the rank-agnostic :class:`HybridBatchNorm`. Each keeps its ``num_features``,
    ``eps``, ``momentum``, ``affine`` and ``track_running_stats``, its device and dtype, and
    its ``weight`` and ``bias``. ``alpha`` starts at 0.

    The global statistics start from the running statistics: ``global_mean = running_mean``
    and ``global_var = running_var``, copied unchanged, so that the converted model in eval
    mode gives the original's eval output. torch's ``running_var`` is an average of
    Bessel-corrected batch variances, which exceeds the biased variance HBN's ``global_var``
    holds by a factor ``n / (n - 1)`` (``n`` elements per channel in a batch): negligible for
    conv layers, and replaced by exact pooled values in the first round of statistics
    collection. BatchNorms with ``track_running_stats=False`` have no running statistics; their
    HBN layers start at ``global_mean = 0`` and ``global_var = 1``.

    Returns
    -------
    torch.nn.Module
        ``module`` itself, or a new HBN layer if ``module`` is itself a BatchNorm.

    Examples
    --------
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    >>> convert_batchnorm(model)[1]
    HybridBatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    """
    replacement = _BATCHNORM_TO_HBN.get(type(module))
    if replacement is not None:
        return _hbn_from_batchnorm(module, replacement)
    for name, child in module.named_children():
        converted = convert_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


@torch.no_grad()
def _hbn_from_batchnorm(bn: nn.Module, layer_type: type[HybridBatchNorm]) -> HybridBatchNorm:
    reference = bn.weight if bn.weight is not None else bn.running_mean
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    layer = layer_type(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        **factory,
    )
    if bn.affine:
        layer.weight.copy_(bn.weight)
        layer.bias.copy_(bn.bias)
    if bn.track_running_stats:
        layer.global_mean.copy_(bn.running_mean)
        layer.global_var.copy_(bn.running_var)
        layer.running_mean.copy_(bn.running_mean)
        layer.running_var.copy_(bn.running_var)
        layer.num_batches_tracked.copy_(bn.num_batches_tracked)
    layer.train(bn.training)
    return layer
