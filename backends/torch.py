"""PyTorch adapter: ``HybridBatchNorm1d/2d/3d`` as drop-in replacements for torch's BatchNorm.

The math is :mod:`hbn_core`'s. In training mode the layer calls :func:`hbn_core.hbn_forward`
inside a :class:`torch.autograd.Function` whose backward is :func:`hbn_core.hbn_backward`, or,
by default, the same math on torch's fused batch-norm kernels (the fast path: a C++ operator on
CPU, see :func:`compiled_kernel_available`, a Python ``autograd.Function`` elsewhere); in eval
mode it calls :func:`hbn_core.hbn_inference`. A backward that autograd records (second-order
gradients) or batches runs hbn_core's forward and backward as torch ops, on every path. This
module adds torch's conventions (names, buffers, shapes, errors), the build of the C++ operator
(:func:`build_compiled_kernel`, ``python -m backends.torch build``) and the client side of the
statistics protocol: :func:`collect_statistics`, :func:`set_global_statistics`,
:func:`hbn_layers` and :func:`convert_batchnorm`.

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
import hashlib
import math
import os
import pathlib
import sys
import time
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
    from collections.abc import Iterator, Mapping, Sequence

__all__ = [
    "HybridBatchNorm",
    "HybridBatchNorm1d",
    "HybridBatchNorm2d",
    "HybridBatchNorm3d",
    "build_compiled_kernel",
    "collect_statistics",
    "compiled_kernel_available",
    "compiled_kernel_directory",
    "convert_batchnorm",
    "hbn_layers",
    "set_global_statistics",
]


def _gradient_composition(
    dy: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    alpha: torch.Tensor,
    global_mean: torch.Tensor,
    global_var: torch.Tensor,
    eps: float,
) -> list[torch.Tensor]:
    """``[dx, dscale, doffset, dalpha]``: :func:`hbn_core.hbn_backward` on recomputed residuals.

    Every step is a torch op on the saved inputs, so autograd can differentiate the gradients
    again (second-order gradients, ``create_graph=True``) and functorch can batch them. The
    fast backwards call it when they must be differentiable or batchable
    (:func:`_needs_composite_backward`); it recomputes the forward once. The offset takes no
    part in any gradient, so zeros stand in for it.
    """
    _, residuals = hbn_core.hbn_forward(
        x, scale, torch.zeros_like(scale), alpha, global_mean, global_var,
        channel_axis=1, eps=eps, xp=torch_xp,
    )  # fmt: skip
    return list(hbn_core.hbn_backward(dy, residuals, xp=torch_xp))


def _needs_composite_backward(dy: torch.Tensor) -> bool:
    """Whether a backward must run as differentiable, batchable torch ops.

    True when autograd records the backward (``create_graph=True``, which turns grad mode on
    inside it; ``torch.func.grad`` always does) or when the incoming gradient is batched or a
    functorch tensor (a ``vmap`` over the backward, as ``torch.autograd.grad`` with
    ``is_grads_batched=True`` and ``gradcheck(check_batched_grad=True)`` run). Never under
    ``torch.compile``, which traces the backward once and supports no double backward.
    """
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    return (
        torch.is_grad_enabled()
        or functorch.is_functorch_wrapped_tensor(dy)
        or functorch.is_legacy_batchedtensor(dy)
    )


class _HybridBatchNormFunction(torch.autograd.Function):
    """The core's forward, with the core's analytic backward (autograd never sees inside).

    ``generate_vmap_rule``: its forward and backward are array-API ops, which ``vmap`` batches.
    """

    generate_vmap_rule = True

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
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        x, scale, _, alpha, global_mean, global_var, eps = inputs
        residuals = output[1:]
        ctx.eps = eps
        ctx.save_for_backward(x, scale, alpha, global_mean, global_var, *residuals)
        ctx.mark_non_differentiable(*residuals)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        x, scale, alpha, global_mean, global_var, *residuals = ctx.saved_tensors
        if _needs_composite_backward(dy):
            grads = _gradient_composition(dy, x, scale, alpha, global_mean, global_var, ctx.eps)
        else:
            grads = list(hbn_core.hbn_backward(dy, HBNResiduals(*residuals), xp=torch_xp))
        return (*grads, None, None, None)


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
    per-channel statistics are recomputed from the saved inputs. :math:`1 - w` is
    :math:`\operatorname{sigmoid}(-\alpha)`, accurate where :math:`w` rounds to 1. A backward
    that must be differentiable or batchable is :func:`_gradient_composition`.
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
        mixed_mean, mixed_var = _mixed_statistics(
            torch.sigmoid(alpha), batch_mean, batch_var, global_mean, global_var
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
        if _needs_composite_backward(dy):
            grads = _gradient_composition(dy, x, scale, alpha, global_mean, global_var, ctx.eps)
            return (*grads, None, None, None, None, None)
        w, batch_weight = torch.sigmoid(alpha), torch.sigmoid(-alpha)
        mixed_mean, mixed_var = _mixed_statistics(w, batch_mean, batch_var, global_mean, global_var)
        inv_std = torch.rsqrt(mixed_var + ctx.eps)
        _, dscale, doffset = torch.ops.aten.native_batch_norm_backward(
            dy, x, None, None, None, mixed_mean, inv_std, True, 0.0, [False, True, True]
        )
        s1, s2 = scale * doffset, scale * dscale
        minus_share = batch_weight * inv_std * (-x.shape[1] / x.numel())  # -(1-w) r / n
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
        dalpha = dweight.mul_(inv_std * w * batch_weight)
        return dx, dscale, doffset, dalpha, None, None, None, None, None


def _mixed_statistics(
    w: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    global_mean: torch.Tensor,
    global_var: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\hat\mu` and :math:`\hat\sigma^2` for the weight :math:`w` on the global statistics.

    ``lerp(batch, global, w)`` is :math:`(1-w)\,\mathrm{batch} + w\,\mathrm{global}`, exact at
    :math:`w = 0` and :math:`w = 1`.
    """
    return torch.lerp(batch_mean, global_mean, w), torch.lerp(batch_var, global_var, w)


