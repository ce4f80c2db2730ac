"""Power-of-two weights and stochastic rounding against numpy references and statistics.

Idempotence ``q(q(x)) == q(x)`` holds exactly for pow2 (the largest level is ``2^e_max`` itself, so
``e_max`` is unchanged); for stochastic rounding in eval mode it holds up to the float rounding of
the recomputed scale ``max|q(x)| / QP``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.quant import create
from lowbit.quant.pow2 import PowerOfTwo
from lowbit.quant.stochastic import StochasticRounding

SETTINGS = settings(max_examples=50, deadline=None)


def arrays() -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.integers(1, 8)),
        elements=st.floats(-30, 30, width=32, allow_subnormal=False),
    )


def check_contract(q: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    c, spec = q.codes(x)
    assert int(c.min()) >= spec.qmin and int(c.max()) <= spec.qmax and spec.bits == q.bits
    assert torch.equal(spec.dequantize(c), y)


# ----------------------------------------------------------------------------- power of two
def np_pow2(w: np.ndarray, bits: int, zero_below: str) -> np.ndarray:
    """Nearest level in the log domain among the n levels under 2^round(log2 max|w|), or 0."""
    n = 2 ** (bits - 1) - 1
    a = np.abs(w.astype(np.float64))
    e_max = int(np.round(np.log2(a.max())))
    exps = np.arange(e_max - n + 1, e_max + 1)
    threshold = 2.0 ** exps[0] * (1.0 if zero_below == "level" else 0.5)
    out = np.zeros_like(a)
    for i, v in np.ndenumerate(a):
        if v >= threshold:
            out[i] = 2.0 ** exps[np.argmin(np.abs(np.log2(v) - exps))]
    return np.sign(w) * out


def test_pow2_by_hand() -> None:
    w = torch.tensor([1.0, -0.7, 0.3, 0.2, 0.1, -0.05, 0.0, 0.4])
    q = PowerOfTwo(bits=3)  # n = 3 levels: 1, 1/2, 1/4
    expected = torch.tensor([1.0, -0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.5])
    assert torch.equal(q(w), expected)
    c, spec = q.codes(w)
    assert c.tolist() == [3, -2, 1, 0, 0, 0, 0, 2]
    assert spec.scheme == "pow2" and spec.qmax == 3 and float(spec.scale) == 1.0
    half = PowerOfTwo(bits=3, zero_below="half")  # zero under 1/8: 0.2 -> 1/4
    assert torch.equal(half(w), torch.tensor([1.0, -0.5, 0.25, 0.25, 0.0, 0.0, 0.0, 0.5]))


def test_pow2_largest_exponent_is_rounded_log() -> None:
    w = torch.tensor([0.7, 0.3, -0.36])  # log2 0.7 = -0.51 -> e_max = -1, top level 1/2
    assert torch.equal(PowerOfTwo(bits=2)(w), torch.tensor([0.5, 0.0, 0.0]))
    assert torch.equal(PowerOfTwo(bits=2, zero_below="half")(w), torch.tensor([0.5, 0.5, -0.5]))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("zero_below", ["level", "half"])
def test_pow2_matches_numpy(bits: int, zero_below: str) -> None:
    w = torch.randn(8, 9, generator=torch.Generator().manual_seed(bits)) * 0.3
    got = PowerOfTwo(bits=bits, zero_below=zero_below)(w).numpy()
    np.testing.assert_array_equal(got, np_pow2(w.numpy(), bits, zero_below))


def test_pow2_gradient_is_straight_through_and_zero_layer_finite() -> None:
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    g = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    PowerOfTwo(bits=4)(w).backward(g)
    assert torch.equal(w.grad, g)
    z = torch.zeros(3, requires_grad=True)
    y = PowerOfTwo(bits=4)(z)
    y.sum().backward()
    assert torch.equal(y, torch.zeros(3)) and torch.equal(z.grad, torch.ones(3))


@SETTINGS
@given(w=arrays(), bits=st.integers(2, 8), zero_below=st.sampled_from(["level", "half"]))
def test_pow2_properties(w: np.ndarray, bits: int, zero_below: str) -> None:
    q = PowerOfTwo(bits=bits, zero_below=zero_below)
    t = torch.from_numpy(w)
    y = q(t)
    n = 2 ** (bits - 1) - 1
    assert torch.unique(y).numel() <= 2 * n + 1
    top = float(q.codes(t)[1].scale)
    assert bool((y.abs() <= top).all())
    nonzero = y[y != 0].abs()
    assert bool((torch.log2(nonzero) == torch.round(torch.log2(nonzero))).all())  # powers of 2
    assert torch.equal(q(y), y)
    check_contract(q, t, y)


# ----------------------------------------------------------------------------- stochastic
def test_stochastic_is_unbiased_and_stays_on_neighbours() -> None:
    x = torch.tensor([1.0, 0.3, -0.55, 0.01, -1 / 3])  # 3 bits: QP = 3, s = max|x| / 3 = 1/3
    q = StochasticRounding(bits=3, seed=123)
    y = q(x.repeat(20000, 1))
    s = 1 / 3
    low, high = np.floor(x.numpy() / s) * s, np.ceil(x.numpy() / s) * s
    on_neighbour = np.isclose(y.numpy(), low, atol=1e-6) | np.isclose(y.numpy(), high, atol=1e-6)
    assert on_neighbour.all()
    # std of one draw <= s/2, so the mean of 20000 draws is within 5 sigma = 0.006 of x
    np.testing.assert_allclose(y.mean(0).numpy(), x.numpy(), atol=0.006)
    frac_up = np.isclose(y.numpy(), high, atol=1e-6).mean(0)[1]  # 0.3 / s = 0.9 -> up 90 %
    assert abs(frac_up - 0.9) < 0.01


def test_stochastic_seeded_reproducibility() -> None:
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    a, b = StochasticRounding(bits=4, seed=7), StochasticRounding(bits=4, seed=7)
    first = a(x)
    assert torch.equal(first, b(x))
    assert not torch.equal(a(x), first)  # the generator advances
    assert not torch.equal(StochasticRounding(bits=4, seed=8)(x), first)
    assert a.rng_state(x.device) is a.rng_state(x.device)  # one stream per device


def test_stochastic_eval_is_deterministic_round_half_even() -> None:
    x = torch.tensor([2.0, 0.25, -0.75, 1.25, -0.1, 0.3])  # 3 bits: s = 2/3
    q = StochasticRounding(bits=3).eval()
    y = q(x)
    s = np.float32(2.0) / np.float32(3)
    expected = s * np.round(x.numpy() / s)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-6)
    assert torch.equal(q(x), y)
    check_contract(q, x, y)


def test_stochastic_per_channel_scale_and_gradient() -> None:
    w = torch.tensor([[1.0, -0.5, 0.2], [8.0, 3.0, -4.4]], requires_grad=True)
    q = StochasticRounding(bits=3, per_channel=True)  # s = [1/3, 8/3]
    q.eval()
    y = q(w)
    torch.testing.assert_close(y, torch.tensor([[1.0, -2 / 3, 1 / 3], [8.0, 8 / 3, -16 / 3]]))
    g = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    y.backward(g)
    assert torch.equal(w.grad, g)
    _, spec = q.codes(w)
    assert spec.axis == 0 and spec.scale.shape == (2,)
    check_contract(q, w, y.detach())


@SETTINGS
@given(x=arrays(), bits=st.integers(2, 8), per_channel=st.booleans(), training=st.booleans())
def test_stochastic_properties(x: np.ndarray, bits: int, per_channel: bool, training: bool) -> None:
    q = StochasticRounding(bits=bits, per_channel=per_channel, seed=3).train(training)
    t = torch.from_numpy(x)
    y = q(t)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    bound = t.abs().amax(dim=1, keepdim=True) if per_channel else t.abs().max()
    for levels in y if per_channel else [y]:  # one grid per channel
        assert torch.unique(levels).numel() <= 2**bits
    s = torch.clamp(bound / qp, min=torch.finfo(torch.float32).tiny)
    steps = y / s
    torch.testing.assert_close(steps, torch.round(steps), rtol=0, atol=1e-4)  # on the grid
    assert bool((steps >= -qn - 1e-4).all() and (steps <= qp + 1e-4).all())
    if not training:
        torch.testing.assert_close(q(y), y)
        check_contract(q, t, y)


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: PowerOfTwo(bits=1), "bits"),
        (lambda: PowerOfTwo(bits=9), "bits"),
        (lambda: PowerOfTwo(zero_below="never"), "zero_below"),
        (lambda: StochasticRounding(bits=1), "bits"),
        (lambda: StochasticRounding(seed=-1), "seed"),
        (lambda: StochasticRounding(seed=1.5), "seed"),
        (lambda: StochasticRounding("activation", per_channel=True), "per_channel"),
        (lambda: StochasticRounding("bias"), "role"),
    ],
)
def test_bad_options(make: object, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make()  # type: ignore[operator]


def test_registry() -> None:
    assert isinstance(create("pow2", "weight", bits=5), PowerOfTwo)
    q = create("stochastic", "activation", bits=4)
    assert isinstance(q, StochasticRounding) and q.role == "activation"


def test_random_stream_resumes_from_state_dict() -> None:
    from lowbit.quant.binary import BinaryConnect

    for make in (lambda: StochasticRounding(bits=4, seed=3), lambda: BinaryConnect(seed=3)):
        x = torch.rand(64, 32) * 2 - 1
        straight = make()
        straight(x)
        expected = straight(x)  # the second draw of an uninterrupted stream
        first = make()
        first(x)
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        assert torch.equal(resumed(x), expected)
        fresh = make()
        fresh.load_state_dict(make().state_dict())  # state saved before any draw
        assert torch.equal(fresh(x), make()(x))
