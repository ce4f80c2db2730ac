"""Conv2d / linear layers of the float engine: the kernel each runs on, weights decoded once.

Layers pick a kernel by their weight spec and input quantiser (:func:`plan_layer`):

* binary weights with sign inputs (BNN; XNOR-Net when ``beta`` is one number per sample, i.e.
  linear layers or ``per_sample=True``; a per-pixel ``beta`` varies inside a conv window and
  takes the float path): :func:`~lowbit.runtime.kernels.binary_gemm` on packed bits
  (XNOR-popcount), times ``alpha`` (and ``beta``);
* ternary weights with sign inputs: :func:`~lowbit.runtime.kernels.ternary_gemm_binary_act`;
  with signed 8-bit static inputs (zero point 0): :func:`~lowbit.runtime.kernels.ternary_gemm_int8`;
  times ``Wp`` / ``Wn`` (one GEMM per sign when they differ, TTQ);
* everything else: the codes dequantised once at load time and a float32 GEMM on the
  fake-quantised input.

Layers on sign inputs run on :class:`~lowbit.runtime.packed.PackedGemm`: im2col on the packed
bits of the input (channels last), with the channel-padding bits and PyTorch's zero padding of
the *quantised* input (zeros, which are not ``+-1``) corrected with integers tabulated at load
time, so the integer dots are exact (see :mod:`lowbit.runtime.packed`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..contract import (
    CodeSpec,
    GraphError,
    InputQuant,
    Node,
    Shape,
    SignMeanAbsQuant,
    SignQuant,
    StaticQuant,
    mean_abs,
)
from . import kernels
from .geometry import attr_pair, conv_geometry, patch_index
from .ops import to_channels_first, to_channels_last
from .packed import Bits, PackedGemm, ThresholdPlan, pack_activation

__all__ = ["IM2COL_CHUNK_ELEMENTS", "Layer", "plan_layer", "weight_gemms"]

F32 = np.float32
IM2COL_CHUNK_ELEMENTS = 2**22
"""Convolutions unfold at most about this many input patch elements at a time."""
MAX_PATCH_INDEX = 2**18
"""Largest im2col gather table (one index a patch element of one sample) a float conv keeps."""
MAX_PADDING_TABLE = 2**24
"""Largest padding-correction table (elements) a packed convolution precomputes at load time."""


def _per_channel(value: NDArray[np.float32], out: int) -> NDArray[np.float32]:
    """A spec scale as a float32 vector over the output channels (axis 0 or per tensor)."""
    v = np.asarray(value, F32).reshape(-1)
    return np.broadcast_to(v, (out,)).astype(F32) if v.size in (1, out) else v


def weight_gemms(
    codes: NDArray[np.int8], spec: CodeSpec
) -> list[tuple[NDArray[np.int8], NDArray[np.float32]]]:
    """A binary or ternary weight as integer GEMMs: ``(matrix, per-channel scale)`` pairs whose
    scaled sum is the dequantised weight. Binary: ``(codes, alpha)``; ternary: ``(codes, Wp)``,
    or ``Wp 1{t=+1} - Wn 1{t=-1}`` as two GEMMs when ``Wp != Wn`` (TTQ)."""
    out = codes.shape[0]
    wp = _per_channel(spec.scale, out)
    if spec.scheme == "binary" or spec.scale_neg is None:
        return [(codes, wp)]
    wn = _per_channel(spec.scale_neg, out)
    return [((codes == 1).astype(np.int8), wp), ((codes == -1).astype(np.int8), -wn)]


def _int8_input(iq: InputQuant | None) -> bool:
    """A static input quantiser whose codes are int8 with zero point 0."""
    if not isinstance(iq, StaticQuant):
        return False
    spec = iq.spec
    return iq.zero_point == 0 and spec.qmin >= -128 and spec.qmax <= 127


def _sign_input(iq: InputQuant | None, rank: int) -> bool:
    """Sign codes with a factor constant over the reduction (one ``beta`` per sample)."""
    if isinstance(iq, SignMeanAbsQuant):
        return iq.per_sample or rank == 2
    return isinstance(iq, SignQuant)


def _padding_table_size(node: Node, out_shape: Shape) -> int:
    """Elements of the padding tables of a packed conv (0 without padding)."""
    if node.op != "conv2d" or not any(attr_pair(node, "padding", 0, 0)):
        return 0
    ws = node.weight_shape
    return math.prod(out_shape[2:]) * (ws[2] * ws[3] + ws[0])


def plan_layer(node: Node, in_shape: Shape, out_shape: Shape) -> str:
    """The kernel a weighted node runs on: ``"binary"``, ``"ternary_sign"``, ``"ternary_int8"``
    or ``"float"`` (see the module docstring). Packed convs whose padding tables would exceed
    :data:`MAX_PADDING_TABLE` elements run on the float path."""
    spec, iq = node.weight_spec, node.input_quant
    if (
        spec is None
        or node.weight_codes is None
        or node.attrs.get("groups", 1) != 1
        or spec.axis not in (None, 0)
    ):
        return "float"
    sign = _sign_input(iq, len(in_shape))
    if sign and _padding_table_size(node, out_shape) > MAX_PADDING_TABLE:
        return "float"
    if spec.scheme == "binary" and sign:
        return "binary"
    if spec.scheme == "ternary" and sign:
        return "ternary_sign"
    if spec.scheme == "ternary" and _int8_input(iq):
        return "ternary_int8"
    return "float"


class Layer:
    """A conv2d/linear node prepared for execution: weights decoded once, kernel chosen.

    Convolutions work channels last (:meth:`forward`: ``[N, H, W, C]`` in, ``[N, OH, OW, O]``
    out); calling the layer takes and gives the graph's ``[N, C, H, W]`` layout. Packed kinds
    (``binary``, ``ternary_sign``) run on a :class:`~lowbit.runtime.packed.PackedGemm`.
    """

    def __init__(self, node: Node, in_shape: Shape, out_shape: Shape) -> None:
        self.node = node
        self.iq = node.input_quant
        self.bias = None if node.bias is None else np.asarray(node.bias, dtype=F32)
        self.kind = plan_layer(node, in_shape, out_shape)
        with np.errstate(over="ignore", invalid="ignore"):
            weight = (
                np.asarray(node.weight_float, dtype=F32)
                if node.weight_float is not None
                else node.weight_spec.dequantize(node.weight_codes)  # type: ignore[union-attr]
            )
        if not np.all(np.isfinite(weight)):
            raise GraphError(f"node {node.name!r}: the weight dequantises to non-finite values")
        self.out_channels = weight.shape[0]
        self.conv = conv_geometry(node, weight.shape) if node.op == "conv2d" else None
        self.groups = int(node.attrs.get("groups", 1))
        self.k = math.prod(weight.shape[1:])
        self.packed: PackedGemm | None = None
        in_chw = None if self.conv is None else (in_shape[1], in_shape[2], in_shape[3])
        self.patch_index = None
        gemm_input = self.kind in ("float", "ternary_int8")
        gather = self.conv is not None and self.groups == 1 and gemm_input
        if gather and math.prod(out_shape[2:]) * self.k <= MAX_PATCH_INDEX:
            self.patch_index = patch_index(self.conv, *in_chw)  # type: ignore[misc]
        if self.kind == "float":
            self.weight = weight.reshape(self.out_channels, -1)
            return
        codes = np.asarray(node.weight_codes).astype(np.int8)
        gemms = weight_gemms(codes, node.weight_spec)
        if self.kind == "ternary_int8":
            self.gemms = [(m.reshape(self.out_channels, -1), s) for m, s in gemms]
            return
        binary = node.weight_spec.scheme == "binary"  # type: ignore[union-attr]
        self.packed = PackedGemm(gemms, binary, self.bias, self.conv, in_chw)  # type: ignore[arg-type]

    # -- execution ---------------------------------------------------------------------------
    def __call__(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """The layer on a graph-layout input (``[N, C, H, W]`` or ``[N, F]``)."""
        if self.conv is None:
            return self.forward(x)
        return to_channels_first(self.forward(to_channels_last(x)))

    def forward(self, x: NDArray[np.float32] | Bits) -> NDArray[np.float32]:
        """The layer on a channels-last input (or its sign bits, for a packed layer whose input
        quantiser is ``sign``): float32 ``[N, OH, OW, O]`` (conv) or ``[N, O]`` (linear)."""
        if self.packed is not None:
            return self._forward_packed(x)
        assert not isinstance(x, Bits)
        scale = None
        if self.kind == "ternary_int8":
            assert isinstance(self.iq, StaticQuant)
            scale = self.iq.scale
            x = self.iq.codes(x).astype(np.int8)
        else:
            x = self._quantize_float(x)
        y = self._rows(x) if self.conv is None else self._conv(x)
        if scale is not None:
            y = y * scale
        if self.bias is not None:
            y = y + self.bias
        return y.astype(F32, copy=False)

    def forward_bits(self, x: NDArray[np.float32] | Bits, plan: ThresholdPlan) -> Bits:
        """Sign bits of ``post(layer output)`` for the next layers (``plan`` from
        :meth:`PackedGemm.threshold`)."""
        assert self.packed is not None
        return self.packed.forward_bits(self._bits(x), plan)

    def _bits(self, x: NDArray[np.float32] | Bits) -> Bits:
        return x if isinstance(x, Bits) else pack_activation(x)

    def _forward_packed(self, x: NDArray[np.float32] | Bits) -> NDArray[np.float32]:
        assert self.packed is not None
        beta = None
        if isinstance(self.iq, SignMeanAbsQuant):  # constant over the reduction: one per sample
            assert not isinstance(x, Bits)
            beta = mean_abs(x if x.ndim == 2 else to_channels_first(x), True).reshape(-1)
        bits = self._bits(x)
        y = self.packed.forward(bits, beta)
        if self.conv is None:
            return y
        return y.reshape(bits.data.shape[0], *self.packed.out_hw, self.out_channels)

    def _quantize_float(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """The input quantiser on a channels-last input (XNOR-Net's ``beta`` averages over the
        channels: computed in the graph layout, so its float sums are the reference's)."""
        if self.iq is None:
            return x
        if self.conv is None or not isinstance(self.iq, SignMeanAbsQuant):
            return self.iq.fake_quantize(x)
        return to_channels_last(self.iq.fake_quantize(to_channels_first(x)))

    def _conv(self, x: NDArray[Any]) -> NDArray[np.float32]:
        """Convolution by im2col, a few samples at a time (bounded memory), channels last."""
        assert self.conv is not None
        n = x.shape[0]
        oh, ow = self.conv.out_hw(self.node, x.shape[1], x.shape[2])
        per_sample = max(oh * ow * self.k * self.groups, 1)
        step = max(1, IM2COL_CHUNK_ELEMENTS // per_sample)
        if step >= n:  # one chunk: the GEMM's rows are the output
            return self._conv_rows(x).reshape(n, oh, ow, self.out_channels)
        out = np.empty((n, oh, ow, self.out_channels), dtype=F32)
        for i in range(0, n, step):
            out[i : i + step] = self._conv_rows(x[i : i + step]).reshape(-1, oh, ow, out.shape[3])
        return out

    def _conv_rows(self, x: NDArray[Any]) -> NDArray[np.float32]:
        assert self.conv is not None
        if self.patch_index is not None:
            return self._rows(self.conv.patches(x, self.patch_index))
        if self.groups == 1:
            return self._rows(self.conv.im2col(x))
        return self._grouped_rows(x)

    def _grouped_rows(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """Float GEMM per group of channels (``groups > 1`` always runs the float path)."""
        assert self.conv is not None
        cin, cout = x.shape[3] // self.groups, self.out_channels // self.groups
        parts = [
            self.conv.im2col(x[..., g * cin : (g + 1) * cin])
            @ self.weight[g * cout : (g + 1) * cout].T
            for g in range(self.groups)
        ]
        return np.concatenate(parts, axis=1)

    def _rows(self, a: NDArray[Any]) -> NDArray[np.float32]:
        """``[M, K]`` patch rows (or linear inputs) times the weights: ``[M, O]`` float32."""
        if self.kind == "float":
            return a @ self.weight.T
        y = np.zeros((a.shape[0], self.out_channels), dtype=F32)
        a = np.ascontiguousarray(a)
        for codes, scale in self.gemms:
            y += kernels.ternary_gemm_int8(a, codes, check=False).astype(F32) * scale
        return y
