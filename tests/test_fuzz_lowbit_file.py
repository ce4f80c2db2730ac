"""Hostile, truncated and corrupted ``.lowbit`` files: only ``LowbitFileError``, never a crash,
a hang or a huge allocation.

Explicit cases name each attack (a header that lies about shapes, sizes or offsets, huge dims,
unknown versions, ops and packings, bad references, non-finite numbers, ...); then a seeded
fuzzer mutates valid files (bit flips, truncation, garbage, and structured edits of both JSON
headers), a fixed number of seeded cases (the same on every machine). A file the loader accepts
must also run.
"""

from __future__ import annotations

import copy
import json
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lowbit.export import build_graph, graph_to_bytes
from lowbit.runtime import LowbitFileError, load, loads
from test_export import IN_SHAPE, quantized_net

MIN_CASES = 2000
MAX_PEAK_BYTES = 64 * 2**20
"""No single case may allocate more than this (the valid files are ~10 KB)."""


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    """Valid files: binary (packed kernels), ternary with float first/last layers, 2-bit
    ternary layout, and LSQ (n-bit codes, static input quantisers)."""
    out = {}
    for method, layout in (("bnn", "5trit"), ("ttq", "5trit"), ("twn", "2bit"), ("lsq", "5trit")):
        graph = build_graph(quantized_net(method), IN_SHAPE)
        out[f"{method}-{layout}"] = graph_to_bytes(graph, ternary_layout=layout)
    return out


