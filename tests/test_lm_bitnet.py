"""BitNet b1.58 quantisers and activation granularity against the paper's equations.

The references below are written from Ma et al. 2024 (Eqs. 1-3 for the weights, the BitNet
absmax activation rule) in float64 numpy, independently of lowbit's code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import QuantLinear
from lowbit.quant import create
from lowbit.quant.bitnet import AbsMaxActivation, BitNetActivation, BitNetWeight
from lowbit.quant.granularity import check_granularity


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def ref_weight(w: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, float]:
    """Eqs. 1-3: gamma = mean|W|, RoundClip(W / (gamma + eps), -1, 1)."""
    w = w.astype(np.float64)
    gamma = float(np.mean(np.abs(w)))
    return np.clip(np.round(w / (gamma + eps)), -1, 1), gamma


def ref_rmsnorm(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def ref_activation(
    x: np.ndarray, bits: int = 8, eps: float = 1e-5, group: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per token (or per group of ``group`` features): codes Clip(round(x Qb / max|x|),
    -Qb - 1, Qb) and the dequantisation scale max|x| / Qb, in x's shape."""
    qb = 2 ** (bits - 1) - 1
    x = x.astype(np.float64)
    v = x if group is None else x.reshape(*x.shape[:-1], -1, group)
    gamma = np.maximum(np.abs(v).max(axis=-1, keepdims=True), eps)
    codes = np.clip(np.round(v * qb / gamma), -qb - 1, qb)
    scale = np.broadcast_to(gamma / qb, v.shape)
    return codes.reshape(x.shape), scale.reshape(x.shape)


def far_from_ties(v: np.ndarray, margin: float = 1e-4) -> np.ndarray:
    """Elements whose rounding float32 and float64 cannot disagree on."""
    return np.abs(np.abs(v - np.floor(v)) - 0.5) > margin


# ----------------------------------------------------------------------------- weights
def test_weight_forward_matches_eq_1_to_3_and_codes_are_ternary() -> None:
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0))
    q = BitNetWeight()
    out = q(w)
    codes, spec = q.codes(w)
    ref_codes, gamma = ref_weight(w.numpy())
    assert spec.scheme == "ternary" and codes.dtype == torch.int8
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    ok = far_from_ties(w.numpy().astype(np.float64) / (gamma + 1e-5))
    assert ok.mean() > 0.99
    np.testing.assert_array_equal(codes.numpy()[ok], ref_codes[ok])
    np.testing.assert_allclose(float(spec.scale), gamma, rtol=1e-6)
    np.testing.assert_allclose(out.detach().numpy(), ref_codes * gamma, rtol=1e-6, atol=1e-7)
    assert_bitwise(spec.dequantize(codes), out.detach())


def test_weight_gradient_is_straight_through() -> None:
    w = torch.randn(8, 6, requires_grad=True)
    g = torch.randn(8, 6)
    BitNetWeight()(w).backward(g)
    assert torch.equal(w.grad, g)


def test_all_zero_weight_gives_zero_codes() -> None:
    codes, spec = BitNetWeight().codes(torch.zeros(3, 4))
    assert not codes.any() and float(spec.scale) == 0.0


# ----------------------------------------------------------------------------- activations
@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_activation_matches_reference(bits: int) -> None:
    x = 3 * torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    x[0, 1] = 0.0  # an all-zero token: eps keeps it finite, codes 0
    q = AbsMaxActivation(bits=bits)
    out = q(x)
    ref_codes, ref_scale = ref_activation(x.numpy(), bits)
    codes, spec = q.codes(x)
    assert codes.shape == x.shape and spec.scale.shape == (2, 5, 1)
    qb = 2 ** (bits - 1) - 1
    assert int(codes.min()) >= -qb - 1 and int(codes.max()) <= qb
    assert not codes[0, 1].any() and torch.isfinite(out).all()
    np.testing.assert_array_equal(codes.numpy(), ref_codes)  # the max maps to +-Qb exactly
    np.testing.assert_allclose(out.numpy(), ref_codes * ref_scale, rtol=1e-6, atol=1e-7)
    assert_bitwise(spec.dequantize(codes), out)


