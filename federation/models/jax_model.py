"""The reference models in Flax NNX, behind :class:`federation.models.FrameworkModel`.

The network works channels-last: images arrive in canonical NCHW and are transposed to NHWC
inside, and every tensor crosses the boundary through :func:`federation.layout.to_channels_last`
and :func:`federation.layout.from_channels_last` (HWIO conv kernels, ``(in, out)`` dense
kernels, and the flatten permutation of the first dense layer after a flatten). Its attributes
carry the canonical layer names (``conv1``, ``norm1``, ``fc1``, ...); within a layer, Flax's
names map to the canonical ones as below.

==============================  ====================================================
canonical                       Flax NNX
==============================  ====================================================
conv and dense ``weight``       ``kernel``
norm ``weight``                 ``scale``
BatchNorm ``running_mean/var``  ``mean``, ``var`` (``nnx.BatchStat``)
HBN ``alpha``                   ``alpha`` (``nnx.Param``; ``FixedAlpha`` for FBN)
HBN ``global_mean/var``         ``global_mean``, ``global_var`` (``GlobalStatistic``)
==============================  ====================================================

Training and evaluation run as module-level :func:`jax.jit` functions of the split model state,
so every model of one spec shares them. They compile once per spec, batch shape and optimiser
structure (clipping on or off, momentum on or off): the learning rate and the other
hyperparameters are traced arguments, so a new value does not recompile. Training with
frozen BatchNorm statistics is another graph (BatchNorm's ``use_running_average``), compiled
once more.

Warnings
--------
A BatchNorm baseline's canonical ``running_var`` is what each framework tracks: Flax averages
the biased batch variance into it, torch the unbiased one (``n / (n - 1)`` larger). The
difference is left as it is; the running statistics only serve inference.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from backends import flax as hbn_flax
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

__all__ = ["FixedAlpha", "JaxModel", "build", "flax_layout", "flax_moments"]

# Flax's attribute for each canonical tensor name that differs from it, by layer kind.
_FLAX_NAMES = {
    "conv": {"weight": "kernel"},
    "dense": {"weight": "kernel"},
    "norm": {"weight": "scale", "running_mean": "mean", "running_var": "var"},
}
# torch's BatchNorm momentum 0.1 weights the new batch; Flax's momentum weights the old average.
_BATCHNORM_MOMENTUM = 1.0 - 0.1


class FixedAlpha(nnx.Variable[jax.Array]):
    r"""FBN's HBN ``alpha``, held at :math:`+\infty`: a Variable but not an ``nnx.Param``.

    The optimiser updates only ``nnx.Param`` leaves. As one, alpha would meet optax's
    ``add_decayed_weights``, whose :math:`\lambda \cdot \infty` is NaN at :math:`\lambda = 0`
    and an infinite step otherwise.
    """


def _hbn(spec: ModelSpec, channels: int, options: dict[str, Any]) -> hbn_flax.HybridBatchNorm:
    r"""An HBN layer; FBN's (``spec.hybrid == "global"``) has alpha fixed at :math:`+\infty`.

    Its training forward then normalises with the global statistics only: the weight on them is
    :math:`w = \operatorname{sigmoid}(+\infty) = 1`, exactly.
    """
    dtype = jnp.dtype(spec.dtype)
    layer = hbn_flax.HybridBatchNorm(channels, dtype=dtype, **options)
    if spec.hybrid == "global":
        layer.alpha = FixedAlpha(jnp.full((channels,), jnp.inf, dtype))
    return layer


def _norm(spec: ModelSpec, channels: int, rngs: nnx.Rngs) -> nnx.Module:
    dtype = jnp.dtype(spec.dtype)
    options: dict[str, Any] = {"epsilon": spec.eps, "param_dtype": dtype, "rngs": rngs}
    if spec.norm == "hbn":
        return _hbn(spec, channels, options)
    # The two-pass variance (as torch computes it) rather than E[x^2] - E[x]^2: same maths,
    # no cancellation in float32.
    options.update(dtype=dtype, use_fast_variance=False)
    if spec.norm == "bn":
        batchnorm = nnx.BatchNorm(channels, momentum=_BATCHNORM_MOMENTUM, **options)
        # Flax keeps the running statistics in float32 whatever `param_dtype` says.
        batchnorm.mean = nnx.BatchStat(jnp.zeros((channels,), dtype))
        batchnorm.var = nnx.BatchStat(jnp.ones((channels,), dtype))
        return batchnorm
    # "ln" is GroupNorm with one group (channels and space per example), not nnx.LayerNorm.
    return nnx.GroupNorm(channels, num_groups=GROUPS[spec.norm], **options)


def _layer(spec: ModelSpec, layer: LayerSpec, rngs: nnx.Rngs) -> nnx.Module:
    dtype = jnp.dtype(spec.dtype)
    dtypes = {"dtype": dtype, "param_dtype": dtype, "rngs": rngs}
    if layer.kind == "conv":
        # Explicit padding: "SAME" is torch's padding=1 only for odd kernels at stride 1.
        padding = ((1, 1), (1, 1))
        return nnx.Conv(layer.in_features, layer.out_features, (3, 3), padding=padding, **dtypes)
    if layer.kind == "dense":
        return nnx.Linear(layer.in_features, layer.out_features, **dtypes)
    return _norm(spec, layer.out_features, rngs)


class _Network(nnx.Module):
    """Simple-CNN or MLP on NHWC inputs, with the spec's canonical layer names as attributes."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs) -> None:
        self.mlp = spec.architecture == "mlp"
        self.blocks = len(spec.channels)
        self.feature_norm = spec.feature_norm
        for layer in spec.layers():
            setattr(self, layer.name, _layer(spec, layer, rngs))

    def _norm_or_identity(self, name: str, x: jax.Array) -> jax.Array:
        norm = getattr(self, name, None)
        return x if norm is None else norm(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.mlp:
            x = nnx.relu(self._norm_or_identity("norm1", self.fc1(self._features(x))))
            return self.fc2(x)
        for index in range(1, self.blocks + 1):
            x = nnx.relu(self._norm_or_identity(f"norm{index}", getattr(self, f"conv{index}")(x)))
            x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        return self.fc2(nnx.relu(self.fc1(self._features(x))))

    def _features(self, x: jax.Array) -> jax.Array:
        r"""``x`` flattened to :math:`z \in \mathbb{R}^d` per example, for ``fc1``.

        With FedFN (``spec.feature_norm``) it is :math:`\sqrt{d}\, z / \max(\lVert z
        \rVert_2, 10^{-12})`, as torch's ``F.normalize(z, eps=1e-12) * sqrt(d)``.
        """
        z = x.reshape(x.shape[0], -1)
        if not self.feature_norm:
            return z
        norm = jnp.linalg.vector_norm(z, axis=1, keepdims=True)
        return z / jnp.maximum(norm, 1e-12) * math.sqrt(z.shape[1])


def _logits(network: _Network, images: jax.Array) -> jax.Array:
    """The network on canonical NCHW images."""
    return network(jnp.transpose(images, (0, 2, 3, 1)))


class _Hyperparameters(NamedTuple):
    """An :class:`SGDConfig` as scalars of the model's dtype; ``None`` leaves out a step."""

    lr: jax.Array
    weight_decay: jax.Array
    momentum: jax.Array | None
    clip_norm: jax.Array | None

    @classmethod
    def from_config(cls, sgd: SGDConfig, dtype: str) -> _Hyperparameters:
        def scalar(value: float) -> jax.Array:
            return jnp.asarray(value, dtype)

        return cls(
            scalar(sgd.lr),
            scalar(sgd.weight_decay),
            scalar(sgd.momentum) if sgd.momentum else None,
            None if sgd.clip_norm is None else scalar(sgd.clip_norm),
        )


def _optimizer(hyper: _Hyperparameters) -> optax.GradientTransformation:
    """``torch.optim.SGD`` after ``clip_grad_norm_``: clip, then coupled decay, then momentum."""
    if hyper.clip_norm is None:
        clip = optax.identity()
    else:
        clip = optax.clip_by_global_norm(hyper.clip_norm)
    return optax.chain(
        clip,
        optax.add_decayed_weights(hyper.weight_decay),
        optax.sgd(hyper.lr, momentum=hyper.momentum),
    )


@functools.partial(jax.jit, static_argnums=0)
def _train_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    opt_state: optax.OptState,
    images: jax.Array,
    labels: jax.Array,
    hyper: _Hyperparameters,
) -> tuple[nnx.State, nnx.State, optax.OptState, jax.Array]:
    """One SGD step on the mean cross-entropy; ``rest`` carries the updated BatchNorm stats."""

    def loss_fn(params: nnx.State) -> tuple[jax.Array, nnx.State]:
        # Fresh Variables at this trace level, so that BatchNorm may update its statistics.
        network = nnx.merge(graphdef, params, rest, copy=True)
        logits = _logits(network, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, nnx.split(network, nnx.Param, ...)[2]

    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = _optimizer(hyper).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss


@functools.partial(jax.jit, static_argnums=0)
def _evaluate_batch(
    graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and the number of correct predictions of one batch."""
    logits = _logits(nnx.merge(graphdef, state), images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
    return loss, (jnp.argmax(logits, axis=-1) == labels).sum()


def _as_arrays(batch: Batch, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = batch
    return np.asarray(images, dtype), np.asarray(labels, np.int32)


class JaxModel:
    """A reference model in Flax NNX (in the spec's dtype), driven by the federation.

    HBN layers are :class:`backends.flax.HybridBatchNorm`; BatchNorm is ``nnx.BatchNorm`` with
    momentum 0.9 (torch's 0.1); ``"gn"`` and ``"ln"`` are ``nnx.GroupNorm`` with 2 and 1 groups.
    """

    def __init__(self, spec: ModelSpec, *, seed: int) -> None:
        if spec.dtype == "float64" and not jax.config.read("jax_enable_x64"):
            msg = "a float64 model in JAX needs jax.config.update('jax_enable_x64', True) first."
            raise ValueError(msg)
        self.spec = spec
        self.layout = spec.layout()
        self._kinds = {layer.name: layer.kind for layer in spec.layers()}
        self.network = _Network(spec, rngs=nnx.Rngs(seed))
        self._batchnorms = [
            module
            for _, module in nnx.iter_modules(self.network)
            if isinstance(module, nnx.BatchNorm)
        ]

    def _variable(self, name: str) -> nnx.Variable[jax.Array]:
        layer, leaf = name.split(".")
        attribute = _FLAX_NAMES[self._kinds[layer]].get(leaf, leaf)
        return getattr(getattr(self.network, layer), attribute)

    def get_state(self) -> dict[str, np.ndarray]:
        """Every canonical tensor, copied to NumPy in canonical layout."""
        return {
            name: from_channels_last(np.asarray(self._variable(name)[...], self.spec.dtype), spec)
            for name, spec in self.layout.items()
        }

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load every canonical tensor (Flax keeps no framework-local counters)."""
        for name, spec in self.layout.items():
            value = to_channels_last(np.asarray(state[name], self.spec.dtype), spec)
            self._variable(name)[...] = jnp.asarray(value, self.spec.dtype)

    def collect_statistics(
        self, inputs: Iterable[np.ndarray], mode: CollectionMode
    ) -> dict[str, Moments]:
        """HBN input moments over ``inputs``, by :func:`backends.flax.collect_statistics`.

        The batches run eagerly. The HBN layers' paths in the network are their canonical names.
        """
        self.network.eval()
        batches = (jnp.asarray(images, self.spec.dtype) for images in inputs)
        return hbn_flax.collect_statistics(self.network, batches, mode=mode, forward=_logits)

    def train(
        self, batches: Iterable[Batch], sgd: SGDConfig, *, freeze_statistics: bool = False
    ) -> TrainResult:
        """SGD on ``batches`` with a fresh optimiser, as :class:`SGDConfig` says.

        ``freeze_statistics`` sets ``use_running_average`` on the BatchNorm layers: they
        normalise with their running statistics and leave them unchanged; scale and bias still
        train. The network is another graph then, so the step compiles once more.
        """
        self.network.train()
        for module in self._batchnorms:
            module.use_running_average = freeze_statistics
        graphdef, params, rest = nnx.split(self.network, nnx.Param, ...)
        hyper = _Hyperparameters.from_config(sgd, self.spec.dtype)
        opt_state = _optimizer(hyper).init(params)
        losses, sizes = [], []
        for batch in trainable_batches(batches, self.spec, freeze_statistics=freeze_statistics):
            images, labels = _as_arrays(batch, self.spec.dtype)
            params, rest, opt_state, loss = _train_step(
                graphdef, params, rest, opt_state, images, labels, hyper
            )
            losses.append(loss)
            sizes.append(len(labels))
        nnx.update(self.network, params, rest)
        loss_sum = sum(float(loss) * size for loss, size in zip(losses, sizes, strict=True))
        return TrainResult(loss_sum, sum(sizes), len(sizes))

    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        """Summed cross-entropy and correct predictions in inference mode."""
        self.network.eval()
        graphdef, state = nnx.split(self.network)
        loss_sum, correct, examples = 0.0, 0, 0
        for batch in batches:
            images, labels = _as_arrays(batch, self.spec.dtype)
            loss, hits = _evaluate_batch(graphdef, state, images, labels)
            loss_sum += float(loss)
            correct += int(hits)
            examples += len(labels)
        return EvalResult(loss_sum, correct, examples)


def build(spec: ModelSpec, *, seed: int) -> JaxModel:
    """Build ``spec`` in Flax NNX, its initial weights drawn from ``seed``."""
    return JaxModel(spec, seed=seed)


def _flax_variables(model: nnx.Module) -> dict[str, nnx.Variable[Any]]:
    """``model``'s floating-point variables by dotted path (``"block.norm.alpha"``)."""
    return {
        ".".join(map(str, path)): variable
        for path, variable in nnx.to_flat_state(nnx.state(model))
        if jnp.issubdtype(variable[...].dtype, jnp.floating)
    }


def flax_layout(model: nnx.Module) -> Layout:
    """The canonical layout of a Flax NNX model of your own with HBN layers.

    Names are the variables' dotted paths in ``nnx.state(model)`` (``"norm.alpha"``), shapes
    are Flax's (channels-last kernels: the layout serves Flax nodes). Each
    :class:`backends.flax.HybridBatchNorm`'s ``global_mean`` and ``global_var`` are
    ``statistics``, its ``alpha`` ``personal``, every other floating variable ``shared``
    (:func:`federation.models.native_tensor_spec`); RNG keys and counters are left out.
    """
    layers = {name for name, _ in hbn_flax.hbn_layers(model)}
    layout: Layout = {}
    for name, variable in _flax_variables(model).items():
        layer, _, local = name.rpartition(".")
        hbn = HBNTensor(layer, HBNPart(local)) if layer in layers and local in _HBN_PARTS else None
        layout[name] = native_tensor_spec(tuple(variable[...].shape), hbn=hbn)
    return layout


_HBN_PARTS = {part.value for part in HBNPart}


def flax_moments(
    model: nnx.Module,
    state: Mapping[str, np.ndarray],
    batches: Iterable[Any],
    *,
    mode: CollectionMode = "hybrid",
) -> tuple[dict[str, Moments], int]:
    """The statistics step on a Flax NNX model of your own: each HBN layer's input moments.

    ``state`` (tensors by the dotted paths of :func:`flax_layout`) is written into ``model``
    first, each cast to its variable's dtype; the model's other variables (its alpha) stay.
    ``batches`` (model inputs) then run through :func:`backends.flax.collect_statistics`.

    Returns the moments and examples and raises as :func:`~federation.models.check_known_names`
    describes.
    """
    variables = _flax_variables(model)
    check_known_names(state, variables, "floating variables of the model")
    for name, value in state.items():
        variables[name][...] = jnp.asarray(value, variables[name][...].dtype)
    examples = 0

    def counted() -> Iterator[jax.Array]:
        nonlocal examples
        for batch in batches:
            inputs = jnp.asarray(batch)
            examples += len(inputs)
            yield inputs

    return hbn_flax.collect_statistics(model, counted(), mode=mode), examples
