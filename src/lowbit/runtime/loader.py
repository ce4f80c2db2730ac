"""The ``.lowbit`` file: format definition and validating reader (numpy only: no torch, no pickle).

A ``.lowbit`` file is one `safetensors <https://github.com/huggingface/safetensors>`_ file:

* 8 bytes: little-endian u64 ``n``; ``n`` bytes of JSON (the safetensors header: for every
  tensor its ``dtype`` (``U8`` or ``F32``), ``shape`` and ``data_offsets`` into the payload, plus
  ``__metadata__``); then the payload, the tensors' bytes back to back;
* ``__metadata__["lowbit"]`` holds the lowbit header, a JSON object::

    {"format": "lowbit", "version": 1,
     "inputs": ["input"], "input_shape": [null, 1, 28, 28], "outputs": ["fc"],
     "num_classes": 10, "meta": {...free-form: producer, recipe, model, preprocess...},
     "nodes": [{"name": "conv1", "op": "conv2d", "inputs": ["input"], "attrs": {...},
                "shape": [null, 16, 28, 28],
                "methods": {"weights": "<method>", "activations": "<method>"},
                "weight": {"tensor": "conv1.weight", "spec": {"scheme": "uniform", "bits": 4,
                           "qmin": -8, "qmax": 7, "axis": null, "signed": true,
                           "scale": "conv1.weight.scale", "zero_point": null,
                           "scale_neg": null}},
                "bias": null, "params": {},
                "input_quant": {"kind": "static", "spec": {...}, "inv_scale": "conv1.iq.inv"}},
               ...],
     "tensors": {"conv1.weight": {"packing": "nbit", "bits": 4, "signed": true,
                                  "shape": [16, 1, 5, 5]},
                 "conv1.weight.scale": {"packing": "float32", "shape": []}, ...}}

  Spec fields that hold numbers (``scale``, ``zero_point``, ``scale_neg``, ``inv_scale``) name
  float32 tensors. Optional keys (``methods``, ``bias``, ``params``, ``input_quant``,
  ``zero_point``, ``scale_neg``, ``inv_scale``) may be omitted, meaning null or empty.
  ``shape`` in ``tensors`` is the logical shape; the stored tensor is float32 of that shape
  (``float32``) or a 1-D uint8 array of :func:`packed_nbytes` bytes:

  ===========  ============================================  =====================
  packing      layout (:mod:`lowbit.packing`)                 bytes for n codes
  ===========  ============================================  =====================
  binary       1 bit a code, bit 1 = +1                       ceil(n / 8)
  ternary5     5 trits a byte (1.6 bits a code)               ceil(n / 5)
  ternary2     2-bit two's complement (fast unpacking)        ceil(n / 4)
  nbit         ``bits``-bit fields, ``signed`` or not         ceil(n bits / 8)
  float32      float32 little-endian, logical shape           4 n
  ===========  ============================================  =====================

The reader validates before it allocates: file and header size limits, the safetensors table
(known dtypes, shapes whose byte length equals the data range, ranges that tile the payload),
the lowbit header (format, version, every key's type), and for every tensor that the header's
packing, shape and byte count agree with the payload; element counts are bounded by
:data:`MAX_ELEMENTS` and, through the byte counts, by the file size. Then it decodes the tensors,
builds the :class:`~lowbit.contract.Graph` and validates it (references, shapes, specs,
codes within their spec). Any problem is a :class:`LowbitFileError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import packing
from ..contract import Graph, GraphError, is_int
from .model import Model
from .onnx_model import OnnxModel
from .shapes import infer_shapes

__all__ = [
    "FORMAT",
    "MAX_ELEMENTS",
    "MAX_FILE_BYTES",
    "MAX_HEADER_BYTES",
    "PACKINGS",
    "VERSION",
    "LowbitFileError",
    "graph_from_bytes",
    "load",
    "load_graph",
    "loads",
    "packed_nbytes",
    "read_header",
]

FORMAT = "lowbit"
VERSION = 1
MAX_FILE_BYTES = 2**32
MAX_HEADER_BYTES = 16 * 2**20
MAX_ELEMENTS = 2**31
"""Largest total number of elements (codes and floats) over all tensors of a file."""
MAX_RANK = 8


class LowbitFileError(ValueError):
    """A ``.lowbit`` file that cannot be used; the message names the file and the problem."""


# ============================================================================= packings
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Packing:
    """One storage layout: stored bytes for ``n`` elements and the decoder (``nbit`` reads
    ``bits``/``signed`` from the tensor's entry)."""

    nbytes: Callable[[dict[str, Any], int], int]
    decode: Callable[[NDArray[np.uint8], int, dict[str, Any]], NDArray[Any]]


PACKINGS: dict[str, Packing] = {
    "binary": Packing(lambda e, n: _ceil_div(n, 8), lambda b, n, e: packing.unpack_binary(b, n)),
    "ternary5": Packing(lambda e, n: _ceil_div(n, 5), lambda b, n, e: packing.unpack_ternary(b, n)),
    "ternary2": Packing(
        lambda e, n: _ceil_div(n, 4), lambda b, n, e: packing.unpack_ternary_2bit(b, n)
    ),
    "nbit": Packing(
        lambda e, n: _ceil_div(n * e["bits"], 8),
        lambda b, n, e: packing.unpack_nbit(b, n, e["bits"], e["signed"]),
    ),
    "float32": Packing(lambda e, n: 4 * n, lambda b, n, e: b.view("<f4").astype(np.float32)),
}
CODE_PACKINGS = ("binary", "ternary5", "ternary2", "nbit")


def packed_nbytes(entry: dict[str, Any], n: int) -> int:
    """Bytes that ``n`` elements take in the packing described by a ``tensors`` entry."""
    return PACKINGS[entry["packing"]].nbytes(entry, n)


# ============================================================================= JSON checks
class _Checker:
    """Typed access to untrusted JSON, raising LowbitFileError with the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, message: str) -> LowbitFileError:
        return LowbitFileError(f"{self.source}: {message}")

    def get(self, d: Any, key: str, kinds: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(d, dict):
            raise self.fail(f"{where} must be a JSON object")
        if key not in d:
            raise self.fail(f"{where} has no {key!r}")
        v = d[key]
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in _tuple(kinds)):
            raise self.fail(f"{where}.{key} has the wrong type ({type(v).__name__})")
        return v

    def int_in(self, v: Any, lo: int, hi: int, where: str) -> int:
        if not is_int(v) or not lo <= v <= hi:
            raise self.fail(f"{where} must be an integer in [{lo}, {hi}], got {v!r:.60}")
        return int(v)

    def shape(self, v: Any, where: str, batch: bool = False) -> list[int | None]:
        """A shape list of positive dims (a leading None when ``batch``), rank <= MAX_RANK."""
        if not isinstance(v, list) or len(v) > MAX_RANK or (batch and (not v or v[0] is not None)):
            raise self.fail(f"{where} must be a list of at most {MAX_RANK} dims, got {v!r:.80}")
        dims = v[1:] if batch else v
        for d in dims:
            self.int_in(d, 1, MAX_ELEMENTS, f"{where} dim")
        return list(v)


def _tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _reject_constant(value: str) -> Any:
    raise ValueError(f"non-finite number {value} in JSON")


def _json(check: _Checker, text: bytes | str, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError too
        raise check.fail(f"{what} is not valid JSON ({str(err)[:120]})") from None


# ============================================================================= container
@dataclass
class _Raw:
    """The safetensors container: tensor table and payload, checked against each other."""

    table: dict[str, dict[str, Any]]
    payload: memoryview
    metadata: dict[str, str]


_DTYPES = {"U8": 1, "F32": 4}


def _read_container(data: bytes, check: _Checker) -> _Raw:
    if len(data) > MAX_FILE_BYTES:
        raise check.fail(f"file is larger than {MAX_FILE_BYTES} bytes")
    if len(data) < 8:
        raise check.fail(f"truncated: {len(data)} bytes, not even a header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or n > len(data) - 8:
        raise check.fail(
            f"header length {n} exceeds the file ({len(data)} bytes) or the limit "
            f"{MAX_HEADER_BYTES} (truncated or not a .lowbit file)"
        )
    header = _json(check, data[8 : 8 + n], "the safetensors header")
    if not isinstance(header, dict):
        raise check.fail("the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise check.fail("no __metadata__ with string values: not a .lowbit file")
    payload = memoryview(data)[8 + n :]
    spans = []
    for name, entry in header.items():
        where = f"tensor {name!r:.80}"
        dtype = check.get(entry, "dtype", str, where)
        if dtype not in _DTYPES:
            raise check.fail(f"{where} has dtype {dtype!r:.20}; a .lowbit file holds U8 and F32")
        shape = check.shape(check.get(entry, "shape", list, where), f"{where} shape")
        offsets = check.get(entry, "data_offsets", list, where)
        if len(offsets) != 2:
            raise check.fail(f"{where} data_offsets must be [begin, end]")
        begin, end = (check.int_in(o, 0, 2**63, f"{where} data_offsets") for o in offsets)
        if not begin <= end <= len(payload):
            raise check.fail(
                f"{where}: data range [{begin}, {end}) lies outside the payload of "
                f"{len(payload)} bytes (truncated file?)"
            )
        if end - begin != math.prod(shape) * _DTYPES[dtype]:
            raise check.fail(
                f"{where}: shape {shape} of {dtype} needs {math.prod(shape) * _DTYPES[dtype]} "
                f"bytes but its data range holds {end - begin}"
            )
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise check.fail(
                f"tensor {name!r:.80}: data range [{begin}, {end}) overlaps or leaves a gap "
                "after the previous tensor"
            )
        pos = end
    if pos != len(payload):
        raise check.fail(f"the payload holds {len(payload)} bytes but the tensors cover {pos}")
    return _Raw(header, payload, metadata)


# ============================================================================= lowbit header
def read_header(data: bytes, source: str = "<bytes>") -> dict[str, Any]:
    """The validated lowbit header of a file's bytes (format, version and tensor table checked
    against the payload; node contents are checked by :func:`graph_from_bytes`)."""
    check = _Checker(source)
    raw = _read_container(data, check)
    return _lowbit_header(raw, check)


def _lowbit_header(raw: _Raw, check: _Checker) -> dict[str, Any]:
    text = raw.metadata.get("lowbit")
    if text is None:
        raise check.fail("no lowbit header in __metadata__: not a .lowbit file")
    header = _json(check, text, "the lowbit header")
    if not isinstance(header, dict):
        raise check.fail("the lowbit header is not a JSON object")
    fmt = header.get("format")
    if fmt != FORMAT:
        raise check.fail(f"format is {fmt!r:.40}, not {FORMAT!r}")
    version = header.get("version")
    if not is_int(version) or version < 1:
        raise check.fail(f"bad format version {version!r:.40}")
    if version > VERSION:
        raise check.fail(
            f"format version {version} is newer than this reader supports ({VERSION}); "
            "upgrade lowbit"
        )
    _check_tensor_table(header, raw, check)
    return header


def _check_tensor_table(header: dict[str, Any], raw: _Raw, check: _Checker) -> None:
    tensors = check.get(header, "tensors", dict, "header")
    if set(tensors) != set(raw.table):
        extra = sorted(set(tensors) ^ set(raw.table))
        raise check.fail(f"header and payload list different tensors (e.g. {extra[0]!r:.80})")
    total = 0
    for name, entry in tensors.items():
        where = f"tensors[{name!r:.80}]"
        kind = check.get(entry, "packing", str, where)
        if kind not in PACKINGS:
            raise check.fail(f"{where}: unknown packing {kind!r:.40}; known: {', '.join(PACKINGS)}")
        if kind == "nbit":
            check.int_in(check.get(entry, "bits", int, where), 1, 8, f"{where}.bits")
            check.get(entry, "signed", bool, where)
        shape = check.shape(check.get(entry, "shape", list, where), f"{where}.shape")
        n = math.prod(shape)
        total += n
        if total > MAX_ELEMENTS:
            raise check.fail(f"the tensors hold more than {MAX_ELEMENTS} elements")
        stored = raw.table[name]
        if kind == "float32":
            want_dtype, want_shape = "F32", shape
        else:
            want_dtype, want_shape = "U8", [packed_nbytes(entry, n)]
        if stored["dtype"] != want_dtype or stored["shape"] != want_shape:
            raise check.fail(
                f"{where}: {kind} of shape {shape} must be stored as {want_dtype} "
                f"{want_shape}, the payload has {stored['dtype']} {stored['shape']}"
            )


def _decode(name: str, entry: dict[str, Any], raw: _Raw, check: _Checker) -> NDArray[Any]:
    begin, end = raw.table[name]["data_offsets"]
    buf = np.frombuffer(raw.payload[begin:end], dtype=np.uint8)
    shape = entry["shape"]
    try:
        arr = PACKINGS[entry["packing"]].decode(buf, math.prod(shape), entry)
    except ValueError as err:
        raise check.fail(f"tensor {name!r:.80}: {err}") from None
    return arr.reshape(shape)


# ============================================================================= graph
class _Tensors:
    """The ``get`` hook of :meth:`Graph.from_json`: decodes named tensors of the file, each used
    exactly once, codes only from code packings and floats only from ``float32``."""

    def __init__(self, header: dict[str, Any], raw: _Raw, check: _Checker) -> None:
        self.raw, self.check = raw, check
        self.entries: dict[str, dict[str, Any]] = header["tensors"]
        self.used: set[str] = set()

    def __call__(self, ref: Any, where: str, codes: bool = False) -> NDArray[Any]:
        if not isinstance(ref, str) or ref not in self.entries:
            raise GraphError(f"{where} names no tensor of the file ({ref!r:.80})")
        if ref in self.used:
            raise GraphError(f"{where}: tensor {ref!r:.80} is used twice")
        packings = CODE_PACKINGS if codes else ("float32",)
        if self.entries[ref]["packing"] not in packings:
            raise GraphError(
                f"{where}: tensor {ref!r:.80} has packing {self.entries[ref]['packing']!r}, "
                f"expected {' or '.join(packings)}"
            )
        self.used.add(ref)
        return _decode(ref, self.entries[ref], self.raw, self.check)


def _parse(data: bytes, source: str) -> tuple[_Raw, dict[str, Any], Graph]:
    check = _Checker(source)
    raw = _read_container(data, check)
    header = _lowbit_header(raw, check)
    tensors = _Tensors(header, raw, check)
    body = {k: v for k, v in header.items() if k not in ("format", "version", "tensors")}
    try:
        graph = Graph.from_json(body, tensors)
        unused = sorted(set(tensors.entries) - tensors.used)
        if unused:
            raise GraphError(f"tensor {unused[0]!r:.80} is not used by any node")
        infer_shapes(graph)
    except GraphError as err:
        raise check.fail(str(err)) from None
    return raw, header, graph


def graph_from_bytes(data: bytes, source: str = "<bytes>") -> Graph:
    """Parse and validate a ``.lowbit`` file's bytes into a :class:`Graph`."""
    return _parse(data, source)[2]


