"""Fused fake-quant operators, registered with ``torch.library`` under the ``lowbit`` namespace.

Each operator is one node for ``torch.compile`` (it has a fake implementation, so dynamo and
AOTAutograd trace through it without running it) and has its backward registered with
``torch.library.register_autograd``, itself one fused operator. Forward and backward each make one
pass over the data:

* ``lowbit::lsq_quant``        -- ``clamp(round(x * inv), -qn, qp) * s`` (LSQ);
* ``lowbit::clipped_uniform``  -- ``round(clip(x, 0, a) * inv) * step`` (PACT, DoReFa activations);
* ``lowbit::sign_ste``         -- ``scale * sign(x)``, ``sign(0) = +1``, hardtanh STE (BNN, XNOR,
  BinaryConnect);
* ``lowbit::stochastic_round`` -- ``clamp(floor(x * inv + u), -qn, qp) * s`` (stochastic
  rounding; identity STE, so it needs no backward operator);
* ``lowbit::affine_quant``     -- PyTorch's per-tensor affine fake quantisation, same values
  (affine activations; PyTorch's CPU kernel for it is several times slower);
* ``lowbit::uniform_from_state`` -- ``u ~ U[0, 1)`` from a generator state held in a tensor, which
  the op advances in place: the random stream of a quantiser is module state that compiled graphs
  carry like a buffer.

The scale operands (``inv``, ``s``, ``a``, ``step``, ``scale``) are tensors that broadcast to
``x``; callers compute them from the quantiser's parameters with the same torch expressions as
the unfused formula, so forward values are the formula's bit for bit.

Kernels: on CPU for float32 and float64 (``affine_quant``: float32) the ops run the C++ kernels
of ``csrc/fakequant.cpp``, compiled on first use with ``torch.utils.cpp_extension.load`` and
cached (see :func:`native_kernels`); everywhere else (GPU, bfloat16/float16, or where no compiler is
available, or with ``LOWBIT_FAKEQUANT_NATIVE=0``) they run the reference formulas in torch
(:mod:`lowbit.quant.ops_reference`), which is also what the tests compare the kernels with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import ops_reference as ref
from .native import native_kernels

__all__ = [
    "affine_quant",
    "clipped_uniform",
    "lsq_quant",
    "sign_ste",
    "stochastic_round",
    "uniform_from_state",
]

_NATIVE_DTYPES = (torch.float32, torch.float64)


def _layout(x: Tensor, scale: Tensor) -> tuple[int, int, bool] | None:
    """``(mid, inner, vec)``: how the kernels index ``scale`` broadcast to ``x`` (see
    ``csrc/fakequant.cpp``), or None for a broadcast they do not handle."""
    if x.numel() == 0:
        return None
    if scale.numel() == 1:
        return 1, x.numel(), False
    if x.dim() < 2 or scale.dim() != x.dim() or scale.shape[0] != x.shape[0] or scale.shape[1] != 1:
        return None
    rest = tuple(scale.shape[2:])
    if all(n == 1 for n in rest):  # one value per slice along dim 0 (per channel, per sample)
        return 1, x.numel() // x.shape[0], False
    if rest == tuple(x.shape[2:]):  # one value per (dim 0, dims 2...) position: XNOR's beta
        return x.shape[1], x[0, 0].numel(), True
    return None


def _native(x: Tensor, scale: Tensor, *others: Tensor) -> tuple[Any, tuple[int, int, bool]] | None:
    """The C++ kernels and the scale layout, when ``x`` is contiguous CPU float32/float64 data,
    every operand has its dtype and the kernels are built; else None (use the torch formulas)."""
    if x.device.type != "cpu" or x.dtype not in _NATIVE_DTYPES or not x.is_contiguous():
        return None
    if any(t.dtype != x.dtype or t.device.type != "cpu" for t in (scale, *others)):
        return None
    lay = _layout(x, scale)
    lib = None if lay is None else native_kernels()
    return None if lib is None else (lib, lay)


def _c(t: Tensor) -> Tensor:
    """A scale operand as the kernels read it: contiguous, no autograd history."""
    return t.detach().contiguous()


def _reduce_to(t: Tensor, like: Tensor) -> Tensor:
    """Sum ``t`` over the dims that ``like`` broadcasts along, to ``like``'s shape and dtype."""
    if t.shape == like.shape:
        return t.to(like.dtype)
    lead = t.dim() - like.dim()
    dims = list(range(lead)) + [
        lead + i for i, n in enumerate(like.shape) if n == 1 and t.shape[lead + i] != 1
    ]
    return t.sum(dim=dims).reshape(like.shape).to(like.dtype)


