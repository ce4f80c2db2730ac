"""Run an inference :class:`~lowbit.runtime.graph.Graph` on the CPU with numpy (no torch).

:class:`Model` executes the graph in float32 between layers (a whole forward pass runs the
compiled :class:`~lowbit.runtime.program.Program`: channels-last activations, packed sign bits
between binary layers; :meth:`Model.run_node` evaluates one node, with the same values) and
reproduces the fake-quant PyTorch model's evaluation outputs *to float tolerance*. Every
quantiser is applied as the training code applies it: the same codes bit for bit (static grids
multiply by the file's float32 ``inv_scale``, as PyTorch does, before rounding half to even)
and the same float32 scales; only the order of the sums differs (BLAS / popcount kernels
instead of PyTorch's convolution), so a layer's output differs by a few float32 ulps. Rarely
such a difference moves a value across a rounding or sign boundary of the next quantiser,
changing one code by one step, and the change propagates. The tolerance, as the tests check it:

* layer by layer (each node fed PyTorch's own input): ``|out - ref| <= 1e-5 max|ref|``;
* end to end: at least 97 % of the logits within ``1e-4 max|ref|`` on random inputs (all of them
  unless a code flipped), and top-1 agreement >= 99.9 % on the MNIST-5k test split for a
  trained model of every method.

Stochastic rounding's evaluation path (``dynamic_max_abs``) takes its scale from the whole
batch, as the PyTorch quantiser does, so its outputs depend on the batch they are computed in.

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

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from . import kernels
from .fused import FusedEngine, Unsupported
from .graph import Graph, GraphError, Node
from .integer import IntegerProgram, compile_integer
from .packed import Bits, PackedGemm, ThresholdPlan, pack_activation

ENGINES = ("float", "integer", "auto")

__all__ = [
    "IM2COL_CHUNK_ELEMENTS",
    "MAX_ACTIVATION_ELEMENTS",
    "Model",
    "Prediction",
    "classify",
    "dequantize",
    "infer_shapes",
    "plan_layer",
    "quantize_input",
    "read_input",
]

F32 = np.float32
Shape = list[int | None]  # None for the batch dimension
MAX_ACTIVATION_ELEMENTS = 2**26
"""Largest number of elements one sample may have at any node (graph validation refuses more)."""
IM2COL_CHUNK_ELEMENTS = 2**22
"""Convolutions unfold at most about this many input patch elements at a time."""
MAX_PATCH_INDEX = 2**18
"""Largest im2col gather table (one index a patch element of one sample) a float conv keeps."""
MAX_PADDING_TABLE = 2**24
"""Largest padding-correction table (elements) a packed convolution precomputes at load time."""
MAX_ATTR = 2**16
"""Largest stride, padding, dilation, kernel size or group count accepted in a graph."""


# ============================================================================= specs
def _arr(value: Any) -> NDArray[np.float32]:
    """A spec field (list, float or array) as a float32 array."""
    return np.asarray(value, dtype=F32)


def _channel(t: NDArray[np.float32], ndim: int, axis: int | None) -> NDArray[np.float32]:
    """Reshape a per-channel vector to broadcast along ``axis`` of an ``ndim`` array."""
    if axis is None or t.ndim == 0:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = t.size
    return t.reshape(shape)


def dequantize(codes: NDArray[Any], spec: dict[str, Any]) -> NDArray[np.float32]:
    """Real values of integer ``codes`` under a weight spec (``QuantSpec.to_dict()`` form).

    The float32 formulas of :meth:`lowbit.quant.QuantSpec.dequantize`, so the result equals the
    fake-quant weight bit for bit: ``binary`` ``s c``; ``ternary`` ``s c`` (``scale_neg c`` for
    ``c < 0``); ``uniform``/``affine`` ``s (c - z)``; ``pow2`` ``sign(c) s 2^(|c| - qmax)``.
    """
    c = np.asarray(codes).astype(F32)
    nd, axis = c.ndim, spec.get("axis")
    s = _channel(_arr(spec["scale"]), nd, axis)
    scheme = spec["scheme"]
    if scheme == "binary":
        return s * c
    if scheme == "ternary":
        neg = s if spec.get("scale_neg") is None else _channel(_arr(spec["scale_neg"]), nd, axis)
        return np.where(c >= 0, s * c, neg * c).astype(F32)
    if scheme in ("uniform", "affine"):
        if spec.get("zero_point") is None:
            return s * c
        return s * (c - _channel(_arr(spec["zero_point"]), nd, axis))
    if scheme == "pow2":
        mag = s * np.exp2(np.abs(c) - F32(spec["qmax"]))
        return np.where(c == 0, F32(0), np.sign(c) * mag).astype(F32)
    raise GraphError(f"unknown weight scheme {scheme!r}")


def _static_scale(iq: dict[str, Any]) -> tuple[F32, F32, F32]:
    """``(scale, inverse scale, zero point)`` of a static input quantiser as float32 scalars."""
    spec = iq["spec"]
    scale = F32(_arr(spec["scale"]).reshape(()))
    inv = iq.get("inv_scale")
    inv = F32(1) / scale if inv is None else F32(_arr(inv).reshape(()))
    zp = spec.get("zero_point")
    return scale, inv, F32(0) if zp is None else F32(_arr(zp).reshape(()))


def static_codes(x: NDArray[np.float32], iq: dict[str, Any]) -> NDArray[np.float32]:
    """Codes ``clip(round_half_even(x * inv_scale) + zp, qmin, qmax)`` (float32, integer-valued).

    ``inv_scale`` is the float32 multiplier the training quantiser uses (``1 / scale`` unless the
    file gives it: PACT multiplies by ``(2^k - 1) / alpha``, PyTorch's fake-quant kernels by
    ``1 / scale``), so the codes agree with PyTorch's bit for bit.
    """
    spec = iq["spec"]
    _, inv, zp = _static_scale(iq)
    c = np.rint(x * inv)
    if zp != 0:
        c += zp
    return np.clip(c, F32(spec["qmin"]), F32(spec["qmax"]))


def _dynamic_scale(x: NDArray[np.float32], qmax: int) -> F32:
    """Stochastic rounding's evaluation scale ``max|x| / qmax`` over the whole batch."""
    amax = F32(np.abs(x).max(initial=0.0))
    return max(amax / F32(qmax), np.finfo(F32).tiny)


