"""Integer-arithmetic-only inference on a :class:`~lowbit.runtime.graph.Graph` (Jacob et al. 2018).

:func:`compile_integer` turns a graph whose conv/linear layers have integer-valued weights and
*static* input quantisers into an :class:`IntegerProgram`. Running it quantises the network input
once, then uses only integers up to the last layer, whose int32 accumulator is dequantised to float
logits. numpy and :mod:`lowbit.runtime.kernels` do the work; no torch.

**Grids.** Every tensor lives on a :class:`Grid` ``r = S (q - Z)``, ``q in [qmin, qmax]``. The grid
of a tensor is the one its *consumers* need (planned backwards from the outputs):

* a conv/linear consumer needs its input quantiser's grid (exactly what the fake-quant model's
  ``round(x / S) + Z`` produces);
* ``relu``, ``clamp``, ``maxpool2d``, ``flatten``, ``slice`` and ``pad`` commute with the
  increasing affine map ``q -> S (q - Z)`` and with rounding, so they run on codes of the grid
  their output needs: ReLU is ``max(q, Z)``, ``clamp(a, b)`` is a clip to
  ``[Z + round(a / S), Z + round(b / S)]``, padding pads with ``Z`` (real zero), max-pooling
  pads with the smallest integer;
* ``avgpool2d``, ``global_avgpool2d`` and ``add`` do not commute with rounding, so their inputs
  are kept on a *wide* grid ``(S 2^-20, Z 2^20)`` with int32 codes (``WIDE_BITS`` = 20 extra
  fraction bits), also when a layer reads the same tensor (the fake-quant model adds the
  unquantised value; the layer gets it rescaled to its own grid), and their result is brought to
  the output grid by one rounding shift.

**Layers.** A conv/linear computes ``acc = sum (q_in - Z_in) q_w`` (int32; weights with zero
point 0, per-channel or per-tensor scale), adds ``bias_q = round(b / (S_in S_w))`` and
requantises with ``M = S_in S_w / S_out = M0 2^-31 2^-n`` (:func:`lowbit.fixedpoint.
quantize_multiplier`): by default in one 64-bit rounding (see **Rounding**) after
:func:`lowbit.runtime.kernels.int8_gemm` (input codes offset into ``[0, 255]``, which does not
change ``q - Z``, and int8 weight codes) or an exact numpy int64 product (codes beyond 8 bits);
with an integer ``min_shift``, in gemmlowp arithmetic, through the kernel's fused
:class:`~lowbit.runtime.kernels.Requant` stage when the output codes fit one byte too.
Accumulators are saturated to int32 before requantisation. A ``batchnorm`` node that directly
follows a layer (its only consumer) is folded into that layer's per-channel multiplier and bias
at compile time (``y = g (S acc + b) + h`` becomes scale ``g S`` and bias ``g b + h``; a channel
with ``g < 0`` has its weight codes negated); any other ``batchnorm``, float weight, or
non-static input quantiser makes :func:`compile_integer` raise a
:class:`~lowbit.runtime.graph.GraphError` naming the node ("not integer-only").

Weight schemes with an integer path: ``uniform``/``affine`` with an integer zero point (codes
``c - Z``) or a half-integer one (DoReFa's ``(2^k - 1) / 2``: codes ``2c - 2Z``, scale ``S / 2``),
``binary``, symmetric ``ternary`` and ``pow2`` with at most 7 exponents (codes
``sign(c) 2^(|c| - 1)``, scale ``S 2^(1 - n)``). Asymmetric ternary (TTQ's ``Wp != Wn``) is not.

**Rounding.** By default requantisation is exact: ``Z + round_half_even((acc M0 + bias_q)
2^-(31+n))`` in int64 with the bias below the binary point (:func:`_exact_epilogue` states the
bound), i.e. the correctly rounded real value, as the fake-quant model's
``round_half_even(r / S) + Z`` up to its own float32 error, on trained and untrained weights
alike. ``compile_integer(graph, min_shift=L)`` selects gemmlowp's double rounding instead (see
:func:`lowbit.fixedpoint.requantize`), off by one for about ``2^-(n+1)`` of the codes, ``n`` the
shift; layers with a small shift then get *headroom*: the accumulator is multiplied by ``2^L``
(exact, within int32) and the shift raised by ``L`` up to ``min_shift``, with the bias quantised
at ``2^-L`` of an accumulator unit; the rate drops to ``2^-(n+L+1)``; ``min_shift=0`` is plain
gemmlowp everywhere. Rescaling between grids (``add`` operands, a tensor consumed
under two different grids) uses the same fixed-point multiply, or a single rounding shift
(half away from zero) when the ratio of scales is a power of two (wide -> 8-bit). Averages
(``avgpool2d``, ``global_avgpool2d``) are ``Z + round_half_even(sum(q - Z) / count)`` in exact
integer arithmetic, with the window count including padding unless ``count_include_pad`` is
False. ``add`` follows TFLite's idea of bringing both operands to one finer common scale with
fixed-point multipliers before adding: here the common scale is the wide version of the output
grid, ``(S_out 2^-20, Z_out 2^20)``; the sum is then shifted down by 20 bits with one rounding.
In a residual network the fake-quant model adds *float* tensors; the engine holds them to
``2^-20`` of a code, so it matches up to rare off-by-ones there too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..fixedpoint import (
    INT32_MAX,
    INT32_MIN,
    quantize_multiplier,
    requantize,
    rounding_divide_by_pot,
)
from . import kernels
from .graph import WEIGHTED_OPS, Graph, GraphError, Node

__all__ = [
    "WIDE_BITS",
    "Grid",
    "IntegerProgram",
    "compile_integer",
    "rescale",
    "round_shift_half_even",
]

WIDE_BITS = 20
"""Extra fraction bits of the wide int32 grids that averages and additions are computed on."""


MEAN_OPS = ("avgpool2d", "global_avgpool2d", "add")
MAX_POW2_LEVELS = 7  # pow2 codes sign(c) 2^(|c| - 1) then fit int8
Env = dict[str, NDArray[Any]]


# ----------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Grid:
    """An integer grid ``r = scale (q - zero_point)`` with codes ``q in [qmin, qmax]``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def wide(self) -> bool:
        return self.qmin == INT32_MIN and self.qmax == INT32_MAX

    def widened(self) -> Grid:
        """The same real line with ``WIDE_BITS`` more fraction bits and int32 codes."""
        if self.wide:
            return self
        scale = self.scale / 2**WIDE_BITS
        return Grid(scale, self.zero_point * 2**WIDE_BITS, INT32_MIN, INT32_MAX)

    def quantize(self, x: NDArray[Any]) -> NDArray[np.int32]:
        """``clip(round_half_even(x * (1 / S)) + Z, qmin, qmax)`` in float32.

        The product by the float32 reciprocal is what PyTorch's fake-quant kernels and
        lowbit's uniform quantisers compute, so codes agree with them bit for bit.
        """
        inv = np.float32(1.0) / np.float32(self.scale)
        q = np.rint(np.asarray(x, dtype=np.float32) * inv)
        lo, hi = self.qmin - self.zero_point, self.qmax - self.zero_point
        return (np.clip(q, lo, hi).astype(np.int64) + self.zero_point).astype(np.int32)

    def code(self, r: float) -> int:
        """The code of the real number ``r`` (clipped to the grid)."""
        return int(self.quantize(np.asarray([r]))[0])