# --------------------------------------------------------------------------- LSQ
@torch.library.custom_op("lowbit::lsq_quant", mutates_args=())
def lsq_quant(x: Tensor, s: Tensor, qn: int, qp: int) -> Tensor:
    """``clamp(round(x / s), -qn, qp) * s`` (``x * (1 / s)`` rounded half to even)."""
    nat = _native(x, s)
    if nat is None:
        return ref.lsq_quant(x, s, qn, qp)
    lib, lay = nat
    return lib.lsq_quant(x, _c(1.0 / s), _c(s), qn, qp, *lay)


@lsq_quant.register_fake
def _(x: Tensor, s: Tensor, qn: int, qp: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lowbit::lsq_quant_backward", mutates_args=())
def lsq_quant_backward(g: Tensor, x: Tensor, s: Tensor, qn: int, qp: int) -> list[Tensor]:
    """``[g * inside, g * ds]`` elementwise: LSQ's gradient to ``x`` and the summands of its
    gradient to ``s`` (``ds = round(q) - q`` inside, ``-qn`` / ``qp`` outside, ``q = x / s``)."""
    nat = _native(x, s, g)
    if nat is None:
        return ref.lsq_quant_backward(g, x, s, qn, qp)
    lib, lay = nat
    return lib.lsq_quant_backward(g.contiguous(), x, _c(1.0 / s), qn, qp, *lay)


@lsq_quant_backward.register_fake
def _(g: Tensor, x: Tensor, s: Tensor, qn: int, qp: int) -> list[Tensor]:
    return [torch.empty_like(g), torch.empty_like(g)]


def _lsq_setup(ctx: Any, inputs: Sequence[Any], output: Tensor) -> None:
    x, s, qn, qp = inputs
    ctx.save_for_backward(x, s)
    ctx.bounds = (qn, qp)


def _lsq_backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
    x, s = ctx.saved_tensors
    grad_x, grad_s_elems = lsq_quant_backward(g, x, s, *ctx.bounds)
    grad_s = _reduce_to(grad_s_elems, s) if ctx.needs_input_grad[1] else None
    return (grad_x if ctx.needs_input_grad[0] else None), grad_s, None, None


lsq_quant.register_autograd(_lsq_backward, setup_context=_lsq_setup)


# --------------------------------------------------------------------------- clipped uniform
@torch.library.custom_op("lowbit::clipped_uniform", mutates_args=())
def clipped_uniform(x: Tensor, a: Tensor, n: int) -> Tensor:
    """``clamp(round(x * (n / a)), 0, n) * (a / n)``: ``x`` clipped to ``[0, a]``, ``n + 1``
    levels."""
    nat = _native(x, a)
    if nat is None:
        return ref.clipped_uniform(x, a, n)
    lib, lay = nat
    return lib.clipped_uniform(x, _c(n / a), _c(a / n), n, *lay)


@clipped_uniform.register_fake
def _(x: Tensor, a: Tensor, n: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lowbit::clipped_uniform_backward", mutates_args=())
def clipped_uniform_backward(g: Tensor, x: Tensor, a: Tensor) -> list[Tensor]:
    """``[g * 1{0 <= x < a}, g * 1{x >= a}]``: PACT's gradient to ``x`` and the summands of its
    gradient to ``a``."""
    nat = _native(x, a, g)
    if nat is None:
        return ref.clipped_uniform_backward(g, x, a)
    lib, lay = nat
    return lib.clipped_backward(g.contiguous(), x, _c(a), *lay)


@clipped_uniform_backward.register_fake
def _(g: Tensor, x: Tensor, a: Tensor) -> list[Tensor]:
    return [torch.empty_like(g), torch.empty_like(g)]


def _clipped_setup(ctx: Any, inputs: Sequence[Any], output: Tensor) -> None:
    ctx.save_for_backward(inputs[0], inputs[1])


def _clipped_backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x, a = ctx.saved_tensors
    grad_x, grad_a_elems = clipped_uniform_backward(g, x, a)
    grad_a = _reduce_to(grad_a_elems, a) if ctx.needs_input_grad[1] else None
    return (grad_x if ctx.needs_input_grad[0] else None), grad_a, None


clipped_uniform.register_autograd(_clipped_backward, setup_context=_clipped_setup)


# --------------------------------------------------------------------------- sign
@torch.library.custom_op("lowbit::sign_ste", mutates_args=())
def sign_ste(x: Tensor, scale: Tensor) -> Tensor:
    """``scale * sign(x)`` with ``sign(0) = +1``; backward ``g * scale * 1{|x| <= 1}`` (``scale``
    is a constant here: it gets no gradient)."""
    nat = _native(x, scale)
    if nat is None:
        return ref.sign_ste(x, scale)
    lib, lay = nat
    return lib.sign_ste(x, _c(scale), *lay)


@sign_ste.register_fake
def _(x: Tensor, scale: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lowbit::sign_ste_backward", mutates_args=())
def sign_ste_backward(g: Tensor, x: Tensor, scale: Tensor) -> Tensor:
    """``g * scale`` where ``|x| <= 1``, else 0."""
    nat = _native(x, scale, g)
    if nat is None:
        return ref.sign_ste_backward(g, x, scale)
    lib, lay = nat
    return lib.sign_backward(g.contiguous(), x, _c(scale), *lay)


@sign_ste_backward.register_fake
def _(g: Tensor, x: Tensor, scale: Tensor) -> Tensor:
    return torch.empty_like(g)


def _sign_setup(ctx: Any, inputs: Sequence[Any], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _sign_backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
    x, scale = ctx.saved_tensors
    return (sign_ste_backward(g, x, scale) if ctx.needs_input_grad[0] else None), None


sign_ste.register_autograd(_sign_backward, setup_context=_sign_setup)


# --------------------------------------------------------------------------- stochastic
@torch.library.custom_op("lowbit::stochastic_round", mutates_args=())
def stochastic_round(x: Tensor, u: Tensor, s: Tensor, qn: int, qp: int) -> Tensor:
    """``s * clamp(floor(x * (1 / s) + u), -qn, qp)``; backward: identity to ``x``."""
    nat = _native(x, s, u)
    if nat is None or not u.is_contiguous() or u.shape != x.shape:
        return ref.stochastic_round(x, u, s, qn, qp)
    lib, lay = nat
    return lib.stochastic_round(x, u, _c(1.0 / s), _c(s), qn, qp, *lay)


@stochastic_round.register_fake
def _(x: Tensor, u: Tensor, s: Tensor, qn: int, qp: int) -> Tensor:
    return torch.empty_like(x)


def _identity_backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None, None]:
    return g, None, None, None, None


stochastic_round.register_autograd(_identity_backward)


# --------------------------------------------------------------------------- affine
@torch.library.custom_op("lowbit::affine_quant", mutates_args=())
def affine_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``S (clamp(round(x / S) + Z, qmin, qmax) - Z)`` per tensor: the values of PyTorch's
    ``fake_quantize_per_tensor_affine`` (``scale`` float32, ``zero_point`` int32, 0-d)."""
    nat = _native(x, scale) if x.dtype == torch.float32 else None
    if nat is None:
        return ref.affine_quant_with_mask(x, scale, zero_point, qmin, qmax)[0]
    return nat[0].affine_quant(x, _c(1.0 / scale), _c(scale), _zp(zero_point), qmin, qmax)


@affine_quant.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lowbit::affine_quant_backward", mutates_args=())
def affine_quant_backward(
    g: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int
) -> Tensor:
    """``g`` where ``qmin <= round(x / S) + Z <= qmax``, else 0 (the clipping STE)."""
    nat = _native(x, scale, g) if x.dtype == torch.float32 else None
    if nat is None:
        return g * ref.affine_quant_with_mask(x, scale, zero_point, qmin, qmax)[1]
    lib = nat[0]
    return lib.affine_backward(g.contiguous(), x, _c(1.0 / scale), _zp(zero_point), qmin, qmax)


@affine_quant_backward.register_fake
def _(g: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    return torch.empty_like(g)


def _zp(zero_point: Tensor) -> Tensor:
    return zero_point.detach().to(torch.float32).contiguous()


def _affine_setup(ctx: Any, inputs: Sequence[Any], output: Tensor) -> None:
    x, scale, zero_point, qmin, qmax = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.bounds = (qmin, qmax)


def _affine_backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None, None]:
    x, scale, zero_point = ctx.saved_tensors
    return affine_quant_backward(g, x, scale, zero_point, *ctx.bounds), None, None, None, None


affine_quant.register_autograd(_affine_backward, setup_context=_affine_setup)


# --------------------------------------------------------------------------- randomness
@torch.library.custom_op("lowbit::uniform_from_state", mutates_args=("state",))
def uniform_from_state(like: Tensor, state: Tensor) -> Tensor:
    """``u ~ U[0, 1)`` shaped like ``like`` from the generator whose state is ``state`` (a CPU
    uint8 tensor from :meth:`torch.Generator.get_state` of a generator on ``like``'s device);
    ``state`` is advanced in place, so successive calls continue one stream."""
    gen = torch.Generator(device=like.device)
    gen.set_state(state)
    u = torch.rand(like.shape, generator=gen, dtype=like.dtype, device=like.device)
    state.copy_(gen.get_state())
    return u


@uniform_from_state.register_fake
def _(like: Tensor, state: Tensor) -> Tensor:
    return torch.empty_like(like)
