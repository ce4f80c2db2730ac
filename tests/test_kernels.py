"""Runtime kernels (lowbit.runtime.kernels) against int64 numpy references, on every backend.

Each kernel runs on the AVX2 path (when the CPU has it), the portable scalar C path and the numpy
fallback, with 1 and 2 threads, on ragged shapes: K not a multiple of 8 / 32 / 64, odd N, M = 1,
few rows (the direct paths) and many rows (the packed paths), N beyond one column chunk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from lowbit.packing import pack_binary
from lowbit.runtime import kernels

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _available_backends() -> list[str]:
    names = ["numpy"]
    if kernels._ext is not None:
        names.insert(0, "scalar")
        if kernels._ext.cpu_has_avx2():
            names.insert(0, "avx2")
    return names


@pytest.fixture(params=_available_backends())
def backend(request):
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend(None)


# (M, N, K): direct paths (M < 8 / < 4), packed paths, ragged K, N past a 256-column chunk
SHAPES = [
    (1, 1, 1),
    (1, 5, 63),
    (1, 37, 130),
    (3, 17, 65),
    (5, 3, 200),
    (8, 16, 144),
    (9, 33, 100),
    (13, 20, 31),
    (40, 7, 512),
    (37, 300, 77),
    (12, 40, 1000),
    # big enough for 2 threads (kernels keep small problems on one thread)
    (3, 700, 1000),
    (6, 700, 3000),
    (40, 300, 1000),
]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


# ----------------------------------------------------------------------------- references


def ref_pack(signs: np.ndarray) -> np.ndarray:
    """+-1 rows [M, K] as uint64 words, bit j of word w = column 64 w + j (by hand)."""
    m, k = signs.shape
    words = np.zeros((m, (k + 63) // 64), dtype=np.uint64)
    for j in range(k):
        words[:, j // 64] |= (signs[:, j] > 0).astype(np.uint64) << np.uint64(j % 64)
    return words


def ref_srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul, int64: (a b + nudge) / 2^31 truncated."""
    ab = a * b
    v = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    high = np.sign(v) * (np.abs(v) >> 31)
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, high)


