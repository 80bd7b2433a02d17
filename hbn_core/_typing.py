"""Types shared by the core: arrays, and the array namespace the core calls.

Arrays are typed as ``Any`` (as array-api-extra does): NumPy, array-api-strict, PyTorch, JAX and
TensorFlow arrays share no common static type. The namespace, on the other hand, is a
:class:`typing.Protocol` that lists exactly the functions the core calls. Every namespace that
:func:`array_api_compat.array_namespace` returns provides them, and so does
:mod:`hbn_core.tf_namespace`, written for TensorFlow tensors.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, TypeAlias

__all__ = ["Array", "ArrayNamespace", "DType"]

Array: TypeAlias = Any
"""An array of any library the core supports."""

DType: TypeAlias = Any
"""A dtype object of the array's namespace (for example ``xp.float32``)."""

DTypeKind: TypeAlias = Literal["bool", "integral", "real floating", "numeric"]


class ArrayNamespace(Protocol):
    """The subset of the Python Array API standard that :mod:`hbn_core` calls."""

    float32: DType
    float64: DType
    int64: DType

    def asarray(self, obj: Any, /, *, dtype: DType | None = None) -> Array: ...
    def astype(self, x: Array, dtype: DType, /, *, copy: bool = True) -> Array: ...
    def isdtype(self, dtype: DType, kind: DTypeKind, /) -> bool: ...
    def result_type(self, *arrays_and_dtypes: Array | DType) -> DType: ...
    def reshape(self, x: Array, /, shape: tuple[int, ...]) -> Array: ...
    def stack(self, arrays: list[Array] | tuple[Array, ...], /, *, axis: int = 0) -> Array: ...
    def sum(
        self, x: Array, /, *, axis: int | tuple[int, ...] | None = None, keepdims: bool = False
    ) -> Array: ...
    def where(self, condition: Array, x1: Array, x2: Array, /) -> Array: ...
    def ones_like(self, x: Array, /) -> Array: ...
    def exp(self, x: Array, /) -> Array: ...
    def sqrt(self, x: Array, /) -> Array: ...
    def any(self, x: Array, /) -> Array: ...
    def all(self, x: Array, /) -> Array: ...
    def isfinite(self, x: Array, /) -> Array: ...