def _round_half_even_div(num: NDArray[np.int64], den: NDArray[np.int64] | int) -> NDArray[np.int64]:
    """``num / den`` (``den > 0``) rounded to the nearest integer, halves to even, exactly."""
    q, r = np.divmod(num, den)
    twice = 2 * r
    return q + ((twice > den) | ((twice == den) & (q % 2 == 1)))


def rescale(q: NDArray[Any], src: Grid, dst: Grid) -> NDArray[np.int32]:
    """Codes ``q`` on ``src`` moved to ``dst``: ``Z_dst + (S_src / S_dst) (q - Z_src)``, clipped.

    A power-of-two ratio ``2^-k`` (``k >= 1``) is one rounding shift (gemmlowp
    ``RoundingDivideByPOT``, halves away from zero); any other ratio the fixed-point
    multiplier of :func:`lowbit.fixedpoint.requantize`. ``q - Z_src`` saturates to int32.
    """
    if src == dst:
        return q
    centred = np.clip(q.astype(np.int64) - src.zero_point, INT32_MIN, INT32_MAX)
    ratio = src.scale / dst.scale
    mantissa, exponent = math.frexp(ratio)
    if mantissa == 0.5 and exponent <= 0:
        shifted = rounding_divide_by_pot(centred, 1 - exponent) + dst.zero_point
        return np.clip(shifted, dst.qmin, dst.qmax).astype(np.int32)
    m0, shift = quantize_multiplier(ratio)
    return requantize(centred, m0, shift, dst.zero_point, dst.qmin, dst.qmax)


def _uint8_offset(lo: int, hi: int, zero_point: int) -> int | None:
    """An offset ``o`` with ``[lo, hi] + o`` and ``zero_point + o`` inside ``[0, 255]``, or None."""
    o = 0 if lo >= 0 else -lo
    inside = lo + o >= 0 and hi + o <= 255 and 0 <= zero_point + o <= 255
    return o if inside else None


# ----------------------------------------------------------------------------- node checks


def _not_integer(node: Node, why: str) -> GraphError:
    return GraphError(f"node {node.name!r} ({node.op}) is not integer-only: {why}")


def _static_grid(node: Node) -> Grid:
    """The grid of a layer's static input quantiser (uniform/affine, per tensor, integer Z)."""
    iq = node.input_quant
    if iq is None:
        raise _not_integer(node, "its input is not quantised (float activations)")
    if iq.get("kind") != "static":
        raise _not_integer(node, f"input quantiser kind {iq.get('kind')!r} is not 'static'")
    spec = iq["spec"]
    if spec["scheme"] not in ("uniform", "affine"):
        raise _not_integer(node, f"input quantiser scheme {spec['scheme']!r}")
    scale = np.asarray(spec["scale"], dtype=np.float64)
    zp = np.asarray(0.0 if spec.get("zero_point") is None else spec["zero_point"], np.float64)
    if scale.size != 1 or zp.size != 1:
        raise _not_integer(node, "the input quantiser has more than one scale / zero point")
    if zp.item() != round(zp.item()):
        raise _not_integer(node, f"input zero point {zp.item()} is not an integer")
    if not (math.isfinite(scale.item()) and scale.item() > 0):
        raise _not_integer(node, f"input scale {scale.item()} is not positive")
    return Grid(float(scale.item()), round(zp.item()), int(spec["qmin"]), int(spec["qmax"]))