def ref_rdbpot(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: x / 2^e rounded half away from zero (int64)."""
    half = np.where(e > 0, np.left_shift(1, np.maximum(e - 1, 0)), 0)
    return np.sign(x) * ((np.abs(x) + half) >> e)


def ref_requant(acc, m0, shift, zp, qmin, qmax) -> np.ndarray:
    left, right = np.maximum(-shift, 0), np.maximum(shift, 0)
    x = np.clip(acc << left, INT32_MIN, INT32_MAX)
    return np.clip(ref_rdbpot(ref_srdhm(x, m0), right) + zp, qmin, qmax)


def signs(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return np.where(rng.random((m, k)) < 0.5, -1, 1).astype(np.int64)


def with_garbage_padding(words: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Set random bits past column k: every kernel must ignore them."""
    if k % 64 == 0 or words.size == 0:
        return words
    out = words.copy()
    pad = ~np.uint64((1 << (k % 64)) - 1)
    out[:, -1] |= rng.integers(0, 2**63, size=out.shape[0], dtype=np.uint64) & pad
    return out


# ----------------------------------------------------------------------------- sign packing


def test_pack_signs_matches_reference_and_pack_binary(backend):
    rng = _rng(1)
    x = rng.standard_normal((7, 150)).astype(np.float32)
    x[0, :4] = [0.0, -0.0, np.nan, -np.inf]
    got = kernels.pack_signs(x)
    expected = ref_pack(np.where(x >= 0, 1, -1))
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.uint64 and got.shape == (7, 3)
    # the bytes of each row are exactly lowbit.packing.pack_binary of its signs
    row = pack_binary(np.where(x[1] >= 0, 1, -1))
    np.testing.assert_array_equal(got[1].view(np.uint8)[: row.size], row)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_pack_signs_large_parallel(backend, num_threads):
    x = _rng(2).standard_normal((300, 257)).astype(np.float32)
    np.testing.assert_array_equal(
        kernels.pack_signs(x, num_threads=num_threads), ref_pack(np.where(x >= 0, 1, -1))
    )


# ----------------------------------------------------------------------------- binary


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_binary_gemm(backend, num_threads, m, n, k):
    rng = _rng(m, n, k)
    a, w = signs(rng, m, k), signs(rng, n, k)
    a_bits = with_garbage_padding(ref_pack(a), k, rng)
    w_bits = with_garbage_padding(ref_pack(w), k, rng)
    got = kernels.binary_gemm(a_bits, w_bits, k, num_threads=num_threads)
    assert got.dtype == np.int32 and got.shape == (m, n)
    np.testing.assert_array_equal(got, a @ w.T)


@pytest.mark.parametrize(("m", "n", "k"), [(9, 18, 17000), (2, 3, 17000)])
def test_binary_gemm_long_k(backend, m, n, k):
    """K past the int16 stage of the byte-table counters (32 flushes x 63 bytes)."""
    rng = _rng(k, m)
    a, w = signs(rng, m, k), signs(rng, n, k)
    np.testing.assert_array_equal(kernels.binary_gemm(ref_pack(a), ref_pack(w), k), a @ w.T)


def test_binary_gemm_all_equal_and_all_opposite(backend):
    k = 300
    a = np.ones((10, k), np.int64)
    w = np.concatenate([np.ones((1, k)), -np.ones((1, k))]).astype(np.int64)
    got = kernels.binary_gemm(ref_pack(a), ref_pack(w), k)
    np.testing.assert_array_equal(got, np.tile([k, -k], (10, 1)))


def ref_threshold_bits(dots: np.ndarray, thr_int: np.ndarray, flip: np.ndarray) -> np.ndarray:
    return ref_pack(np.where((dots >= thr_int) ^ flip.astype(bool), 1, -1))


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 70, 100), (9, 33, 64), (21, 130, 90), (6, 5, 7)])
def test_binary_gemm_threshold(backend, num_threads, m, n, k):
    rng = _rng(n, k, 3)
    a, w = signs(rng, m, k), signs(rng, n, k)
    dots = a @ w.T
    thr = rng.normal(0, np.sqrt(k), n).astype(np.float32)
    thr[:3] = [np.nan, np.inf, -np.inf][: min(3, n)]
    flip = rng.integers(0, 2, n).astype(np.uint8)
    thr_int = np.ceil(np.nan_to_num(thr.astype(np.float64), nan=np.inf, posinf=1e18, neginf=-1e18))
    got = kernels.binary_gemm_threshold(
        ref_pack(a), ref_pack(w), k, thr, flip, num_threads=num_threads
    )
    assert got.dtype == np.uint64 and got.shape == (m, (n + 63) // 64)
    np.testing.assert_array_equal(got, ref_threshold_bits(dots, thr_int, flip))
    # integer thresholds, no flip; output feeds the next binary layer directly
    ithr = rng.integers(-k, k + 1, n)
    bits = kernels.binary_gemm_threshold(ref_pack(a), ref_pack(w), k, ithr)
    np.testing.assert_array_equal(bits, ref_threshold_bits(dots, ithr, np.zeros(n)))
    nxt = signs(rng, 4, n)
    np.testing.assert_array_equal(
        kernels.binary_gemm(bits, ref_pack(nxt), n), np.where(dots >= ithr, 1, -1) @ nxt.T
    )


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 19, 100), (11, 40, 257), (30, 9, 64)])
def test_binary_gemm_scale(backend, num_threads, m, n, k):
    rng = _rng(n, k, 4)
    a, w = signs(rng, m, k), signs(rng, n, k)
    scale = rng.uniform(0.01, 2, n).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    got = kernels.binary_gemm_scale(
        ref_pack(a), ref_pack(w), k, scale, bias, num_threads=num_threads
    )
    expected = (a @ w.T).astype(np.float32) * scale + bias
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    got = kernels.binary_gemm_scale(ref_pack(a), ref_pack(w), k, 0.5)
    np.testing.assert_array_equal(got, (a @ w.T).astype(np.float32) * np.float32(0.5))


# ----------------------------------------------------------------------------- ternary