# ----------------------------------------------------------------------------- file surgery
def split(data: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """(safetensors table without metadata, lowbit header, payload) of a valid file."""
    (n,) = struct.unpack("<Q", data[:8])
    table = json.loads(data[8 : 8 + n])
    lowbit = json.loads(table.pop("__metadata__")["lowbit"])
    return table, lowbit, data[8 + n :]


def join(
    table: dict[str, Any],
    lowbit: Any,
    payload: bytes,
    *,
    raw_lowbit: str | None = None,
    length: int | None = None,
) -> bytes:
    meta = {"lowbit": raw_lowbit if raw_lowbit is not None else json.dumps(lowbit)}
    text = json.dumps({"__metadata__": meta, **table}).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + payload


def edit(data: bytes, fn: Callable[[dict, dict], Any]) -> bytes:
    table, lowbit, payload = split(data)
    fn(table, lowbit)
    return join(table, lowbit, payload)


def node(lowbit: dict, op: str) -> dict:
    return next(n for n in lowbit["nodes"] if n["op"] == op)


def first_weight(lowbit: dict, packing: str) -> str:
    return next(k for k, e in lowbit["tensors"].items() if e["packing"] == packing)


def set_payload_bytes(data: bytes, tensor: str, value: bytes) -> bytes:
    table, lowbit, payload = split(data)
    begin = table[tensor]["data_offsets"][0]
    patched = payload[:begin] + value + payload[begin + len(value) :]
    return join(table, lowbit, patched)


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# ----------------------------------------------------------------------------- explicit cases
def _lying_shape(t: dict, h: dict) -> None:
    h["tensors"][first_weight(h, "binary")]["shape"][0] += 1


def _huge_dims(t: dict, h: dict) -> None:
    h["tensors"][first_weight(h, "binary")]["shape"] = [2**20, 2**20, 2**20]


def _overflow_dims(t: dict, h: dict) -> None:
    h["tensors"][first_weight(h, "binary")]["shape"] = [2**62, 2**62]


def _lying_offsets(t: dict, h: dict) -> None:
    name = first_weight(h, "binary")
    t[name]["data_offsets"] = [t[name]["data_offsets"][0], 10**9]


def _overlapping_offsets(t: dict, h: dict) -> None:
    b = sorted(t, key=lambda k: t[k]["data_offsets"][0])[1]
    t[b]["data_offsets"] = [t[b]["data_offsets"][0] - 1, t[b]["data_offsets"][1] - 1]


def _table_shape_lies(t: dict, h: dict) -> None:
    name = first_weight(h, "binary")
    t[name]["shape"] = [t[name]["shape"][0] + 4]


def _weight_shape_mismatch(t: dict, h: dict) -> None:  # consistent tensor, wrong layer geometry
    name = first_weight(h, "binary")
    entry = h["tensors"][name]
    entry["shape"] = [entry["shape"][0], entry["shape"][1] * 2, *entry["shape"][2:]]
    t[name]["shape"] = [t[name]["shape"][0]]  # same byte count would need 2x: fails either way


def _spec_scale_missing(t: dict, h: dict) -> None:
    node(h, "conv2d")["weight"]["spec"]["scale"] = "no such tensor"


def _tensor_used_twice(t: dict, h: dict) -> None:
    coded = [n for n in h["nodes"] if n.get("weight") and n["weight"]["spec"]]
    coded[1]["weight"]["spec"]["scale"] = coded[0]["weight"]["spec"]["scale"]


def _undefined_input(t: dict, h: dict) -> None:
    h["nodes"][1]["inputs"] = ["nowhere"]


def _cycle(t: dict, h: dict) -> None:
    h["nodes"][0]["inputs"] = [h["nodes"][-1]["name"]]


def _duplicate_name(t: dict, h: dict) -> None:
    h["nodes"][2]["name"] = h["nodes"][1]["name"]


def _huge_input(t: dict, h: dict) -> None:
    h["input_shape"] = [None, 1, 2**20, 2**20]


def _zero_stride(t: dict, h: dict) -> None:
    node(h, "conv2d")["attrs"]["stride"] = [0, 1]


def _huge_padding(t: dict, h: dict) -> None:
    node(h, "conv2d")["attrs"]["padding"] = [2**40, 1]


def _string_attr(t: dict, h: dict) -> None:
    node(h, "avgpool2d")["attrs"]["kernel_size"] = "2"


def _unknown_iq(t: dict, h: dict) -> None:
    n = next(n for n in h["nodes"] if n.get("input_quant"))
    n["input_quant"] = {"kind": "quantum"}


def _bad_scheme(t: dict, h: dict) -> None:
    node(h, "conv2d")["weight"]["spec"]["scheme"] = "float"


def _codes_outside_spec(t: dict, h: dict) -> None:
    spec = next(
        n
        for n in h["nodes"]
        if n.get("weight", {}).get("spec") and n["weight"]["spec"]["scheme"] == "uniform"
    )["weight"]["spec"]
    spec["qmin"], spec["qmax"] = 0, 0


def _meta_not_object(t: dict, h: dict) -> None:
    h["meta"] = [1, 2]


def _nodes_empty(t: dict, h: dict) -> None:
    h["nodes"] = []


def _extra_tensor_in_table(t: dict, h: dict) -> None:
    h["tensors"]["ghost"] = {"packing": "float32", "shape": [1]}


def _slice_cuts_batch(t: dict, h: dict) -> None:
    node(h, "slice")["attrs"]["starts"][0] = 1


HeaderEdit = Callable[[dict, dict], None]
HEADER_CASES: dict[str, tuple[str, HeaderEdit, str]] = {
    "tensor shape lies": ("bnn-5trit", _lying_shape, "must be stored as"),
    "huge dims": ("bnn-5trit", _huge_dims, "elements"),
    "dims overflow": ("bnn-5trit", _overflow_dims, "dim"),
    "offsets beyond payload": ("bnn-5trit", _lying_offsets, "outside the payload"),
    "overlapping offsets": ("bnn-5trit", _overlapping_offsets, "overlaps"),
    "table shape lies": ("bnn-5trit", _table_shape_lies, "bytes"),
    "weight shape mismatch": ("bnn-5trit", _weight_shape_mismatch, "must be stored as"),
    "missing scale tensor": ("bnn-5trit", _spec_scale_missing, "names no tensor"),
    "tensor used twice": ("ttq-5trit", _tensor_used_twice, "used twice"),
    "undefined input": ("bnn-5trit", _undefined_input, "not defined before"),
    "cycle": ("bnn-5trit", _cycle, "not defined before"),
    "duplicate name": ("lsq-5trit", _duplicate_name, "twice"),
    "huge input shape": ("bnn-5trit", _huge_input, "too large"),
    "zero stride": ("lsq-5trit", _zero_stride, "stride"),
    "huge padding": ("lsq-5trit", _huge_padding, "padding"),
    "string attribute": ("lsq-5trit", _string_attr, "kernel_size"),
    "unknown input quantiser": ("bnn-5trit", _unknown_iq, "input_quant"),
    "unknown scheme": ("lsq-5trit", _bad_scheme, "scheme"),
    "codes outside spec": ("lsq-5trit", _codes_outside_spec, "outside"),
    "meta not an object": ("bnn-5trit", _meta_not_object, "meta"),
    "no nodes": ("bnn-5trit", _nodes_empty, "nodes"),
    "tensor in header only": ("bnn-5trit", _extra_tensor_in_table, "different tensors"),
    "slice cuts the batch": ("bnn-5trit", _slice_cuts_batch, "batch"),
}


def _set(key: str, value: Any) -> HeaderEdit:
    return lambda t, h: h.__setitem__(key, value)


for _key, _value, _words in (
    ("version", 2, "newer than this reader"),
    ("version", 0, "version"),
    ("version", "1", "version"),
    ("format", "onnx", "format"),
    ("outputs", [], "exactly one output"),
    ("inputs", ["x", "y"], "one input"),
):
    HEADER_CASES[f"{_key}={_value!r}"] = ("bnn-5trit", _set(_key, _value), _words)
HEADER_CASES["unknown op"] = (
    "bnn-5trit",
    lambda t, h: h["nodes"][1].__setitem__("op", "softmax"),
    "unknown op",
)
HEADER_CASES["unknown packing"] = (
    "bnn-5trit",
    lambda t, h: h["tensors"][first_weight(h, "binary")].__setitem__("packing", "binary3"),
    "unknown packing",
)
HEADER_CASES["unknown dtype"] = (
    "bnn-5trit",
    lambda t, h: t[first_weight(h, "binary")].__setitem__("dtype", "F64"),
    "dtype",
)


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_hostile_header_is_refused(case: str, files: dict[str, bytes]) -> None:
    name, fn, words = HEADER_CASES[case]
    data = edit(files[name], fn)
    with pytest.raises(LowbitFileError) as err:
        loads(data, "hostile.lowbit")
    assert "hostile.lowbit" in str(err.value)
    assert words in str(err.value), str(err.value)


def _raw_cases(files: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    good = files["bnn-5trit"]
    table, lowbit, payload = split(good)
    nan = np.array([np.nan], np.float32).tobytes()
    scale = next(n for n in lowbit["nodes"] if n["op"] == "conv2d")["weight"]["spec"]["scale"]
    ternary = first_weight(split(files["ttq-5trit"])[1], "ternary5")
    return {
        "empty": (b"", "truncated"),
        "five bytes": (good[:5], "truncated"),
        "truncated header": (good[:100], "header length"),
        "truncated payload": (good[:-3], "payload"),
        "trailing garbage": (good + b"\x00" * 7, "payload"),
        "huge header length": (struct.pack("<Q", 2**63) + good[8:], "header length"),
        "header not JSON": (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
        "header is a list": (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        "deeply nested header": (
            join(table, None, payload, raw_lowbit=deep_json(100_000)),
            "not valid JSON",
        ),
        "NaN in header": (join(table, None, payload, raw_lowbit='{"format": NaN}'), "JSON"),
        "no metadata": (struct.pack("<Q", 2) + b"{}", "__metadata__"),
        "no lowbit header": (_without_lowbit(table, payload), "lowbit header"),
        "NaN scale": (set_payload_bytes(good, scale, nan), "finite"),
        "ternary byte 243": (set_payload_bytes(files["ttq-5trit"], ternary, b"\xf3"), "five trits"),
    }


def _without_lowbit(table: dict, payload: bytes) -> bytes:
    text = json.dumps({"__metadata__": {"other": "x"}, **table}).encode()
    return struct.pack("<Q", len(text)) + text + payload


def test_raw_corruptions_are_refused(files: dict[str, bytes]) -> None:
    for case, (data, words) in _raw_cases(files).items():
        with pytest.raises(LowbitFileError) as err:
            loads(data, "bad.lowbit")
        assert words in str(err.value), (case, str(err.value))


def test_load_names_the_file(tmp_path: Path, files: dict[str, bytes]) -> None:
    path = tmp_path / "cut.lowbit"
    path.write_bytes(files["lsq-5trit"][:-100])
    with pytest.raises(LowbitFileError, match=r"cut\.lowbit"):
        load(path)
    assert isinstance(LowbitFileError("x"), ValueError)


# ----------------------------------------------------------------------------- fuzzing
JUNK = [
    None,
    -1,
    0,
    1,
    3,
    2**31,
    2**62,
    -(2**40),
    10**400,
    1e308,
    0.5,
    "",
    "x",
    "binary",
    [],
    {},
    True,
    [2**40],
    [None],
    [1, 2],
    {"kind": "sign"},
    "conv2d",
]


def _slots(obj: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) pair of a JSON value, depth first."""
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for k, v in items:
        out.append((obj, k))
        _slots(v, out)
    return out


def _mutate_json(obj: Any, rng: np.random.Generator) -> None:
    slots = _slots(obj, [])
    container, key = slots[rng.integers(len(slots))]
    r = rng.random()
    if r < 0.15 and isinstance(container, dict):
        del container[key]
    elif r < 0.3:  # a value from elsewhere in the same file
        other, k2 = slots[rng.integers(len(slots))]
        container[key] = copy.deepcopy(other[k2])
    elif r < 0.45 and isinstance(container[key], int) and not isinstance(container[key], bool):
        container[key] += int(rng.choice([-1, 1, 2**31, -(2**31)]))
    else:
        container[key] = copy.deepcopy(JUNK[rng.integers(len(JUNK))])


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    kind = rng.integers(7)
    buf = bytearray(data)
    (n,) = struct.unpack("<Q", data[:8])
    if kind == 0:  # bit flips anywhere
        for _ in range(rng.integers(1, 9)):
            i = rng.integers(len(buf))
            buf[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # bit flips in the headers
        for _ in range(rng.integers(1, 4)):
            i = rng.integers(8 + n)
            buf[i] ^= 1 << int(rng.integers(8))
    elif kind == 2:  # truncation
        return bytes(buf[: rng.integers(len(buf))])
    elif kind == 3:  # garbage overwrite or append
        i = rng.integers(len(buf))
        junk = rng.integers(0, 256, size=rng.integers(1, 64), dtype=np.uint8).tobytes()
        buf[i : i + len(junk)] = junk if rng.random() < 0.5 else buf[i : i + len(junk)] + junk
    elif kind in (4, 5):  # structured edits of the lowbit header
        table, lowbit, payload = split(data)
        for _ in range(rng.integers(1, 4)):
            _mutate_json(lowbit, rng)
        return join(table, lowbit, payload)
    else:  # structured edits of the safetensors table
        table, lowbit, payload = split(data)
        _mutate_json(table, rng)
        return join(table, lowbit, payload)
    return bytes(buf)


def test_fuzz_mutated_files(files: dict[str, bytes]) -> None:
    rng = np.random.default_rng(20240501)
    originals = list(files.values())
    counts = {"refused": 0, "accepted": 0}
    tracemalloc.start()
    try:
        while counts["refused"] + counts["accepted"] < MIN_CASES:
            data = mutate(originals[rng.integers(len(originals))], rng)
            tracemalloc.reset_peak()
            t0 = time.perf_counter()
            try:
                model = loads(data, "fuzz.lowbit")
            except LowbitFileError:
                counts["refused"] += 1
            else:
                counts["accepted"] += 1
                with np.errstate(all="ignore"):
                    out = model(np.zeros((2, *model.input_shape), np.float32))
                assert out.shape[0] == 2
            assert time.perf_counter() - t0 < 5.0, "a case took too long"
            assert tracemalloc.get_traced_memory()[1] < MAX_PEAK_BYTES
    finally:
        tracemalloc.stop()
    total = counts["refused"] + counts["accepted"]
    assert counts["refused"] > total // 2, counts  # most mutations must be caught