def _channel_vector(node: Node, value: Any, n: int, what: str) -> NDArray[np.float64]:
    """A per-tensor or per-output-channel weight parameter as a length-``n`` float64 vector."""
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        return np.full(n, arr[0])
    axis = (node.weight_spec or {}).get("axis")
    if arr.size != n or axis not in (0, None):
        raise _not_integer(node, f"weight {what} is neither per tensor nor per output channel")
    return arr


def _integer_weight(node: Node) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """A layer's weight as integer codes ``k`` with a per-output-channel scale ``s``: ``w = s k``.

    Raises a GraphError naming the node when the weight has no such exact integer form.
    """
    if node.weight_codes is None or node.weight_spec is None:
        raise _not_integer(node, "float weights")
    spec = node.weight_spec
    codes = np.asarray(node.weight_codes).astype(np.int64)
    n = codes.shape[0]
    scale = _channel_vector(node, spec["scale"], n, "scale")
    view = (n,) + (1,) * (codes.ndim - 1)
    scheme = spec["scheme"]
    if scheme in ("uniform", "affine"):
        zp = _channel_vector(
            node, 0.0 if spec.get("zero_point") is None else spec["zero_point"], n, "zero point"
        )
        if np.all(zp == np.round(zp)):
            return codes - zp.astype(np.int64).reshape(view), scale
        if np.all(2 * zp == np.round(2 * zp)):  # DoReFa: S (c - (2^k - 1) / 2)
            return 2 * codes - (2 * zp).astype(np.int64).reshape(view), scale / 2
        raise _not_integer(node, "weight zero point is not a multiple of 1/2")
    if scheme == "binary":
        return codes, scale
    if scheme == "ternary":
        neg = spec.get("scale_neg")
        if neg is not None and not np.array_equal(_channel_vector(node, neg, n, "scale"), scale):
            raise _not_integer(node, "asymmetric ternary weights (Wp != Wn) have two scales")
        return codes, scale
    if scheme == "pow2":
        levels = int(spec["qmax"])
        if levels > MAX_POW2_LEVELS:
            raise _not_integer(node, f"pow2 weights with {levels} > {MAX_POW2_LEVELS} exponents")
        mags = np.where(codes == 0, 0, np.left_shift(1, np.maximum(np.abs(codes) - 1, 0)))
        return np.sign(codes) * mags, scale * 2.0 ** (1 - levels)
    raise _not_integer(node, f"weight scheme {scheme!r}")


# ----------------------------------------------------------------------------- layers


INT64_ROOM = 2**62  # |acc m0| + |bias| stays below this in the exact requantisation


def round_shift_half_even(x: NDArray[np.int64], s: NDArray[np.int64]) -> NDArray[np.int64]:
    """``x / 2^s`` rounded to nearest, ties to even, in exact int64 arithmetic (``s >= 1``)."""
    x, s = np.asarray(x, np.int64), np.asarray(s, np.int64)
    q = x >> s  # floor
    rem = x - (q << s)
    half = np.left_shift(np.int64(1), s - 1)
    return q + ((rem > half) | ((rem == half) & (q & 1 == 1)))


@dataclass(frozen=True)
class _Epilogue:
    """What follows a layer's accumulator: requantisation to ``grid``, or (``grid`` None) float.

    ``real = scale * acc + bias`` per output channel (``scale > 0``, BatchNorm folded in). For a
    grid, two schemes (``exact``):

    * exact (the default): ``q = Z + round_half_even((acc m0 + bias_q) 2^-shift)`` in int64,
      with ``m0 2^-shift = scale / S_out`` (``m0 in [2^30, 2^31)``) and ``bias_q =
      round(bias / S_out 2^shift)``; see :func:`_exact_epilogue` for its error bound;
    * gemmlowp: ``q = requantize(acc 2^headroom + bias_q, m0, shift)`` with
      ``m0 2^-31 2^-shift = 2^-headroom scale / S_out`` and ``bias_q = round(bias 2^headroom /
      scale)`` (:func:`lowbit.fixedpoint.requantize`, double rounding).
    """

    scale: NDArray[np.float64]
    bias: NDArray[np.float64]
    grid: Grid | None
    headroom: int = 0
    m0: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    shift: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    bias_q: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    exact: bool = True

    def requantize(self, acc: NDArray[np.int64], sl: slice) -> NDArray[np.int32]:
        """Codes from int64 accumulators ``[M, N]`` of output channels ``sl`` (int32-saturated)."""
        g = self.grid
        if self.exact:
            acc = np.clip(acc, INT32_MIN, INT32_MAX)
            q = round_shift_half_even(acc * self.m0[sl] + self.bias_q[sl], self.shift[sl])
            return np.clip(q + g.zero_point, g.qmin, g.qmax).astype(np.int32)
        scaled = np.clip(acc * 2**self.headroom + self.bias_q[sl], INT32_MIN, INT32_MAX)
        return requantize(scaled, self.m0[sl], self.shift[sl], g.zero_point, g.qmin, g.qmax)


