"""Bit packing of quantised weight codes (METHODS.md, "Storage"), numpy only.

Every layout here is little-endian at both levels: element ``i`` of the flattened codes lives in
the lowest-numbered free bits, and bit ``j`` of the stream is bit ``j % 8`` (``value >> (j % 8) &
1``) of byte ``j // 8``. Packers take any integer-valued array (flattened in C order) and return a
1-D ``uint8`` array; unpackers take a ``uint8`` buffer and the number of codes ``n`` and return a
1-D array of ``n`` codes. A buffer longer than needed is accepted (the tail is ignored); a shorter
one raises ``ValueError``.

============================  =========================================  ===================
function                      layout                                     bytes for n codes
============================  =========================================  ===================
``pack_binary``               1 bit a weight, bit 1 = +1, bit 0 = -1     ``ceil(n / 8)``
``pack_ternary``              5 trits a byte: ``sum_i (c_i + 1) 3^i``    ``ceil(n / 5)``
``pack_ternary_2bit``         2-bit two's complement (00=0 01=+1 11=-1)  ``ceil(n / 4)``
``pack_nbit``                 ``bits``-bit fields, dense                 ``ceil(n bits / 8)``
============================  =========================================  ===================

``pack_binary`` is bit-compatible with the runtime kernels' packed sign words: the bytes padded to
a multiple of 8 and viewed as little-endian ``uint64`` are exactly what
``lowbit.runtime.kernels.pack_signs`` produces (bit ``j`` of word ``w`` is element ``64 w + j``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

_TERNARY_GROUP = 5  # 3^5 = 243 <= 256 patterns fit a byte
_TERNARY_PATTERNS = 3**_TERNARY_GROUP
_POWERS_OF_3 = 3 ** np.arange(_TERNARY_GROUP, dtype=np.int64)
# _TRITS[b] = the five base-3 digits of byte b, least significant first (rows >= 243 unused).
_TRITS = (np.arange(256)[:, None] // _POWERS_OF_3[None, :] % 3).astype(np.int8)


def _codes(codes: ArrayLike, lo: int, hi: int, what: str) -> NDArray[np.int64]:
    """Flatten ``codes`` to int64, or raise ValueError naming the first value outside [lo, hi]."""
    arr = np.asarray(codes)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"codes must be a numeric array, got dtype {arr.dtype}")
    flat = arr.reshape(-1)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(flat) | (flat != np.round(flat))
        if bad.any():
            raise ValueError(f"codes must be integers for {what}, got {flat[bad][0]}")
    flat = flat.astype(np.int64)
    bad = (flat < lo) | (flat > hi)
    if bad.any():
        raise ValueError(f"code {flat[bad][0]} is outside [{lo}, {hi}] allowed for {what}")
    return flat


def _data(data: ArrayLike | bytes, n: int, nbytes: int, what: str) -> NDArray[np.uint8]:
    """The first ``nbytes`` of ``data`` as uint8, checking ``n`` and the buffer length."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(data, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(data, dtype=np.uint8)
    else:
        buf = np.asarray(data)
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise ValueError(
                f"data must be a 1-D uint8 array, got dtype {buf.dtype} and shape {buf.shape}"
            )
    if buf.size < nbytes:
        raise ValueError(f"data holds {buf.size} bytes, but n={n} codes in {what} need {nbytes}")
    return buf[:nbytes]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pack_binary(codes: ArrayLike) -> NDArray[np.uint8]:
    """Pack codes in {-1, +1} at 8 a byte (BinaryConnect/BNN storage): bit 1 = +1, bit 0 = -1.

    Code ``i`` is bit ``i % 8`` of byte ``i // 8`` (little-endian bit order); unused high bits of
    the last byte are 0. Output size ``ceil(n / 8)`` bytes.
    """
    flat = _codes(codes, -1, 1, "binary packing (1 bit, codes -1 or +1)")
    if (flat == 0).any():
        raise ValueError("code 0 is not allowed for binary packing (1 bit, codes -1 or +1)")
    return np.packbits(flat > 0, bitorder="little")


def unpack_binary(data: ArrayLike | bytes, n: int) -> NDArray[np.int8]:
    """Inverse of :func:`pack_binary`: ``n`` codes in {-1, +1} as int8."""
    buf = _data(data, n, _ceil_div(n, 8), "binary packing (1 bit)")
    bits = np.unpackbits(buf, count=n, bitorder="little").astype(np.int8)
    return 2 * bits - 1


def pack_ternary(codes: ArrayLike) -> NDArray[np.uint8]:
    """Pack codes in {-1, 0, +1} at 5 a byte (1.6 bits a weight; 3^5 = 243 <= 256).

    Byte ``j`` holds codes ``5j .. 5j+4`` as the base-3 number ``sum_i (c_{5j+i} + 1) 3^i``
    (digit = code + 1, least significant digit first), so every byte is at most 242. A short last
    group is padded with digit 0. Output size ``ceil(n / 5)`` bytes.
    """
    flat = _codes(codes, -1, 1, "ternary packing (5 trits a byte, codes -1, 0, +1)")
    digits = np.zeros(_ceil_div(flat.size, _TERNARY_GROUP) * _TERNARY_GROUP, dtype=np.int64)
    digits[: flat.size] = flat + 1
    return (digits.reshape(-1, _TERNARY_GROUP) @ _POWERS_OF_3).astype(np.uint8)


