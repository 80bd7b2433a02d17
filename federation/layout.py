"""The canonical layout: how every model state crosses the client/server boundary.

A state is one flat ``dict[str, numpy.ndarray]`` with torch-style dotted names, whatever the
framework that produced it:

========================  =====================  ==============================================
tensor                    canonical shape         note
========================  =====================  ==============================================
``conv.weight``           ``(out, in, kh, kw)``   OIHW; Flax and Keras hold HWIO
``dense.weight``          ``(out, in)``           Flax and Keras hold ``(in, out)``
``dense.weight`` after a  ``(out, C*H*W)``        inputs flattened in ``(C, H, W)`` order; a
flatten                                           channels-last framework flattens ``(H, W, C)``
``*.bias``, norm vectors  ``(C,)``
========================  =====================  ==============================================

Each tensor has a :class:`Role`, which the model's layer types decide (never a name pattern):

- ``shared``: learnable parameters averaged by FedAvg (and a BatchNorm baseline's running
  statistics, which FedAvg+BN averages like weights: that is the baseline).
- ``statistics``: HBN's ``global_mean`` and ``global_var``, set by the server from pooled
  :class:`hbn_core.Moments`, never averaged.
- ``personal``: HBN's ``alpha``, and FedBN's norm-layer tensors; they stay on their client.
- ``counter``: framework-local counters such as torch's ``num_batches_tracked``. They are not
  in the canonical layout at all: never sent, never averaged, reset when a client loads a model.

Channels-last frameworks convert at the boundary with :func:`to_channels_last` and
:func:`from_channels_last`; the round trip is exact (a permutation of elements).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "HBNPart",
    "HBNTensor",
    "Layout",
    "Role",
    "State",
    "TensorSpec",
    "check_state",
    "from_channels_last",
    "select",
    "to_channels_last",
]

State = dict[str, np.ndarray]


class Role(enum.StrEnum):
    """What the server does with a tensor (see the module docstring)."""

    SHARED = "shared"
    STATISTICS = "statistics"
    PERSONAL = "personal"
    COUNTER = "counter"


class Kind(enum.StrEnum):
    """How a tensor is laid out, which is what channels-last conversion needs to know."""

    VECTOR = "vector"
    CONV_KERNEL = "conv_kernel"
    DENSE_KERNEL = "dense_kernel"


class HBNPart(enum.StrEnum):
    """Which of an HBN layer's own tensors a tensor is."""

    GLOBAL_MEAN = "global_mean"
    GLOBAL_VAR = "global_var"
    ALPHA = "alpha"


class HBNTensor(NamedTuple):
    """An HBN layer's tensor: the layer's canonical name and which part it is.

    ``positions`` is the layer's values per channel for one example (1 after a dense layer,
    the map's ``H * W`` after a convolution), where the model declares it: a client's report
    forwarding ``e`` examples must then count ``e * positions`` elements.
    """

    layer: str
    part: HBNPart
    positions: int | None = None


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of the canonical layout.

    Attributes
    ----------
    shape
        Its canonical shape.
    role
        What the server does with it.
    kind
        Its layout kind, for conversion to and from channels-last frameworks.
    flatten_from
        For the kernel of a dense layer that follows a flatten: the ``(C, H, W)`` shape that was
        flattened. ``None`` otherwise.
    hbn
        For an HBN layer's global mean, global variance and alpha: the layer and the part.
        The server finds the HBN layers, whose statistics it pools, from this field alone.
        ``None`` otherwise.
    """

    shape: tuple[int, ...]
    role: Role
    kind: Kind = Kind.VECTOR
    flatten_from: tuple[int, int, int] | None = None
    hbn: HBNTensor | None = None


Layout = dict[str, TensorSpec]


def select(layout: Mapping[str, TensorSpec], *roles: Role) -> list[str]:
    """The names in ``layout`` whose role is one of ``roles``, in layout order."""
    return [name for name, spec in layout.items() if spec.role in roles]


def check_state(
    state: Mapping[str, np.ndarray], layout: Mapping[str, TensorSpec], *, names: list[str]
) -> None:
    """Check that ``state`` holds exactly ``names``, with their layout's shapes, all finite.

    Raises
    ------
    ValueError
        If a name is missing or unknown, a shape differs from the layout, or a value is not
        finite. The message names the tensor.
    TypeError
        If a value is not a floating-point NumPy array.
    """
    if set(state) != set(names):
        missing = sorted(set(names) - set(state))
        unknown = sorted(set(state) - set(names))
        msg = (
            f"the state must hold exactly {len(names)} tensors; "
            f"missing {missing}, unknown {unknown}."
        )
        raise ValueError(msg)
    for name in names:
        value = state[name]
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
            kind = getattr(value, "dtype", type(value).__name__)
            msg = f"`{name}` must be a floating-point numpy.ndarray; got {kind}."
            raise TypeError(msg)
        if value.shape != layout[name].shape:
            msg = f"`{name}` must have shape {layout[name].shape}; got {value.shape}."
            raise ValueError(msg)
        if not np.isfinite(value).all():
            msg = f"`{name}` holds non-finite values (NaN or inf)."
            raise ValueError(msg)


def to_channels_last(value: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """A canonical tensor in the layout of Flax and Keras (HWIO kernels, ``(in, out)`` dense)."""
    if spec.kind is Kind.CONV_KERNEL:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if spec.kind is Kind.DENSE_KERNEL:
        if spec.flatten_from is not None:
            channels, height, width = spec.flatten_from
            out = value.shape[0]
            value = value.reshape(out, channels, height, width).transpose(0, 2, 3, 1)
            value = value.reshape(out, -1)
        return np.ascontiguousarray(value.T)
    return value


def from_channels_last(value: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The inverse of :func:`to_channels_last`: a Flax or Keras tensor in canonical layout."""
    if spec.kind is Kind.CONV_KERNEL:
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if spec.kind is Kind.DENSE_KERNEL:
        value = value.T
        if spec.flatten_from is not None:
            channels, height, width = spec.flatten_from
            out = value.shape[0]
            value = value.reshape(out, height, width, channels).transpose(0, 3, 1, 2)
            value = value.reshape(out, -1)
        return np.ascontiguousarray(value)
    return value