def _beta(x: NDArray[np.float32], per_sample: bool) -> NDArray[np.float32]:
    """XNOR-Net ``beta = mean|x|`` over the channel dim (or all non-batch dims), keepdims."""
    dims = tuple(range(1, x.ndim)) if per_sample else (1,)
    return np.abs(x).mean(axis=dims, keepdims=True, dtype=F32)


def _signs(x: NDArray[np.float32]) -> NDArray[np.float32]:
    """``sign(x)`` with ``sign(0) = +1`` as float32 ``{-1, +1}``."""
    return np.where(x >= 0, F32(1), F32(-1))


def quantize_input(x: NDArray[np.float32], iq: dict[str, Any] | None) -> NDArray[np.float32]:
    """Fake-quantise a layer input as the layer's activation quantiser does (float32)."""
    if iq is None:
        return x
    kind = iq["kind"]
    if kind == "static":
        scale, _, zp = _static_scale(iq)
        c = static_codes(x, iq)
        return (c - zp) * scale if zp != 0 else c * scale
    if kind == "sign":
        return _signs(x)
    if kind == "sign_mean_abs":
        return _beta(x, bool(iq.get("per_sample", False))) * _signs(x)
    if kind == "dynamic_max_abs":
        qmax = int(iq["qmax"])
        s = _dynamic_scale(x, qmax)
        return np.clip(np.rint(x * (F32(1) / s)), -qmax, qmax) * s
    raise GraphError(f"unknown input_quant kind {kind!r}")


SCHEMES = ("binary", "ternary", "uniform", "affine", "pow2")
MAX_CODE = 2**24
"""Largest ``|qmin|``, ``|qmax|`` accepted (codes are exact in float32 up to 2^24)."""


def _finite_array(node: Node, what: str, value: Any, sizes: tuple[int, ...]) -> None:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu" or arr.size not in sizes or arr.ndim > 1:
        raise GraphError(
            f"node {node.name!r}: {what} must be a number or a vector of {sizes[-1]}, got "
            f"shape {list(arr.shape)} ({arr.dtype})"
        )
    if not np.all(np.isfinite(arr)):
        raise GraphError(f"node {node.name!r}: {what} must be finite")


def check_spec(node: Node, spec: Any, codes: Any = None, where: str = "weight_spec") -> None:
    """GraphError unless ``spec`` is a well-formed QuantSpec dict (and ``codes`` fit it).

    With ``codes`` (a weight): ``axis`` must index the codes and per-channel fields have one
    value per channel; without (an input quantiser): the spec is per tensor.
    """
    if not isinstance(spec, dict):
        raise GraphError(f"node {node.name!r}: {where} must be a dict, got {type(spec).__name__}")
    scheme, qmin, qmax = spec.get("scheme"), spec.get("qmin"), spec.get("qmax")
    if scheme not in SCHEMES:
        raise GraphError(f"node {node.name!r}: {where} has unknown scheme {scheme!r}")
    bits = spec.get("bits")
    if not (_is_int(bits) and 1 <= bits <= 32):
        raise GraphError(
            f"node {node.name!r}: {where} bits must be an int in [1, 32], got {bits!r}"
        )
    if not (_is_int(qmin) and _is_int(qmax) and -MAX_CODE <= qmin <= qmax <= MAX_CODE):
        raise GraphError(f"node {node.name!r}: {where} has bad qmin/qmax {qmin!r}, {qmax!r}")
    if not isinstance(spec.get("signed", True), bool):
        raise GraphError(f"node {node.name!r}: {where} signed must be a bool")
    axis = spec.get("axis")
    ndim = 0 if codes is None else np.ndim(codes)
    if axis is not None and not (_is_int(axis) and 0 <= axis < ndim):
        raise GraphError(f"node {node.name!r}: {where} axis {axis!r} does not index the weight")
    sizes = (1,) if axis is None else (1, int(np.shape(codes)[axis]))
    _finite_array(node, f"{where} scale", spec.get("scale"), sizes)
    for key in ("zero_point", "scale_neg"):
        if spec.get(key) is not None:
            _finite_array(node, f"{where} {key}", spec[key], sizes)
    if spec.get("scale_neg") is not None and scheme != "ternary":
        raise GraphError(f"node {node.name!r}: {where} scale_neg is only for ternary weights")
    if codes is not None:
        _check_codes(node, np.asarray(codes), scheme, qmin, qmax)


