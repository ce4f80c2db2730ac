"""Binary quantisers (BNN, XNOR-Net, BinaryConnect) against hand-computed numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from lowbit.quant import create, get
from lowbit.quant.binary import BinaryConnect, SignBNN, XNORActivation, XNORWeight

# Latent values on both sides of the hardtanh clip, including 0 and the edges +-1.
X = [-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 1.5]
PLUS_SIGN = [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]  # sign(0) = +1
INSIDE = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # 1{|x| <= 1}, edges included
G = [0.3, -1.1, 0.7, 2.0, -0.4, 0.9, 1.3]

SETTINGS = settings(max_examples=50, deadline=None)
tensors = arrays(
    np.float32,
    array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5),
    elements=st.floats(-3, 3, width=32),
).map(torch.from_numpy)


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def grad_of(q: torch.nn.Module, x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward value and dL/dx for L = sum(g * q(x)), in float64."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out = q(xt)
    out.backward(torch.tensor(g, dtype=torch.float64))
    return out.detach().numpy(), xt.grad.numpy()


# --- registry and options -------------------------------------------------------------------


def test_registry_names_and_roles() -> None:
    assert get("bnn", "weight") is SignBNN and get("bnn", "activation") is SignBNN
    assert create("bnn", "activation").role == "activation"
    assert create("bnn", "weight").role == "weight"
    assert get("xnor", "weight") is XNORWeight
    assert get("xnor", "activation") is XNORActivation
    assert get("binaryconnect", "weight") is BinaryConnect
    with pytest.raises(ValueError, match="activation"):
        create("binaryconnect", "activation")
    for cls in (SignBNN, XNORWeight, XNORActivation, BinaryConnect):
        assert cls().bits == 1
    assert SignBNN.latent_range == (-1.0, 1.0) and BinaryConnect.latent_range == (-1.0, 1.0)
    assert XNORWeight.latent_range is None


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (SignBNN, {"role": "bias"}, "role"),
        (XNORActivation, {"per_sample": 1}, "per_sample"),
        (BinaryConnect, {"seed": -1}, "seed"),
        (BinaryConnect, {"seed": 1.5}, "seed"),
        (BinaryConnect, {"seed": True}, "seed"),
    ],
)
def test_bad_options_name_the_option(cls: type, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        BinaryConnect(3)  # type: ignore[misc]


# --- BNN ------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_bnn_forward_and_hardtanh_ste(role: str) -> None:
    out, dx = grad_of(SignBNN(role=role), np.array(X), np.array(G))
    np.testing.assert_array_equal(out, PLUS_SIGN)
    np.testing.assert_array_equal(dx, np.array(G) * np.array(INSIDE))


def test_bnn_codes() -> None:
    x = torch.tensor(X)
    q = SignBNN()
    codes, spec = q.codes(x)
    assert codes.dtype == torch.int8 and spec.scheme == "binary" and spec.bits == 1
    assert spec.scale.item() == 1.0
    np.testing.assert_array_equal(codes.numpy(), PLUS_SIGN)
    assert_bitwise(spec.dequantize(codes), q(x))


# --- XNOR-Net weights -----------------------------------------------------------------------


def test_xnor_weight_forward_and_gradient() -> None:
    w = np.array([[0.5, -2.0, 0.0, 0.25], [1.0, -0.25, 1.5, -0.75]])
    g = np.array([[0.3, -1.2, 0.7, 0.1], [2.0, 0.5, -0.4, 1.1]])
    n = w.shape[1]
    alpha = np.array([sum(abs(v) for v in row) / n for row in w])
    s = np.where(w >= 0, 1.0, -1.0)
    out, dw = grad_of(XNORWeight(), w, g)
    np.testing.assert_allclose(out, alpha[:, None] * s, rtol=1e-12)
    # STE through sign (clipped) + the path through alpha = mean|W| (d|w|/dw = sgn, sgn(0) = 0).
    ste = alpha[:, None] * g * (np.abs(w) <= 1)
    through_alpha = np.sign(w) / n * (g * s).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(dw, ste + through_alpha, rtol=1e-12, atol=1e-15)
    assert not np.allclose(dw, ste)  # the alpha path is really there


def test_xnor_weight_conv_per_filter_scale() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    q = XNORWeight()
    out = q(torch.from_numpy(w)).numpy()
    alpha = np.abs(w).mean(axis=(1, 2, 3))
    expected = alpha[:, None, None, None] * np.where(w >= 0, 1.0, -1.0)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    codes, spec = q.codes(torch.from_numpy(w))
    assert spec.axis == 0 and spec.scale.shape == (3,) and spec.per_channel
    np.testing.assert_allclose(spec.scale.numpy(), alpha, rtol=1e-6)
    assert_bitwise(spec.dequantize(codes), q(torch.from_numpy(w)))


def test_xnor_weight_rejects_scalar() -> None:
    with pytest.raises(ValueError, match="shape"):
        XNORWeight()(torch.tensor(1.0))


# --- XNOR-Net activations -------------------------------------------------------------------


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (4, 5)])
def test_xnor_activation_forward_and_gradient(per_sample: bool, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-2, 2, size=shape)
    x.flat[0] = 0.0
    g = rng.normal(size=shape)
    axes = tuple(range(1, len(shape))) if per_sample else (1,)
    beta = np.abs(x).mean(axis=axes, keepdims=True)
    out, dx = grad_of(XNORActivation(per_sample=per_sample), x, g)
    np.testing.assert_allclose(out, beta * np.where(x >= 0, 1.0, -1.0), rtol=1e-12)
    # beta is a constant in backward: dx = beta * g * 1{|x| <= 1}
    np.testing.assert_allclose(dx, beta * g * (np.abs(x) <= 1), rtol=1e-12)


def test_xnor_activation_codes_broadcast_scale() -> None:
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    for per_sample, scale_shape in ((False, (2, 1, 4, 4)), (True, (2, 1, 1, 1))):
        q = XNORActivation(per_sample=per_sample)
        codes, spec = q.codes(x)
        assert spec.axis is None and spec.scale.shape == scale_shape
        assert_bitwise(spec.dequantize(codes), q(x))


def test_xnor_activation_rejects_1d() -> None:
    with pytest.raises(ValueError, match="batch and channel dims"):
        XNORActivation()(torch.ones(3))


# --- BinaryConnect --------------------------------------------------------------------------


def test_binaryconnect_eval_is_deterministic_sign() -> None:
    q = BinaryConnect().eval()
    out, dw = grad_of(q, np.array(X), np.array(G))
    np.testing.assert_array_equal(out, PLUS_SIGN)
    np.testing.assert_array_equal(dw, np.array(G) * np.array(INSIDE))
    x = torch.tensor(X)
    assert_bitwise(q(x), q(x))
    codes, spec = q.codes(x)
    assert_bitwise(spec.dequantize(codes), q(x))


def test_binaryconnect_train_gradient_is_hardtanh_ste() -> None:
    out, dw = grad_of(BinaryConnect(seed=5).train(), np.array(X), np.array(G))
    assert set(np.unique(out)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(dw, np.array(G) * np.array(INSIDE))


def test_binaryconnect_seeded_reproducibility() -> None:
    w = torch.zeros(2000)  # p = 0.5: maximally random
    a, b, c = BinaryConnect(seed=7), BinaryConnect(seed=7), BinaryConnect(seed=8)
    seq_a, seq_b = [a(w) for _ in range(3)], [b(w) for _ in range(3)]
    assert all(
        torch.equal(u, v) for u, v in zip(seq_a, seq_b, strict=True)
    )  # same seed, same stream
    assert not torch.equal(seq_a[0], seq_a[1])  # the stream advances between draws
    assert not torch.equal(seq_a[0], c(w))  # another seed, another stream
    # The module does not touch the global RNG.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    BinaryConnect(seed=1)(torch.zeros(100))
    assert torch.equal(torch.rand(3), expected)


def test_binaryconnect_frequency_matches_probability() -> None:
    values = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.3, 0.9, 1.0, 1.2])
    p = np.clip((values.numpy().astype(np.float64) + 1) / 2, 0, 1)
    draws, width = 10, 4000
    w = values[:, None].expand(-1, width).contiguous()
    q = BinaryConnect(seed=0)
    plus = sum((q(w) == 1).double().sum(dim=1) for _ in range(draws)).numpy()
    n = draws * width
    freq = plus / n
    tol = 5 * np.sqrt(p * (1 - p) / n)  # 5 sigma; exact where p is 0 or 1
    assert np.all(np.abs(freq - p) <= tol), (freq, p)


# --- properties -----------------------------------------------------------------------------


@SETTINGS
@given(x=tensors)
def test_levels_codes_and_idempotence_bnn(x: torch.Tensor) -> None:
    q = SignBNN()
    out = q(x)
    assert torch.all(out.abs() == 1)
    assert torch.equal(q(out), out)  # sign(+-1) = +-1: exactly idempotent
    codes, spec = q.codes(x)
    assert_bitwise(spec.dequantize(codes), out)


@SETTINGS
@given(x=tensors)
def test_levels_codes_and_idempotence_xnor_weight(x: torch.Tensor) -> None:
    q = XNORWeight()
    out = q(x)
    alpha = np.abs(x.numpy().reshape(x.shape[0], -1)).mean(axis=1)
    levels = out.numpy().reshape(x.shape[0], -1)
    assert np.all(np.abs(levels) == np.abs(levels[:, :1]))  # exactly two levels per filter
    np.testing.assert_allclose(np.abs(levels[:, 0]), alpha, rtol=1e-6)
    # mean|alpha * sign(W)| = alpha, so idempotent up to the rounding of the mean
    torch.testing.assert_close(q(out), out, rtol=1e-5, atol=0)
    codes, spec = q.codes(x)
    assert_bitwise(spec.dequantize(codes), out)


@SETTINGS
@given(x=tensors, per_sample=st.booleans())
def test_levels_codes_and_idempotence_xnor_activation(x: torch.Tensor, per_sample: bool) -> None:
    q = XNORActivation(per_sample=per_sample)
    out = q(x)
    axes = tuple(range(1, x.dim())) if per_sample else (1,)
    beta = np.abs(x.numpy()).mean(axis=axes, keepdims=True)
    np.testing.assert_allclose(np.abs(out.numpy()), np.broadcast_to(beta, x.shape), rtol=1e-6)
    torch.testing.assert_close(q(out), out, rtol=1e-5, atol=0)  # up to rounding of the mean
    codes, spec = q.codes(x)
    assert_bitwise(spec.dequantize(codes), out)


@SETTINGS
@given(x=tensors, seed=st.integers(0, 2**31))
def test_levels_and_idempotence_binaryconnect(x: torch.Tensor, seed: int) -> None:
    q = BinaryConnect(seed=seed)
    out = q(x)
    assert torch.all(out.abs() == 1)
    # p(+1) = 1 and p(-1) = 0: a second stochastic pass cannot flip a binary value
    assert torch.equal(q(out), out)
    q.eval()
    codes, spec = q.codes(x)
    assert_bitwise(spec.dequantize(codes), q(x))
