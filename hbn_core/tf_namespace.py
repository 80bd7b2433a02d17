"""An array namespace for TensorFlow tensors: exactly the functions :mod:`hbn_core` calls.

TensorFlow tensors have no Array API namespace (``array_api_compat.array_namespace`` rejects
them), so the core looks this module up itself when it receives a TensorFlow tensor; users
never need to pass it. It is written over plain ``tf`` ops, so it works eagerly, inside
``tf.function`` and under XLA (``jit_compile=True``), and whatever Keras backend is set.
Importing it imports TensorFlow; ``import hbn_core`` does not.

Each function follows the Array API standard's signature for the arguments the core uses
(:class:`hbn_core._typing.ArrayNamespace`). It does not call
``tf.experimental.numpy.experimental_enable_numpy_behavior``, which would change dtype
promotion for the whole process.

Examples
--------
>>> import tensorflow as tf
>>> from hbn_core import moments
>>> m = moments(tf.constant([[1.0, 10.0], [3.0, 30.0]]))
>>> m.mean.numpy().tolist()
[2.0, 20.0]
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import tensorflow as tf

__all__ = [
    "all",
    "any",
    "asarray",
    "astype",
    "exp",
    "float32",
    "int64",
    "isdtype",
    "isfinite",
    "ones_like",
    "reshape",
    "result_type",
    "sqrt",
    "stack",
    "sum",
    "where",
]

float32 = tf.float32
int64 = tf.int64

exp = tf.math.exp
sqrt = tf.math.sqrt
isfinite = tf.math.is_finite
ones_like = tf.ones_like


def asarray(obj: Any, /, *, dtype: tf.DType | None = None) -> tf.Tensor:
    """Convert ``obj`` to a tensor; Python ints become int64, as in NumPy."""
    if dtype is None and isinstance(obj, int) and not isinstance(obj, bool):
        dtype = tf.int64
    return tf.convert_to_tensor(obj, dtype=dtype)


def astype(x: tf.Tensor, dtype: tf.DType, /, *, copy: bool = True) -> tf.Tensor:  # noqa: ARG001
    """Cast ``x`` to ``dtype``. TensorFlow tensors are immutable, so ``copy`` has no effect."""
    return tf.cast(x, dtype)


def isdtype(
    dtype: tf.DType, kind: Literal["bool", "integral", "real floating", "numeric"], /
) -> bool:
    """Whether ``dtype`` is of ``kind``, among the kinds the core asks about."""
    dtype = tf.as_dtype(dtype)
    kinds = {
        "bool": dtype.is_bool,
        "integral": dtype.is_integer,
        "real floating": dtype.is_floating,
        "numeric": dtype.is_integer or dtype.is_floating or dtype.is_complex,
    }
    return bool(kinds[kind])


def result_type(*arrays_and_dtypes: tf.Tensor | tf.DType) -> tf.DType:
    """The promoted dtype, with NumPy's promotion rules (``bfloat16`` promotes like float16)."""
    dtypes = [tf.as_dtype(getattr(a, "dtype", a)) for a in arrays_and_dtypes]
    as_numpy = [np.float16 if d == tf.bfloat16 else d.as_numpy_dtype for d in dtypes]
    promoted = tf.as_dtype(np.result_type(*as_numpy))
    if promoted == tf.float16 and tf.bfloat16 in dtypes:
        return tf.float32
    return promoted


def reshape(x: tf.Tensor, /, shape: tuple[int, ...]) -> tf.Tensor:
    """Reshape ``x`` to ``shape`` (one entry may be -1)."""
    return tf.reshape(x, shape)


def stack(arrays: list[tf.Tensor] | tuple[tf.Tensor, ...], /, *, axis: int = 0) -> tf.Tensor:
    """Stack tensors of one shape along a new ``axis``."""
    return tf.stack(list(arrays), axis=axis)


def sum(
    x: tf.Tensor, /, *, axis: int | tuple[int, ...] | None = None, keepdims: bool = False
) -> tf.Tensor:
    """Sum over ``axis`` (all axes when None)."""
    return tf.math.reduce_sum(
        x, axis=None if axis is None else list(_tuple(axis)), keepdims=keepdims
    )


def any(x: tf.Tensor, /) -> tf.Tensor:
    """Whether any element is true (nonzero)."""
    return tf.math.reduce_any(tf.cast(x, tf.bool))


def all(x: tf.Tensor, /) -> tf.Tensor:
    """Whether every element is true (nonzero)."""
    return tf.math.reduce_all(tf.cast(x, tf.bool))


def where(condition: tf.Tensor, x1: tf.Tensor, x2: tf.Tensor, /) -> tf.Tensor:
    """Elementwise ``x1`` where ``condition`` holds, else ``x2``, with broadcasting."""
    return tf.where(condition, x1, x2)


def _tuple(axis: int | tuple[int, ...]) -> tuple[int, ...]:
    return (axis,) if isinstance(axis, int) else axis