def _read(path: str | os.PathLike[str]) -> bytes:
    size = os.stat(path).st_size
    if size > MAX_FILE_BYTES:
        raise LowbitFileError(f"{path}: file is larger than {MAX_FILE_BYTES} bytes")
    with open(path, "rb") as f:
        return f.read(MAX_FILE_BYTES + 1)


def load_graph(path: str | os.PathLike[str]) -> Graph:
    """Read and validate the :class:`Graph` of a ``.lowbit`` file."""
    return graph_from_bytes(_read(path), str(path))


def loads(data: bytes, source: str = "<bytes>", engine: str = "float") -> Model:
    """A runnable :class:`Model` from a ``.lowbit`` file's bytes (see :func:`load`)."""
    graph = graph_from_bytes(data, source)
    try:
        return Model(graph, source, engine=engine)
    except GraphError as err:
        raise LowbitFileError(f"{source}: {err}") from None


def load(path: str | os.PathLike[str], engine: str = "float") -> Model | OnnxModel:
    """Load a ``.lowbit`` file for CPU inference: validated, decoded, ready to call.

    Needs neither torch nor the training code; never unpickles. A truncated, corrupt or
    hostile file raises :class:`LowbitFileError` (a ValueError) naming the file. ``engine``:
    ``"float"`` (default), ``"integer"`` (integer-only; an error for graphs that are not) or
    ``"auto"`` (integer where possible), see :class:`Model`. A ``.onnx`` file (from
    ``lowbit export --format onnx``) loads as an :class:`OnnxModel` on onnxruntime instead,
    with its input normalisation, for ``lowbit run``; ``engine`` ``"integer"`` is refused there.
    """
    if Path(path).suffix.lower() == ".onnx":
        if engine == "integer":
            raise ValueError(
                f"{path}: engine 'integer' runs .lowbit files; ONNX runs on onnxruntime"
            )
        return OnnxModel(path)
    return loads(_read(path), str(path), engine=engine)
