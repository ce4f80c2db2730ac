"""Bit packing (lowbit.packing): round trips, exact layouts, sizes, and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import packing

SETTINGS = settings(max_examples=50, deadline=None)


def _stream_bits(data: np.ndarray, nbits: int) -> list[int]:
    """The first nbits of a byte string, bit j = bit j % 8 of byte j // 8 (written by hand)."""
    return [(int(data[j // 8]) >> (j % 8)) & 1 for j in range(nbits)]


# ----------------------------------------------------------------------------- round trips


@SETTINGS
@given(st.lists(st.sampled_from([-1, 1]), max_size=200))
def test_binary_round_trip_and_size(codes):
    data = packing.pack_binary(codes)
    assert data.dtype == np.uint8 and data.size == math.ceil(len(codes) / 8)
    np.testing.assert_array_equal(packing.unpack_binary(data, len(codes)), codes)


@SETTINGS
@given(st.lists(st.sampled_from([-1, 0, 1]), max_size=200))
def test_ternary_round_trip_and_size(codes):
    data = packing.pack_ternary(codes)
    assert data.dtype == np.uint8 and data.size == math.ceil(len(codes) / 5)
    assert (data <= 242).all()
    np.testing.assert_array_equal(packing.unpack_ternary(data, len(codes)), codes)


@SETTINGS
@given(st.lists(st.sampled_from([-1, 0, 1]), max_size=200))
def test_ternary_2bit_round_trip_and_size(codes):
    data = packing.pack_ternary_2bit(codes)
    assert data.size == math.ceil(len(codes) / 4)
    np.testing.assert_array_equal(packing.unpack_ternary_2bit(data, len(codes)), codes)


@st.composite
def nbit_codes(draw):
    bits = draw(st.integers(1, 8))
    signed = draw(st.booleans())
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return bits, signed, draw(st.lists(st.integers(lo, hi), max_size=120))


@SETTINGS
@given(nbit_codes())
def test_nbit_round_trip_size_and_layout(case):
    bits, signed, codes = case
    data = packing.pack_nbit(codes, bits, signed)
    assert data.dtype == np.uint8 and data.size == math.ceil(len(codes) * bits / 8)
    out = packing.unpack_nbit(data, len(codes), bits, signed)
    assert out.dtype == (np.int8 if signed else np.uint8)
    np.testing.assert_array_equal(out.astype(np.int64), codes)
    # layout: field i = bits [i*bits, (i+1)*bits) of the stream, two's complement, LSB first
    stream = _stream_bits(data, len(codes) * bits)
    for i, code in enumerate(codes):
        field = sum(b << j for j, b in enumerate(stream[i * bits : (i + 1) * bits]))
        assert field == code % (1 << bits)
    # unused bits of the last byte are zero
    assert all(b == 0 for b in _stream_bits(data, data.size * 8)[len(codes) * bits :])


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 1000])
def test_every_length_at_every_width(n):
    rng = np.random.default_rng(n)
    for bits in range(1, 9):
        for signed in (False, True):
            lo, hi = packing.nbit_range(bits, signed)
            codes = rng.integers(lo, hi + 1, size=n)
            data = packing.pack_nbit(codes, bits, signed)
            assert data.size == -(-n * bits // 8)
            np.testing.assert_array_equal(packing.unpack_nbit(data, n, bits, signed), codes)


# ----------------------------------------------------------------------------- exact layouts


def test_binary_layout_little_endian_bits():
    codes = [1, -1, -1, 1, 1, 1, 1, 1, -1, 1]
    data = packing.pack_binary(codes)
    assert data.tolist() == [0b11111001, 0b10]


def test_ternary_layout_base3_little_endian():
    # digits (code + 1): 0 1 2 2 0 | 2 -> 0 + 1*3 + 2*9 + 2*27 + 0*81 = 75 ; 2
    assert packing.pack_ternary([-1, 0, 1, 1, -1, 1]).tolist() == [75, 2]
    assert packing.pack_ternary([1] * 5).tolist() == [242]


def test_ternary_2bit_layout_and_nbit_equivalence():
    codes = [0, 1, -1, 1, -1]
    # fields 00, 01, 11, 01 | 11 -> byte0 = 0b01_11_01_00, byte1 = 0b11
    assert packing.pack_ternary_2bit(codes).tolist() == [0b01110100, 0b11]
    np.testing.assert_array_equal(
        packing.pack_ternary_2bit(codes), packing.pack_nbit(codes, 2, signed=True)
    )


def test_nbit_signed_two_complement_layout():
    # -3, 2, 1 at 3 bits: 101 010 001 -> stream 1,0,1,0,1,0,1,0 | 0 -> [0x55, 0]
    assert packing.pack_nbit([-3, 2, 1], 3, signed=True).tolist() == [0b01010101, 0]
    assert packing.pack_nbit([255, 1], 8, signed=False).tolist() == [255, 1]
    assert packing.pack_nbit([-128, 127], 8, signed=True).tolist() == [128, 127]


def test_accepts_integral_floats_bytes_and_longer_buffers():
    data = packing.pack_nbit(np.array([1.0, 3.0]), 2, signed=False)
    assert data.tolist() == [0b1101]
    np.testing.assert_array_equal(packing.unpack_nbit(bytes([0b1101, 0xFF]), 2, 2, False), [1, 3])
    np.testing.assert_array_equal(packing.unpack_binary(np.array([3, 7], np.uint8), 2), [1, 1])


def test_multidimensional_codes_are_flattened_in_c_order():
    codes = np.array([[1, -1], [-1, -1]])
    np.testing.assert_array_equal(
        packing.unpack_binary(packing.pack_binary(codes), 4), [1, -1, -1, -1]
    )


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("func", "codes", "message"),
    [
        (packing.pack_binary, [1, 0], "code 0"),
        (packing.pack_binary, [1, 2], "code 2"),
        (packing.pack_ternary, [1, -2], "code -2"),
        (packing.pack_ternary_2bit, [2], "code 2"),
        (lambda c: packing.pack_nbit(c, 3, signed=False), [8], r"code 8 .*3-bit unsigned"),
        (lambda c: packing.pack_nbit(c, 3, signed=False), [-1], r"code -1 .*3-bit unsigned"),
        (lambda c: packing.pack_nbit(c, 4, signed=True), [8], r"code 8 .*4-bit signed"),
        (lambda c: packing.pack_nbit(c, 4, signed=True), [-9], r"code -9 .*4-bit signed"),
        (lambda c: packing.pack_nbit(c, 2, signed=False), [0.5], "integers"),
        (lambda c: packing.pack_nbit(c, 2, signed=False), ["a"], "numeric"),
    ],
)
def test_bad_codes_name_the_value_and_width(func, codes, message):
    with pytest.raises(ValueError, match=message):
        func(codes)


@pytest.mark.parametrize("bits", [0, 9, 2.5, True])
def test_bad_bit_width(bits):
    with pytest.raises(ValueError, match="bits"):
        packing.pack_nbit([0], bits, signed=False)
    with pytest.raises(ValueError, match="bits"):
        packing.unpack_nbit(np.zeros(4, np.uint8), 1, bits, signed=False)


@pytest.mark.parametrize(
    ("func", "n", "nbytes"),
    [
        (packing.unpack_binary, 17, 2),
        (packing.unpack_ternary, 11, 2),
        (packing.unpack_ternary_2bit, 9, 2),
        (lambda d, n: packing.unpack_nbit(d, n, 3, signed=True), 6, 2),
    ],
)
def test_data_too_short(func, n, nbytes):
    with pytest.raises(ValueError, match=f"holds {nbytes} bytes"):
        func(np.zeros(nbytes, np.uint8), n)


def test_bad_data_and_n():
    with pytest.raises(ValueError, match="uint8"):
        packing.unpack_binary(np.zeros(2, np.int32), 8)
    with pytest.raises(ValueError, match="1-D"):
        packing.unpack_binary(np.zeros((2, 2), np.uint8), 8)
    with pytest.raises(ValueError, match="non-negative"):
        packing.unpack_binary(np.zeros(2, np.uint8), -1)
    with pytest.raises(ValueError, match="byte 243"):
        packing.unpack_ternary(np.array([5, 243], np.uint8), 10)
    with pytest.raises(ValueError, match="0b10"):
        packing.unpack_ternary_2bit(np.array([0b10], np.uint8), 1)