_KERNEL_SOURCE = pathlib.Path(__file__).parent / "csrc" / "hybrid_batch_norm.cpp"
BUILD_TIMEOUT_VARIABLE = "HBN_TORCH_BUILD_TIMEOUT"
"""The environment variable that bounds, in seconds, how long a process waits for another's
build of the C++ operator (default 120) before it trains on the Python path."""
_DEFAULT_BUILD_TIMEOUT_S = 120.0


def compiled_kernel_directory() -> pathlib.Path:
    """The directory where the C++ operator is built: private to this Python environment.

    It lies under ``TORCH_EXTENSIONS_DIR`` (or torch's default, ``~/.cache/torch_extensions``)
    and its name holds a hash of the interpreter (``sys.executable`` with its links resolved,
    ``sys.prefix``, its version) and of the torch build (version and location). Environments at
    different paths or with different torch versions never share a build, nor its lock; the
    names of one interpreter (``bin/python`` and ``bin/python3``, as Flower's ``flwr-clientapp``
    runs it) share one.
    """
    from torch.utils import cpp_extension  # imports setuptools: only when a layer trains

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    interpreter = os.path.realpath(sys.executable)
    environment = (interpreter, sys.prefix, sys.version, torch.__version__, torch.__file__)
    digest = hashlib.sha256("\0".join(environment).encode()).hexdigest()[:16]
    return pathlib.Path(root) / f"hbn_torch_kernels-{digest}"


def _build_timeout() -> float:
    """Seconds to wait for another process's build: ``HBN_TORCH_BUILD_TIMEOUT``, or 120."""
    raw = os.environ.get(BUILD_TIMEOUT_VARIABLE)
    if raw is None:
        return _DEFAULT_BUILD_TIMEOUT_S
    try:
        timeout = float(raw)
    except ValueError:
        timeout = math.nan
    if not (math.isfinite(timeout) and timeout >= 0):
        msg = f"{BUILD_TIMEOUT_VARIABLE} must be a non-negative number of seconds; got {raw!r}."
        raise ValueError(msg)
    return timeout


