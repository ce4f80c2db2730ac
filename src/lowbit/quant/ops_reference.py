"""The formulas of the fused fake-quant operators (:mod:`lowbit.quant.ops`) in plain torch.

These run wherever the C++ kernels do not (GPU, bfloat16/float16, no compiler) and are the
reference the kernels are tested against. Each computes its result with the same torch operations
as the unfused quantiser did, so values are bit for bit those of the formula.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lsq_quant(x: Tensor, s: Tensor, qn: int, qp: int) -> Tensor:
    """``clamp(round(x * (1 / s)), -qn, qp) * s``."""
    return (x * (1.0 / s)).round_().clamp_(-qn, qp).mul_(s)


def lsq_quant_backward(g: Tensor, x: Tensor, s: Tensor, qn: int, qp: int) -> list[Tensor]:
    """``[g * inside, g * ds]`` with ``inside = 1{round(q) in [-qn, qp]}`` and
    ``ds = round(q) - q`` inside, the clip level outside (``q = x / s``)."""
    q = x * (1.0 / s)
    r = q.round()
    rc = r.clamp(-qn, qp)
    inside = (r == rc).to(g.dtype)
    # q clipped one level beyond the range stays finite (so 0 * q = 0); inside-ness is unchanged
    ds = rc.sub_(q.clamp_(-qn - 1, qp + 1).mul_(inside))
    return [g * inside, ds.mul_(g)]


def clipped_uniform(x: Tensor, a: Tensor, n: int) -> Tensor:
    """``clamp(round(x * (n / a)), 0, n) * (a / n)``."""
    return (x * (n / a)).round_().clamp_(0, n).mul_(a / n)


def clipped_uniform_backward(g: Tensor, x: Tensor, a: Tensor) -> list[Tensor]:
    """``[g * 1{0 <= x < a}, g * 1{x >= a}]``."""
    above = x >= a
    return [g * ((x >= 0) & ~above).to(g.dtype), g * above.to(g.dtype)]


def sign_ste(x: Tensor, scale: Tensor) -> Tensor:
    """``scale * sign(x)`` with ``sign(0) = +1``."""
    return scale * ((x >= 0).to(x.dtype) * 2 - 1)


def sign_ste_backward(g: Tensor, x: Tensor, scale: Tensor) -> Tensor:
    """``g * scale * 1{|x| <= 1}``."""
    return (g * scale).mul_(x.abs() <= 1)


def stochastic_round(x: Tensor, u: Tensor, s: Tensor, qn: int, qp: int) -> Tensor:
    """``s * clamp(floor(x * (1 / s) + u), -qn, qp)``."""
    return s * (x * (1.0 / s)).add_(u).floor_().clamp_(-qn, qp)


def affine_quant_with_mask(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int
) -> tuple[Tensor, Tensor]:
    """PyTorch's per-tensor affine fake quantisation ``S (clamp(round(x / S) + Z, qmin, qmax) - Z)``
    and its gradient mask ``qmin <= round(x / S) + Z <= qmax`` (PyTorch's own kernel)."""
    enabled = torch.ones((), dtype=torch.long, device=x.device)
    op = torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams
    y, mask = op(x, scale, zero_point, enabled, qmin, qmax)
    return y, mask