def _multipliers(node: Node, ratio: NDArray[np.float64]) -> tuple[NDArray[np.int64], ...]:
    try:
        pairs = [quantize_multiplier(float(r)) for r in ratio]
    except ValueError as exc:
        raise GraphError(f"node {node.name!r}: cannot requantise: {exc}") from exc
    m0, shift = (np.array(v, dtype=np.int64) for v in zip(*pairs, strict=True))
    return m0, shift


def _exact_epilogue(
    node: Node, scale: NDArray[np.float64], bias: NDArray[np.float64], grid: Grid, acc_bound: int
) -> _Epilogue:
    """Single-rounding requantisation in 64 bits, exact up to a bound (the default scheme).

    Per channel ``M = scale / S_out = m0 2^-31 2^-n`` (:func:`~lowbit.fixedpoint.
    quantize_multiplier`), total shift ``s = 31 + n`` and ``bias_q = round(bias / S_out 2^s)``;
    the output is ``Z + round_half_even((acc m0 + bias_q) 2^-s)``, clamped. ``acc`` is the int32
    accumulator, ``acc m0 + bias_q`` an int64 (when ``acc_bound m0 + |bias_q|`` could reach
    ``2^62``, or ``s > 62``, ``m0`` and ``s`` lose the same number of low bits, which for
    ``s > 62`` costs less than ``acc_bound 2^-62`` of a code). Against the real value
    ``v = M_f acc + bias / S_out`` (``M_f`` the float64 ratio) the rounded quantity is off by at
    most ``|M_f acc| 2^-31 + 2^-s`` (``m0``'s rounding, then ``bias_q``'s) plus float64's
    ``2^-52`` relative error of ``bias / S_out``: for outputs within a few hundred codes that is
    below ``2^-21`` of a code, so the code equals ``round_half_even(v)`` unless ``v`` lies that
    close to a half-integer -- closer than the float32 fake-quant model computes ``v`` itself.
    A C kernel implements it with int32 accumulators, a 32x32->64-bit multiply per output, one
    64-bit add and a rounding right shift (TFLite's single-rounding
    ``MultiplyByQuantizedMultiplier`` with the bias folded in below the binary point, and ties to
    even as ``torch.round``).
    """
    m0, n = _multipliers(node, scale / grid.scale)
    shift = 31 + n
    offset = bias / grid.scale
    acc_bound = min(acc_bound, INT32_MAX)
    while True:
        bias_q = np.rint(offset * np.exp2(shift.astype(np.float64)))
        over = (acc_bound * m0.astype(np.float64) + np.abs(bias_q) >= INT64_ROOM) | (shift > 62)
        if not over.any():
            break
        if shift[over].min() <= 1:
            raise GraphError(f"node {node.name!r}: cannot requantise within 64 bits")
        m0 = np.where(over, (m0 + 1) >> 1, m0)
        shift = np.where(over, shift - 1, shift)
    return _Epilogue(scale, bias, grid, 0, m0, shift, bias_q.astype(np.int64))


def _epilogue(
    node: Node,
    scale: NDArray[np.float64],
    bias: NDArray[np.float64],
    grid: Grid | None,
    acc_bound: int,
    min_shift: int | None,
) -> _Epilogue:
    """Multipliers, headroom and quantised bias of a layer; ``acc_bound`` bounds ``|acc|``.

    ``min_shift`` None: :func:`_exact_epilogue`. Otherwise gemmlowp with headroom: when the
    smallest requantisation shift ``n`` is below ``min_shift``, the accumulator is multiplied by
    ``2^L`` (exact in int32, ``L <= min_shift - n``, limited by ``acc_bound``) and the shift
    raised by ``L``, so the double rounding of the high multiply and the shift lands
    ``min_shift`` bits below the output's unit (rate ``2^-(n+L+1)`` instead of ``2^-(n+1)``) and
    the bias is kept to ``2^-L`` of an accumulator unit.
    """
    if grid is None:
        return _Epilogue(scale, bias, None)
    if min_shift is None:
        return _exact_epilogue(node, scale, bias, grid, acc_bound)
    m0, shift = _multipliers(node, scale / grid.scale)
    bias_bound = int(np.abs(np.rint(bias / scale)).max(initial=0)) + 1
    room = math.floor(math.log2(INT32_MAX / (acc_bound + bias_bound)))
    if room < 0:
        raise GraphError(f"node {node.name!r}: accumulator and bias may overflow int32")
    headroom = max(0, min(min_shift - int(shift.min()), room))
    bias_q = np.rint(bias * 2.0**headroom / scale).astype(np.int64)
    return _Epilogue(scale, bias, grid, headroom, m0, shift + headroom, bias_q, exact=False)


@dataclass(frozen=True)
class _Group:
    """One convolution group's output channels ``sl``: integer weight rows ``w`` ``[N, K]``,
    their int8 copy when they fit, and the fused requantisation stage when it applies."""

    sl: slice
    w: NDArray[np.int64]
    w8: NDArray[np.int8] | None
    stage: kernels.Requant | None


