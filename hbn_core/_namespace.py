"""Find the one array namespace of a call's arrays, naming the argument that does not fit."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, cast

import array_api_compat

if TYPE_CHECKING:
    from hbn_core._typing import Array, ArrayNamespace

__all__ = ["concrete", "is_tensorflow_array", "namespace_of"]


def is_tensorflow_array(x: object) -> bool:
    """Whether ``x`` is a TensorFlow tensor or variable, found without importing TensorFlow."""
    return type(x).__module__.partition(".")[0] == "tensorflow"


def _library_name(xp: ArrayNamespace) -> str:
    name = str(getattr(xp, "__name__", type(xp).__name__))
    return {"hbn_core.tf_namespace": "tensorflow"}.get(name, name.removeprefix("array_api_compat."))


def _namespace_of_one(name: str, value: object) -> ArrayNamespace:
    if is_tensorflow_array(value):
        return cast("ArrayNamespace", importlib.import_module("hbn_core.tf_namespace"))
    try:
        return cast("ArrayNamespace", array_api_compat.array_namespace(value))
    except TypeError:
        msg = (
            f"`{name}` must be an array of NumPy, array-api-strict, PyTorch, JAX or TensorFlow; "
            f"got {type(value).__module__}.{type(value).__qualname__}."
        )
        raise TypeError(msg) from None


def namespace_of(arrays: dict[str, Array], xp: ArrayNamespace | None = None) -> ArrayNamespace:
    """Return the array namespace shared by every array in ``arrays``.

    Parameters
    ----------
    arrays
        The call's array arguments, keyed by argument name; the first one is the reference.
    xp
        A namespace the caller chose. It is returned unchecked: the caller takes responsibility
        for it serving every array.

    Raises
    ------
    TypeError
        If an argument is not an array of a supported library, or if two arguments come from
        different libraries. The message names the argument.
    """
    if xp is not None:
        return xp
    (first_name, first), *others = arrays.items()
    reference = _namespace_of_one(first_name, first)
    for name, value in others:
        found = _namespace_of_one(name, value)
        if found is not reference:
            msg = (
                f"`{name}` must come from the same array library as `{first_name}` "
                f"({_library_name(reference)}); got an array of {_library_name(found)}."
            )
            raise TypeError(msg)
    return reference


def concrete(x: Any) -> bool:
    """Whether the values of ``x`` can be read cheaply and eagerly (not traced, not lazy).

    JAX arrays always count as lazy (they may be tracers), and so do TensorFlow tensors (they
    may be symbolic inside ``tf.function``): value checks are skipped for them.
    """
    return not (is_tensorflow_array(x) or array_api_compat.is_lazy_array(x))