def _load_compiled_kernel(directory: pathlib.Path, timeout: float) -> str | None:
    """Build (if needed) and load the operator in ``directory``; the reason if it cannot.

    Processes that share ``directory`` build one at a time, under an OS file lock
    (:class:`filelock.FileLock`) that the OS releases when its holder dies, so it never goes
    stale. A process waits at most ``timeout`` seconds for it. Holding it, a process finds
    torch's own ``lock`` file (``torch.utils.cpp_extension`` creates it for a build and removes
    it after) only if a process died during a build, or one that does not take the OS lock is
    building: it waits for that file to go away, but at most ``timeout`` seconds after the file
    was last written, and never past the same deadline.
    """
    import filelock
    from torch.utils import cpp_extension

    deadline = time.monotonic() + timeout
    torch_lock = directory / "lock"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(directory / "hbn-build.lock", timeout=timeout):
            if not _lock_released(torch_lock, deadline, timeout):
                return (
                    f"torch's build lock {torch_lock} has been held for more than {timeout:g} s: "
                    "a process that died during a build leaves it; delete it if no build is "
                    "running"
                )
            # at::parallel_for runs on OpenMP in torch's Linux builds, inlined from its headers:
            # without -fopenmp the operator's loops would run on one thread. The library is
            # torch's own libgomp.so.1, already loaded by the time this runs. (Apple's clang
            # has no -fopenmp: there the loops stay on one thread.)
            linux_openmp = sys.platform == "linux" and torch.backends.openmp.is_available()
            openmp = ["-fopenmp"] if linux_openmp else []
            cpp_extension.load(
                name="hbn_torch_kernels",
                sources=[str(_KERNEL_SOURCE)],
                extra_cflags=["-O3", *openmp],
                extra_ldflags=openmp,
                build_directory=str(directory),
                is_python_module=False,
            )
    except filelock.Timeout:
        return f"another process has been building it in {directory} for more than {timeout:g} s"
    except (RuntimeError, OSError, ImportError, NotImplementedError) as error:
        return str(error)
    return None


def _lock_released(lock: pathlib.Path, deadline: float, timeout: float) -> bool:
    """Whether ``lock`` is absent, or goes away before ``deadline`` (``time.monotonic``).

    False at once when the file was last written more than ``timeout`` seconds ago.
    """
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return True
        if age > timeout or time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


@functools.cache
def _register_gradient_composition() -> None:
    """Implement ``hbn::hybrid_batch_norm_gradients`` with :func:`_gradient_composition`.

    The C++ backward calls that operator when it must be differentiable or batchable. Its
    composite kernel also serves torch's legacy batching (``is_grads_batched``).
    """
    torch.library.impl(
        "hbn::hybrid_batch_norm_gradients",
        ("CompositeImplicitAutograd", "Batched"),
        _gradient_composition,
    )


def build_compiled_kernel() -> pathlib.Path:
    """Build (if needed) and load ``hbn::hybrid_batch_norm``; return its build directory.

    The ahead-of-time build for clusters and CI: run ``python -m backends.torch build`` once
    per environment (on a shared file system, once for all the nodes that use it) before
    training starts, and no training process builds or waits. Processes that share the
    directory (:func:`compiled_kernel_directory`) build one at a time; a process waits for
    another's build at most ``HBN_TORCH_BUILD_TIMEOUT`` seconds (default 120).

    Raises
    ------
    RuntimeError
        With the reason, if the operator cannot be built or loaded (no compiler or ``ninja``,
        a build error, another build holding the lock past the timeout, or a lock left by a
        process that died during a build).
    ValueError
        If ``HBN_TORCH_BUILD_TIMEOUT`` is not a non-negative number.
    """
    directory = compiled_kernel_directory()
    reason = _load_compiled_kernel(directory, _build_timeout())
    if reason is not None:
        raise RuntimeError(reason)
    _register_gradient_composition()
    return directory


