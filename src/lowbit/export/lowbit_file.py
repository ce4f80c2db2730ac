"""Write an inference :class:`~lowbit.contract.Graph` as a ``.lowbit`` file.

The layout is defined in :mod:`lowbit.runtime.loader` (the reader): one safetensors file whose
``__metadata__["lowbit"]`` is the JSON header (graph, shapes, methods, specs, tensor packings)
and whose tensors are the packed codes (uint8) and the float32 scales, biases, BatchNorm
parameters and float weights. Storage follows METHODS.md: binary codes at 1 bit (8 a byte),
ternary at 1.6 bits (5 trits a byte, or the 2-bit layout with ``ternary_layout="2bit"``), other
codes densely at their bit width; scales in float32. The file is written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from numpy.typing import NDArray

from .. import packing
from ..contract import CodeSpec, Graph
from ..runtime.loader import FORMAT, VERSION
from .files import write_atomic

__all__ = ["TERNARY_LAYOUTS", "code_packing", "graph_to_bytes", "write_graph"]

TERNARY_LAYOUTS = {"5trit": "ternary5", "2bit": "ternary2"}


def code_packing(spec: CodeSpec, ternary_layout: str = "5trit") -> dict[str, Any]:
    """The ``tensors`` entry (without shape) that stores codes of ``spec`` most compactly.

    ``binary`` -> 1 bit; ``ternary`` -> ``ternary5`` (1.6 bits) or ``ternary2``; any other
    scheme -> ``nbit`` with the fewest bits that hold ``[qmin, qmax]`` (signed when
    ``qmin < 0``), at most 8.
    """
    if ternary_layout not in TERNARY_LAYOUTS:
        raise ValueError(
            f"ternary_layout must be one of {tuple(TERNARY_LAYOUTS)}, got {ternary_layout!r}"
        )
    if spec.scheme == "binary":
        return {"packing": "binary"}
    if spec.scheme == "ternary":
        return {"packing": TERNARY_LAYOUTS[ternary_layout]}
    signed = spec.qmin < 0
    for bits in range(1, 9):
        lo, hi = packing.nbit_range(bits, signed)
        if lo <= spec.qmin and spec.qmax <= hi:
            return {"packing": "nbit", "bits": bits, "signed": signed}
    raise ValueError(
        f"codes in [{spec.qmin}, {spec.qmax}] need more than 8 bits; .lowbit stores up to 8"
    )


def _pack(codes: NDArray[Any], entry: dict[str, Any]) -> NDArray[np.uint8]:
    kind = entry["packing"]
    if kind == "binary":
        return packing.pack_binary(codes)
    if kind == "ternary5":
        return packing.pack_ternary(codes)
    if kind == "ternary2":
        return packing.pack_ternary_2bit(codes)
    return packing.pack_nbit(codes, entry["bits"], entry["signed"])


class _Tensors:
    """The ``put`` hook of :meth:`Graph.to_json`: collects the payload tensors (codes packed by
    their spec, everything else float32) and their header entries."""

    def __init__(self, ternary_layout: str) -> None:
        self.ternary_layout = ternary_layout
        self.arrays: dict[str, NDArray[Any]] = {}
        self.entries: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, value: NDArray[Any], codes_spec: CodeSpec | None) -> str:
        if codes_spec is None:
            arr = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
            self.arrays[name] = arr
            self.entries[name] = {"packing": "float32", "shape": list(arr.shape)}
            return name
        codes = np.asarray(value)
        entry = code_packing(codes_spec, self.ternary_layout)
        self.arrays[name] = _pack(codes, entry)
        self.entries[name] = {**entry, "shape": list(codes.shape)}
        return name


def graph_to_bytes(graph: Graph, *, ternary_layout: str = "5trit") -> bytes:
    """The ``.lowbit`` bytes of ``graph`` (validated first; see :mod:`lowbit.runtime.loader`)."""
    graph.validate()
    tensors = _Tensors(ternary_layout)
    body = graph.to_json(tensors)
    header = {"format": FORMAT, "version": VERSION, **body, "tensors": tensors.entries}
    text = json.dumps(header, separators=(",", ":"), allow_nan=False)
    return safetensors.numpy.save(tensors.arrays, metadata={"lowbit": text})


def write_graph(
    graph: Graph, path: str | os.PathLike[str], *, ternary_layout: str = "5trit"
) -> Path:
    """Write ``graph`` to ``path`` atomically (:func:`~lowbit.export.files.write_atomic`: a
    reader never sees a half-written file; missing folders are created; normal permissions).
    Returns the path."""
    return write_atomic(path, graph_to_bytes(graph, ternary_layout=ternary_layout))