def _check_codes(node: Node, codes: NDArray[Any], scheme: str, qmin: int, qmax: int) -> None:
    if codes.dtype.kind not in "iu":
        raise GraphError(f"node {node.name!r}: weight codes must be integers, got {codes.dtype}")
    lo, hi = {"binary": (-1, 1), "ternary": (-1, 1)}.get(scheme, (qmin, qmax))
    bad = (codes < max(lo, qmin)) | (codes > min(hi, qmax))
    if scheme == "binary":
        bad |= codes == 0
    if bad.any():
        raise GraphError(
            f"node {node.name!r}: weight code {int(codes[bad].reshape(-1)[0])} is outside the "
            f"{scheme} spec [{qmin}, {qmax}]"
        )


def check_input_quant(node: Node, iq: Any) -> None:
    """GraphError unless ``iq`` is a well-formed ``input_quant`` dict (see graph.py)."""
    if iq is None:
        return
    kind = iq.get("kind") if isinstance(iq, dict) else None
    if kind == "static":
        check_spec(node, iq.get("spec"), where="input_quant spec")
        spec = iq["spec"]
        if spec["scheme"] not in ("uniform", "affine") or not float(np.min(spec["scale"])) > 0:
            raise GraphError(
                f"node {node.name!r}: a static input_quant needs a uniform/affine spec with a "
                "positive scale"
            )
        inv = iq.get("inv_scale")
        if inv is not None:
            _finite_array(node, "input_quant inv_scale", inv, (1,))
    elif kind == "dynamic_max_abs":
        qmax = iq.get("qmax")
        if not (_is_int(qmax) and 1 <= qmax <= MAX_CODE):
            raise GraphError(f"node {node.name!r}: dynamic_max_abs qmax must be in [1, 2^24]")
    elif kind == "sign_mean_abs":
        if not isinstance(iq.get("per_sample", False), bool):
            raise GraphError(f"node {node.name!r}: sign_mean_abs per_sample must be a bool")
    elif kind != "sign":
        raise GraphError(f"node {node.name!r}: unknown input_quant {iq!r:.80}")


# ============================================================================= geometry
def _pair(node: Node, key: str, default: int, lo: int) -> tuple[int, int]:
    """Attribute ``key`` of ``node`` as a pair of ints in ``[lo, MAX_ATTR]``."""
    v = node.attrs.get(key, default)
    pair = [v, v] if _is_int(v) else v
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or not all(_is_int(p) and lo <= p <= MAX_ATTR for p in pair)
    ):
        raise GraphError(
            f"node {node.name!r}: attribute {key!r} must be an int in [{lo}, {MAX_ATTR}] or a "
            f"pair of them, got {v!r}"
        )
    return int(pair[0]), int(pair[1])


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _out_size(node: Node, size: int, k: int, s: int, p: int, d: int) -> int:
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    if out < 1:
        raise GraphError(f"node {node.name!r}: window {k} (dilation {d}) does not fit size {size}")
    return out


@dataclass(frozen=True)
class Conv:
    """Convolution/pooling window geometry: kernel, stride, padding, dilation (pairs)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)

    def out_hw(self, node: Node, h: int, w: int) -> tuple[int, int]:
        return (
            _out_size(node, h, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0]),
            _out_size(node, w, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1]),
        )

    def windows(
        self, x: NDArray[Any], pad_value: float = 0, channels_last: bool = False
    ) -> NDArray[Any]:
        """The (padded) windows of ``x``: a ``[N, C, OH, OW, kh, kw]`` view of ``x [N, C, H, W]``,
        or ``[N, OH, OW, C, kh, kw]`` of a channels-last ``x [N, H, W, C]``."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
        )
        hw = (1, 2) if channels_last else (2, 3)
        if ph or pw:
            pads = [(0, 0)] * 4
            pads[hw[0]], pads[hw[1]] = (ph, ph), (pw, pw)
            x = np.pad(x, pads, constant_values=pad_value)
        span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        win = sliding_window_view(x, span, axis=hw)
        if channels_last:
            return win[:, ::sh, ::sw, :, ::dh, ::dw]
        return win[:, :, ::sh, ::sw, ::dh, ::dw]

    def im2col(self, x: NDArray[Any]) -> NDArray[Any]:
        """Patches ``[N OH OW, C kh kw]`` of a channels-last ``x [N, H, W, C]`` (zero padded),
        columns in the ``(c, i, j)`` order of a conv weight (:meth:`patches` is faster)."""
        win = self.windows(x, 0, channels_last=True)
        n, oh, ow, c, kh, kw = win.shape
        return win.reshape(n * oh * ow, c * kh * kw)

    def tap_indices(self, h: int, w: int) -> NDArray[np.intp]:
        """``[OH OW, kh kw]``: for each output position (row-major) and kernel tap ``(i, j)``,
        the flat index of the pixel it reads in the zero-padded ``[H + 2 ph, W + 2 pw]`` input."""
        (oh, ow), (kh, kw) = self.out_hw(None, h, w), self.kernel  # type: ignore[arg-type]
        y, x = np.divmod(np.arange(oh * ow), ow)
        i, j = np.divmod(np.arange(kh * kw), kw)
        rows = y[:, None] * self.stride[0] + i[None, :] * self.dilation[0]
        cols = x[:, None] * self.stride[1] + j[None, :] * self.dilation[1]
        return (rows * (w + 2 * self.padding[1]) + cols).astype(np.intp)

    def padded(self, x: NDArray[Any], out: NDArray[Any] | None = None) -> NDArray[Any]:
        """Channels-last ``x [N, H, W, C]`` zero padded to ``[N, H + 2 ph, W + 2 pw, C]``
        (written into ``out``, whose border must be zero, when given)."""
        (ph, pw), (n, h, w, c) = self.padding, x.shape
        if out is None:
            out = np.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=x.dtype)
        out[:, ph : ph + h, pw : pw + w] = x
        return out

    def patches(self, x: NDArray[Any], index: NDArray[np.intp]) -> NDArray[Any]:
        """im2col by one gather: ``x [N, H, W, C]`` channels last, ``index`` ``[OH OW, C kh kw]``
        flat element indices into the padded sample (:func:`patch_index`); ``[N OH OW, C kh kw]``.
        """
        src = self.padded(x) if any(self.padding) else np.ascontiguousarray(x)
        out = np.empty((x.shape[0], *index.shape), dtype=x.dtype)
        np.take(src.reshape(x.shape[0], -1), index, axis=1, out=out, mode="clip")
        return out.reshape(-1, index.shape[1])