@functools.cache
def compiled_kernel_available() -> bool:
    """Whether ``hbn::hybrid_batch_norm``, the layer's C++ training operator, is loaded.

    The first call builds it with :func:`build_compiled_kernel` (a C++ compiler and ``ninja``;
    about 10 seconds, once per environment, cached in :func:`compiled_kernel_directory`) and
    loads it. Where it cannot be built, or another process's build holds the lock longer than
    ``HBN_TORCH_BUILD_TIMEOUT`` seconds (default 120), it warns once and returns False, and the
    layers train on the Python fast path: the same math and kernels, with a higher fixed cost
    per call.
    """
    try:
        build_compiled_kernel()
    except RuntimeError as error:
        warnings.warn(
            f"HBN's C++ operator could not be built ({error}); HybridBatchNorm trains on its "
            "Python fast path, which costs more per call on small tensors. "
            "`python -m backends.torch build` builds it ahead of time.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


_STATE = ("weight", "bias", "alpha", "global_mean", "global_var")


def _state(module: HybridBatchNorm) -> tuple[Any, ...]:
    """``weight``, ``bias``, ``alpha``, ``global_mean`` and ``global_var`` of ``module``.

    From nn.Module's dicts: its ``__getattr__`` costs about 0.4 us a name, and the compiled
    path's whole fixed cost is a few tens of us. A name is missing from them when
    ``torch.nn.utils.parametrize`` or ``torch.nn.utils.prune`` has replaced it by a computed
    tensor; then every name is read by attribute access, which computes it.
    """
    parameters, buffers = module._parameters, module._buffers
    try:
        return (
            parameters["weight"],
            parameters["bias"],
            parameters["alpha"],
            buffers["global_mean"],
            buffers["global_var"],
        )
    except KeyError:
        return tuple(getattr(module, name) for name in _STATE)


def _fused_function_applies() -> bool:
    """Whether the Python form of the fast path can run here.

    Not under ``torch.func.vmap``: torch's fused statistics kernel has no batch rule. Not under
    ``torch.export``, which traces the Function's forward with gradients on, where torch's
    inference kernel refuses statistics that require grad. The core path serves both.
    """
    if torch.compiler.is_exporting():
        return False
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return True
    vmap = torch._C._functorch.TransformType.Vmap
    levels = torch._C._functorch.get_interpreter_stack() or ()
    return all(level.key() != vmap for level in levels)


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

    The constructor is :class:`torch.nn.BatchNorm2d`'s:

    Parameters
    ----------
    num_features
        :math:`C`, the number of channels.
    eps
        Added to the variance: positive and finite in training, non-negative and finite in
        eval mode, as torch's BatchNorm requires (checked at each call, as torch does).
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
    bias
        Keyword only: with ``affine=True``, whether the layer has the learnable ``bias``; when
        False, ``bias`` is None and :math:`\beta = 0`, as in torch.

    Attributes
    ----------
    weight, bias : torch.nn.Parameter or None
        :math:`\gamma` (ones) and :math:`\beta` (zeros), ``(C,)``; None when ``affine=False``
        (and ``bias`` None when ``bias=False``).
    alpha : torch.nn.Parameter
        The hybrid factor :math:`\alpha` (zeros: half batch, half global), ``(C,)``.
    global_mean, global_var : torch.Tensor
        Buffers, zeros and ones, ``(C,)``; ``global_var`` is a biased variance. Set them with
        :func:`set_global_statistics`.

    Notes
    -----
    Unlike torch's BatchNorm, a training batch with one value per channel is allowed: its
    batch variance is 0, and the global half of the mixture still normalises it. A training
    batch with no element gives an empty output, as torch's BatchNorm does, and leaves the
    running statistics as they are (``num_batches_tracked`` still counts it, as torch's does).
    """

    _input_ranks: ClassVar[tuple[int, ...] | None] = None
    use_fused_kernels: bool = True
    """Train with torch's fused batch-norm kernels fed with the core's statistics (the fast
    path) where they apply: float32 or float64 input with parameters and buffers of its dtype,
    on CPU or CUDA, outside ``torch.func.vmap`` and ``torch.export``. Otherwise, or when set to
    False, the layer calls hbn_core's forward and backward directly. All paths compute the same
    math and pass the same tests."""
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
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.alpha = nn.Parameter(torch.empty(num_features, **factory))
        self.register_buffer("global_mean", torch.empty(num_features, **factory))
        self.register_buffer("global_var", torch.empty(num_features, **factory))
        if track_running_stats:
            self.register_buffer("running_mean", torch.empty(num_features, **factory))
            self.register_buffer("running_var", torch.empty(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.empty((), dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._collector: _Collector | None = None
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running statistics back to torch's start: mean 0, variance 1, no batch tracked."""
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.zero_()
                self.running_var.fill_(1)
                self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Every parameter and buffer back to its initial value, as the constructor sets it.

        ``weight`` 1, ``bias`` 0, ``alpha`` 0, ``global_mean`` 0, ``global_var`` 1, and
        :meth:`reset_running_stats`.
        """
        self.reset_running_stats()
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1)
            if self.bias is not None:
                self.bias.zero_()
            self.alpha.zero_()
            self.global_mean.zero_()
            self.global_var.fill_(1)

    def extra_repr(self) -> str:
        """The constructor arguments, as torch's BatchNorm shows them."""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
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

    def _refuse_eps(self, *, training: bool) -> None:
        """Raise the ``ValueError`` for an ``eps`` that this mode cannot normalise with.

        As torch's BatchNorm: positive in training, non-negative in eval; and finite.
        """
        expected = "positive and finite during training" if training else "non-negative and finite"
        msg = f"{type(self).__name__}: eps must be {expected}; got {self.eps!r}"
        raise ValueError(msg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x``: hybrid statistics in training mode, global ones in eval mode."""
        self._check_input(x)
        if self._collector is not None:
            return self._collector.record(self, x)
        if self.training:
            return self._hybrid(x, update_running_stats=self.track_running_stats)
        return self._inference(x)

    def _hybrid(self, x: torch.Tensor, *, update_running_stats: bool) -> torch.Tensor:
        eps = self.eps
        if not 0 < eps < math.inf:
            self._refuse_eps(training=True)
        weight, bias, alpha, global_mean, global_var = _state(self)
        if x.numel() == 0:
            return self._empty_batch(
                x, weight, bias, alpha, update_running_stats=update_running_stats
            )
        fused = self._fused_kernels_apply(x, alpha, global_mean, global_var)
        if fused and self._compiled_kernel_applies(x, weight, bias, update_running_stats):
            if weight is None or bias is None:
                weight, bias = self._affine(weight, bias, alpha)
            buffers = self._buffers
            running = ("running_mean", "running_var", "num_batches_tracked")
            return torch.ops.hbn.hybrid_batch_norm.default(
                x, weight, bias, alpha, global_mean, global_var,
                *(buffers[name] if update_running_stats else None for name in running),
                self.momentum, eps,
            )  # fmt: skip
        scale, offset = self._affine(weight, bias, alpha)
        if fused and _fused_function_applies():
            batch_mean, batch_var = torch.batch_norm_update_stats(x.detach(), None, None, 0.0)
            y = _FusedHybridBatchNormFunction.apply(
                x, scale, offset, alpha, batch_mean, batch_var, global_mean, global_var, eps
            )
        else:
            y, *residuals = _HybridBatchNormFunction.apply(
                x, scale, offset, alpha, global_mean, global_var, eps
            )
            gaps = HBNResiduals(*residuals)
            batch_mean = global_mean - gaps.mean_gap.reshape(-1)
            batch_var = global_var - gaps.var_gap.reshape(-1)
        if update_running_stats:
            self._update_running_stats(batch_mean, batch_var, x.numel() // self.num_features)
        return y

    @staticmethod
    def _affine(
        weight: torch.Tensor | None, bias: torch.Tensor | None, alpha: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\gamma` and :math:`\beta`: ``weight`` and ``bias``, or 1 and 0 without them."""
        scale = torch.ones_like(alpha) if weight is None else weight
        return scale, torch.zeros_like(alpha) if bias is None else bias

    def _empty_batch(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        alpha: torch.Tensor,
        *,
        update_running_stats: bool,
    ) -> torch.Tensor:
        """The output of a batch without elements: empty, as torch's BatchNorm gives it.

        As torch's, it is computed from every learnable parameter (``weight``, ``bias`` and
        ``alpha`` here), which all get zero gradients, and the batch counts in
        ``num_batches_tracked`` while the running statistics stay.
        """
        if update_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
        shape = (1, -1) + (1,) * (x.dim() - 2)

        def per_channel(p: torch.Tensor) -> torch.Tensor:
            return p.to(x.dtype).view(shape)

        y = x + per_channel(alpha)  # empty: no value is mixed, alpha only takes part
        y = y if weight is None else y * per_channel(weight)
        return y if bias is None else y + per_channel(bias)

    def _fused_kernels_apply(
        self,
        x: torch.Tensor,
        alpha: torch.Tensor,
        global_mean: torch.Tensor,
        global_var: torch.Tensor,
    ) -> bool:
        """Whether torch's fused batch-norm kernels serve this call (one float dtype, CPU/CUDA).

        Its Python form also needs :func:`_fused_function_applies`, which the caller checks
        last.
        """
        dtype = x.dtype
        return (
            self.use_fused_kernels
            and dtype in (torch.float32, torch.float64)
            and x.device.type in ("cpu", "cuda")
            and alpha.dtype is dtype
            and global_mean.dtype is dtype
            and global_var.dtype is dtype
        )

    def _compiled_kernel_applies(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        update_running_stats: bool,
    ) -> bool:
        """Whether the C++ operator serves this fused call: CPU, eager, no functorch.

        It needs ``weight``, ``bias`` and the running statistics in the input's dtype, and an
        int64 ``num_batches_tracked`` (FedAvg can leave a float one, which the Python path
        takes, as torch's BatchNorm does).
        """
        dtype, buffers = x.dtype, self._buffers
        running_mean = buffers["running_mean"] if update_running_stats else None
        return (
            self.use_compiled_kernel
            and x.is_cpu
            and (weight is None or weight.dtype is dtype)
            and (bias is None or bias.dtype is dtype)
            and (
                running_mean is None
                or (
                    running_mean.dtype is dtype
                    and buffers["running_var"].dtype is dtype
                    and buffers["num_batches_tracked"].dtype is torch.int64
                )
            )
            and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
            and compiled_kernel_available()
        )

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps
        if not 0 <= eps < math.inf:
            self._refuse_eps(training=False)
        scale, offset = self._affine(self.weight, self.bias, self.alpha)
        return hbn_core.hbn_inference(
            x, scale, offset, self.global_mean, self.global_var, eps=eps, xp=torch_xp
        )

    @torch.no_grad()
    def _update_running_stats(
        self, batch_mean: torch.Tensor, batch_var: torch.Tensor, count: int
    ) -> None:
        """Torch's running-statistics update from the forward's batch statistics.

        ``batch_var`` is biased; ``running_var`` averages Bessel-corrected variances, as in torch.
        A float ``num_batches_tracked`` (an average of several models' counts) counts on, as in
        torch.
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
    ``eps``, ``momentum``, ``affine``, ``bias`` (present or not) and ``track_running_stats``,
    its device and dtype, and its ``weight`` and ``bias``. ``alpha`` starts at 0.

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
    HybridBatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
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
        bias=bn.bias is not None,
    )
    if bn.weight is not None:
        layer.weight.copy_(bn.weight)
    if bn.bias is not None:
        layer.bias.copy_(bn.bias)
    if bn.track_running_stats:
        layer.global_mean.copy_(bn.running_mean)
        layer.global_var.copy_(bn.running_var)
        layer.running_mean.copy_(bn.running_mean)
        layer.running_var.copy_(bn.running_var)
        layer.num_batches_tracked.copy_(bn.num_batches_tracked)
    layer.train(bn.training)
    return layer


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m backends.torch build``: build the C++ operator ahead of time.

    Prints the build directory and returns 0; prints one line and returns 1 if the operator
    cannot be built, 2 on a wrong command line.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["build"]:
        print(f"usage: python -m backends.torch build (got {' '.join(args) or 'no command'})",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        directory = build_compiled_kernel()
    except (RuntimeError, ValueError) as error:
        print(f"error: HBN's C++ operator could not be built: {error}", file=sys.stderr)
        return 1
    print(f"hbn::hybrid_batch_norm is built and loads from {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
