"""Ternary quantisers (TWN, TTQ) against hand-computed references."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from lowbit.quant import create, get
from lowbit.quant.ternary import MIN_SCALE, TernaryTTQ, TernaryTWN

SETTINGS = settings(max_examples=50, deadline=None)
weights = arrays(
    np.float32,
    array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
    elements=st.floats(-3, 3, width=32),
).map(torch.from_numpy)
scales = st.floats(0.015625, 4.0, width=32)

# TTQ example with dyadic values: max|w| = 2, t = 0.25, so delta = 0.25 exactly.
TTQ_W = [2.0, -2.0, 0.5, -0.5, 1.0, -0.75, 0.0, 0.25]
# wn = w / 2 = [1, -1, .25, -.25, .5, -.375, 0, .125]: Ip = {0, 4}, In = {1, 5}, rest zero
TTQ_CODES = [1, -1, 0, 0, 1, -1, 0, 0]
TTQ_G = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def ttq(wp: float, wn: float, threshold: float = 0.25, dtype=torch.float32) -> TernaryTTQ:
    """A TTQ quantiser with given scales, marked initialised."""
    q = TernaryTTQ(threshold=threshold).to(dtype)
    with torch.no_grad():
        q.wp.fill_(wp)
        q.wn.fill_(wn)
        q.initialized.fill_(1)
    return q


# --- registry and options -------------------------------------------------------------------


def test_registry_and_bits() -> None:
    assert get("twn", "weight") is TernaryTWN and get("ttq", "weight") is TernaryTTQ
    for name in ("twn", "ttq"):
        with pytest.raises(ValueError, match="activation"):
            create(name, "activation")
    assert create("ttq", "weight", threshold=0.1).threshold == 0.1
    assert TernaryTWN().bits == 2 and TernaryTTQ().bits == 2
    assert TernaryTWN().delta_factor == 0.7 and TernaryTTQ().threshold == 0.05


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (TernaryTWN, {"delta_factor": -0.1}, "delta_factor"),
        (TernaryTWN, {"delta_factor": float("nan")}, "delta_factor"),
        (TernaryTWN, {"delta_factor": "0.7"}, "delta_factor"),
        (TernaryTTQ, {"threshold": 1.0}, "threshold"),
        (TernaryTTQ, {"threshold": -0.01}, "threshold"),
    ],
)
def test_bad_options_name_the_option(cls: type, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


# --- TWN ------------------------------------------------------------------------------------


def test_twn_threshold_edges() -> None:
    # mean|w| = 8 / 8 = 1 and delta_factor 0.5: delta = 0.5; |w| == delta stays 0
    w = torch.tensor([0.5, -0.5, 2.0, -1.5, 0.25, 0.75, -2.5, 0.0])
    wt = [0, 0, 1, -1, 0, 1, -1, 0]
    alpha = (2.0 + 1.5 + 0.75 + 2.5) / 4  # 1.6875, exact
    q = TernaryTWN(delta_factor=0.5)
    assert q(w).tolist() == [alpha * t for t in wt]
    codes, spec = q.codes(w)
    assert codes.dtype == torch.int8 and codes.tolist() == wt
    assert spec.scheme == "ternary" and spec.bits == 2 and spec.scale_neg is None
    assert spec.scale.dim() == 0 and spec.scale.item() == alpha
    assert_bitwise(spec.dequantize(codes), q(w))


def test_twn_default_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3))
    delta = 0.7 * np.mean(np.abs(w))
    wt = (w > delta).astype(float) - (w < -delta).astype(float)
    alpha = np.mean(np.abs(w[np.abs(w) > delta]))
    out = TernaryTWN()(torch.tensor(w)).numpy()
    np.testing.assert_allclose(out, alpha * wt, rtol=1e-12)


def test_twn_all_zero_weights() -> None:
    out = TernaryTWN()(torch.zeros(3, 4))
    assert torch.equal(out, torch.zeros(3, 4))


def test_twn_gradient_is_identity_ste() -> None:
    w = torch.tensor([0.5, -0.5, 2.0, -1.5, 0.25, 0.75, -2.5, 0.0], requires_grad=True)
    g = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.7, 1.1, 0.9, -2.0])
    TernaryTWN(delta_factor=0.5)(w).backward(g)
    # alpha is a constant: dw = g everywhere (a differentiable alpha would add a term)
    assert torch.equal(w.grad, g)


# --- TTQ: forward, init, state --------------------------------------------------------------


def test_ttq_lazy_init_and_regions() -> None:
    q = TernaryTTQ(threshold=0.25)
    assert int(q.initialized) == 0
    out = q(torch.tensor(TTQ_W))
    assert int(q.initialized) == 1
    assert q.wp.item() == (1.0 + 0.5) / 2  # mean |wn| over Ip
    assert q.wn.item() == (1.0 + 0.375) / 2  # mean |wn| over In
    assert out.tolist() == [0.75, -0.6875, 0, 0, 0.75, -0.6875, 0, 0]
    assert q.sparsity(torch.tensor(TTQ_W)) == 4 / 8
    # initialised once: other weights later do not reset the scales
    q(torch.tensor(TTQ_W) * 3 + 1)
    assert (q.wp.item(), q.wn.item()) == (0.75, 0.6875)


def test_ttq_default_threshold_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(scale=0.1, size=(6, 5))
    wn = w / np.abs(w).max()
    delta = 0.05 * np.abs(wn).max()
    ip, in_ = wn > delta, wn < -delta
    q = TernaryTTQ().double()
    out = q(torch.tensor(w)).detach().numpy()
    wp_ref, wn_ref = np.abs(wn[ip]).mean(), np.abs(wn[in_]).mean()
    np.testing.assert_allclose([q.wp.item(), q.wn.item()], [wp_ref, wn_ref], rtol=1e-12)
    np.testing.assert_allclose(out, np.where(ip, wp_ref, np.where(in_, -wn_ref, 0.0)))
    assert q.sparsity(torch.tensor(w)) == pytest.approx(1 - (ip.sum() + in_.sum()) / w.size)


def test_ttq_init_from_empty_region_and_zero_weights() -> None:
    q = TernaryTTQ()
    q.init_from(torch.tensor([0.0, 0.5, 1.0]))  # no negative region
    assert q.wp.item() == 0.75 and q.wn.item() == 1.0
    out = TernaryTTQ()(torch.zeros(4))
    assert torch.equal(out, torch.zeros(4))


def test_ttq_codes_bitwise_and_asymmetric() -> None:
    q = ttq(1.5, 0.375)
    w = torch.tensor(TTQ_W)
    codes, spec = q.codes(w)
    assert codes.dtype == torch.int8 and codes.tolist() == TTQ_CODES
    assert spec.scheme == "ternary" and spec.bits == 2
    assert spec.scale.item() == 1.5 and spec.scale_neg.item() == 0.375
    assert_bitwise(spec.dequantize(codes), q(w))


def test_ttq_codes_initialise_like_forward() -> None:
    q = TernaryTTQ(threshold=0.25)
    _, spec = q.codes(torch.tensor(TTQ_W))
    assert (spec.scale.item(), spec.scale_neg.item()) == (0.75, 0.6875)


def test_ttq_state_dict_round_trip_skips_reinit() -> None:
    src = TernaryTTQ(threshold=0.25)
    src(torch.tensor(TTQ_W))
    with torch.no_grad():
        src.wp.fill_(1.25)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = TernaryTTQ(threshold=0.25)
    dst.load_state_dict(torch.load(buf))
    assert set(dst.state_dict()) == {"wp", "wn", "initialized"}
    out = dst(torch.tensor(TTQ_W))  # loaded as initialised: no re-init from these weights
    assert (dst.wp.item(), dst.wn.item(), int(dst.initialized)) == (1.25, 0.6875, 1)
    assert out.tolist() == [1.25, -0.6875, 0, 0, 1.25, -0.6875, 0, 0]


# --- TTQ: gradients -------------------------------------------------------------------------


def test_ttq_scale_gradients_chain_rule_sign() -> None:
    q = ttq(1.5, 0.5)
    w = torch.tensor(TTQ_W, requires_grad=True)
    q(w).backward(torch.tensor(TTQ_G))
    assert q.wp.grad.item() == 1.0 + 5.0  # sum of g over Ip
    assert q.wn.grad.item() == -(2.0 + 6.0)  # -sum of g over In
    # The paper's Eq. 6 as printed (+sum over In) would give +8: with g > 0 the sign must be -.
    assert q.wn.grad.item() < 0


def test_ttq_scale_gradients_match_finite_differences() -> None:
    # wq is linear in (Wp, Wn), so numerical differentiation is exact there.
    q = ttq(1.5, 0.5, dtype=torch.float64)
    w = torch.tensor(TTQ_W, dtype=torch.float64)
    g = torch.tensor(TTQ_G, dtype=torch.float64)

    def loss(wp: torch.Tensor, wn: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(q, {"wp": wp, "wn": wn}, (w,))
        return (g * out).sum()

    wp = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    wn = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (wp, wn))


def test_ttq_latent_gradient_scaled_ste() -> None:
    wp, wn, max_abs = 1.5, 0.5, 2.0
    q = ttq(wp, wn)
    w = torch.tensor(TTQ_W, requires_grad=True)
    q(w).backward(torch.tensor(TTQ_G))
    mult = {1: wp, 0: 1.0, -1: wn}
    expected = [mult[c] * g / max_abs for c, g in zip(TTQ_CODES, TTQ_G, strict=True)]
    assert w.grad.tolist() == expected


def test_ttq_scales_kept_positive_but_gradient_flows() -> None:
    q = ttq(-0.5, 0.5)
    w = torch.tensor(TTQ_W, requires_grad=True)
    out = q(w)
    assert out[0].item() == pytest.approx(MIN_SCALE)
    out.backward(torch.tensor(TTQ_G))
    assert q.wp.grad.item() == 6.0  # straight through the clamp: the scale can recover


def test_ttq_training_moves_scales_and_lowers_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randint(-1, 2, (4, 8), generator=gen).float()
    teacher = torch.where(teacher > 0, 0.8 * teacher, 0.3 * teacher)  # asymmetric {-.3, 0, .8}
    x = torch.randn(64, 8, generator=gen)
    y = x @ teacher.T
    w = torch.nn.Parameter(torch.randn(4, 8, generator=gen) * 0.1)
    q = TernaryTTQ()
    q(w)  # initialise the scales before handing them to the optimizer
    start = (q.wp.item(), q.wn.item())
    opt = torch.optim.SGD([w, q.wp, q.wn], lr=0.01)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(x @ q(w).T, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert q.wp.item() != start[0] and q.wn.item() != start[1]


# --- properties -----------------------------------------------------------------------------


@SETTINGS
@given(w=weights, factor=st.floats(0.0, 1.5))
def test_twn_levels_codes_idempotence(w: torch.Tensor, factor: float) -> None:
    q = TernaryTWN(delta_factor=factor)
    out = q(w)
    codes, spec = q.codes(w)
    alpha = spec.scale
    assert torch.all((out == 0) | (out == alpha) | (out == -alpha))
    assert_bitwise(spec.dequantize(codes), out)
    if factor < 1:
        # delta' = factor * alpha * share_nonzero < alpha: the support is kept and alpha is
        # recomputed as a mean of equal values, so idempotent up to the rounding of that mean
        torch.testing.assert_close(q(out), out, rtol=1e-5, atol=0)


@SETTINGS
@given(w=weights, wp=scales, wn=scales, t=st.floats(0.0, 0.5))
def test_ttq_levels_codes_idempotence(w: torch.Tensor, wp: float, wn: float, t: float) -> None:
    q = ttq(wp, wn, threshold=t)
    out = q(w)
    vp, vn = q.wp.detach(), q.wn.detach()
    assert torch.all((out == 0) | (out == vp) | (out == -vn))
    codes, spec = q.codes(w)
    assert_bitwise(spec.dequantize(codes), out)
    # Idempotent exactly when neither scale falls under the threshold after renormalising by
    # max(Wp, Wn); otherwise the smaller side collapses to 0.
    if min(wp, wn) > t * max(wp, wn):
        assert torch.equal(q(out), out)


def test_ttq_not_idempotent_when_a_scale_is_under_threshold() -> None:
    q = ttq(1.0, 0.25)  # Wn / max(Wp, Wn) = 0.25 <= t = 0.25
    out = q(torch.tensor(TTQ_W))
    assert out.tolist() == [1.0, -0.25, 0, 0, 1.0, -0.25, 0, 0]
    assert q(out).tolist() == [1.0, 0, 0, 0, 1.0, 0, 0, 0]


@SETTINGS
@given(wp=scales, wn=scales, init=st.booleans())
def test_ttq_state_dict_round_trip(wp: float, wn: float, init: bool) -> None:
    src = ttq(wp, wn)
    src.initialized.fill_(int(init))
    dst = TernaryTTQ(threshold=0.25)
    dst.load_state_dict(src.state_dict())
    assert dst.wp.item() == src.wp.item() and dst.wn.item() == src.wn.item()
    assert dst.initialized.dtype == src.initialized.dtype
    assert int(dst.initialized) == int(init)