def patch_index(conv: Conv, c: int, h: int, w: int) -> NDArray[np.intp]:
    """``[OH OW, C kh kw]`` flat indices into a padded channels-last sample ``[Hp, Wp, C]`` of
    the patch elements, columns in the ``(c, i, j)`` order of a conv weight."""
    pix = conv.tap_indices(h, w)
    return (pix[:, None, :] * c + np.arange(c)[None, :, None]).reshape(pix.shape[0], -1)


def _conv_geometry(node: Node, weight_shape: Sequence[int]) -> Conv:
    return Conv(
        kernel=(int(weight_shape[2]), int(weight_shape[3])),
        stride=_pair(node, "stride", 1, 1),
        padding=_pair(node, "padding", 0, 0),
        dilation=_pair(node, "dilation", 1, 1),
    )


def _pool_geometry(node: Node) -> Conv:
    kernel = _pair(node, "kernel_size", 1, 1)
    stride = kernel if node.attrs.get("stride") is None else _pair(node, "stride", 1, 1)
    padding = _pair(node, "padding", 0, 0)
    if padding[0] * 2 > kernel[0] or padding[1] * 2 > kernel[1]:
        raise GraphError(f"node {node.name!r}: padding {padding} exceeds half the kernel {kernel}")
    return Conv(kernel, stride, padding)


# ============================================================================= shapes
def _weight_shape(node: Node) -> tuple[int, ...]:
    w = node.weight_float if node.weight_float is not None else node.weight_codes
    return tuple(int(d) for d in np.shape(w))


def _check_weight_bias(node: Node) -> None:
    """Float weights are finite real arrays; the bias has one finite value per output."""
    if node.weight_float is not None:
        w = np.asarray(node.weight_float)
        if w.dtype.kind != "f" or not np.all(np.isfinite(w)):
            raise GraphError(f"node {node.name!r}: the float weight must be finite floats")
    if node.bias is not None:
        out = _weight_shape(node)[0]
        _finite_array(node, "bias", node.bias, (out,) if out != 1 else (1,))


def _need_rank(node: Node, shape: Shape, rank: int) -> None:
    if len(shape) != rank:
        raise GraphError(f"node {node.name!r} ({node.op}) needs a {rank}-D input, got {shape}")


