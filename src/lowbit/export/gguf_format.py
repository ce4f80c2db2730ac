"""The GGUF v3 container and ggml's ternary block types, in numpy (no torch).

Formats as ggml defines them (``ggml-common.h``, ``ggml-quants.c``; the ``gguf`` Python package
reads them the same way):

* **file**: magic ``GGUF``, version 3 (uint32), tensor count and key/value count (uint64), the
  key/value pairs (key: uint64 length + UTF-8; value: uint32 type + payload, arrays as element
  type + uint64 count + elements), then per tensor its name, dimension count (uint32), the
  dimensions innermost first (``ne[0]`` is the row length; uint64 each), ggml type (uint32) and
  data offset (uint64, from the start of the data section); the data section starts at the
  next multiple of ``general.alignment`` (32) and every tensor's data is aligned to it.
* **TQ2_0** (type 35): blocks of 256 weights, 66 bytes: 64 bytes of 2-bit codes ``t + 1`` in
  which element ``m + 32 n`` of each 128-weight chunk sits in byte ``m`` of that chunk's 32 at
  bits ``2n .. 2n+1``, then the fp16 scale ``d``; a weight is ``(code - 1) * d``.
* **TQ1_0** (type 34): blocks of 256 weights, 54 bytes (1.69 bits a weight): ``qs`` 48 bytes
  of 5 trits each (bytes 0-31 hold elements ``m + 32 n``, n = 0..4, of the first 160; bytes
  32-47 elements ``160 + m + 16 n`` of the next 80), ``qh`` 4 bytes of 4 trits each (byte ``j``
  holds elements ``240 + j + 4 n``, n = 0..3, shifted up one trit), then fp16 ``d``. A byte's
  trits ``q_0 .. q_4`` (``t + 1``, the first most significant) form ``v = sum q_n 3^(4-n)``,
  stored as ``ceil(v * 256 / 243)`` so that the decoder extracts trit ``n`` as
  ``((byte * 3^n mod 256) * 3) >> 8``.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ALIGNMENT",
    "BLOCK",
    "F16",
    "F32",
    "TQ1_0",
    "TQ2_0",
    "TYPE_NAMES",
    "GGUFTensor",
    "encode_ternary",
    "write_gguf",
]

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32
BLOCK = 256
"""Weights per TQ1_0 / TQ2_0 block (ggml's ``QK_K``)."""

F32, F16, TQ1_0, TQ2_0 = 0, 1, 34, 35
TYPE_NAMES = {F32: "F32", F16: "F16", TQ1_0: "TQ1_0", TQ2_0: "TQ2_0"}

# GGUF metadata value types (gguf.h: enum gguf_type) and their struct codes
_SCALARS = {
    "u8": (0, "<B"),
    "i8": (1, "<b"),
    "u16": (2, "<H"),
    "i16": (3, "<h"),
    "u32": (4, "<I"),
    "i32": (5, "<i"),
    "f32": (6, "<f"),
    "bool": (7, "<?"),
    "u64": (10, "<Q"),
    "i64": (11, "<q"),
    "f64": (12, "<d"),
}
_STRING, _ARRAY = 8, 9

_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: ``shape`` in numpy (row-major) order, e.g. ``(out, in)`` for a
    linear weight (the file stores it reversed, ``ne = [in, out]``); ``data`` the encoded
    bytes of ``ggml_type``."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    data: bytes


def _tq2_blocks(t: np.ndarray) -> np.ndarray:
    """2-bit codes of ``(n, 256)`` trits: ``(n, 64)`` bytes."""
    q = (t + 1).astype(np.uint8).reshape(-1, 2, 4, 32)  # chunk, n, m
    shifted = q << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(shifted, axis=2).reshape(-1, 64)


def _pack_trits(q: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Bytes ``ceil(sum_n q_n w_n * 256 / 243)`` of trit groups ``q`` (..., n, m) over ``n``."""
    v = (q.astype(np.uint16) * weights.reshape(1, -1, 1)).sum(axis=1, dtype=np.uint16)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def _tq1_blocks(t: np.ndarray) -> np.ndarray:
    """5-trit codes of ``(n, 256)`` trits: ``(n, 52)`` bytes (``qs`` 48 then ``qh`` 4)."""
    q = (t + 1).astype(np.uint8)
    head = _pack_trits(q[:, :160].reshape(-1, 5, 32), _POW3)
    mid = _pack_trits(q[:, 160:240].reshape(-1, 5, 16), _POW3)
    tail = _pack_trits(q[:, 240:].reshape(-1, 4, 4), _POW3[:4])  # 3^4..3^1: one trit up
    return np.concatenate([head, mid, tail], axis=1)


def encode_ternary(codes: np.ndarray, scales: np.ndarray, ggml_type: int) -> bytes:
    """TQ2_0 or TQ1_0 bytes of a ternary matrix.

    ``codes`` is ``(rows, cols)`` in ``{-1, 0, 1}`` with ``cols`` a multiple of 256;
    ``scales`` the float32 value of a ``+1`` code in each block, ``(rows, cols / 256)``. A
    block's fp16 ``d`` is its scale where the block holds a nonzero code and 0 where it is all
    zero, i.e. the block's absmax, which is what ggml's reference quantiser stores.
    """
    if ggml_type not in (TQ1_0, TQ2_0):
        raise ValueError(f"not a ternary ggml type: {ggml_type}")
    cols = codes.shape[1]
    if cols % BLOCK:
        raise ValueError(f"row length {cols} is not a multiple of {BLOCK}")
    blocks = codes.reshape(-1, BLOCK)
    if blocks.size and (blocks.min() < -1 or blocks.max() > 1):
        raise ValueError("ternary codes must lie in {-1, 0, 1}")
    d = np.where(np.any(blocks != 0, axis=1), scales.reshape(-1), 0.0).astype(np.float16)
    packed = _tq2_blocks(blocks) if ggml_type == TQ2_0 else _tq1_blocks(blocks)
    return np.concatenate([packed, d.reshape(-1, 1).view(np.uint8)], axis=1).tobytes()


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(kind: str, value: Any) -> bytes:
    """Type tag and payload of a metadata value of ``kind`` (``u32``, ``str``, ``[str]`` ...)."""
    if kind == "str":
        return struct.pack("<I", _STRING) + _string(value)
    if kind.startswith("[") and kind.endswith("]"):
        inner, items = kind[1:-1], list(value)
        if inner == "str":
            body = b"".join(_string(v) for v in items)
            return struct.pack("<IIQ", _ARRAY, _STRING, len(items)) + body
        tag, fmt = _SCALARS[inner]
        body = np.asarray(items, dtype=np.dtype(fmt)).tobytes()
        return struct.pack("<IIQ", _ARRAY, tag, len(items)) + body
    tag, fmt = _SCALARS[kind]
    return struct.pack("<I", tag) + struct.pack(fmt, value)


def _padding(n: int) -> int:
    return -n % ALIGNMENT


def _header(metadata: Mapping[str, tuple[str, Any]], tensors: Sequence[GGUFTensor]) -> bytes:
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    parts += [_string(key) + _value(kind, value) for key, (kind, value) in metadata.items()]
    offset = 0
    for t in tensors:
        dims = tuple(reversed(t.shape))
        parts.append(
            _string(t.name)
            + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t.ggml_type, offset)
        )
        offset += len(t.data) + _padding(len(t.data))
    head = b"".join(parts)
    return head + bytes(_padding(len(head)))


def write_gguf(
    path: str | os.PathLike[str],
    metadata: Mapping[str, tuple[str, Any]],
    tensors: Iterable[GGUFTensor],
) -> Path:
    """Write a GGUF v3 file atomically (temporary file in the same folder, then ``os.replace``).

    ``metadata`` maps each key to ``(kind, value)``: kind ``str``, ``bool``, ``u32``, ``i32``,
    ``f32``, ``u64`` ... or an array ``[str]``, ``[i32]``, ``[f32]`` ...; insertion order is
    file order. Tensors are written in the given order, each aligned to 32 bytes.
    """
    path = Path(path)
    tensors = list(tensors)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tensor names in {names}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_header(metadata, tensors))
            for t in tensors:
                f.write(t.data)
                f.write(bytes(_padding(len(t.data))))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