def ternary_codes(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.integers(-1, 2, size=(n, k)).astype(np.int8)


def test_ternary_planes():
    codes = np.array([[1, 0, -1, 1] + [0] * 66], np.int8)
    pos, neg = kernels.ternary_planes(codes)
    assert pos.shape == neg.shape == (1, 2) and pos.dtype == np.uint64
    assert int(pos[0, 0]) == 0b1001 and int(neg[0, 0]) == 0b0100
    assert int(pos[0, 1]) == int(neg[0, 1]) == 0


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_ternary_gemm_binary_act(backend, num_threads, m, n, k):
    rng = _rng(m, n, k, 5)
    a, t = signs(rng, m, k), ternary_codes(rng, n, k)
    pos, neg = kernels.ternary_planes(t)
    a_bits = with_garbage_padding(ref_pack(a), k, rng)
    pos, neg = with_garbage_padding(pos, k, rng), neg.copy()
    pos &= ~neg  # garbage padding must stay disjoint
    got = kernels.ternary_gemm_binary_act(a_bits, pos, neg, k, num_threads=num_threads)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, a @ t.T.astype(np.int64))


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_ternary_gemm_int8(backend, num_threads, m, n, k):
    rng = _rng(m, n, k, 6)
    a = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    a[0, :1] = -128  # the one value vpsignb cannot negate
    t = ternary_codes(rng, n, k)
    t[0, :1] = -1
    got = kernels.ternary_gemm_int8(a, t, num_threads=num_threads)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, a.astype(np.int64) @ t.T.astype(np.int64))


def test_ternary_gemm_int8_extremes(backend):
    """All activations -128 (or 127) against all -1 weights over a long K: no int16 overflow."""
    k = 5000
    for value in (-128, 127):
        a = np.full((9, k), value, np.int8)
        t = -np.ones((3, k), np.int8)
        np.testing.assert_array_equal(kernels.ternary_gemm_int8(a, t), np.full((9, 3), -value * k))
        np.testing.assert_array_equal(
            kernels.ternary_gemm_int8(a[:1], t), np.full((1, 3), -value * k)
        )


# ----------------------------------------------------------------------------- int8


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_int8_gemm(backend, num_threads, m, n, k):
    rng = _rng(m, n, k, 7)
    a = rng.integers(0, 256, size=(m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, size=(n, k)).astype(np.int8)
    zp = int(rng.integers(0, 256))
    got = kernels.int8_gemm(a, zp, w, num_threads=num_threads)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, (a.astype(np.int64) - zp) @ w.T.astype(np.int64))


def test_int8_gemm_extremes(backend):
    """Every product at its extreme (255 * -128 and 0 - 255 with zero point 255) over long K."""
    k = 4000
    a = np.full((7, k), 255, np.uint8)
    w = np.full((17, k), -128, np.int8)
    np.testing.assert_array_equal(kernels.int8_gemm(a, 0, w), np.full((7, 17), -255 * 128 * k))
    a0 = np.zeros((2, k), np.uint8)
    np.testing.assert_array_equal(kernels.int8_gemm(a0, 255, w[:3]), np.full((2, 3), 255 * 128 * k))


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 20, 75), (2, 9, 300), (13, 33, 144), (50, 70, 10)])
def test_int8_gemm_requant_per_channel(backend, num_threads, m, n, k):
    rng = _rng(m, n, k, 8)
    a = rng.integers(0, 256, size=(m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, size=(n, k)).astype(np.int8)
    zp, zout = int(rng.integers(0, 256)), int(rng.integers(0, 256))
    bias = rng.integers(-(2**20), 2**20, n)
    m0 = rng.integers(2**30, 2**31, n)
    shift = rng.integers(-6, 40, n)  # left shifts, ordinary right shifts, shifts past 31
    shift[:4] = [-31, 0, 31, 62][: min(4, n)]
    qmin, qmax = 3, 250
    got = kernels.int8_gemm_requant(
        a, zp, w, bias, m0, shift, zout, qmin, qmax, num_threads=num_threads
    )
    acc = (a.astype(np.int64) - zp) @ w.T.astype(np.int64) + bias
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref_requant(acc, m0, shift, zout, qmin, qmax))


