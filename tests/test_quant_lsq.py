"""LSQ (Esser et al. 2019) against hand values, Eq. 3/4 by hand and PyTorch's fake-quant ops.

Idempotence ``q(q(x)) == q(x)`` holds for LSQ once ``s`` is set: the grid points are fixed points.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.quant import create
from lowbit.quant.lsq import LSQ

SETTINGS = settings(max_examples=50, deadline=None)


def bounds(bits: int, signed: bool) -> tuple[int, int]:
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def with_step(q: LSQ, x: torch.Tensor, step: torch.Tensor | float) -> LSQ:
    """Initialise ``q`` on ``x`` (materialising a per-channel step), then overwrite the step."""
    q(x)
    with torch.no_grad():
        q.step.copy_(torch.as_tensor(step, dtype=q.step.dtype))
    q.step.grad = None
    return q


def hand_step_grad(v: np.ndarray, s: np.ndarray, qn: int, qp: int) -> np.ndarray:
    """Eq. 3 per element: -QN / QP beyond the (rounded) range, round(v/s) - v/s inside."""
    q = v.astype(np.float64) / s
    r = np.round(q)
    return np.where(r < -qn, -qn, np.where(r > qp, qp, r - q))


def per_element_step_grad(q: LSQ, v: torch.Tensor) -> torch.Tensor:
    """d y_i / d s for every element i (one backward per element), shaped like ``v``."""
    y = q(v).reshape(-1)
    rows = []
    for i in range(y.numel()):
        (g,) = torch.autograd.grad(y[i], q.step, retain_graph=True)
        rows.append(g.reshape(-1)[i // (v.numel() // g.numel())])
    return torch.stack(rows).reshape(v.shape)


# ----------------------------------------------------------------------------- forward values
def test_forward_signed_by_hand() -> None:
    v = torch.tensor([-3.0, -2.2, -0.74, -0.26, 0.0, 0.24, 0.76, 1.3, 1.76, 5.0])
    q = with_step(LSQ("weight", bits=3), v, 0.5)  # QN = 4, QP = 3
    expected = torch.tensor([-2.0, -2.0, -0.5, -0.5, 0.0, 0.0, 1.0, 1.5, 1.5, 1.5])
    assert torch.equal(q(v), expected)


def test_forward_unsigned_by_hand() -> None:
    x = torch.tensor([[0.0, 0.2, 0.3, 0.8, 1.4, 2.0]])
    q = with_step(LSQ("activation", bits=2), x, 0.5)  # QN = 0, QP = 3
    assert not bool(q.signed)
    assert torch.equal(q(x), torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.5, 1.5]]))
    # halves round to even: 0.25/0.5 = 0.5 -> 0, 0.75/0.5 = 1.5 -> 2
    assert torch.equal(q(torch.tensor([[0.25, 0.75]])), torch.tensor([[0.0, 1.0]]))


def test_init_per_tensor_and_per_channel() -> None:
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5], [-2.0, 0.0]])
    q = LSQ(bits=4)  # QP = 7
    q(w)
    assert math.isclose(q.step.item(), 2 * (7.0 / 6) / math.sqrt(7), rel_tol=1e-6)
    pc = LSQ(bits=4, per_channel=True)
    pc(w)
    expected = 2 * torch.tensor([2.0, 0.5, 1.0]) / math.sqrt(7)
    torch.testing.assert_close(pc.step.detach(), expected)
    assert bool(q.initialized) and bool(pc.initialized)


def test_activation_initialises_on_first_batch_only() -> None:
    q = LSQ("activation", bits=2)
    first = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    q(first)
    assert not bool(q.signed)  # min >= 0 -> unsigned, QP = 3
    assert math.isclose(q.step.item(), 2 * 1.5 / math.sqrt(3), rel_tol=1e-6)
    q(-10 * first)
    assert not bool(q.signed)
    assert math.isclose(q.step.item(), 2 * 1.5 / math.sqrt(3), rel_tol=1e-6)
    signed = LSQ("activation", bits=2)
    signed(torch.tensor([[-0.5, 1.0]]))
    assert bool(signed.signed)


def test_explicit_signed_overrides_data() -> None:
    q = LSQ("activation", bits=3, signed=True)
    x = torch.tensor([[0.0, 1.0, 2.0]])
    q(x)
    assert bool(q.signed)
    c, spec = q.codes(-x)
    assert spec.qmin == -4 and spec.qmax == 3 and spec.signed
    assert int(c.min()) < 0


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_step_gradient_elementwise_eq3(signed: bool, per_channel: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(4, 6, generator=gen) * 2
    bits = 3
    qn, qp = bounds(bits, signed)
    steps = torch.tensor([0.3, 0.45, 0.6, 0.8]) if per_channel else torch.tensor(0.45)
    q = with_step(LSQ(bits=bits, signed=signed, per_channel=per_channel), v, steps)
    got = per_element_step_grad(q, v)
    s = steps.reshape(-1, 1).numpy() if per_channel else steps.numpy()
    n = v.numel() // (v.shape[0] if per_channel else 1)
    expected = hand_step_grad(v.numpy(), s, qn, qp) / math.sqrt(n * qp)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    # both clipped sides and the inside occur in this sample
    r = np.round(v.numpy() / s)
    assert (r > qp).any() and (r < -qn).any() and ((r >= -qn) & (r <= qp)).any()


def test_gradient_boundary_convention() -> None:
    """Inside = round(v/s) in [-QN, QP] (PyTorch's convention), checked at the half-step band."""
    s, qp = 0.5, 3  # unsigned 2-bit
    v = torch.tensor([[(qp + 0.3) * s, (qp + 0.7) * s, -0.3 * s, -0.7 * s, 1.2 * s]])
    q = with_step(LSQ("activation", bits=2, signed=False, grad_scale=False), v.abs(), s)
    vv = v.clone().requires_grad_()
    q(vv).sum().backward()
    assert vv.grad.tolist() == [[1.0, 0.0, 1.0, 0.0, 1.0]]
    got = per_element_step_grad(q, v)
    torch.testing.assert_close(got, torch.tensor([[-0.3, 3.0, 0.3, 0.0, -0.2]]))


def _ours(q: LSQ, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    y = q(x)
    y.backward(g)
    return y.detach(), x.grad, q.step.grad.reshape(-1)


def _random_case(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("grad_scale", [True, False])
def test_matches_pytorch_per_tensor(bits: int, signed: bool, grad_scale: bool) -> None:
    x, g = _random_case(bits, (8, 40))
    qn, qp = bounds(bits, signed)
    q = with_step(LSQ(bits=bits, signed=signed, grad_scale=grad_scale), x, 6.0 / qp)
    y, gx, gs_ours = _ours(q, x, g)
    gs = 1 / math.sqrt(x.numel() * qp) if grad_scale else 1.0
    xr = x.clone().requires_grad_()
    scale = torch.tensor([6.0 / qp], requires_grad=True)
    yr = torch._fake_quantize_learnable_per_tensor_affine(xr, scale, torch.zeros(1), -qn, qp, gs)
    yr.backward(g)
    torch.testing.assert_close(y, yr.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, xr.grad, rtol=0, atol=0)
    torch.testing.assert_close(gs_ours, scale.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_matches_pytorch_per_channel(bits: int, signed: bool) -> None:
    x, g = _random_case(10 + bits, (5, 3, 4))
    qn, qp = bounds(bits, signed)
    steps = torch.linspace(2.0, 8.0, 5) / qp
    q = with_step(LSQ(bits=bits, signed=signed, per_channel=True), x, steps)
    y, gx, gs_ours = _ours(q, x, g)
    gs = 1 / math.sqrt(x[0].numel() * qp)
    xr = x.clone().requires_grad_()
    scale = steps.clone().requires_grad_()
    yr = torch._fake_quantize_learnable_per_channel_affine(
        xr, scale, torch.zeros(5), 0, -qn, qp, gs
    )
    yr.backward(g)
    torch.testing.assert_close(y, yr.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, xr.grad, rtol=0, atol=0)
    torch.testing.assert_close(gs_ours, scale.grad, rtol=1e-4, atol=1e-5)


def test_activation_gradient_scale_uses_features_per_sample() -> None:
    x, g = _random_case(3, (4, 2, 3, 5))
    x = x.relu()
    q = with_step(LSQ("activation", bits=4), x, 0.4)
    assert math.isclose(q.grad_factor(x), 1 / math.sqrt(30 * 15))
    _, _, gs_ours = _ours(q, x, g)
    scale = torch.tensor([0.4], requires_grad=True)
    yr = torch._fake_quantize_learnable_per_tensor_affine(
        x, scale, torch.zeros(1), 0, 15, 1 / math.sqrt(30 * 15)
    )
    yr.backward(g)
    torch.testing.assert_close(gs_ours, scale.grad, rtol=1e-4, atol=1e-6)


def test_negative_step_is_used_by_magnitude() -> None:
    v = torch.tensor([-1.0, 0.3, 0.9])
    q = with_step(LSQ(bits=3), v, -0.5)
    assert torch.equal(q(v), torch.tensor([-1.0, 0.5, 1.0]))
    c, spec = q.codes(v)
    assert float(spec.scale) == 0.5 and c.tolist() == [-2, 1, 2]


# ----------------------------------------------------------------------------- properties
def float_arrays(min_rows: int = 1) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(
        np.float32,
        st.tuples(st.integers(min_rows, 4), st.integers(1, 8)),
        elements=st.floats(-50, 50, width=32, allow_subnormal=False),
    )


@SETTINGS
@given(
    x=float_arrays(),
    bits=st.integers(2, 8),
    role=st.sampled_from(["weight", "activation"]),
    signed=st.sampled_from([None, True, False]),
    per_channel=st.booleans(),
)
def test_properties(
    x: np.ndarray, bits: int, role: str, signed: bool | None, per_channel: bool
) -> None:
    per_channel = per_channel and role == "weight"
    q = LSQ(role, bits=bits, signed=signed, per_channel=per_channel)  # type: ignore[arg-type]
    t = torch.from_numpy(x)
    y = q(t).detach()
    qn, qp = bounds(bits, bool(q.signed))
    s = q.step.detach().abs().reshape(-1, 1) if per_channel else q.step.detach().abs()
    for levels in y if per_channel else [y]:  # one grid per channel
        assert torch.unique(levels).numel() <= 2**bits
    # relative tolerance: the step forward uses (Eq. 4's gradient-scale trick) can be an ulp off
    # ``step``, which the largest code multiplies
    tol = 1 + 1e-6
    assert bool((y >= -qn * s * tol).all() and (y <= qp * s * tol).all())
    assert torch.equal(q(y).detach(), y)
    c, spec = q.codes(t)
    assert c.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)
    assert spec.qmin == -qn and spec.qmax == qp and spec.bits == bits
    assert int(c.min()) >= spec.qmin and int(c.max()) <= spec.qmax
    assert torch.equal(spec.dequantize(c), y)


# ----------------------------------------------------------------------------- state and training
@pytest.mark.parametrize("per_channel", [False, True])
def test_state_dict_round_trip_weights(per_channel: bool) -> None:
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    a = LSQ(bits=4, per_channel=per_channel)
    a(w)
    with torch.no_grad():
        a.step.mul_(1.5)  # distinguishable from a fresh initialisation
    state = a.state_dict()
    assert set(state) == {"step", "signed", "initialized"}
    b = LSQ(bits=4, per_channel=per_channel)
    b.load_state_dict(state)
    assert torch.equal(b(w), a(w))
    torch.testing.assert_close(b.step.detach(), a.step.detach(), rtol=0, atol=0)


def test_state_dict_round_trip_activation_sign_and_no_reinit() -> None:
    a = LSQ("activation", bits=3)
    a(torch.tensor([[0.0, 2.0, 4.0]]))
    b = LSQ("activation", bits=3)
    b.load_state_dict(a.state_dict())
    x = torch.tensor([[-1.0, 0.5, 100.0]])
    assert torch.equal(b(x), a(x))
    assert not bool(b.signed) and b.step.item() == a.step.item()
    assert float(b(x).detach().min()) == 0.0  # unsigned grid kept although x has negatives


def test_loading_resets_cached_sign() -> None:
    """A module already used keeps no stale Python-side copy of the loaded buffers."""
    unsigned = LSQ("activation", bits=3)
    unsigned(torch.tensor([[0.0, 1.0]]))
    signed = LSQ("activation", bits=3)
    signed(torch.tensor([[-1.0, 1.0]]))
    unsigned.load_state_dict(signed.state_dict())
    assert float(unsigned(torch.tensor([[-1.0, 1.0]])).detach().min()) < 0


def test_step_moves_under_sgd() -> None:
    x = torch.randn(256, generator=torch.Generator().manual_seed(0))
    q = LSQ(bits=3)
    opt = torch.optim.SGD(q.parameters(), lr=10.0)  # gs = 1/sqrt(256 * 3) damps the step
    q(x)
    with torch.no_grad():
        q.step.fill_(1.5)  # far too coarse for N(0, 1) data
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (q(x) - x).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert q.step.item() < 1.2
    assert losses[-1] < 0.7 * losses[0]


def test_optimizer_built_before_lazy_per_channel_step() -> None:
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    q = LSQ(bits=4, per_channel=True)
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    loss = (q(w) - 2 * w).square().sum()
    before = q.step.detach().clone()
    loss.backward()
    opt.step()
    assert q.step.shape == (4,) and not torch.equal(q.step.detach(), before)


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": True}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"signed": "yes"}, "signed"),
        ({"grad_scale": 1}, "grad_scale"),
        ({"per_channel": "no"}, "per_channel"),
    ],
)
def test_bad_options(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LSQ("weight", **kwargs)  # type: ignore[arg-type]


def test_bad_role_and_activation_per_channel() -> None:
    with pytest.raises(ValueError, match="bias"):
        LSQ("bias")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_channel"):
        LSQ("activation", per_channel=True)


def test_registry_passes_role() -> None:
    q = create("lsq", "activation", bits=3)
    assert isinstance(q, LSQ) and q.role == "activation" and q.bits == 3
    assert create("lsq", "weight").role == "weight"
