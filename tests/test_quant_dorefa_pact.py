"""DoReFa (Zhou et al. 2016) and PACT (Choi et al. 2018) against numpy references and hand values.

Idempotence ``q(q(x)) == q(x)`` holds exactly for DoReFa activations and PACT (fixed alpha), and for
1-bit DoReFa weights up to the float rounding of ``mean|w|``; it does not hold for k-bit DoReFa
weights (``tanh`` re-normalises the levels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.quant import create
from lowbit.quant.dorefa import DoReFaActivation, DoReFaWeight
from lowbit.quant.pact import PACT

SETTINGS = settings(max_examples=50, deadline=None)


def np_quantize_k(r: np.ndarray, k: int) -> np.ndarray:
    n = 2**k - 1
    return np.round(n * r) / n


def np_dorefa_weight(w: np.ndarray, k: int) -> np.ndarray:
    w = w.astype(np.float64)
    if k == 1:
        return np.where(w >= 0, 1.0, -1.0) * np.abs(w).mean()
    t = np.tanh(w)
    return 2 * np_quantize_k(t / (2 * np.abs(t).max()) + 0.5, k) - 1


def np_pact(x: np.ndarray, alpha: float, k: int) -> np.ndarray:
    n = 2**k - 1
    y = np.clip(x.astype(np.float64), 0, alpha)
    return np.round(y * n / alpha) * alpha / n


def arrays(lo: float = -5, hi: float = 5) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.integers(1, 8)),
        elements=st.floats(lo, hi, width=32, allow_subnormal=False),
    )


def check_contract(q: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bits: int) -> None:
    c, spec = q.codes(x)
    assert int(c.min()) >= spec.qmin and int(c.max()) <= spec.qmax and spec.bits == bits
    assert torch.equal(spec.dequantize(c), y)


# ----------------------------------------------------------------------------- DoReFa weights
def test_dorefa_weight_by_hand() -> None:
    w = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0])
    # 3 * (tanh(w) / (2 max|tanh|) + 1/2) = [0, 0.78, 1.5, 1.95, 2.69] -> [0, 1, 2, 2, 3]
    expected = torch.tensor([-1.0, -1 / 3, 1 / 3, 1 / 3, 1.0])
    torch.testing.assert_close(DoReFaWeight(bits=2)(w), expected)
    c, spec = DoReFaWeight(bits=2).codes(w)
    assert c.tolist() == [0, 1, 2, 2, 3]
    assert spec.scheme == "uniform" and float(spec.zero_point) == 1.5
    assert float(spec.scale) == pytest.approx(2 / 3)


def test_dorefa_weight_1bit_by_hand() -> None:
    w = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.2], requires_grad=True)
    q = DoReFaWeight(bits=1)
    y = q(w)
    torch.testing.assert_close(y, torch.tensor([-0.8, -0.8, 0.8, 0.8, 0.8]))
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y.backward(g)
    assert torch.equal(w.grad, g)  # pure straight-through, mean|w| a constant
    c, spec = q.codes(w)
    assert c.tolist() == [-1, -1, 1, 1, 1] and spec.scheme == "binary"
    assert float(spec.scale) == pytest.approx(0.8)


@pytest.mark.parametrize("bits", range(1, 9))
def test_dorefa_weight_matches_numpy(bits: int) -> None:
    w = torch.randn(6, 7, generator=torch.Generator().manual_seed(bits)) * 0.7
    got = DoReFaWeight(bits=bits)(w).detach().numpy()
    np.testing.assert_allclose(got, np_dorefa_weight(w.numpy(), bits), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
def test_dorefa_weight_gradient_is_ste_through_round_only(bits: int) -> None:
    w = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    g = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    a = w.clone().requires_grad_()
    DoReFaWeight(bits=bits)(a).backward(g)
    # the unrounded expression: 2 * (tanh(w) / (2 max|tanh w|) + 1/2) - 1 = tanh(w) / max|tanh w|
    b = w.clone().requires_grad_()
    t = torch.tanh(b)
    (t / t.abs().max()).backward(g)
    torch.testing.assert_close(a.grad, b.grad)


def test_dorefa_weight_all_zero_is_finite() -> None:
    w = torch.zeros(3, 3, requires_grad=True)
    y = DoReFaWeight(bits=2)(w)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(w.grad).all()


@SETTINGS
@given(w=arrays(), bits=st.integers(1, 8))
def test_dorefa_weight_properties(w: np.ndarray, bits: int) -> None:
    q = DoReFaWeight(bits=bits)
    t = torch.from_numpy(w)
    y = q(t)
    assert torch.unique(y).numel() <= 2**bits
    if bits == 1:
        torch.testing.assert_close(y.abs(), torch.full_like(y, float(np.abs(w).mean())))
        torch.testing.assert_close(q(y), y)  # mean|y| = mean|w| up to the float sum's rounding
    else:
        assert bool((y.abs() <= 1).all())
    check_contract(q, t, y, bits)


# ----------------------------------------------------------------------------- DoReFa activations
def test_dorefa_activation_values_and_mask() -> None:
    x = torch.tensor([-0.5, 0.0, 0.3, 0.5, 0.999, 1.0, 1.5], requires_grad=True)
    y = DoReFaActivation(bits=2)(x)  # grid {0, 1/3, 2/3, 1}; 0.5 * 3 = 1.5 -> 2 (half to even)
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]))
    y.backward(torch.full_like(y, 2.0))
    assert x.grad.tolist() == [0.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0]  # 1{0 <= x < 1}


@pytest.mark.parametrize("bits", range(1, 9))
def test_dorefa_activation_matches_numpy(bits: int) -> None:
    x = torch.rand(50, generator=torch.Generator().manual_seed(bits)) * 1.6 - 0.3
    got = DoReFaActivation(bits=bits)(x).numpy()
    ref = np_quantize_k(np.clip(x.numpy().astype(np.float64), 0, 1), bits)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@SETTINGS
@given(x=arrays(-2, 2), bits=st.integers(1, 8))
def test_dorefa_activation_properties(x: np.ndarray, bits: int) -> None:
    q = DoReFaActivation(bits=bits)
    t = torch.from_numpy(x)
    y = q(t)
    assert torch.unique(y).numel() <= 2**bits
    assert bool(((y >= 0) & (y <= 1)).all())
    assert torch.equal(q(y), y)
    check_contract(q, t, y, bits)
    _, spec = q.codes(t)
    assert spec.qmin == 0 and spec.qmax == 2**bits - 1 and not spec.signed


# ----------------------------------------------------------------------------- PACT
def test_pact_values_by_hand() -> None:
    q = PACT(bits=2, alpha_init=3.0)  # grid {0, 1, 2, 3}
    x = torch.tensor([-1.0, 0.4, 0.5, 1.5, 2.6, 3.0, 7.0])
    torch.testing.assert_close(q(x), torch.tensor([0.0, 0.0, 0.0, 2.0, 3.0, 3.0, 3.0]))


@pytest.mark.parametrize("bits", range(1, 9))
def test_pact_matches_numpy(bits: int) -> None:
    alpha = 2.5
    x = torch.randn(60, generator=torch.Generator().manual_seed(bits)) * 2
    got = PACT(bits=bits, alpha_init=alpha)(x).detach().numpy()
    np.testing.assert_allclose(got, np_pact(x.numpy(), alpha, bits), rtol=0, atol=1e-6)


def test_pact_gradients() -> None:
    q = PACT(bits=3, alpha_init=2.0)
    x = torch.tensor([-1.0, 0.0, 0.7, 1.999, 2.0, 5.0], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    q(x).backward(g)
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0, 0.0]  # 1{0 <= x < alpha}
    assert q.alpha.grad.item() == 11.0  # sum of g over x >= alpha


def test_pact_regularization() -> None:
    q = PACT(alpha_init=3.0, alpha_decay=0.01)
    r = q.regularization()
    assert r.item() == pytest.approx(0.5 * 0.01 * 9.0)
    r.backward()
    assert q.alpha.grad.item() == pytest.approx(0.01 * 3.0)  # same as weight decay 0.01


def test_pact_state_dict_round_trip() -> None:
    a = PACT(bits=4, alpha_init=6.0)
    with torch.no_grad():
        a.alpha.fill_(2.75)
    b = PACT(bits=4)
    b.load_state_dict(a.state_dict())
    assert b.alpha.item() == 2.75
    x = torch.linspace(-1, 4, 33)
    assert torch.equal(a(x), b(x))


def test_pact_alpha_moves_under_sgd() -> None:
    x = torch.rand(512, generator=torch.Generator().manual_seed(0)) * 4
    q = PACT(bits=4, alpha_init=1.0)
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = (q(x) - x).square().mean() + q.regularization()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert 3.0 < q.alpha.item() < 4.5  # grows to cover the data, which ends at 4
    assert losses[-1] < 0.1 * losses[0]


@SETTINGS
@given(x=arrays(-20, 20), bits=st.integers(1, 8), alpha=st.floats(0.1, 12))
def test_pact_properties(x: np.ndarray, bits: int, alpha: float) -> None:
    q = PACT(bits=bits, alpha_init=alpha)
    t = torch.from_numpy(x)
    y = q(t).detach()
    a = q.alpha.detach()
    assert torch.unique(y).numel() <= 2**bits
    assert bool(((y >= 0) & (y <= a * (1 + 1e-6))).all())
    assert torch.equal(q(y).detach(), y)
    check_contract(q, t, y, bits)


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (DoReFaWeight, {"bits": 0}, "bits"),
        (DoReFaWeight, {"bits": 9}, "bits"),
        (DoReFaActivation, {"bits": 2.0}, "bits"),
        (PACT, {"bits": 0}, "bits"),
        (PACT, {"alpha_init": 0.0}, "alpha_init"),
        (PACT, {"alpha_init": float("nan")}, "alpha_init"),
        (PACT, {"alpha_init": "6"}, "alpha_init"),
        (PACT, {"alpha_decay": -1e-4}, "alpha_decay"),
    ],
)
def test_bad_options(cls: type, kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_registry() -> None:
    assert isinstance(create("dorefa", "weight", bits=2), DoReFaWeight)
    assert isinstance(create("dorefa", "activation"), DoReFaActivation)
    assert isinstance(create("pact", "activation", alpha_init=6.0), PACT)
    with pytest.raises(ValueError, match="weight"):
        create("pact", "weight")