def test_int8_gemm_requant_saturation_corners(backend):
    """Left-shift saturation to INT32_MIN/MAX, m0 = INT32_MIN (the high-multiply overflow),
    negative m0, ties of the rounding divide, per-tensor parameters, ReLU6-style clamps."""
    rng = _rng(9)
    m, n, k = 12, 24, 40
    a = rng.integers(0, 256, size=(m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, size=(n, k)).astype(np.int8)
    bias = rng.integers(-(2**24), 2**24, n)
    acc = (a.astype(np.int64) - 128) @ w.T.astype(np.int64) + bias
    m0 = np.full(n, INT32_MIN)
    m0[::3] = -(2**30) - 12345
    m0[1::3] = 2**30
    shift = np.where(np.arange(n) % 2 == 0, -20, 1)
    for qmin, qmax, zout in [(0, 255, 128), (128, 183, 128), (0, 0, 0)]:
        got = kernels.int8_gemm_requant(a, 128, w, bias, m0, shift, zout, qmin, qmax)
        np.testing.assert_array_equal(got, ref_requant(acc, m0, shift, zout, qmin, qmax))
    got = kernels.int8_gemm_requant(a, 128, w, None, 1518500250, 7, 10)  # per tensor, no bias
    acc0 = acc - bias
    np.testing.assert_array_equal(got, ref_requant(acc0, 1518500250, np.int64(7), 10, 0, 255))


def test_output_stages_on_every_gemm(backend):
    """Prepared stages are reusable and work after any GEMM (per-tensor and per-channel)."""
    rng = _rng(10)
    m, n, k = 10, 21, 150
    a, t = signs(rng, m, k), ternary_codes(rng, n, k)
    pos, neg = kernels.ternary_planes(t)
    dots = a @ t.T.astype(np.int64)
    requant = kernels.Requant(5, 2**30 + 7, np.arange(n) % 5 - 1, 100, 10, 240)
    thresholds, flips = rng.integers(-20, 20, n), rng.integers(0, 2, n)
    thr = kernels.Threshold(thresholds, flips)
    scale = kernels.Scale(0.25, np.arange(n, dtype=np.float32))
    for _ in range(2):  # second round: cached per-channel parameters
        got = kernels.ternary_gemm_binary_act(ref_pack(a), pos, neg, k, requant)
        expected = ref_requant(dots + 5, 2**30 + 7, np.arange(n) % 5 - 1, 100, 10, 240)
        np.testing.assert_array_equal(got, expected)
        got = kernels.ternary_gemm_binary_act(ref_pack(a), pos, neg, k, thr)
        np.testing.assert_array_equal(got, ref_threshold_bits(dots, thresholds, flips))
    a8 = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    got = kernels.ternary_gemm_int8(a8, t, scale)
    expected = (a8.astype(np.int64) @ t.T).astype(np.float32) * np.float32(0.25) + np.arange(n)
    np.testing.assert_array_equal(got, expected.astype(np.float32))
    with pytest.raises(ValueError, match="Requant bias has 3 values, the GEMM has 21"):
        kernels.ternary_gemm_int8(a8, t, kernels.Requant([1, 2, 3], 2**30, 1, 0))
    with pytest.raises(ValueError, match="output must be"):
        kernels.ternary_gemm_int8(a8, t, "requant")


# ----------------------------------------------------------------------------- backends


def test_backend_switching():
    assert kernels.set_backend("numpy") == "numpy" and not kernels.has_avx2()
    if kernels._ext is not None:
        assert kernels.set_backend("scalar") == "scalar"
    auto = kernels.set_backend(None)
    assert auto == kernels.backend()
    assert auto == (
        "numpy" if kernels._ext is None else ("avx2" if kernels.has_avx2() else "scalar")
    )
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("sse")


def test_release_scratch_keeps_kernels_working(backend):
    a = ref_pack(np.ones((40, 300), np.int64))
    for _ in range(2):
        np.testing.assert_array_equal(kernels.binary_gemm(a, a, 300), np.full((40, 40), 300))
        kernels.release_scratch()


@pytest.mark.skipif(kernels._ext is None, reason="compiled extension not built")
def test_env_var_forces_scalar_path():
    code = "from lowbit.runtime import kernels; print(kernels.backend())"
    env = dict(os.environ, LOWBIT_NO_AVX2="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "scalar"


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setitem(kernels._state, "warned", False)
    monkeypatch.setitem(kernels._state, "numpy", False)
    a = ref_pack(np.ones((2, 70), np.int64))
    assert kernels.backend() == "numpy"
    with pytest.warns(RuntimeWarning, match="numpy"):
        np.testing.assert_array_equal(kernels.binary_gemm(a, a, 70), np.full((2, 2), 70))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.binary_gemm(a, a, 70)


# ----------------------------------------------------------------------------- validation


def test_validation_errors():
    bits = np.zeros((2, 2), np.uint64)
    with pytest.raises(ValueError, match="a_bits must have dtype uint64"):
        kernels.binary_gemm(bits.astype(np.int64), bits, 100)
    with pytest.raises(ValueError, match=r"k=200 needs ceil\(k/64\)=4"):
        kernels.binary_gemm(bits, bits, 200)
    with pytest.raises(ValueError, match="w_bits must have 2 columns"):
        kernels.binary_gemm(bits, np.zeros((2, 3), np.uint64), 100)
    with pytest.raises(ValueError, match="must be 2-D"):
        kernels.binary_gemm(bits[0], bits, 100)
    with pytest.raises(ValueError, match="num_threads"):
        kernels.binary_gemm(bits, bits, 100, num_threads=0)
    with pytest.raises(ValueError, match="Threshold thr has 3 values, the GEMM has 2"):
        kernels.binary_gemm_threshold(bits, bits, 100, [1, 2, 3])
    with pytest.raises(ValueError, match="flip"):
        kernels.binary_gemm_threshold(bits, bits, 100, 0, [0, 2])
    one = np.ones((2, 2), np.uint64)
    with pytest.raises(ValueError, match="share a set bit"):
        kernels.ternary_gemm_binary_act(bits, one, one, 100)
    with pytest.raises(ValueError, match="ternary codes -1, 0, \\+1, got 2"):
        kernels.ternary_gemm_int8(np.zeros((1, 3), np.int8), np.array([[0, 2, 0]], np.int8))
    with pytest.raises(ValueError, match="ternary codes"):
        kernels.ternary_planes(np.array([[3]], np.int8))
    a, w = np.zeros((2, 5), np.uint8), np.zeros((3, 5), np.int8)
    with pytest.raises(ValueError, match="a_zero_point"):
        kernels.int8_gemm(a, 256, w)
    with pytest.raises(ValueError, match="w must have dtype int8"):
        kernels.int8_gemm(a, 0, w.astype(np.uint8))
    with pytest.raises(ValueError, match=r"shift must lie in \[-31, 62\], got 63"):
        kernels.int8_gemm_requant(a, 0, w, None, 2**30, 63, 0)
    with pytest.raises(ValueError, match="qmax"):
        kernels.int8_gemm_requant(a, 0, w, None, 2**30, 1, 0, 10, 5)
    with pytest.raises(ValueError, match="do not fit int32"):
        kernels.int8_gemm(np.zeros((1, 70000), np.uint8), 0, np.zeros((1, 70000), np.int8))
    with pytest.raises(ValueError, match="overflow"):
        kernels.int8_gemm_requant(a, 0, w, [2**31 - 1] * 3, 2**30, 1, 0)


# ----------------------------------------------------------------------------- im2col


@pytest.mark.parametrize(
    ("kh", "kw", "stride", "padding"),
    [(3, 3, 1, 1), (3, 3, 2, 1), (1, 1, 1, 0), (5, 3, (2, 1), (0, 2))],
)
def test_im2col_matches_unfold_and_conv(kh, kw, stride, padding):
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(0))
    cols = kernels.im2col(x.numpy(), kh, kw, stride, padding)
    ref = torch.nn.functional.unfold(x, (kh, kw), stride=stride, padding=padding)
    np.testing.assert_allclose(cols, ref.transpose(1, 2).reshape(-1, ref.shape[1]).numpy())
    weight = torch.randn(4, 3, kh, kw, generator=torch.Generator().manual_seed(1))
    conv = torch.nn.functional.conv2d(x, weight, stride=stride, padding=padding)
    out = cols @ weight.reshape(4, -1).numpy().T
    np.testing.assert_allclose(
        out.reshape(2, conv.shape[2], conv.shape[3], 4), conv.permute(0, 2, 3, 1).numpy(), atol=1e-4
    )


def test_im2col_pad_value_and_dtype():
    x = np.arange(4, dtype=np.uint8).reshape(1, 1, 2, 2)
    cols = kernels.im2col(x, 3, 3, padding=1, pad_value=7)
    assert cols.dtype == np.uint8 and cols.shape == (4, 9)
    assert cols[0].tolist() == [7, 7, 7, 7, 0, 1, 7, 2, 3]
    with pytest.raises(ValueError, match="larger than"):
        kernels.im2col(x, 3, 3)
    with pytest.raises(ValueError, match="stride"):
        kernels.im2col(x, 1, 1, stride=0)