class _Layer:
    """A conv2d / linear node: integer GEMM (through ``im2col`` for convs) and its epilogue.

    ``name`` is the tensor it writes (its folded BatchNorm's name when there is one), ``src``
    the grid its input tensor is held on, ``grid_in`` its input quantiser's grid, ``codes`` the
    integer weight (sign-adjusted for negative folded BatchNorm scales). The GEMM is
    :func:`~lowbit.runtime.kernels.int8_gemm` when the input codes (offset by ``a_off``) fit
    uint8 and the weights int8, with the fused :class:`~lowbit.runtime.kernels.Requant` stage
    when the output codes (offset by ``o_off``) fit uint8 too and no headroom is needed.
    """

    def __init__(
        self,
        node: Node,
        name: str,
        src: Grid,
        grid_in: Grid,
        codes: NDArray[np.int64],
        epilogue: _Epilogue,
    ) -> None:
        self.name, self.input = name, node.inputs[0]
        self.src, self.grid_in, self.epilogue = src, grid_in, epilogue
        self.conv = node.op == "conv2d"
        groups = int(node.attrs.get("groups", 1)) if self.conv else 1
        if self.conv:
            self.kernel = codes.shape[2:]
            self.stride = _pair(node, "stride", 1)
            self.padding = _pair(node, "padding", 0)
            if _pair(node, "dilation", 1) != (1, 1):
                raise GraphError(f"node {node.name!r}: dilated convolutions are not supported")
        self.a_off = _uint8_offset(grid_in.qmin, grid_in.qmax, grid_in.zero_point)
        w = codes.reshape(codes.shape[0], -1)
        og = w.shape[0] // groups
        self.groups = [self._group(w, slice(g * og, (g + 1) * og)) for g in range(groups)]

    def _group(self, w: NDArray[np.int64], sl: slice) -> _Group:
        ep, grid, rows = self.epilogue, self.epilogue.grid, w[sl]
        fits = rows.size == 0 or (rows.min() >= -128 and rows.max() <= 127)
        w8 = np.ascontiguousarray(rows.astype(np.int8)) if fits else None
        o_off = None if grid is None else _uint8_offset(grid.qmin, grid.qmax, grid.zero_point)
        stage = None
        fused = not ep.exact and not ep.headroom  # the C stage rounds as gemmlowp
        if w8 is not None and self.a_off is not None and o_off is not None and fused:
            bias = ep.bias_q[sl]
            if rows.shape[1] * 255 * 128 + np.abs(bias).max(initial=0) <= INT32_MAX:
                stage = kernels.Requant(
                    bias,
                    ep.m0[sl],
                    ep.shift[sl],
                    grid.zero_point + o_off,
                    grid.qmin + o_off,
                    grid.qmax + o_off,
                )
                self.o_off = o_off
        return _Group(sl, rows, w8, stage)

    def rows(self, q: NDArray[np.int32]) -> NDArray[Any]:
        """Input codes as GEMM rows ``[M, K]`` (uint8, offset by ``a_off``, when they fit)."""
        if self.a_off is not None:
            q = (q + self.a_off).astype(np.uint8)
        if not self.conv:
            return np.ascontiguousarray(q.reshape(-1, q.shape[-1]))
        pad = self.grid_in.zero_point + (self.a_off or 0)
        return kernels.im2col(q, *self.kernel, self.stride, self.padding, pad_value=pad)

    def gemm(self, rows: NDArray[Any], group: _Group) -> NDArray[Any]:
        """One group's output ``[M, N]``: requantised codes, or the int32 accumulator."""
        z = self.grid_in.zero_point + (self.a_off or 0)
        if group.stage is not None:
            return kernels.int8_gemm(rows, z, group.w8, group.stage).astype(np.int32) - self.o_off
        if self.a_off is not None and group.w8 is not None:
            acc = kernels.int8_gemm(rows, z, group.w8).astype(np.int64)
        else:  # exact: |q - Z| and |w| are at most 2^16 here, far below float64's 2^53
            acc = ((rows.astype(np.float64) - z) @ group.w.astype(np.float64).T).astype(np.int64)
        if self.epilogue.grid is None:
            return np.clip(acc, INT32_MIN, INT32_MAX).astype(np.int32)
        return self.epilogue.requantize(acc, group.sl)

    def __call__(self, env: Env) -> None:
        q = rescale(env[self.input], self.src, self.grid_in)
        if not self.conv:
            out = self.gemm(self.rows(q), self.groups[0])
            env[self.name] = out.reshape(*q.shape[:-1], out.shape[-1])
            return
        batch, channels, height = q.shape[:3]
        cg = channels // len(self.groups)
        outs = [
            self.gemm(self.rows(q[:, i * cg : (i + 1) * cg]), group)
            for i, group in enumerate(self.groups)
        ]
        oh = (height + 2 * self.padding[0] - self.kernel[0]) // self.stride[0] + 1
        out = np.concatenate(outs, axis=1)
        out = out.reshape(batch, oh, -1, out.shape[-1]).transpose(0, 3, 1, 2)
        env[self.name] = np.ascontiguousarray(out)


