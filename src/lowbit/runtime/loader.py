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
                "methods": {"weights": "lsq", "activations": "lsq"},
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
builds the :class:`~lowbit.runtime.graph.Graph` and validates it (references, shapes, specs,
codes within their spec). Any problem is a :class:`LowbitFileError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import packing
from .executor import Model, _is_int
from .graph import OPS, Graph, GraphError, Node

__all__ = [
    "FORMAT",
    "MAX_ELEMENTS",
    "MAX_FILE_BYTES",
    "MAX_HEADER_BYTES",
    "PACKINGS",
    "VERSION",
    "FileSummary",
    "LowbitFileError",
    "file_summary",
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
MAX_NAME = 256
MAX_NODES = 100_000
SPEC_TENSORS = ("scale", "zero_point", "scale_neg")
NODE_KEYS = (
    "name",
    "op",
    "inputs",
    "attrs",
    "shape",
    "methods",
    "weight",
    "bias",
    "params",
    "input_quant",
)


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

    def name(self, v: Any, where: str) -> str:
        if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME:
            raise self.fail(f"{where} must be a name of 1 to {MAX_NAME} characters, got {v!r:.60}")
        return v

    def int_in(self, v: Any, lo: int, hi: int, where: str) -> int:
        if not _is_int(v) or not lo <= v <= hi:
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
    if not _is_int(version) or version < 1:
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
class _GraphReader:
    """Builds the Graph from a checked header; every tensor must be used exactly once."""

    def __init__(self, header: dict[str, Any], raw: _Raw, check: _Checker) -> None:
        self.header, self.raw, self.check = header, raw, check
        self.entries: dict[str, dict[str, Any]] = header["tensors"]
        self.used: set[str] = set()

    def tensor(
        self, ref: Any, where: str, packings: tuple[str, ...] = ("float32",)
    ) -> NDArray[Any]:
        check = self.check
        if not isinstance(ref, str) or ref not in self.entries:
            raise check.fail(f"{where} names no tensor of the file ({ref!r:.80})")
        if ref in self.used:
            raise check.fail(f"{where}: tensor {ref!r:.80} is used twice")
        if self.entries[ref]["packing"] not in packings:
            raise check.fail(
                f"{where}: tensor {ref!r:.80} has packing {self.entries[ref]['packing']!r}, "
                f"expected {' or '.join(packings)}"
            )
        self.used.add(ref)
        return _decode(ref, self.entries[ref], self.raw, check)

    def spec(self, d: Any, where: str) -> dict[str, Any]:
        check = self.check
        if not isinstance(d, dict):
            raise check.fail(f"{where} must be a JSON object")
        spec = {k: v for k, v in d.items() if k not in SPEC_TENSORS}
        for key in ("scheme", "bits", "qmin", "qmax", "axis", "signed"):
            if key not in d:
                raise check.fail(f"{where} has no {key!r}")
        spec["scale"] = self.tensor(d.get("scale"), f"{where}.scale")
        for key in ("zero_point", "scale_neg"):
            spec[key] = None if d.get(key) is None else self.tensor(d[key], f"{where}.{key}")
        return spec

    def weight(self, node: Node, d: Any, where: str) -> None:
        tensor = self.check.get(d, "tensor", str, where)
        spec = d.get("spec") if isinstance(d, dict) else None
        if spec is None:
            node.weight_float = self.tensor(tensor, f"{where}.tensor")
            return
        codes = self.tensor(tensor, f"{where}.tensor", CODE_PACKINGS)
        node.weight_spec = self.spec(spec, f"{where}.spec")
        node.weight_codes = codes

    def input_quant(self, d: Any, where: str) -> dict[str, Any] | None:
        if d is None:
            return None
        kind = self.check.get(d, "kind", str, where)
        iq = {k: v for k, v in d.items() if k not in ("spec", "inv_scale")}
        if kind == "static":
            iq["spec"] = self.spec(d.get("spec"), f"{where}.spec")
            inv = d.get("inv_scale")
            iq["inv_scale"] = None if inv is None else self.tensor(inv, f"{where}.inv_scale")
        return iq

    def node(self, d: Any, index: int) -> Node:
        check = self.check
        where = f"nodes[{index}]"
        if not isinstance(d, dict):
            raise check.fail(f"{where} must be a JSON object")
        unknown = [k for k in d if k not in NODE_KEYS]
        if unknown:
            raise check.fail(f"{where} has unknown key {unknown[0]!r:.40}")
        name = check.name(d.get("name"), f"{where}.name")
        where = f"node {name!r}"
        op = check.get(d, "op", str, where)
        if op not in OPS:
            raise check.fail(f"{where}: unknown op {op!r:.40}; this reader knows {', '.join(OPS)}")
        inputs = check.get(d, "inputs", list, where)
        for i in inputs:
            check.name(i, f"{where} input")
        attrs = d.get("attrs") or {}
        if not isinstance(attrs, dict):
            raise check.fail(f"{where}.attrs must be a JSON object")
        if d.get("shape") is not None:
            check.shape(d["shape"], f"{where}.shape", batch=True)
        methods = d.get("methods") or {}
        if not isinstance(methods, dict) or not all(
            v is None or isinstance(v, str) for v in methods.values()
        ):
            raise check.fail(f"{where}.methods must map weights/activations to method names")
        node = Node(name, op, list(inputs), attrs=dict(attrs))
        if d.get("weight") is not None:
            self.weight(node, d["weight"], f"{where}.weight")
        if d.get("bias") is not None:
            node.bias = self.tensor(d["bias"], f"{where}.bias")
        params = d.get("params") or {}
        if not isinstance(params, dict):
            raise check.fail(f"{where}.params must be a JSON object")
        node.params = {k: self.tensor(v, f"{where}.params.{k}") for k, v in params.items()}
        node.input_quant = self.input_quant(d.get("input_quant"), f"{where}.input_quant")
        return node

    def graph(self) -> Graph:
        check, header = self.check, self.header
        nodes_json = check.get(header, "nodes", list, "header")
        if not 0 < len(nodes_json) <= MAX_NODES:
            raise check.fail(f"the graph must have 1 to {MAX_NODES} nodes")
        inputs = check.get(header, "inputs", list, "header")
        outputs = check.get(header, "outputs", list, "header")
        for n in (*inputs, *outputs):
            check.name(n, "graph input/output")
        input_shape = check.shape(
            check.get(header, "input_shape", list, "header"), "input_shape", batch=True
        )
        meta = header.get("meta", {})
        if not isinstance(meta, dict):
            raise check.fail("meta must be a JSON object")
        nodes = [self.node(d, i) for i, d in enumerate(nodes_json)]
        unused = sorted(set(self.entries) - self.used)
        if unused:
            raise check.fail(f"tensor {unused[0]!r:.80} is not used by any node")
        meta = dict(meta)
        meta["shapes"] = {d["name"]: d.get("shape") for d in nodes_json}
        meta["methods"] = {d["name"]: d["methods"] for d in nodes_json if d.get("methods")}
        if "num_classes" in header:
            meta["num_classes"] = header["num_classes"]
        return Graph(list(inputs), input_shape, nodes, list(outputs), meta)


def _parse(data: bytes, source: str) -> tuple[_Raw, dict[str, Any], Graph]:
    check = _Checker(source)
    raw = _read_container(data, check)
    header = _lowbit_header(raw, check)
    graph = _GraphReader(header, raw, check).graph()
    try:
        graph.validate()
    except GraphError as err:
        raise check.fail(str(err)) from None
    _check_declared_shapes(graph, check)
    return raw, header, graph


def graph_from_bytes(data: bytes, source: str = "<bytes>") -> Graph:
    """Parse and validate a ``.lowbit`` file's bytes into a :class:`Graph`."""
    return _parse(data, source)[2]


def _check_declared_shapes(graph: Graph, check: _Checker) -> None:
    """Each node's declared shape (if any) must equal the inferred one."""
    from .executor import infer_shapes

    try:
        shapes = infer_shapes(graph)
    except GraphError as err:
        raise check.fail(str(err)) from None
    for name, declared in graph.meta["shapes"].items():
        if declared is not None and declared != shapes.get(name):
            raise check.fail(
                f"node {name!r}: header shape {declared} but the graph gives {shapes.get(name)}"
            )


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


def load(path: str | os.PathLike[str], engine: str = "float") -> Model:
    """Load a ``.lowbit`` file for CPU inference: validated, decoded, ready to call.

    Needs neither torch nor the training code; never unpickles. A truncated, corrupt or
    hostile file raises :class:`LowbitFileError` (a ValueError) naming the file. ``engine``:
    ``"float"`` (default), ``"integer"`` (integer-only; an error for graphs that are not) or
    ``"auto"`` (integer where possible), see :class:`Model`.
    """
    return loads(_read(path), str(path), engine=engine)


# ============================================================================= summary
@dataclass
class FileSummary:
    """Per-layer storage of a ``.lowbit`` file, measured from its tensors.

    ``rows``: one dict per conv/linear node with ``layer``, ``op``, ``weights`` and
    ``activations`` (method names, None for float), ``packing``, ``bits`` (stored bits per
    weight), ``params`` (weights), ``bytes`` (the weight's codes plus its scales; biases are
    not counted) and ``float32_bytes`` (``4 params``). ``file_bytes`` is the whole file;
    ``float32_file_bytes`` estimates the same graph with every weight stored as float32.
    """

    path: str
    rows: list[dict[str, Any]]
    file_bytes: int
    float32_file_bytes: int

    @property
    def weight_bytes(self) -> int:
        return sum(r["bytes"] for r in self.rows)

    @property
    def float32_weight_bytes(self) -> int:
        return sum(r["float32_bytes"] for r in self.rows)

    def table(self) -> Any:
        """A ``rich`` table of the rows and the totals."""
        from rich.table import Table

        t = Table(title=f"{self.path}")
        for col in (
            "layer",
            "op",
            "weights",
            "activations",
            "bits",
            "params",
            "bytes",
            "float32 bytes",
        ):
            t.add_column(col, justify="left" if col in ("layer", "op") else "right")
        for r in self.rows:
            t.add_row(
                r["layer"],
                r["op"],
                r["weights"] or "float",
                r["activations"] or "float",
                f"{r['bits']:.3g}",
                f"{r['params']:,}",
                f"{r['bytes']:,}",
                f"{r['float32_bytes']:,}",
            )
        ratio = self.float32_weight_bytes / max(self.weight_bytes, 1)
        t.add_row(
            "weights",
            "",
            "",
            "",
            "",
            "",
            f"{self.weight_bytes:,}",
            f"{self.float32_weight_bytes:,} ({ratio:.1f}x)",
            end_section=True,
        )
        ratio = self.float32_file_bytes / max(self.file_bytes, 1)
        t.add_row(
            "file",
            "",
            "",
            "",
            "",
            "",
            f"{self.file_bytes:,}",
            f"{self.float32_file_bytes:,} ({ratio:.1f}x)",
        )
        return t


def _stored_bytes(raw: _Raw, name: str | None) -> int:
    if name is None:
        return 0
    begin, end = raw.table[name]["data_offsets"]
    return end - begin


def file_summary(path: str | os.PathLike[str]) -> FileSummary:
    """Per-layer bits and bytes of a ``.lowbit`` file and its size against float32 storage
    (for ``lowbit summary model.lowbit``). The file is fully validated first."""
    data = _read(path)
    raw, header, _ = _parse(data, str(path))
    rows, saved = [], 0
    for d in header["nodes"]:
        weight = d.get("weight")
        if weight is None:
            continue
        entry = header["tensors"][weight["tensor"]]
        n = math.prod(entry["shape"])
        spec = weight.get("spec") or {}
        stored = sum(
            _stored_bytes(raw, k) for k in (weight["tensor"], *(spec.get(k) for k in SPEC_TENSORS))
        )
        saved += 4 * n - stored
        methods = d.get("methods") or {}
        rows.append(
            {
                "layer": d["name"],
                "op": d["op"],
                "weights": methods.get("weights"),
                "activations": methods.get("activations"),
                "packing": entry["packing"],
                "bits": 8 * _stored_bytes(raw, weight["tensor"]) / n,
                "params": n,
                "bytes": stored,
                "float32_bytes": 4 * n,
            }
        )
    return FileSummary(str(path), rows, len(data), len(data) + saved)