def test_per_group_and_per_tensor_granularity() -> None:
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(2))
    x[:, :8] *= 100  # one loud group per row: per-group scales keep the quiet groups' detail
    grouped = AbsMaxActivation(granularity="group", group_size=8)
    codes, spec = grouped.codes(x)
    assert codes.shape == (3, 3, 8) and spec.scale.shape == (3, 3, 1)
    ref_codes, ref_scale = ref_activation(x.numpy(), group=8)
    np.testing.assert_array_equal(codes.reshape(3, 24).numpy(), ref_codes)
    np.testing.assert_allclose(spec.scale.numpy()[..., 0], ref_scale[:, ::8], rtol=1e-6)
    assert_bitwise(spec.dequantize(codes).reshape(x.shape), grouped(x))
    per_tensor = AbsMaxActivation(granularity="tensor")
    codes, spec = per_tensor.codes(x)
    assert codes.shape == x.shape and spec.scale.dim() == 0
    np.testing.assert_allclose(float(spec.scale), float(x.abs().max()) / 127, rtol=1e-6)
    assert_bitwise(spec.dequantize(codes), per_tensor(x))
    quiet = (slice(None), slice(8, None))
    err_group = (grouped(x) - x)[quiet].abs().max()
    err_tensor = (per_tensor(x) - x)[quiet].abs().max()
    assert err_group < err_tensor / 10


def test_bitnet_activation_normalises_first_and_passes_gradient_through_the_norm() -> None:
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    q = BitNetActivation()
    assert q.norm and not AbsMaxActivation().norm
    out = q(x)
    ref_codes, ref_scale = ref_activation(ref_rmsnorm(x.detach().numpy()))
    np.testing.assert_allclose(out.detach().numpy(), ref_codes * ref_scale, rtol=1e-12)
    g = torch.randn(4, 16, dtype=torch.float64)
    out.backward(g)

    def norm(v: torch.Tensor) -> torch.Tensor:  # the reference RMSNorm, in autograd
        return v / torch.sqrt((v * v).mean(dim=-1, keepdim=True) + 1e-6)

    xr = x.detach().clone().requires_grad_()
    norm(xr).backward(g)  # straight through the rounding: the norm's own gradient
    torch.testing.assert_close(x.grad, xr.grad)


def test_activation_gradient_is_straight_through_without_norm() -> None:
    x = torch.randn(3, 7, 10, requires_grad=True)
    g = torch.randn(3, 7, 10)
    AbsMaxActivation(granularity="group", group_size=5)(x).backward(g)
    assert torch.equal(x.grad, g)


def test_bitlinear_output_is_the_papers_integer_product_rescaled() -> None:
    """y = (W~ x~) * beta * gamma / Qb with integer W~, x~ (the BitLinear equation)."""
    layer = nn.Linear(32, 12, bias=False)
    qlayer = QuantLinear.from_float(
        layer, weight_quant=create("bitnet", "weight"), input_quant=create("bitnet", "activation")
    )
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    w_codes, beta = ref_weight(layer.weight.detach().numpy())
    xn = ref_rmsnorm(x.numpy())
    qb = 127
    gamma = np.abs(xn).max(axis=-1, keepdims=True)
    x_codes = np.clip(np.round(xn * qb / gamma), -qb - 1, qb)
    ref = (x_codes @ w_codes.T) * beta * gamma / qb
    with torch.no_grad():
        got = qlayer(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_options_are_checked_with_their_names() -> None:
    with pytest.raises(ValueError, match="granularity"):
        AbsMaxActivation(granularity="channel")
    with pytest.raises(ValueError, match="group_size"):
        AbsMaxActivation(granularity="token", group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        check_granularity("group", None)
    with pytest.raises(ValueError, match="does not divide the last dimension"):
        AbsMaxActivation(granularity="group", group_size=5)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="bits"):
        AbsMaxActivation(bits=1)
    with pytest.raises(lowbit.RecipeError, match="fixed at 2 bit"):
        lowbit.Recipe.from_dict({"weights": {"method": "bitnet", "bits": 3}})


def test_bitnet_recipe_quantises_hidden_layers_and_keeps_the_head_float() -> None:
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 16))
    lowbit.quantize(model, "bitnet")
    assert isinstance(model[1], QuantLinear)
    assert isinstance(model[1].weight_quant, BitNetWeight)
    assert isinstance(model[1].input_quant, BitNetActivation)
    assert type(model[3]) is nn.Linear and type(model[0]) is nn.Embedding
    out = model(torch.randint(0, 16, (2, 5)))
    assert out.shape == (2, 5, 16)