def _pair(node: Node, key: str, default: int) -> tuple[int, int]:
    v = node.attrs.get(key, default)
    v = default if v is None else v
    pair = (v, v) if isinstance(v, int | np.integer) else tuple(v)
    if len(pair) != 2:
        raise GraphError(f"node {node.name!r}: attribute {key!r} must be an int or a pair")
    return int(pair[0]), int(pair[1])


# ----------------------------------------------------------------------------- other ops


def _windows(q: NDArray[Any], node: Node, pad_value: int) -> NDArray[Any]:
    """Pooling windows ``[N, C, OH, OW, kh, kw]`` of ``q`` (padded with ``pad_value``)."""
    k = _pair(node, "kernel_size", 1)
    s = _pair(node, "stride", 0)
    s = k if s == (0, 0) else s
    p = _pair(node, "padding", 0)
    if node.attrs.get("ceil_mode") or _pair(node, "dilation", 1) != (1, 1):
        raise GraphError(f"node {node.name!r}: ceil_mode / dilation pooling is not supported")
    padded = np.pad(q, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])), constant_values=pad_value)
    win = np.lib.stride_tricks.sliding_window_view(padded, k, axis=(2, 3))
    return win[:, :, :: s[0], :: s[1]]


def _avgpool(q: NDArray[Any], node: Node, g: Grid) -> NDArray[Any]:
    """``Z + round_half_even(sum(q - Z) / count)`` over each window."""
    sums = _windows(q.astype(np.int64) - g.zero_point, node, 0).sum(axis=(-2, -1))
    count: NDArray[np.int64] | int = math.prod(_pair(node, "kernel_size", 1))
    if node.attrs.get("count_include_pad") is False:
        ones = np.ones((1, 1, *q.shape[2:]), dtype=np.int64)
        count = _windows(ones, node, 0).sum(axis=(-2, -1))
    return _round_half_even_div(sums, count) + g.zero_point


def _global_avgpool(q: NDArray[Any], g: Grid) -> NDArray[Any]:
    sums = (q.astype(np.int64) - g.zero_point).sum(axis=(2, 3), keepdims=True)
    return _round_half_even_div(sums, q.shape[2] * q.shape[3]) + g.zero_point


def _clamp_codes(node: Node, g: Grid) -> tuple[int, int]:
    """Code range of ``relu`` / ``clamp(min, max)`` on grid ``g`` (round commutes with clip)."""
    if node.op == "relu":
        return g.zero_point, g.qmax
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    return (g.qmin if lo is None else g.code(lo)), (g.qmax if hi is None else g.code(hi))


def _pass_op(node: Node, g: Grid) -> Callable[[NDArray[Any]], NDArray[Any]]:
    """The code-domain version of an op that commutes with ``q -> S (q - Z)``."""
    if node.op in ("relu", "clamp"):
        lo, hi = _clamp_codes(node, g)
        return lambda q: np.clip(q, lo, hi)
    if node.op == "maxpool2d":
        return lambda q: _windows(q, node, np.iinfo(np.int32).min).max(axis=(-2, -1))
    if node.op == "flatten":
        start = int(node.attrs.get("start_dim", 1))
        return lambda q: q.reshape(*q.shape[:start], -1)
    if node.op == "slice":
        a = node.attrs
        index = tuple(slice(*t) for t in zip(a["starts"], a["stops"], a["steps"], strict=True))
        return lambda q: q[index]
    pads = [tuple(int(v) for v in p) for p in node.attrs["pads"]]  # pad
    return lambda q: np.pad(q, pads, constant_values=g.zero_point)


@dataclass
class _Op:
    """A non-weighted node: inputs rescaled to ``grid_in``, ``fn`` applied, result to ``grid``."""

    name: str
    inputs: list[str]
    srcs: list[Grid]
    grid_in: Grid
    grid: Grid
    fn: Callable[..., NDArray[Any]]

    def __call__(self, env: Env) -> None:
        pairs = zip(self.inputs, self.srcs, strict=True)
        args = [rescale(env[i], src, self.grid_in) for i, src in pairs]
        out = np.clip(self.fn(*args), self.grid_in.qmin, self.grid_in.qmax).astype(np.int32)
        env[self.name] = rescale(out, self.grid_in, self.grid)


def _add(g: Grid) -> Callable[..., NDArray[Any]]:
    """Sum of operands on one grid: ``Z + sum_i (q_i - Z)``, in int64."""
    return lambda *qs: sum(q.astype(np.int64) - g.zero_point for q in qs) + g.zero_point


# ----------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    """The graph's integer reading: folded BatchNorms, consumers and the grid of every tensor."""

    graph: Graph
    folded: dict[str, Node] = field(default_factory=dict)  # layer name -> its batchnorm node
    consumers: dict[str, list[Node]] = field(default_factory=dict)
    grids: dict[str, Grid | None] = field(default_factory=dict)  # None: float (the output)
    exact: dict[str, bool] = field(default_factory=dict)

    def out_name(self, node: Node) -> str:
        """The tensor a layer's step writes: its own name, or its folded batchnorm's."""
        bn = self.folded.get(node.name)
        return node.name if bn is None else bn.name