def _shape_conv2d(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    _need_rank(node, x, 4)
    ws = _weight_shape(node)
    groups = node.attrs.get("groups", 1)
    if not _is_int(groups) or not 1 <= groups <= MAX_ATTR:
        raise GraphError(f"node {node.name!r}: groups must be a positive int, got {groups!r}")
    if len(ws) != 4 or ws[1] * groups != x[1] or ws[0] % groups:
        raise GraphError(
            f"node {node.name!r}: weight shape {list(ws)} with groups={groups} does not fit "
            f"input {x}"
        )
    _check_weight_bias(node)
    oh, ow = _conv_geometry(node, ws).out_hw(node, x[2], x[3])
    return [None, ws[0], oh, ow]


def _shape_linear(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    _need_rank(node, x, 2)
    ws = _weight_shape(node)
    if len(ws) != 2 or ws[1] != x[1]:
        raise GraphError(f"node {node.name!r}: weight shape {list(ws)} does not fit input {x}")
    _check_weight_bias(node)
    return [None, ws[0]]


def _shape_batchnorm(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    if node.attrs.get("dim", 1) != 1 or len(x) < 2:
        raise GraphError(f"node {node.name!r}: batchnorm works on dim 1 of an (N, C, ...) input")
    for key in ("scale", "shift"):
        p = node.params.get(key)
        if p is None or np.shape(p) != (x[1],):
            raise GraphError(
                f"node {node.name!r}: param {key!r} must have shape ({x[1]},), got "
                f"{None if p is None else np.shape(p)}"
            )
        _finite_array(node, f"param {key!r}", p, (x[1],))
    return list(x)


def _shape_same(node: Node, ins: list[Shape]) -> Shape:
    return list(ins[0])


def _shape_clamp(node: Node, ins: list[Shape]) -> Shape:
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    for v in (lo, hi):
        real = isinstance(v, (int, float)) and not isinstance(v, bool)
        if v is not None and not (real and abs(v) <= np.finfo(F32).max):
            raise GraphError(f"node {node.name!r}: clamp bounds must be float32 numbers or None")
    if lo is not None and hi is not None and lo > hi:
        raise GraphError(f"node {node.name!r}: clamp min {lo} > max {hi}")
    return list(ins[0])


def _shape_pool(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    _need_rank(node, x, 4)
    oh, ow = _pool_geometry(node).out_hw(node, x[2], x[3])
    return [None, x[1], oh, ow]


def _shape_global_pool(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    _need_rank(node, x, 4)
    return [None, x[1], 1, 1]


def _shape_flatten(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    start = node.attrs.get("start_dim", 1)
    if not _is_int(start) or not 1 <= start < len(x):
        raise GraphError(
            f"node {node.name!r}: start_dim must be in [1, {len(x) - 1}], got {start!r}"
        )
    return [*x[:start], math.prod(x[start:])]


def _shape_add(node: Node, ins: list[Shape]) -> Shape:
    if len(ins) != 2 or ins[0] != ins[1]:
        raise GraphError(f"node {node.name!r}: add needs two inputs of one shape, got {ins}")
    return list(ins[0])


def _dim_list(node: Node, key: str, n: int, ok: Callable[[Any], bool]) -> list[Any]:
    v = node.attrs.get(key)
    if not isinstance(v, (list, tuple)) or len(v) != n or not all(ok(e) for e in v):
        raise GraphError(
            f"node {node.name!r}: attribute {key!r} must list {n} valid values, got {v!r}"
        )
    return list(v)


def _slices(node: Node, ndim: int) -> tuple[slice, ...]:
    """The slice attributes as Python slices (steps >= 1; batch dim untouched)."""
    bounded = lambda e: e is None or (_is_int(e) and abs(e) <= 2**31)  # noqa: E731
    starts = _dim_list(node, "starts", ndim, bounded)
    stops = _dim_list(node, "stops", ndim, bounded)
    steps = _dim_list(node, "steps", ndim, lambda e: e is None or (_is_int(e) and 1 <= e <= 2**31))
    if starts[0] not in (None, 0) or stops[0] is not None or steps[0] not in (None, 1):
        raise GraphError(f"node {node.name!r}: slice may not cut the batch dimension")
    return tuple(slice(a, b, c) for a, b, c in zip(starts, stops, steps, strict=True))


def _shape_slice(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    sl = _slices(node, len(x))
    out: Shape = [None]
    for d, s in zip(x[1:], sl[1:], strict=True):
        size = len(range(*s.indices(d)))
        if size < 1:
            raise GraphError(f"node {node.name!r}: slice {s} of a dim of size {d} is empty")
        out.append(size)
    return out


def _pads(node: Node, ndim: int) -> list[tuple[int, int]]:
    pads = _dim_list(
        node,
        "pads",
        ndim,
        lambda e: (
            isinstance(e, (list, tuple))
            and len(e) == 2
            and all(_is_int(p) and 0 <= p <= MAX_ATTR for p in e)
        ),
    )
    if tuple(pads[0]) != (0, 0):
        raise GraphError(f"node {node.name!r}: pad may not pad the batch dimension")
    return [(int(a), int(b)) for a, b in pads]


def _shape_pad(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    pads = _pads(node, len(x))
    return [None, *(d + a + b for d, (a, b) in zip(x[1:], pads[1:], strict=True))]


_SHAPES: dict[str, Callable[[Node, list[Shape]], Shape]] = {
    "conv2d": _shape_conv2d,
    "linear": _shape_linear,
    "batchnorm": _shape_batchnorm,
    "relu": _shape_same,
    "clamp": _shape_clamp,
    "maxpool2d": _shape_pool,
    "avgpool2d": _shape_pool,
    "global_avgpool2d": _shape_global_pool,
    "flatten": _shape_flatten,
    "add": _shape_add,
    "slice": _shape_slice,
    "pad": _shape_pad,
}
_ARITY = {"add": 2}


def infer_shapes(graph: Graph) -> dict[str, Shape]:
    """Output shape of every input and node (batch dim None); GraphError where one cannot fit.

    Also refuses nodes whose per-sample output exceeds :data:`MAX_ACTIVATION_ELEMENTS`, so a
    graph that validates cannot ask for a huge activation.
    """
    shape = graph.input_shape
    if (
        len(graph.inputs) != 1
        or not isinstance(shape, list)
        or not 2 <= len(shape) <= 4
        or shape[0] is not None
        or not all(_is_int(d) and d >= 1 for d in shape[1:])
    ):
        raise GraphError(
            f"the graph needs one input of shape [None, ...] with 1 to 3 positive dims, got "
            f"inputs {graph.inputs} and input_shape {shape}"
        )
    if len(graph.outputs) != 1:
        raise GraphError(f"the graph needs exactly one output, got {graph.outputs}")
    shapes: dict[str, Shape] = {graph.inputs[0]: [None, *(int(d) for d in shape[1:])]}
    for node in graph.nodes:
        if len(node.inputs) != _ARITY.get(node.op, 1):
            raise GraphError(f"node {node.name!r} ({node.op}) has {len(node.inputs)} inputs")
        out = _SHAPES[node.op](node, [shapes[i] for i in node.inputs])
        if math.prod(out[1:]) > MAX_ACTIVATION_ELEMENTS:
            raise GraphError(f"node {node.name!r}: output {out} is too large")
        shapes[node.name] = out
    return shapes


# ============================================================================= layers
def _per_channel(spec: dict[str, Any], key: str, out: int) -> NDArray[np.float32]:
    """A spec scale as a float32 vector over the output channels (axis 0 or per tensor)."""
    v = _arr(spec[key]).reshape(-1)
    return np.broadcast_to(v, (out,)).astype(F32) if v.size in (1, out) else v


def weight_gemms(
    codes: NDArray[np.int8], spec: dict[str, Any]
) -> list[tuple[NDArray[np.int8], NDArray[np.float32]]]:
    """A binary or ternary weight as integer GEMMs: ``(matrix, per-channel scale)`` pairs whose
    scaled sum is the dequantised weight. Binary: ``(codes, alpha)``; ternary: ``(codes, Wp)``,
    or ``Wp 1{t=+1} - Wn 1{t=-1}`` as two GEMMs when ``Wp != Wn`` (TTQ)."""
    out = codes.shape[0]
    wp = _per_channel(spec, "scale", out)
    if spec["scheme"] == "binary" or spec.get("scale_neg") is None:
        return [(codes, wp)]
    wn = _per_channel(spec, "scale_neg", out)
    return [((codes == 1).astype(np.int8), wp), ((codes == -1).astype(np.int8), -wn)]


def _int8_input(iq: dict[str, Any] | None) -> bool:
    """A static input quantiser whose codes are int8 with zero point 0."""
    if iq is None or iq.get("kind") != "static":
        return False
    spec = iq["spec"]
    zp = spec.get("zero_point")
    zero = zp is None or not np.any(_arr(zp))
    return zero and spec["qmin"] >= -128 and spec["qmax"] <= 127


def _constant_beta(iq: dict[str, Any], rank: int) -> bool:
    return bool(iq.get("per_sample")) or rank == 2


def _padding_table_size(node: Node, out_shape: Shape) -> int:
    """Elements of the padding tables of a packed conv (0 without padding)."""
    if node.op != "conv2d" or not any(_pair(node, "padding", 0, 0)):
        return 0
    ws = _weight_shape(node)
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
        or spec.get("axis") not in (None, 0)
    ):
        return "float"
    sign = iq is not None and (
        iq["kind"] == "sign"
        or (iq["kind"] == "sign_mean_abs" and _constant_beta(iq, len(in_shape)))
    )
    if sign and _padding_table_size(node, out_shape) > MAX_PADDING_TABLE:
        return "float"
    if spec["scheme"] == "binary" and sign:
        return "binary"
    if spec["scheme"] == "ternary" and sign:
        return "ternary_sign"
    if spec["scheme"] == "ternary" and _int8_input(iq):
        return "ternary_int8"
    return "float"


class Layer:
    """A conv2d/linear node prepared for execution: weights decoded once, kernel chosen.

    Convolutions work channels last (:meth:`forward`: ``[N, H, W, C]`` in, ``[N, OH, OW, O]``
    out); calling the layer takes and gives the graph's ``[N, C, H, W]`` layout. Packed kinds
    (``binary``, ``ternary_sign``) run on a :class:`~lowbit.runtime.packed.PackedGemm`.
    """

    def __init__(self, node: Node, in_shape: Shape, out_shape: Shape) -> None:
        if node.weight_spec is not None:
            check_spec(node, node.weight_spec, node.weight_codes)
        check_input_quant(node, node.input_quant)
        self.node = node
        self.iq = node.input_quant
        self.bias = None if node.bias is None else np.asarray(node.bias, dtype=F32)
        self.kind = plan_layer(node, in_shape, out_shape)
        with np.errstate(over="ignore", invalid="ignore"):
            weight = (
                np.asarray(node.weight_float, dtype=F32)
                if node.weight_float is not None
                else dequantize(node.weight_codes, node.weight_spec)
            )
        if not np.all(np.isfinite(weight)):
            raise GraphError(f"node {node.name!r}: the weight dequantises to non-finite values")
        self.out_channels = weight.shape[0]
        self.conv = _conv_geometry(node, weight.shape) if node.op == "conv2d" else None
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
        binary = node.weight_spec["scheme"] == "binary"
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
            scale = _static_scale(self.iq)[0]
            x = static_codes(x, self.iq).astype(np.int8)
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
        if self.iq["kind"] == "sign_mean_abs":  # constant over the reduction: one per sample
            assert not isinstance(x, Bits)
            beta = _beta(x if x.ndim == 2 else to_channels_first(x), True).reshape(-1)
        bits = self._bits(x)
        y = self.packed.forward(bits, beta)
        if self.conv is None:
            return y
        return y.reshape(bits.data.shape[0], *self.packed.out_hw, self.out_channels)

    def _quantize_float(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """The input quantiser on a channels-last input (XNOR-Net's ``beta`` averages over the
        channels: computed in the graph layout, so its float sums are the reference's)."""
        if self.conv is None or self.iq is None or self.iq["kind"] != "sign_mean_abs":
            return quantize_input(x, self.iq)
        return to_channels_last(quantize_input(to_channels_first(x), self.iq))

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


def to_channels_last(x: NDArray[Any]) -> NDArray[Any]:
    """``[N, C, H, W]`` as a contiguous ``[N, H, W, C]`` array."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def to_channels_first(x: NDArray[Any]) -> NDArray[Any]:
    """``[N, H, W, C]`` as a contiguous ``[N, C, H, W]`` array."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ============================================================================= other ops
def _pool(node: Node, x: NDArray[np.float32], op: str) -> NDArray[np.float32]:
    geo = _pool_geometry(node)
    if op == "maxpool2d":
        return geo.windows(x, pad_value=-np.inf).max(axis=(4, 5))
    area = F32(geo.kernel[0] * geo.kernel[1])
    return (geo.windows(x, pad_value=0).sum(axis=(4, 5), dtype=F32) / area).astype(F32)


def _batchnorm(node: Node, x: NDArray[np.float32]) -> NDArray[np.float32]:
    scale = _channel(np.asarray(node.params["scale"], F32), x.ndim, 1)
    shift = _channel(np.asarray(node.params["shift"], F32), x.ndim, 1)
    return x * scale + shift


def _clamp(node: Node, x: NDArray[np.float32]) -> NDArray[np.float32]:
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    return np.clip(x, None if lo is None else F32(lo), None if hi is None else F32(hi))


_OPS: dict[str, Callable[[Node, list[NDArray[np.float32]]], NDArray[np.float32]]] = {
    "batchnorm": lambda n, a: _batchnorm(n, a[0]),
    "relu": lambda n, a: np.maximum(a[0], F32(0)),
    "clamp": lambda n, a: _clamp(n, a[0]),
    "maxpool2d": lambda n, a: _pool(n, a[0], "maxpool2d"),
    "avgpool2d": lambda n, a: _pool(n, a[0], "avgpool2d"),
    "global_avgpool2d": lambda n, a: a[0].mean(axis=(2, 3), keepdims=True, dtype=F32),
    "flatten": lambda n, a: a[0].reshape(*a[0].shape[: n.attrs.get("start_dim", 1)], -1),
    "add": lambda n, a: a[0] + a[1],
    "slice": lambda n, a: np.ascontiguousarray(a[0][_slices(n, a[0].ndim)]),
    "pad": lambda n, a: np.pad(a[0], _pads(n, a[0].ndim)),
}


# ============================================================================= model
class Prediction(NamedTuple):
    """Top-k classes of each sample (``[N, k]``, best first) and their softmax probabilities."""

    indices: NDArray[np.int64]
    probs: NDArray[np.float32]


class Model:
    """A runnable inference graph: ``model(x)`` gives logits, ``model.predict(x, k)`` the top-k.

    ``engine``: ``"float"`` runs every layer on its kernel with float32 between layers (outputs
    equal the fake-quant model's to float tolerance); ``"integer"`` runs the integer-only engine
    of :mod:`lowbit.runtime.integer` (uint8/int8 codes, int32 accumulators, fixed-point
    requantisation; a GraphError for a graph that is not integer-only); ``"auto"`` takes the
    integer engine where the graph allows it. ``self.engine`` says which one runs. The integer
    engine runs on the fused C engine (:mod:`lowbit.runtime.fused`, ``self.fused``; same results
    bit for bit) when it supports every part of the graph, else in numpy.

    Built from a validated :class:`Graph` (:func:`lowbit.runtime.load` reads one from a
    ``.lowbit`` file). Construction checks every shape (:func:`infer_shapes`), decodes the
    weights once and plans the float engine's forward pass (``self.program``); it raises
    :class:`GraphError` for a graph it cannot run. Calls may come from several threads (scratch
    buffers are per thread).
    """

    def __init__(self, graph: Graph, source: str | Path = "<graph>", engine: str = "float") -> None:
        graph.validate()
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.graph = graph
        self.source = str(source)
        self.shapes = infer_shapes(graph)
        self.layers = {
            n.name: Layer(n, self.shapes[n.inputs[0]], self.shapes[n.name])
            for n in graph.nodes
            if n.op in ("conv2d", "linear")
        }
        self.integer: IntegerProgram | None = None
        if engine != "float":
            try:
                self.integer = compile_integer(graph)
            except GraphError:
                if engine == "integer":
                    raise
        self.engine = "float" if self.integer is None else "integer"
        self.fused: FusedEngine | None = None
        if self.integer is not None:
            with contextlib.suppress(Unsupported):  # else the integer program runs in numpy
                self.fused = FusedEngine(self.integer)
        self.program = None
        if self.integer is None:
            from .program import Program  # imports this module

            self.program = Program(graph, self.layers, self.shapes)

    @property
    def input_shape(self) -> list[int]:
        """Per-sample input shape (without the batch dimension)."""
        return [int(d) for d in self.graph.input_shape[1:]]

    @property
    def num_classes(self) -> int:
        return int(self.shapes[self.graph.outputs[0]][-1])

    @property
    def meta(self) -> dict[str, Any]:
        return self.graph.meta

    def kernels(self) -> dict[str, str]:
        """The kernel each weighted node runs on (see :func:`plan_layer`)."""
        return {name: layer.kind for name, layer in self.layers.items()}

    def __call__(self, x: NDArray[Any]) -> NDArray[np.float32]:
        """Logits ``[N, classes]`` for a float batch ``[N, *input_shape]`` (NCHW or NC)."""
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu" or list(arr.shape[1:]) != self.input_shape or arr.ndim < 2:
            raise ValueError(
                f"x must be a real array of shape [N, {', '.join(map(str, self.input_shape))}], "
                f"got dtype {arr.dtype} and shape {list(arr.shape)}"
            )
        if self.fused is not None:
            return self.fused(arr)
        if self.integer is not None:
            return self.integer.run(arr.astype(F32)).astype(F32)
        assert self.program is not None
        return self.program.run(arr.astype(F32))

    def run_node(self, node: Node, inputs: list[NDArray[np.float32]]) -> NDArray[np.float32]:
        """Evaluate one node of the graph on the given input arrays (float32)."""
        if node.name in self.layers:
            return self.layers[node.name](inputs[0])
        return _OPS[node.op](node, inputs)

    def predict(self, x: NDArray[Any], top_k: int = 5) -> Prediction:
        """Top-``top_k`` classes (best first) and their softmax probabilities."""
        if not _is_int(top_k) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        logits = self(x).astype(np.float64)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        k = min(top_k, probs.shape[1])
        idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return Prediction(idx.astype(np.int64), np.take_along_axis(probs, idx, 1).astype(F32))


# ============================================================================= inputs
def read_input(path: str | Path, model: Model) -> NDArray[np.float32]:
    """One input batch for ``model`` from a ``.npy`` array or an image file (PNG, ...).

    Images and ``uint8`` arrays are raw pixels: they are scaled and normalised with the file's
    ``meta["preprocess"]`` (``x * scale - mean) / std`` per channel) when it has one. Float
    arrays are taken as model inputs as they are. A single sample (``input_shape``) gets a batch
    dimension; the shape must otherwise be ``[N, *input_shape]``.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
        raw = arr.dtype == np.uint8
    else:
        arr = _read_image(path, model.input_shape)
        raw = True
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{path}: expected a numeric array, got dtype {arr.dtype}")
    if list(arr.shape) == model.input_shape:
        arr = arr[None]
    if list(arr.shape[1:]) != model.input_shape:
        raise ValueError(
            f"{path}: shape {list(arr.shape)} does not fit the model input {model.input_shape}"
        )
    return _preprocess(arr, model.meta.get("preprocess")) if raw else arr.astype(F32)


def _read_image(path: Path, shape: list[int]) -> NDArray[np.uint8]:
    from PIL import Image

    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"{path}: images need a model with 1 or 3 input channels, got {shape}")
    with Image.open(path) as img:
        arr = np.asarray(img.convert("L" if shape[0] == 1 else "RGB"), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _preprocess(arr: NDArray[Any], pre: dict[str, Any] | None) -> NDArray[np.float32]:
    x = arr.astype(F32)
    if not pre:
        return x
    x = x * F32(pre.get("scale", 1.0))
    c = x.shape[1]
    mean = np.asarray(pre.get("mean", [0.0] * c), F32).reshape(1, c, *([1] * (x.ndim - 2)))
    std = np.asarray(pre.get("std", [1.0] * c), F32).reshape(1, c, *([1] * (x.ndim - 2)))
    return (x - mean) / std


def classify(
    model_or_path: Model | str | Path, inputs: Sequence[str | Path], top_k: int = 5
) -> list[tuple[str, list[tuple[int, float]]]]:
    """Top-``top_k`` ``(class, probability)`` pairs for every sample of every input file.

    For ``lowbit run model.lowbit INPUT...``: each entry is ``(label, pairs)`` with label
    ``"file"`` (or ``"file[i]"`` for sample ``i`` of a batch file).
    """
    from .loader import load

    model = model_or_path if isinstance(model_or_path, Model) else load(model_or_path)
    results: list[tuple[str, list[tuple[int, float]]]] = []
    for path in inputs:
        batch = read_input(path, model)
        pred = model.predict(batch, top_k)
        for i in range(batch.shape[0]):
            label = str(path) if batch.shape[0] == 1 else f"{path}[{i}]"
            pairs = [
                (int(c), float(p)) for c, p in zip(pred.indices[i], pred.probs[i], strict=True)
            ]
            results.append((label, pairs))
    return results
