"""What the contract's records share: the error type, exact equality, typed-value checks and the
tensor storage hooks of ``to_json``/``from_json`` (numpy only)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["F32", "GraphError", "Record", "TensorGet", "TensorPut", "inline_get", "inline_put"]

F32 = np.float32

TensorPut = Callable[[str, NDArray[Any], Any], Any]
"""``put(name, array, codes_spec)``: store an array, return its JSON reference. ``codes_spec``
is the :class:`~lowbit.contract.CodeSpec` of integer weight codes (None for float arrays)."""
TensorGet = Callable[[Any, str, bool], NDArray[Any]]
"""``get(ref, where, codes)``: the array a JSON reference names (``codes``: integer codes)."""


class GraphError(ValueError):
    """A contract value or graph that is not well formed; the message names the node."""


def inline_put(name: str, array: NDArray[Any], codes_spec: Any = None) -> Any:
    """The default store: arrays inline in the JSON, as (nested) lists."""
    return np.asarray(array).tolist()


def inline_get(ref: Any, where: str, codes: bool = False) -> NDArray[Any]:
    """Reads what :func:`inline_put` wrote (numbers or nested lists of numbers)."""
    try:
        arr = np.asarray(ref, dtype=np.int64 if codes else F32)
    except (TypeError, ValueError, OverflowError):
        raise GraphError(f"{where} must be an array of numbers") from None
    if codes and not np.array_equal(arr, np.asarray(ref, dtype=np.float64)):
        raise GraphError(f"{where}: codes must be integers")
    return arr


def is_int(v: Any) -> bool:
    """An int (Python or numpy) that is not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return False
        kinds = a.dtype.kind == b.dtype.kind  # int8 and int32 codes of equal values are equal
        return kinds and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b) and type(a) is type(b)


class Record:
    """A dataclass whose equality compares arrays exactly (kind of dtype, shape and values)."""

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(
            _same(getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        )

    __hash__ = None  # type: ignore[assignment]


def frozen_array(value: Any, dtype: Any = F32) -> NDArray[Any]:
    """A read-only copy of ``value`` as an array of ``dtype``."""
    arr = np.array(value, dtype=dtype)
    arr.setflags(write=False)
    return arr