def _check_nodes(graph: Graph, plan: _Plan) -> None:
    """Refuse float parts; find the batchnorms that fold into the layer before them."""
    nodes = {n.name: n for n in graph.nodes}
    for node in graph.nodes:
        plan.consumers.setdefault(node.name, [])
        for i in node.inputs:
            plan.consumers.setdefault(i, []).append(node)
    for name in graph.inputs:
        plan.consumers.setdefault(name, [])
    for node in graph.nodes:
        if node.op in WEIGHTED_OPS:
            _static_grid(node)
            _integer_weight(node)
        elif node.op == "batchnorm":
            prev = nodes.get(node.inputs[0])
            sole = prev is not None and len(plan.consumers[prev.name]) == 1
            if not (sole and prev.op in WEIGHTED_OPS and prev.name not in graph.outputs):
                raise _not_integer(
                    node,
                    "a float BatchNorm that does not directly follow a "
                    "conv/linear layer (only such a one folds into requantisation)",
                )
            if int(node.attrs.get("dim", 1)) != 1:
                raise _not_integer(node, "BatchNorm over a dim other than 1")
            plan.folded[prev.name] = node
    if len(graph.outputs) != 1:
        raise GraphError(f"the integer engine needs one graph output, got {graph.outputs}")


def _want(plan: _Plan, name: str) -> tuple[Grid | None, bool]:
    """The grid tensor ``name`` should be held on, and whether a consumer needs it exactly."""
    graph = plan.graph
    exact: list[Grid] = []
    soft: list[Grid] = []
    for c in plan.consumers[name]:
        if c.op in WEIGHTED_OPS:
            exact.append(_static_grid(c))
            continue
        g, is_exact = plan.grids[c.name], plan.exact[c.name]
        if c.op == "batchnorm":  # folded into this tensor's layer: it is the only consumer
            return g, is_exact
        if g is None:
            raise GraphError(
                f"node {c.name!r} ({c.op}): only a conv/linear layer may produce "
                "the graph output of the integer engine"
            )
        if c.op in MEAN_OPS:
            soft.append(g.widened())
        else:  # ops that commute with the affine map pass the grid through
            (exact if is_exact else soft).append(g)
    if name in graph.outputs:
        if plan.consumers[name]:
            raise GraphError(f"graph output {name!r} is also consumed inside the graph")
        return None, True
    if exact:
        if all(g == exact[0] for g in exact) and not soft:
            return exact[0], True
        # consumers with different grids, or an add/average that takes the real value (the
        # fake-quant model adds the unquantised tensor): hold it wide, rescale for each
        return exact[0].widened(), False
    if soft:
        return soft[0], False
    raise GraphError(f"tensor {name!r} has no consumer and is not a graph output")


def _plan_grids(plan: _Plan) -> None:
    graph = plan.graph
    for name in reversed([*graph.inputs, *(n.name for n in graph.nodes)]):
        plan.grids[name], plan.exact[name] = _want(plan, name)
    for name in graph.inputs:
        if plan.grids[name] is None:
            raise GraphError(f"graph input {name!r} is the graph output: nothing to compute")


# ----------------------------------------------------------------------------- program


@dataclass
class IntegerProgram:
    """A compiled integer-only network; see :mod:`lowbit.runtime.integer`.

    ``grids`` maps every tensor (graph input and node outputs) to its :class:`Grid` (None for the
    float output); ``input_grid`` quantises the network input. The output layer's real value is
    ``output_scale * acc + output_bias`` per channel (axis 1).
    """

    graph: Graph
    steps: list[_Layer | _Op]
    grids: dict[str, Grid | None]
    input_grid: Grid
    output_scale: NDArray[np.float64]
    output_bias: NDArray[np.float64]

    @property
    def input_name(self) -> str:
        return self.graph.inputs[0]

    @property
    def output_name(self) -> str:
        return self.graph.outputs[0]

    def quantize_input(self, x: NDArray[Any]) -> NDArray[np.int32]:
        """The network input's codes on :attr:`input_grid` (the only float -> int step)."""
        return self.input_grid.quantize(x)

    def trace_codes(
        self, x_codes: NDArray[Any], force: Mapping[str, NDArray[Any]] | None = None
    ) -> dict[str, NDArray[np.int32]]:
        """Every tensor's integer codes (on :attr:`grids`) for input codes ``x_codes``.

        The output layer's entry is its int32 accumulator ``sum (q - Z) q_w`` (without bias; a
        channel whose folded BatchNorm scale is negative has its weight codes negated).
        ``force`` replaces the named tensors' codes (node outputs) as soon as they are computed
        (layer-by-layer comparisons against a reference that feed each layer its own input).
        """
        x = np.asarray(x_codes)
        if x.dtype.kind not in "iu":
            raise ValueError(f"x_codes must hold integers, got dtype {x.dtype}")
        g = self.input_grid
        if x.size and (x.min() < g.qmin or x.max() > g.qmax):
            raise ValueError(f"x_codes must lie in [{g.qmin}, {g.qmax}]")
        force = force or {}
        unknown = sorted(set(force) - {step.name for step in self.steps})
        if unknown:
            raise ValueError(f"force names unknown tensors: {unknown}")
        env: Env = {self.input_name: x.astype(np.int32)}
        for step in self.steps:
            step(env)
            if step.name in force:
                env[step.name] = np.asarray(force[step.name]).astype(np.int32)
        return env

    def run_codes(self, x_codes: NDArray[Any]) -> NDArray[np.int32]:
        """The output layer's int32 accumulators for network input codes ``x_codes``."""
        return self.trace_codes(x_codes)[self.output_name]

    def dequantize_output(self, acc: NDArray[Any]) -> NDArray[np.float32]:
        """Float logits ``output_scale * acc + output_bias`` (per channel, axis 1)."""
        view = (1, -1) + (1,) * (acc.ndim - 2)
        scale = self.output_scale.reshape(view)
        return (acc.astype(np.float64) * scale + self.output_bias.reshape(view)).astype(np.float32)

    def run(self, x: NDArray[Any]) -> NDArray[np.float32]:
        """Float logits for float input ``x``: quantise once, integers only, dequantise."""
        return self.dequantize_output(self.run_codes(self.quantize_input(x)))


