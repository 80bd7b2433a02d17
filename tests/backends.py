"""The array libraries the core is tested on, behind one small interface.

Tests draw data as float64 NumPy arrays (one Hypothesis strategy serves every library), move
them into the library under test with :meth:`Backend.asarray`, and read results back with
:meth:`Backend.to_numpy` to compare them with float64 NumPy oracles.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import array_api_compat
import array_api_compat.numpy
import numpy as np
import pytest

from hbn_core._namespace import is_tensorflow_array

# (name, module to import or None, marker); the marker selects the nox session.
BACKEND_PARAMS = [
    pytest.param(("numpy", None, "core"), id="numpy"),
    pytest.param(("numpy_readonly", None, "core"), id="numpy_readonly"),
    pytest.param(("array_api_strict", "array_api_strict", "core"), id="array_api_strict"),
    pytest.param(("torch", "torch", "torch"), id="torch", marks=pytest.mark.torch),
    pytest.param(("jax", "jax.numpy", "jax"), id="jax", marks=pytest.mark.jax),
    pytest.param(("tensorflow", "tensorflow", "tf"), id="tensorflow", marks=pytest.mark.tf),
]


class ReadOnlyNumpy:
    """NumPy's Array API namespace whose functions return read-only arrays.

    Passed explicitly as ``xp``, it makes any in-place write in the core fail loudly, as it
    would on immutable JAX arrays or on tensors that autograd saved.
    """

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(array_api_compat.numpy, name)
        if not callable(attribute) or isinstance(attribute, type):
            return attribute

        @functools.wraps(attribute)
        def read_only(*args: Any, **kwargs: Any) -> Any:
            return _freeze(attribute(*args, **kwargs))

        return read_only


def _freeze(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = value.view()
        value.flags.writeable = False
    elif isinstance(value, tuple):
        return (
            type(value)(*map(_freeze, value))
            if hasattr(value, "_fields")
            else tuple(map(_freeze, value))
        )
    return value


@dataclasses.dataclass(frozen=True)
class Backend:
    """One array library: its namespace, and conversions from and to NumPy."""

    name: str
    xp: Any
    explicit_xp: Any = None

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for core calls: ``xp`` only where it cannot be inferred."""
        return {} if self.explicit_xp is None else {"xp": self.explicit_xp}

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        """A copy of the NumPy array ``a`` in this library, optionally cast to ``dtype``."""
        a = np.array(a, dtype=dtype)
        if self.name == "numpy_readonly":
            return _freeze(a)
        if self.name == "tensorflow":
            import tensorflow as tf

            return tf.constant(a)
        return self.xp.asarray(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        """The values of ``a`` as a NumPy array, after checking that ``a`` is of this library."""
        assert self.owns(a), f"expected an array of {self.name}, got {type(a)}"
        if self.name == "torch":
            return a.detach().cpu().numpy()
        if self.name == "tensorflow":
            return a.numpy()
        return np.asarray(a)

    def vjp(self, fn: Any, args: list[Any], cotangent: Any) -> tuple[Any, ...]:
        """Gradients of ``sum(cotangent * fn(*args))`` by the library's own autodiff."""
        if self.name == "torch":
            import torch

            leaves = [a.detach().requires_grad_(True) for a in args]
            return torch.autograd.grad(
                fn(*leaves), leaves, grad_outputs=cotangent, allow_unused=True
            )
        if self.name == "jax":
            import jax

            _, pullback = jax.vjp(fn, *args)
            return pullback(cotangent)
        if self.name == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                tape.watch(args)
                output = fn(*args)
            return tuple(tape.gradient(output, args, output_gradients=cotangent))
        pytest.skip(f"{self.name} has no autodiff")

    def compile(self, fn: Any) -> Any:
        """``fn`` traced and compiled by the library (jax.jit, tf.function with XLA)."""
        if self.name == "jax":
            import jax

            return jax.jit(fn)
        if self.name == "tensorflow":
            import tensorflow as tf

            return tf.function(fn, jit_compile=True)
        pytest.skip(f"{self.name} is not traced here (torch.compile is tested with the adapter)")

    def owns(self, a: Any) -> bool:
        """Whether ``a`` is an array of this library."""
        if self.name == "tensorflow":
            return is_tensorflow_array(a)
        return array_api_compat.array_namespace(a) is self.xp


def make_backend(name: str) -> Backend:
    """The :class:`Backend` called ``name`` (its library must be importable)."""
    if name == "numpy":
        return Backend(name, array_api_compat.numpy)
    if name == "numpy_readonly":
        return Backend(name, array_api_compat.numpy, explicit_xp=ReadOnlyNumpy())
    if name == "tensorflow":
        return Backend(name, importlib.import_module("hbn_core.tf_namespace"))
    module = {"array_api_strict": "array_api_strict", "torch": "torch", "jax": "jax.numpy"}[name]
    sample = importlib.import_module(module).asarray(0.0)
    return Backend(name, array_api_compat.array_namespace(sample))


def assert_close(
    backend: Backend,
    actual: Any,
    expected: np.ndarray,
    *,
    rtol: float,
    atol: float = 0.0,
    dtype: str | None = None,
) -> None:
    """Check library, shape and dtype of ``actual``, then its values against ``expected``."""
    values = backend.to_numpy(actual)
    assert values.shape == np.shape(expected), f"shape {values.shape} != {np.shape(expected)}"
    if dtype is not None:
        assert str(values.dtype) == dtype, f"dtype {values.dtype} != {dtype}"
    np.testing.assert_allclose(values, expected, rtol=rtol, atol=atol)
