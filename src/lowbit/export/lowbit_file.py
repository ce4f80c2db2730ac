"""Write an inference :class:`~lowbit.runtime.graph.Graph` as a ``.lowbit`` file.

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
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from numpy.typing import NDArray

from .. import packing
from ..runtime.graph import Graph, Node
from ..runtime.loader import FORMAT, SPEC_TENSORS, VERSION

__all__ = ["TERNARY_LAYOUTS", "code_packing", "graph_to_bytes", "write_graph"]

TERNARY_LAYOUTS = {"5trit": "ternary5", "2bit": "ternary2"}


def code_packing(spec: dict[str, Any], ternary_layout: str = "5trit") -> dict[str, Any]:
    """The ``tensors`` entry (without shape) that stores codes of ``spec`` most compactly.

    ``binary`` -> 1 bit; ``ternary`` -> ``ternary5`` (1.6 bits) or ``ternary2``; any other
    scheme -> ``nbit`` with the fewest bits that hold ``[qmin, qmax]`` (signed when
    ``qmin < 0``), at most 8.
    """
    if ternary_layout not in TERNARY_LAYOUTS:
        raise ValueError(
            f"ternary_layout must be one of {tuple(TERNARY_LAYOUTS)}, got {ternary_layout!r}"
        )
    scheme = spec["scheme"]
    if scheme == "binary":
        return {"packing": "binary"}
    if scheme == "ternary":
        return {"packing": TERNARY_LAYOUTS[ternary_layout]}
    qmin, qmax = int(spec["qmin"]), int(spec["qmax"])
    signed = qmin < 0
    for bits in range(1, 9):
        lo, hi = packing.nbit_range(bits, signed)
        if lo <= qmin and qmax <= hi:
            return {"packing": "nbit", "bits": bits, "signed": signed}
    raise ValueError(f"codes in [{qmin}, {qmax}] need more than 8 bits; .lowbit stores up to 8")


def _pack(codes: NDArray[Any], entry: dict[str, Any]) -> NDArray[np.uint8]:
    kind = entry["packing"]
    if kind == "binary":
        return packing.pack_binary(codes)
    if kind == "ternary5":
        return packing.pack_ternary(codes)
    if kind == "ternary2":
        return packing.pack_ternary_2bit(codes)
    return packing.pack_nbit(codes, entry["bits"], entry["signed"])


def _jsonable(v: Any) -> Any:
    """Attributes as plain JSON values: tuples to lists, numpy scalars to Python numbers."""
    if isinstance(v, (list, tuple)):
        return [_jsonable(e) for e in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(e) for k, e in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return v


class _Writer:
    """Collects the payload tensors and their header entries while nodes are serialised."""

    def __init__(self, ternary_layout: str) -> None:
        self.ternary_layout = ternary_layout
        self.arrays: dict[str, NDArray[Any]] = {}
        self.entries: dict[str, dict[str, Any]] = {}

    def floats(self, name: str, value: Any) -> str:
        arr = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
        self.arrays[name] = arr
        self.entries[name] = {"packing": "float32", "shape": list(arr.shape)}
        return name

    def codes(self, name: str, codes: Any, spec: dict[str, Any]) -> str:
        arr = np.asarray(codes)
        entry = code_packing(spec, self.ternary_layout)
        self.arrays[name] = _pack(arr, entry)
        self.entries[name] = {**entry, "shape": list(arr.shape)}
        return name

    def spec(self, prefix: str, spec: dict[str, Any]) -> dict[str, Any]:
        out = {k: _jsonable(v) for k, v in spec.items() if k not in SPEC_TENSORS}
        for key in SPEC_TENSORS:
            if spec.get(key) is not None:
                out[key] = self.floats(f"{prefix}.{key}", spec[key])
        return out

    def input_quant(self, prefix: str, iq: dict[str, Any] | None) -> dict[str, Any] | None:
        if iq is None:
            return None
        out = {k: _jsonable(v) for k, v in iq.items() if k not in ("spec", "inv_scale")}
        if iq.get("spec") is not None:
            out["spec"] = self.spec(f"{prefix}.spec", iq["spec"])
        if iq.get("inv_scale") is not None:
            out["inv_scale"] = self.floats(f"{prefix}.inv_scale", iq["inv_scale"])
        return out

    def node(self, node: Node, meta: dict[str, Any]) -> dict[str, Any]:
        name = node.name
        d: dict[str, Any] = {
            "name": name,
            "op": node.op,
            "inputs": list(node.inputs),
            "attrs": _jsonable(node.attrs),
            "shape": _jsonable(meta.get("shapes", {}).get(name)),
        }
        if name in meta.get("methods", {}):
            d["methods"] = meta["methods"][name]
        if node.weight_float is not None:
            d["weight"] = {"tensor": self.floats(f"{name}.weight", node.weight_float), "spec": None}
        elif node.weight_codes is not None and node.weight_spec is not None:
            d["weight"] = {
                "tensor": self.codes(f"{name}.weight", node.weight_codes, node.weight_spec),
                "spec": self.spec(f"{name}.weight", node.weight_spec),
            }
        if node.bias is not None:
            d["bias"] = self.floats(f"{name}.bias", node.bias)
        if node.params:
            d["params"] = {k: self.floats(f"{name}.{k}", v) for k, v in node.params.items()}
        if node.input_quant is not None:
            d["input_quant"] = self.input_quant(f"{name}.input_quant", node.input_quant)
        return d


def graph_to_bytes(graph: Graph, *, ternary_layout: str = "5trit") -> bytes:
    """The ``.lowbit`` bytes of ``graph`` (validated first; see :mod:`lowbit.runtime.loader`)."""
    graph.validate()
    writer = _Writer(ternary_layout)
    nodes = [writer.node(n, graph.meta) for n in graph.nodes]
    meta = {k: v for k, v in graph.meta.items() if k not in ("shapes", "methods", "num_classes")}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "inputs": list(graph.inputs),
        "input_shape": _jsonable(graph.input_shape),
        "outputs": list(graph.outputs),
        "num_classes": _jsonable(graph.meta.get("num_classes")),
        "meta": _jsonable(meta),
        "nodes": nodes,
        "tensors": writer.entries,
    }
    text = json.dumps(header, separators=(",", ":"), allow_nan=False)
    return safetensors.numpy.save(writer.arrays, metadata={"lowbit": text})


def write_graph(
    graph: Graph, path: str | os.PathLike[str], *, ternary_layout: str = "5trit"
) -> Path:
    """Write ``graph`` to ``path`` atomically (a temporary file in the same folder, then
    ``os.replace``), so a reader never sees a half-written file. Returns the path."""
    path = Path(path)
    data = graph_to_bytes(graph, ternary_layout=ternary_layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
