"""The fused fake-quant operators of lowbit.quant.ops.

* the C++ kernels equal the torch formulas bit for bit (both paths forced), for float32 and
  float64 and every scale layout they handle;
* the gradients equal autograd through the reference formulas written with straight-through
  rounding (``r + (round(r) - r).detach()``) in float64 -- ``gradcheck``'s finite differences do
  not apply: these forwards are step functions and the STE is by design not their derivative;
* ``torch.library.opcheck``: schema, fake (meta) implementation, autograd registration and
  AOT dispatch are consistent, so ``torch.compile`` traces each as one op.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from lowbit.quant import native, ops
from lowbit.quant import ops_reference as ref


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def data(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    x = torch.randn(shape, generator=gen(seed), dtype=torch.float64) * 3
    x.view(-1)[:4] = torch.tensor([0.0, 1.0, -1.0, 2.5])  # boundaries and a half-way value
    return x.to(dtype)


# one scale per tensor, per output channel, per sample, and XNOR's (N, 1, H, W)
SCALE_SHAPES = [(), (5, 1, 1, 1), (5, 1, 3, 4)]


def scale(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return (torch.rand(shape, generator=gen(1), dtype=torch.float64) + 0.2).to(dtype)


def both_paths(fn, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:  # type: ignore[no-untyped-def]
    assert native.native_kernels() is not None, "the C++ kernels did not build"
    fused = fn()
    with monkeypatch.context() as m:
        m.setenv(native.ENV_SWITCH, "0")
        formula = fn()
    return fused, formula


def assert_same(a: object, b: object) -> None:
    a_list = a if isinstance(a, list | tuple) else [a]
    b_list = b if isinstance(b, list | tuple) else [b]
    for u, v in zip(a_list, b_list, strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sshape", SCALE_SHAPES)
def test_kernels_equal_formulas(
    dtype: torch.dtype, sshape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, g = data((5, 2, 3, 4), dtype), data((5, 2, 3, 4), dtype, seed=2)
    s = scale(sshape, dtype)
    u = torch.rand(x.shape, generator=gen(3), dtype=dtype)
    calls = [
        lambda: ops.lsq_quant(x, s, 8, 7),
        lambda: ops.lsq_quant_backward(g, x, s, 8, 7),
        lambda: ops.clipped_uniform(x, s * 4, 15),
        lambda: ops.clipped_uniform_backward(g, x, s * 4),
        lambda: ops.sign_ste(x, s),
        lambda: ops.sign_ste_backward(g, x, s),
        lambda: ops.stochastic_round(x, u, s, 8, 7),
    ]
    for call in calls:
        assert_same(*both_paths(call, monkeypatch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_affine_quant_equals_pytorch_fake_quant(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, g = data((5, 2, 3, 4), dtype), data((5, 2, 3, 4), dtype, seed=2)
    x.view(-1)[5] = float("nan")
    scale, zp = torch.tensor(0.037), torch.tensor(131, dtype=torch.int32)
    want = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)
    xr = x.clone().requires_grad_()
    (want_dx,) = grads(torch.fake_quantize_per_tensor_affine(xr, scale, zp, 0, 255), g, xr)
    for y in both_paths(lambda: ops.affine_quant(x, scale, zp, 0, 255), monkeypatch):
        assert torch.equal(y, want)
    for dx in both_paths(lambda: ops.affine_quant_backward(g, x, scale, zp, 0, 255), monkeypatch):
        assert torch.equal(dx, want_dx)


def test_layouts_the_kernels_do_not_take_use_the_formulas() -> None:
    x = data((4, 6), torch.float32)
    s = scale((1, 6), torch.float32)  # a per-column scale: not a kernel layout
    assert ops._layout(x, s) is None
    assert torch.equal(ops.lsq_quant(x, s, 8, 7), ref.lsq_quant(x, s, 8, 7))
    xt = data((6, 4), torch.float32).t()  # non-contiguous input
    assert torch.equal(
        ops.sign_ste(xt, scale((), torch.float32)), ref.sign_ste(xt, scale((), torch.float32))
    )
    bf = data((4, 6), torch.bfloat16)  # bfloat16 (AMP): formulas, in bfloat16
    assert ops.lsq_quant(bf, scale((), torch.float32), 8, 7).dtype == torch.bfloat16


# ---------------------------------------------------------------- gradients vs autograd
def ste_round(r: torch.Tensor) -> torch.Tensor:
    return r + (r.round() - r).detach()


def grads(out: torch.Tensor, g: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("sshape", [(), (5, 1, 1, 1)])
def test_lsq_gradients_match_autograd_of_formula(sshape: tuple[int, ...]) -> None:
    x, g = data((5, 2, 3, 4), torch.float64), data((5, 2, 3, 4), torch.float64, seed=2)
    s0 = scale(sshape, torch.float64) * 0.5
    x1, s1 = x.clone().requires_grad_(), s0.clone().requires_grad_()
    x2, s2 = x.clone().requires_grad_(), s0.clone().requires_grad_()
    got = grads(ops.lsq_quant(x1, s1, 8, 7), g, x1, s1)
    want = grads(ste_round(x2 / s2).clamp(-8, 7) * s2, g, x2, s2)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_clipped_uniform_gradients_match_autograd_of_formula() -> None:
    x, g = data((5, 2, 3, 4), torch.float64), data((5, 2, 3, 4), torch.float64, seed=2)
    x.view(-1)[4] = 2.0  # exactly alpha: the gradient goes to alpha
    x1, a1 = x.clone().requires_grad_(), torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    x2, a2 = x.clone().requires_grad_(), torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    got = grads(ops.clipped_uniform(x1, a1, 15), g, x1, a1)
    # PACT: the whole quantiser is straight-through around the clip, and x >= alpha is alpha's
    clipped = torch.where(x2 >= a2, a2, x2.clamp(min=0))
    levels = (clipped * 15 / a2).round() * a2 / 15
    want = grads(clipped + (levels - clipped).detach(), g, x2, a2)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sshape", SCALE_SHAPES)
def test_sign_ste_gradient_matches_autograd_of_formula(sshape: tuple[int, ...]) -> None:
    x, g = data((5, 2, 3, 4), torch.float64), data((5, 2, 3, 4), torch.float64, seed=2)
    s = scale(sshape, torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (got,) = grads(ops.sign_ste(x1, s), g, x1)
    sign = torch.where(x2 >= 0, 1.0, -1.0).to(x2.dtype)
    clip = x2.clamp(-1, 1)  # clamp passes the gradient on [-1, 1], ends included
    (want,) = grads(s * (clip + (sign - clip).detach()), g, x2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_stochastic_round_gradient_is_identity() -> None:
    x = data((5, 6), torch.float64).requires_grad_()
    g = data((5, 6), torch.float64, seed=2)
    u = torch.rand(x.shape, generator=gen(3), dtype=x.dtype)
    (got,) = grads(ops.stochastic_round(x, u, scale((), x.dtype), 8, 7), g, x)
    assert torch.equal(got, g)


# ---------------------------------------------------------------- registration
def opcheck_cases() -> list[tuple[object, tuple[object, ...]]]:
    x = data((3, 2, 4, 4), torch.float32).requires_grad_()
    g = data((3, 2, 4, 4), torch.float32, seed=2)
    s = torch.tensor(0.4, requires_grad=True)
    u = torch.rand(x.shape, generator=gen(3))
    beta = x.detach().abs().mean(1, keepdim=True)
    return [
        (ops.lsq_quant, (x, s, 8, 7)),
        (ops.lsq_quant_backward, (g, x.detach(), s.detach(), 8, 7)),
        (ops.clipped_uniform, (x, s, 15)),
        (ops.clipped_uniform_backward, (g, x.detach(), s.detach())),
        (ops.sign_ste, (x, beta)),
        (ops.sign_ste_backward, (g, x.detach(), beta)),
        (ops.stochastic_round, (x, u, s.detach(), 8, 7)),
        (ops.uniform_from_state, (g, torch.Generator().manual_seed(0).get_state())),
        (ops.affine_quant, (x, s.detach(), torch.tensor(3, dtype=torch.int32), 0, 255)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case: int) -> None:
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_uniform_from_state_continues_one_stream() -> None:
    state = torch.Generator().manual_seed(5).get_state()
    like = torch.empty(3, 7)
    draws = [ops.uniform_from_state(like, state) for _ in range(2)]
    reference = torch.Generator().manual_seed(5)
    for d in draws:
        assert torch.equal(d, torch.rand(like.shape, generator=reference))


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path: Path) -> None:
    # torch's build lock has no timeout: one left by a killed build would block every later
    # process forever, so the kernels' build removes a lock older than STALE_LOCK_S.
    assert native.clear_stale_lock(tmp_path) is False  # no lock
    lock = tmp_path / "lock"
    lock.write_text("")
    assert native.clear_stale_lock(tmp_path) is False and lock.exists()  # a live build
    old = time.time() - native.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert native.clear_stale_lock(tmp_path) is True and not lock.exists()


def test_build_directory_is_per_torch_and_python_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/x")
    d = native.build_directory("k")
    assert d.parent.parent == Path("/x") and d.name == "k"
    assert torch.__version__ in d.parent.name and f"py{sys.version_info[0]}" in d.parent.name