def _layer_step(plan: _Plan, node: Node, min_shift: int | None) -> _Layer:
    """A layer with its epilogue: ``real = (S_in S_w) acc + b``, then a folded BatchNorm."""
    codes, w_scale = _integer_weight(node)
    grid_in = _static_grid(node)
    scale = grid_in.scale * w_scale
    bias = np.zeros(len(scale)) if node.bias is None else np.asarray(node.bias, np.float64)
    bn = plan.folded.get(node.name)
    if bn is not None:
        g = np.asarray(bn.params["scale"], np.float64).reshape(-1)
        scale, bias = g * scale, g * bias + np.asarray(bn.params["shift"], np.float64).reshape(-1)
    if np.any(scale == 0):
        raise GraphError(f"node {node.name!r}: an output channel has scale 0")
    sign = np.sign(scale).astype(np.int64).reshape((-1,) + (1,) * (codes.ndim - 1))
    out = plan.out_name(node)
    centred = max(grid_in.zero_point - grid_in.qmin, grid_in.qmax - grid_in.zero_point)
    acc_bound = codes[0].size * centred * int(np.abs(codes).max(initial=0))
    epilogue = _epilogue(node, np.abs(scale), bias, plan.grids[out], acc_bound, min_shift)
    return _Layer(node, out, plan.grids[node.inputs[0]], grid_in, codes * sign, epilogue)


def _op_step(plan: _Plan, node: Node) -> _Op:
    grid = plan.grids[node.name]
    srcs = [plan.grids[i] for i in node.inputs]
    if node.op == "add":
        common = grid.widened()
        return _Op(node.name, node.inputs, srcs, common, grid, _add(common))
    if node.op in ("avgpool2d", "global_avgpool2d"):
        src = srcs[0]
        fn = (
            (lambda q: _avgpool(q, node, src))
            if node.op == "avgpool2d"
            else (lambda q: _global_avgpool(q, src))
        )
        return _Op(node.name, node.inputs, srcs, src, grid, fn)
    return _Op(node.name, node.inputs, srcs, grid, grid, _pass_op(node, grid))


def compile_integer(graph: Graph, *, min_shift: int | None = None) -> IntegerProgram:
    """Compile ``graph`` for integer-only inference (Jacob et al. 2018).

    ``min_shift`` None (the default): every layer requantises with the exact single-rounding
    64-bit scheme (:func:`_exact_epilogue`), so the codes are the correctly rounded real values
    whatever the weights (trained or not). An integer selects gemmlowp's double rounding instead:
    layers whose requantisation shift ``n`` is smaller get ``min_shift - n`` bits of accumulator
    headroom (see the module docstring); 0 gives plain gemmlowp requantisation everywhere (the
    kernels' fused :class:`~lowbit.runtime.kernels.Requant` stage).

    Raises :class:`~lowbit.runtime.graph.GraphError` naming the node when part of the graph is
    not integer-only (float weights or activations, a BatchNorm that does not follow a layer,
    dynamic/sign input quantisers, asymmetric ternary weights) or unsupported.
    """
    bad = isinstance(min_shift, bool) or not isinstance(min_shift, int | None)
    if bad or (min_shift is not None and not 0 <= min_shift <= 31):
        raise ValueError(f"min_shift must be None or an integer in [0, 31], got {min_shift!r}")
    graph.validate()
    if len(graph.inputs) != 1:
        raise GraphError(f"the integer engine needs one graph input, got {graph.inputs}")
    plan = _Plan(graph)
    _check_nodes(graph, plan)
    _plan_grids(plan)
    steps: list[_Layer | _Op] = []
    out_scale = out_bias = np.ones(0)
    for node in graph.nodes:
        if node.op in WEIGHTED_OPS:
            layer = _layer_step(plan, node, min_shift)
            steps.append(layer)
            if layer.epilogue.grid is None:
                out_scale, out_bias = layer.epilogue.scale, layer.epilogue.bias
        elif node.op != "batchnorm":
            steps.append(_op_step(plan, node))
    input_grid = plan.grids[graph.inputs[0]]
    if input_grid is None:  # pragma: no cover - refused by _plan_grids
        raise GraphError("graph input is the output")
    return IntegerProgram(graph, steps, plan.grids, input_grid, out_scale, out_bias)
