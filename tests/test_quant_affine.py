"""Affine quantisers (Jacob et al. 2018) and the fixed-point requantisation helpers.

References are independent of the implementation: scales computed by hand in numpy, PyTorch's
own fake-quant ops and min/max observer, and exact Python big-integer / Fraction arithmetic.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.quantization.observer import MinMaxObserver

from lowbit.fixedpoint import (
    INT32_MAX,
    INT32_MIN,
    quantize_multiplier,
    requantize,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)
from lowbit.quant import create
from lowbit.quant.affine import AffineActivation, AffineWeight, nudge_range

SETTINGS = settings(max_examples=50, deadline=None)
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def hand_qparams(lo: float, hi: float, qmin: int = 0, qmax: int = 255) -> tuple[float, int]:
    """Scale and zero point by the nudging rule, in numpy float32."""
    lo32, hi32 = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
    scale = max((hi32 - lo32) / np.float32(qmax - qmin), np.finfo(np.float32).eps)
    zp = int(np.clip(qmin - np.round(lo32 / np.float32(scale)), qmin, qmax))
    return float(scale), zp


# --------------------------------------------------------------------------- nudge_range


@SETTINGS
@given(finite, finite)
def test_nudge_range_matches_torch_observer(a: float, b: float) -> None:
    lo, hi = min(a, b), max(a, b)
    obs = MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=255)
    ref_s, ref_z = obs._calculate_qparams(torch.tensor(lo), torch.tensor(hi))
    s, z = nudge_range(lo, hi, 0, 255)
    assert s.item() == ref_s.item()
    assert z.item() == ref_z.item()


@SETTINGS
@given(finite, finite, st.sampled_from([(0, 255), (-128, 127), (0, 15), (-7, 7)]))
def test_nudge_range_zero_exact_and_range_covered(a: float, b: float, grid: tuple) -> None:
    qmin, qmax = grid
    lo, hi = min(a, b), max(a, b)
    s, z = nudge_range(lo, hi, qmin, qmax)
    assert s.item() > 0 and math.isfinite(s.item())
    assert qmin <= z.item() <= qmax
    assert z.dtype == torch.int32
    zero = torch.zeros(3)
    assert torch.equal(torch.fake_quantize_per_tensor_affine(zero, s, z, qmin, qmax), zero)
    # the nudged range [S(qmin - Z), S(qmax - Z)] covers [min(lo,0), max(hi,0)] up to S/2
    s_, z_ = s.item(), z.item()
    assert s_ * (qmin - z_) <= min(lo, 0.0) + 0.5 * s_ * (1 + 1e-5)
    assert s_ * (qmax - z_) >= max(hi, 0.0) - 0.5 * s_ * (1 + 1e-5)


def test_nudge_range_ranges_containing_zero_unchanged() -> None:
    s, z = nudge_range(0.0, 5.1, 0, 255)
    assert z.item() == 0 and s.item() == pytest.approx(5.1 / 255, rel=1e-7)
    s, z = nudge_range(-2.55, 0.0, 0, 255)
    assert z.item() == 255 and s.item() == pytest.approx(2.55 / 255, rel=1e-7)
    s, z = nudge_range(-1.0, 3.0, 0, 255)
    assert s.item() == pytest.approx(4.0 / 255, rel=1e-7)
    assert z.item() == round(1.0 / (4.0 / 255))


def test_nudge_range_one_signed_ranges_are_extended_to_zero() -> None:
    s, z = nudge_range(2.0, 5.0, 0, 255)  # all positive -> [0, 5]
    assert (s.item(), z.item()) == (pytest.approx(5.0 / 255, rel=1e-7), 0)
    s, z = nudge_range(-5.0, -2.0, 0, 255)  # all negative -> [-5, 0]
    assert (s.item(), z.item()) == (pytest.approx(5.0 / 255, rel=1e-7), 255)


def test_nudge_range_degenerate() -> None:
    for v in (0.0, 3.0, -3.0):
        s, z = nudge_range(v, v, 0, 255)
        assert math.isfinite(s.item()) and s.item() > 0
        assert 0 <= z.item() <= 255
    s, z = nudge_range(0.0, 0.0, 0, 255)
    x = torch.tensor([0.0, 0.0])
    assert torch.equal(torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255), x)
    assert nudge_range(3.0, 3.0, 0, 255)[0].item() == pytest.approx(3.0 / 255, rel=1e-7)


def test_nudge_range_elementwise_and_bad_input() -> None:
    lo, hi = torch.tensor([-1.0, 0.5, -3.0]), torch.tensor([1.0, 2.0, -1.0])
    s, z = nudge_range(lo, hi, 0, 255)
    for i in range(3):
        s_i, z_i = hand_qparams(lo[i].item(), hi[i].item())
        assert s[i].item() == s_i and z[i].item() == z_i
    with pytest.raises(ValueError, match="qmin"):
        nudge_range(0.0, 1.0, 5, 5)
    with pytest.raises(ValueError, match="min_val"):
        nudge_range(2.0, 1.0, 0, 255)


# --------------------------------------------------------------------------- AffineWeight


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_weight_per_channel_matches_torch_fake_quant(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 3, 3, 3, generator=g)
    w[2] = 0.0  # an all-zero channel: scale falls back to eps, no NaN
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w.numpy()).reshape(6, -1).max(axis=1).astype(np.float32)
    scale = np.maximum(amax / np.float32(qmax), np.finfo(np.float32).eps)
    wr = w.clone().requires_grad_(True)
    ref = torch.fake_quantize_per_channel_affine(
        wr, torch.from_numpy(scale), torch.zeros(6, dtype=torch.int32), 0, -qmax, qmax
    )
    wq = w.clone().requires_grad_(True)
    out = AffineWeight(bits=bits)(wq)
    assert torch.equal(out, ref)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    gout = torch.randn(w.shape, generator=g)
    ref.backward(gout)
    out.backward(gout)
    assert torch.equal(wq.grad, wr.grad)
    # per channel: at most 2*qmax+1 distinct levels per channel, the extreme one hit
    codes = torch.round(out / torch.from_numpy(scale).reshape(-1, 1, 1, 1))
    assert codes.abs().amax().item() == qmax


def test_weight_per_tensor_matches_torch_fake_quant() -> None:
    w = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    scale = float(np.float32(np.abs(w.numpy()).max()) / np.float32(127))
    ref = torch.fake_quantize_per_tensor_affine(w, scale, 0, -127, 127)
    assert torch.equal(AffineWeight(per_channel=False)(w), ref)


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_codes_reproduce_forward(per_channel: bool) -> None:
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    q = create("affine", "weight", per_channel=per_channel)
    assert isinstance(q, AffineWeight)
    codes, spec = q.codes(w)
    assert codes.dtype == torch.int32
    assert spec.scheme == "affine" and spec.signed and (spec.qmin, spec.qmax) == (-127, 127)
    assert spec.axis == (0 if per_channel else None)
    assert not spec.zero_point.dtype.is_floating_point and not spec.zero_point.any()
    assert int(codes.min()) >= -127 and int(codes.max()) <= 127
    assert torch.equal(spec.dequantize(codes), q(w))


def test_weight_bad_options() -> None:
    for bits in (1, 9, 8.0):
        with pytest.raises(ValueError, match="bits"):
            AffineWeight(bits=bits)


# --------------------------------------------------------------------------- AffineActivation


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 5, generator=g) * (1 + i) + 0.3 * i for i in range(n)]


def test_activation_first_batch_matches_torch_fake_quant_and_ste() -> None:
    x = batches(1)[0]
    s, z = hand_qparams(x.min().item(), x.max().item())
    xr = x.clone().requires_grad_(True)
    ref = torch.fake_quantize_per_tensor_affine(xr, s, z, 0, 255)
    xq = x.clone().requires_grad_(True)
    out = AffineActivation()(xq)
    assert torch.equal(out, ref)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ref.backward(g)
    out.backward(g)
    assert torch.equal(xq.grad, xr.grad)


def test_activation_clipping_gradient_in_eval() -> None:
    q = AffineActivation(bits=4)
    q(torch.linspace(-1.0, 2.0, 50))
    q.eval()
    x = torch.linspace(-3.0, 4.0, 71, requires_grad=True)
    out = q(x)
    s, z = hand_qparams(q.min_val.item(), q.max_val.item(), 0, 15)
    xr = x.detach().clone().requires_grad_(True)
    ref = torch.fake_quantize_per_tensor_affine(xr, s, z, 0, 15)
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(x.grad, xr.grad)
    assert 0 < x.grad.sum().item() < 71  # some inputs clipped, gradient 0 there


def test_activation_ema_matches_hand_computation() -> None:
    decay = 0.9
    q = AffineActivation(ema_decay=decay)
    xs = batches(4)
    lo = hi = None
    for x in xs:
        q(x)
        bmin, bmax = float(x.min()), float(x.max())
        lo = bmin if lo is None else decay * lo + (1 - decay) * bmin
        hi = bmax if hi is None else decay * hi + (1 - decay) * bmax
    assert q.min_val.item() == pytest.approx(lo, rel=1e-6)
    assert q.max_val.item() == pytest.approx(hi, rel=1e-6)
    assert bool(q.initialized) and int(q.steps) == 4
    # the last training forward used the range updated with its own batch
    s, z = hand_qparams(q.min_val.item(), q.max_val.item())
    x = xs[-1]
    q2 = AffineActivation(ema_decay=decay)
    q2.load_state_dict(q.state_dict())
    q2.eval()
    assert torch.equal(q2(x), torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255))


def test_activation_quant_delay_passes_through_then_quantises() -> None:
    q = AffineActivation(quant_delay=2, ema_decay=0.5)
    xs = batches(3, seed=5)
    for x in xs[:2]:
        xr = x.clone().requires_grad_(True)
        out = q(xr)
        assert torch.equal(out, x)
        out.sum().backward()
        assert torch.equal(xr.grad, torch.ones_like(x))
    expected_lo = 0.5 * float(xs[0].min()) + 0.5 * float(xs[1].min())
    assert q.min_val.item() == pytest.approx(expected_lo, rel=1e-6)  # EMA ran during the delay
    q.eval()
    assert not torch.equal(q(xs[2]), xs[2])  # delay elapsed: eval quantises
    q.train()
    out = q(xs[2])
    s, z = hand_qparams(q.min_val.item(), q.max_val.item())
    assert torch.equal(out, torch.fake_quantize_per_tensor_affine(xs[2], s, z, 0, 255))
    assert int(q.steps) == 3


def test_activation_eval_does_not_update_and_uninitialised_passes() -> None:
    q = AffineActivation().eval()
    x = batches(1)[0]
    assert torch.equal(q(x), x)  # no range observed yet
    q.train()
    q(x)
    q.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    y = q(x * 10)
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k
    s, z = hand_qparams(float(x.min()), float(x.max()))
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x * 10, s, z, 0, 255))


def test_activation_codes_and_state_dict() -> None:
    q = create("affine", "activation", bits=8)
    assert isinstance(q, AffineActivation)
    for x in batches(3):
        q(x)
    assert set(q.state_dict()) == {"min_val", "max_val", "initialized", "steps"}
    q.eval()
    x = batches(1, seed=9)[0] * 3
    codes, spec = q.codes(x)
    assert spec.scheme == "affine" and not spec.signed and (spec.qmin, spec.qmax) == (0, 255)
    assert spec.zero_point.dtype == torch.int32 and spec.axis is None
    assert int(codes.min()) >= 0 and int(codes.max()) <= 255
    assert torch.equal(spec.dequantize(codes), q(x))


def test_activation_bad_options() -> None:
    with pytest.raises(ValueError, match="bits"):
        AffineActivation(bits=9)
    with pytest.raises(ValueError, match="ema_decay"):
        AffineActivation(ema_decay=1.0)
    with pytest.raises(ValueError, match="quant_delay"):
        AffineActivation(quant_delay=-1)
    with pytest.raises(ValueError, match="no option"):
        create("affine", "activation", per_channel=True)


# --------------------------------------------------------------------------- fixed point


@SETTINGS
@given(st.floats(2.0**-40, 2.0**30, allow_nan=False, exclude_max=True))
def test_quantize_multiplier_reconstructs(m: float) -> None:
    m0, shift = quantize_multiplier(m)
    assert 2**30 <= m0 < 2**31
    assert (shift >= 0) == (m < 1.0)
    approx = Fraction(m0, 2**31) * Fraction(2) ** (-shift)
    assert abs(approx - Fraction(m)) <= Fraction(m) * Fraction(1, 2**31)


def test_quantize_multiplier_edges_and_bad_input() -> None:
    assert quantize_multiplier(0.5) == (2**30, 0)
    assert quantize_multiplier(1.0) == (2**30, -1)
    assert quantize_multiplier(1.0 - 2.0**-40) == (2**30, -1)  # rounds up to 2^31: renormalised
    for bad in (0.0, -0.1, float("nan"), float("inf"), 2.0**31, 2.0**-70):
        with pytest.raises(ValueError, match="m"):
            quantize_multiplier(bad)


def srdhm_reference(a: int, b: int) -> int:
    """a*b/2^31 rounded to nearest, halves up; INT32_MIN * INT32_MIN saturates."""
    if a == b == INT32_MIN:
        return INT32_MAX
    return math.floor(Fraction(a * b, 2**31) + Fraction(1, 2))


def rdbpot_reference(x: int, e: int) -> int:
    """x / 2^e rounded to nearest, halves away from zero."""
    mag = math.floor(Fraction(abs(x), 2**e) + Fraction(1, 2))
    return mag if x >= 0 else -mag


INT32 = st.integers(INT32_MIN, INT32_MAX)
EDGES = [INT32_MIN, INT32_MIN + 1, -(2**30), -3, -1, 0, 1, 3, 2**30, INT32_MAX - 1, INT32_MAX]


def test_srdhm_edges() -> None:
    a = np.array([x for x in EDGES for _ in EDGES], dtype=np.int32)
    b = np.array([y for _ in EDGES for y in EDGES], dtype=np.int32)
    out = saturating_rounding_doubling_high_mul(a, b)
    assert out.dtype == np.int32
    assert out.tolist() == [srdhm_reference(int(x), int(y)) for x, y in zip(a, b, strict=True)]
    assert saturating_rounding_doubling_high_mul(INT32_MIN, INT32_MIN) == INT32_MAX
    # halves: +0.5 -> 1 and -0.5 -> 0 (rounded up); +-1.5 -> 2, -1
    halves = saturating_rounding_doubling_high_mul([1, -1, 3, -3], [2**30] * 4)
    assert halves.tolist() == [1, 0, 2, -1]


@SETTINGS
@given(st.lists(st.tuples(INT32, INT32), min_size=1, max_size=40))
def test_srdhm_random(pairs: list[tuple[int, int]]) -> None:
    a, b = (np.array(v, dtype=np.int64) for v in zip(*pairs, strict=True))
    out = saturating_rounding_doubling_high_mul(a, b)
    assert out.tolist() == [srdhm_reference(x, y) for x, y in pairs]


def test_rdbpot_edges() -> None:
    xs = np.array(EDGES, dtype=np.int32)
    for e in (0, 1, 2, 5, 30, 31, 40):
        assert rounding_divide_by_pot(xs, e).tolist() == [rdbpot_reference(int(x), e) for x in xs]
    # negative halves round away from zero
    assert rounding_divide_by_pot([-3, -1, -2, 3, 1, -6], 1).tolist() == [-2, -1, -1, 2, 1, -3]
    assert rounding_divide_by_pot([-12, 12, -11, -13], 3).tolist() == [-2, 2, -1, -2]


@SETTINGS
@given(st.lists(st.tuples(INT32, st.integers(0, 31)), min_size=1, max_size=40))
def test_rdbpot_random_per_element_exponent(pairs: list[tuple[int, int]]) -> None:
    x, e = (np.array(v, dtype=np.int64) for v in zip(*pairs, strict=True))
    assert rounding_divide_by_pot(x, e).tolist() == [rdbpot_reference(a, b) for a, b in pairs]


def test_fixedpoint_bad_input() -> None:
    with pytest.raises(ValueError, match="exponent"):
        rounding_divide_by_pot([1], 63)
    with pytest.raises(ValueError, match="a must"):
        saturating_rounding_doubling_high_mul([2**31], [1])
    with pytest.raises(ValueError, match="acc_int32"):
        requantize(np.array([1.5]), 2**30, 0, 0, 0, 255)
    with pytest.raises(ValueError, match="qmin"):
        requantize([1], 2**30, 0, 0, 10, 0)


@pytest.mark.parametrize("seed", range(6))
def test_requantize_vs_float_off_by_one_rate(seed: int) -> None:
    """Off by at most one from clamp(round(m acc) + Z), at a rate of about 2^-(n+1).

    Every mismatch lies within 2^-(n+1) of a half (double rounding), which the rate bound and
    the distance check below pin down.
    """
    rng = np.random.default_rng(seed)
    m = float(rng.uniform(0.5, 1.0) * 2.0 ** -rng.integers(0, 12))
    m0, n = quantize_multiplier(m)
    acc = rng.integers(-(2**22), 2**22, size=200_000)
    zp = int(rng.integers(0, 256))
    got = requantize(acc, m0, n, zp, INT32_MIN, INT32_MAX).astype(np.int64)
    exact = m * acc.astype(np.float64)
    ref = np.round(exact).astype(np.int64) + zp
    diff = got - ref
    assert np.abs(diff).max() <= 1
    rate = np.mean(diff != 0)
    assert rate <= 1.2 * 2.0 ** -(n + 1) + 1e-3
    frac = np.abs(exact[diff != 0] % 1.0 - 0.5)
    assert np.all(frac <= 2.0 ** -(n + 1) + 1e-6)
    clamped = requantize(acc, m0, n, zp, 0, 255)
    assert np.array_equal(clamped, np.clip(got, 0, 255))


def test_requantize_multiplier_above_one_and_saturation() -> None:
    m = math.pi  # irrational-ish: no exact ties, and n = 0 after the left shift
    m0, n = quantize_multiplier(m)
    assert n < 0
    acc = np.arange(-1000, 1000)
    got = requantize(acc, m0, n, 10, INT32_MIN, INT32_MAX).astype(np.int64)
    assert np.array_equal(got, np.round(m * acc).astype(np.int64) + 10)
    # exact ties round up (towards +inf), not to even: 1.5 -> 2, -1.5 -> -1, -4.5 -> -4
    m0, n = quantize_multiplier(1.5)
    assert requantize([1, -1, 3, -3], m0, n, 0, -100, 100).tolist() == [2, -1, 5, -4]
    # a left shift beyond int32 saturates, then the clamp applies
    big = requantize([INT32_MAX, INT32_MIN], m0, n, 0, 0, 255)
    assert big.tolist() == [255, 0]


def test_requantize_per_channel_broadcast() -> None:
    ms = [0.003, 0.02, 0.4]
    params = [quantize_multiplier(m) for m in ms]
    m0 = np.array([p[0] for p in params]).reshape(3, 1)
    n = np.array([p[1] for p in params]).reshape(3, 1)
    acc = np.random.default_rng(0).integers(-5000, 5000, size=(3, 7))
    out = requantize(acc, m0, n, 128, 0, 255)
    for c in range(3):
        assert np.array_equal(out[c], requantize(acc[c], params[c][0], params[c][1], 128, 0, 255))