def unpack_ternary(data: ArrayLike | bytes, n: int) -> NDArray[np.int8]:
    """Inverse of :func:`pack_ternary`: ``n`` codes in {-1, 0, +1} as int8.

    Raises ValueError for a byte above 242 (not a valid group of five trits).
    """
    buf = _data(data, n, _ceil_div(n, _TERNARY_GROUP), "ternary packing (5 trits a byte)")
    bad = buf >= _TERNARY_PATTERNS
    if bad.any():
        raise ValueError(
            f"byte {int(buf[bad][0])} is not a group of five trits (ternary bytes are <= 242)"
        )
    return _TRITS[buf].reshape(-1)[:n] - 1


def pack_ternary_2bit(codes: ArrayLike) -> NDArray[np.uint8]:
    """Pack codes in {-1, 0, +1} at 4 a byte as 2-bit two's complement (fast-unpack layout).

    Field ``i % 4`` of byte ``i // 4`` (bits ``2(i % 4)`` and ``2(i % 4) + 1``) holds code ``i``:
    ``00`` = 0, ``01`` = +1, ``11`` = -1 (``10`` is never written). The low bit of a field is
    "non-zero" and the high bit is "negative", so a decoder gets the value by sign-extending the
    field (``(int8)(byte << (6 - 2 f)) >> 6``) or the two bit planes with a mask and a shift.
    This is ``pack_nbit(codes, 2, signed=True)`` restricted to {-1, 0, +1}. Size ``ceil(n / 4)``.
    """
    _codes(codes, -1, 1, "2-bit ternary packing (codes -1, 0, +1)")
    return pack_nbit(codes, 2, signed=True)


def unpack_ternary_2bit(data: ArrayLike | bytes, n: int) -> NDArray[np.int8]:
    """Inverse of :func:`pack_ternary_2bit`; raises ValueError on the unused field ``10``."""
    codes = unpack_nbit(data, n, 2, signed=True)
    if (codes == -2).any():
        raise ValueError("field 0b10 (value -2) is not a 2-bit ternary code (-1, 0 or +1)")
    return codes


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")


def nbit_range(bits: int, signed: bool) -> tuple[int, int]:
    """Codes ``pack_nbit`` accepts: ``[-2^(bits-1), 2^(bits-1) - 1]`` or ``[0, 2^bits - 1]``."""
    _check_bits(bits)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def pack_nbit(codes: ArrayLike, bits: int, signed: bool) -> NDArray[np.uint8]:
    """Dense little-endian packing of ``bits``-bit integer codes (``bits`` in 1..8).

    Code ``i`` occupies stream bits ``[i bits, (i + 1) bits)``, least significant bit first, with
    stream bit ``j`` at bit ``j % 8`` of byte ``j // 8``; fields may straddle bytes. Signed codes
    (``[-2^(bits-1), 2^(bits-1) - 1]``) are stored in two's complement within their ``bits`` bits;
    unsigned codes lie in ``[0, 2^bits - 1]``. Unused high bits of the last byte are 0. Output size
    ``ceil(n bits / 8)`` bytes.
    """
    lo, hi = nbit_range(bits, signed)
    sign = "signed" if signed else "unsigned"
    flat = _codes(codes, lo, hi, f"{bits}-bit {sign} packing")
    fields = flat & ((1 << bits) - 1)  # two's complement within the field
    stream = (fields[:, None] >> np.arange(bits)) & 1
    return np.packbits(stream.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_nbit(data: ArrayLike | bytes, n: int, bits: int, signed: bool) -> NDArray[np.integer]:
    """Inverse of :func:`pack_nbit`: ``n`` codes as int8 (signed) or uint8 (unsigned)."""
    _check_bits(bits)
    buf = _data(data, n, _ceil_div(n * bits, 8), f"{bits}-bit packing")
    stream = np.unpackbits(buf, count=n * bits, bitorder="little").reshape(n, bits)
    fields = stream.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))
    if signed:
        fields -= (fields >> (bits - 1)) << bits  # sign-extend: subtract 2^bits when top bit set
        return fields.astype(np.int8)
    return fields.astype(np.uint8)


def stored_bits(scheme: str, qmin: int, qmax: int, ternary_layout: str = "5trit") -> float:
    """Bits per code as ``.lowbit`` stores codes of ``scheme`` in ``[qmin, qmax]``.

    Binary 1; ternary 8/5 = 1.6 (five trits a byte) or 2 with ``ternary_layout="2bit"``;
    otherwise the fewest bits whose (signed when ``qmin < 0``) range holds ``[qmin, qmax]``.
    The one size definition of lowbit: ``lowbit.summary`` counts weights with it.
    """
    if scheme == "binary":
        return 1.0
    if scheme == "ternary":
        return 2.0 if ternary_layout == "2bit" else 8 / _TERNARY_GROUP
    for bits in range(1, 9):
        lo, hi = nbit_range(bits, qmin < 0)
        if lo <= qmin and qmax <= hi:
            return float(bits)
    raise ValueError(f"codes in [{qmin}, {qmax}] need more than 8 bits; .lowbit stores up to 8")
