"""Binary and ternary layers on packed sign bits, channels last (the float engine's fast path).

A layer whose weights are binary or ternary and whose input quantiser is a sign (BNN, XNOR-Net
with a per-sample ``beta``, TWN/TTQ weights with sign activations) runs here as one or two
XNOR-popcount GEMMs of :mod:`lowbit.runtime.kernels` (one per ternary scale when ``Wp != Wn``).

**Bits of an activation** (:class:`Bits`). A 4-D activation ``[N, C, H, W]`` is held channels
last as ``ceil(C / 8)`` bytes per pixel, bit ``c % 8`` of byte ``c // 8`` set where channel ``c``
is ``>= 0`` (``sign(0) = +1``), padding bits 0; a 2-D one ``[N, F]`` as the sign words of
:func:`lowbit.runtime.kernels.pack_signs`. A convolution unfolds these bytes (im2col on bits,
no float patches): a patch row is ``kh kw`` runs of ``ceil(C / 8)`` bytes, tap by tap, and the
weights are packed in the same order at load time, so the GEMM sees ``K' = 8 kh kw ceil(C/8)``
bits per row.

**Exactness.** The kernels treat every bit as ``+-1``; two differences from the convolution
PyTorch computes on the ``+-1`` input are corrected with integers, so the dots are exact:

* channel padding bits (``C`` not a multiple of 8) are 0 in activations and weights, so each
  adds ``+1`` to a binary dot: ``const = kh kw (8 ceil(C/8) - C)`` is subtracted (ternary
  weights have no nonzero there: nothing to subtract);
* PyTorch pads the *quantised* input with zeros; here a padded pixel has all bits 0, i.e. reads
  as ``-1``, adding ``-S[o, t] = -sum_c w[o, c, t]`` for every padded tap ``t``. Which taps fall
  into the padding depends on the output position only, so ``corr[p, o] = sum_{t padded at p}
  S[o, t]`` is tabulated at load time for the *border* positions (those with a padded tap) and
  added there; interior rows need no correction.

**Output stages.** ``dot`` (exact) becomes the layer output as the float path computes it
(:meth:`PackedGemm.finish`: ``sum_j float32(dot_j) scale_j``, times ``beta``, plus the bias).
When one GEMM suffices and nothing per sample scales it, the kernel's fused
:class:`~lowbit.runtime.kernels.Scale` stage does this for the interior rows (it rounds exactly
as numpy does). When the output only feeds sign quantisers (possibly through a BatchNorm and
max-pooling, see :mod:`lowbit.runtime.program`), :meth:`PackedGemm.threshold` turns
``sign(post(finish(dot)))`` into an integer threshold per channel, found by evaluating that
float expression on every possible dot, so the fused :class:`~lowbit.runtime.kernels.Threshold`
stage gives the next layer its packed bits with exactly the signs the float path would give.
Border rows get their own GEMM with int32 dots, are corrected, and the two parts assembled (a
float output whose border share is small runs the fused GEMM on every row and overwrites the
border rows instead).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from . import kernels

F32 = np.float32
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_PIXEL_UNITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
"""Element types for copying a pixel's sign bytes (the widest dividing their count)."""
ASSEMBLE_MIN = 256
"""Border share times ``K'`` above which a float-output conv leaves the border rows out of the
fused GEMM (recomputing them costs more than copying the output once)."""
THRESHOLD_TABLE_ELEMENTS = 2**22
"""Float values evaluated at once while searching a layer's sign thresholds."""

__all__ = ["Bits", "PackedGemm", "ThresholdPlan", "pack_activation", "pool_bits"]


class Bits(NamedTuple):
    """Sign bits of an activation: ``data`` uint8 ``[N, H, W, ceil(C/8)]`` (4-D, channels last)
    or uint64 ``[N, ceil(F/64)]`` sign words (2-D); ``channels`` is ``C`` (or ``F``)."""

    data: NDArray[Any]
    channels: int


def pack_activation(x: NDArray[np.float32]) -> Bits:
    """Sign bits (``x >= 0``) of a float activation ``[N, H, W, C]`` (channels last) or ``[N, F]``.

    With ``C`` a multiple of 8 the whole tensor packs as one bit stream (64 values a word, the
    kernels' fast path), which is exactly ``C / 8`` bytes per pixel; otherwise each pixel packs
    into its own words and the first ``ceil(C / 8)`` bytes are kept.
    """
    x = np.ascontiguousarray(x, dtype=F32)
    c = x.shape[-1]
    if x.ndim == 2:
        return Bits(kernels.pack_signs(x), c)
    nb = (c + 7) // 8
    if c % 8 == 0 and x.size % 64 == 0:
        words = kernels.pack_signs(x.reshape(-1, 64))
        return Bits(words.view(np.uint8).reshape(*x.shape[:3], nb), c)
    words = kernels.pack_signs(x.reshape(-1, c))
    return Bits(words.view(np.uint8).reshape(*x.shape[:3], -1)[..., :nb], c)


def window_reduce(
    x: NDArray[Any],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    ufunc: np.ufunc,
    pad_value: Any,
) -> NDArray[Any]:
    """``ufunc``-reduce each pooling window of a channels-last ``x [N, H, W, C]``, one strided
    slice per kernel tap (max-pooling: ``np.maximum`` with ``-inf`` padding)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if ph or pw:
        x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=pad_value)
    oh = (x.shape[1] - kh) // sh + 1
    ow = (x.shape[2] - kw) // sw + 1
    out = np.array(x[:, : sh * (oh - 1) + 1 : sh, : sw * (ow - 1) + 1 : sw])
    for t in range(1, kh * kw):
        i, j = divmod(t, kw)
        ufunc(out, x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw], out=out)
    return out


def pool_bits(
    bits: Bits, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> Bits:
    """Max-pooling on sign bits: ``sign`` is increasing, so ``sign(max_i v_i) = max_i sign(v_i)``,
    an OR of the window's bits (the float pool's ``-inf`` padding is a 0 bit)."""
    out = window_reduce(bits.data, kernel, stride, padding, np.bitwise_or, 0)
    return Bits(out, bits.channels)


@dataclass(frozen=True)
class ThresholdPlan:
    """Signs of a layer's output as integer thresholds on its exact dots (see the module doc):
    bit ``o`` is ``(dot >= thr[o]) XOR flip[o]``; ``gemm`` runs the layer's GEMM with the fused
    Threshold stage (thresholds shifted by the channel-padding constant) for interior rows."""

    thr: NDArray[np.int32]
    flip: NDArray[np.bool_]
    gemm: kernels.BitGemm

    def bits(self, dots: NDArray[np.int32]) -> NDArray[np.bool_]:
        out = np.greater_equal(dots, self.thr)
        return np.not_equal(out, self.flip, out=out) if self.flip.any() else out


class _Weights(NamedTuple):
    pos: NDArray[np.uint64]
    neg: NDArray[np.uint64] | None  # None: binary weights
    gemm: kernels.BitGemm  # int32 dots
    scale: NDArray[np.float32]
    const: int  # subtracted from the kernel's dots (channel padding bits)
    corr: NDArray[np.int32] | None  # [border positions, O] added on border rows


class PackedGemm:
    """A conv2d/linear layer on packed sign bits: weights packed once, corrections tabulated.

    ``gemms`` lists ``(matrix, scale)``: int8 ``[O, C, kh, kw]`` (conv) or ``[O, F]`` (linear)
    matrices with entries in {-1, 0, +1}, each times its per-channel float32 ``scale``; the
    layer output is ``sum_j scale_j (matrix_j * sign(x))`` (times ``beta``, plus ``bias``).
    ``binary``: the matrices are +-1 (XNOR-popcount); otherwise ternary bit planes.
    ``in_chw``: ``(C, H, W)`` of a conv input; ``geometry`` the conv's
    :class:`~lowbit.runtime.geometry.Conv` (None for a linear layer).
    """

    def __init__(
        self,
        gemms: list[tuple[NDArray[np.int8], NDArray[np.float32]]],
        binary: bool,
        bias: NDArray[np.float32] | None,
        geometry: Any = None,
        in_chw: tuple[int, int, int] | None = None,
    ) -> None:
        self.binary = binary
        self.bias = bias
        self.geometry = geometry
        self.out_channels = gemms[0][0].shape[0]
        self._local = threading.local()
        if geometry is None:
            self.k = gemms[0][0].shape[1]
            self.real_k = self.k
            self.border = np.zeros(0, dtype=np.intp)
            self.weights = [self._pack(m, s, 0, None) for m, s in gemms]
            self._scaled = self._prepared(kernels.Scale(self.weights[0].scale, bias))
            return
        assert in_chw is not None
        c, h, w = in_chw
        (kh, kw), self.taps = geometry.kernel, math.prod(geometry.kernel)
        self.nb = (c + 7) // 8
        self.in_hw = (h, w)
        self.out_hw = geometry.out_hw(None, h, w)
        self.k = 8 * self.nb * self.taps
        self.real_k = c * self.taps
        inside = self._inside_taps()
        ok = inside[0][:, None, :, None] & inside[1][None, :, None, :]  # [OH, OW, kh, kw]
        padded = ~ok.reshape(-1, self.taps)  # [OH OW, taps]: tap t of position p reads padding
        self.border = np.flatnonzero(padded.any(axis=1))
        self.border_yx = np.divmod(self.border, self.out_hw[1])
        # positions without padded taps: a rectangle (the taps' valid ranges intersect)
        self.interior = tuple(_span(np.flatnonzero(a.all(axis=1))) for a in inside)
        self._unit = _PIXEL_UNITS[math.gcd(self.nb, 8)]
        # the pixels a GEMM row reads: its taps, then (when a whole number of pixels fills the
        # row's words) a zero pixel kept after the padded input up to the end of the row
        taps = geometry.tap_indices(h, w)  # [OH OW, taps] into the padded input
        row_bytes = 8 * ((self.k + 63) // 64)
        self._filled = row_bytes % self.nb == 0
        if self._filled:
            zero_pixel = (h + 2 * geometry.padding[0]) * (w + 2 * geometry.padding[1])
            fill = np.full((taps.shape[0], row_bytes // self.nb - self.taps), zero_pixel)
            taps = np.concatenate([taps, fill], axis=1)
        interior = np.arange(taps.shape[0]).reshape(self.out_hw)[self.interior].reshape(-1)
        self.has_interior = interior.size > 0
        self._taps_index = {"all": taps, "interior": taps[interior], "border": taps[self.border]}
        share = self.border.size / padded.shape[0]
        self.assemble = share * self.k > ASSEMBLE_MIN
        border_taps = padded[self.border].astype(np.int64)
        self.weights = []
        for m, s in gemms:
            tap_major = np.zeros((self.out_channels, kh, kw, 8 * self.nb), dtype=np.int8)
            tap_major[..., :c] = m.transpose(0, 2, 3, 1)
            sums = m.reshape(self.out_channels, c, self.taps).astype(np.int64).sum(axis=1)
            corr = (border_taps @ sums.T).astype(np.int32)
            const = self.taps * (8 * self.nb - c) if binary else 0
            self.weights.append(
                self._pack(tap_major.reshape(self.out_channels, -1), s, const, corr)
            )
        self._scaled = self._prepared(kernels.Scale(self.weights[0].scale, bias))

    def _pack(
        self, m: NDArray[np.int8], scale: NDArray[np.float32], const: int, corr: Any
    ) -> _Weights:
        pos, neg = kernels.ternary_planes(m)
        neg = None if self.binary else neg
        return _Weights(pos, neg, kernels.BitGemm(pos, neg, self.k), scale, const, corr)

    def _inside_taps(self) -> list[NDArray[np.bool_]]:
        """Per axis, ``[out, k]``: whether kernel offset ``k`` of output index ``out`` reads the
        input (not the padding)."""
        g = self.geometry
        inside = []
        for size, out, k, s, p, d in zip(
            self.in_hw, self.out_hw, g.kernel, g.stride, g.padding, g.dilation, strict=True
        ):
            pos = np.arange(out)[:, None] * s - p + np.arange(k)[None, :] * d
            inside.append((pos >= 0) & (pos < size))
        return inside

    # -- scratch buffers (per thread, reused while the batch size stays the same) ----------------
    def _buffer(self, name: str, shape: tuple[int, ...], dtype: type) -> NDArray[Any]:
        cache = self._local.__dict__
        buf = cache.get(name)
        if buf is None or buf.shape != shape:
            buf = cache[name] = np.zeros(shape, dtype=dtype)
        return buf

    def _border_rows(self, n: int) -> NDArray[np.intp]:
        """Indices of the border rows among all ``n OH OW`` output rows."""
        cache = self._local.__dict__
        rows = cache.get("border_rows")
        if rows is None or rows.size != n * self.border.size:
            positions = self.out_hw[0] * self.out_hw[1]
            rows = (np.arange(n)[:, None] * positions + self.border[None, :]).reshape(-1)
            cache["border_rows"] = rows
        return rows

    # -- activations (im2col on bits) ------------------------------------------------------------
    def _source(self, x: Bits) -> NDArray[Any]:
        """The input as ``[N, (H + 2 ph) (W + 2 pw) (+ 1), e]`` pixels of ``e`` integer
        elements, zero padded, then one zero pixel when rows are filled with it."""
        data, g = x.data.view(self._unit), self.geometry
        n, h, w, e = data.shape
        if not (any(g.padding) or self._filled) and data.flags.c_contiguous:
            return data.reshape(n, h * w, e)
        hp, wp = h + 2 * g.padding[0], w + 2 * g.padding[1]
        src = self._buffer("padded", (n, hp * wp + self._filled, e), self._unit)
        g.padded(data, src[:, : hp * wp].reshape(n, hp, wp, e))
        return src

    def _gather(self, src: NDArray[Any], which: str) -> NDArray[np.uint64]:
        """GEMM rows ``[N P, ceil(K'/64)]`` of the output positions ``which`` (``"all"``,
        ``"interior"`` or ``"border"``): the pixels under each tap, gathered with precomputed
        indices (``np.take``), tap after tap."""
        idx = self._taps_index[which]
        n, words = src.shape[0], (self.k + 63) // 64
        rows = self._buffer(which, (n * idx.shape[0], 8 * words), np.uint8)
        if self._filled:  # whole pixels fill the rows: gather in place
            out = rows.view(self._unit).reshape(n, *idx.shape, -1)
            np.take(src, idx, axis=1, out=out, mode="clip")
        else:
            taken = np.take(src, idx, axis=1, mode="clip")
            rows[:, : self.taps * self.nb] = taken.reshape(rows.shape[0], -1).view(np.uint8)
        return rows.view(np.uint64)

    def rows(self, x: Bits) -> NDArray[np.uint64]:
        """The GEMM's activation rows ``[M, ceil(K'/64)]`` for input bits ``x``, rows in
        ``(n, oh, ow)`` order (im2col on bytes for a conv, zero bytes as padding)."""
        if self.geometry is None:
            return _row_words(x.data, self.k)
        return self._gather(self._source(x), "all")

    # -- GEMMs -----------------------------------------------------------------------------------
    def _prepared(self, stage: kernels.OutputStage) -> kernels.BitGemm:
        """The first (or only) weight matrix's GEMM with output ``stage``, checked once."""
        wt = self.weights[0]
        return kernels.BitGemm(wt.pos, wt.neg, self.k, stage)

    def _exact_dots(self, wt: _Weights, a: NDArray[np.uint64]) -> NDArray[np.int32]:
        """Exact int32 dots of rows ``a`` (all positions, in order) against one weight matrix."""
        d = wt.gemm(a)
        if wt.const:
            d -= np.int32(wt.const)
        if wt.corr is not None and wt.corr.size:
            positions = self.out_hw[0] * self.out_hw[1]
            d.reshape(-1, positions, self.out_channels)[:, self.border] += wt.corr
        return d

    def _border_dots(self, wt: _Weights, src: NDArray[Any]) -> NDArray[np.int32]:
        """Exact dots of the border rows only: ``[N Pb, O]``."""
        d = wt.gemm(self._gather(src, "border")) - np.int32(wt.const)
        return (d.reshape(src.shape[0], -1, self.out_channels) + wt.corr).reshape(d.shape)

    def finish(
        self, dots: list[NDArray[np.int32]], beta: NDArray[np.float32] | None = None
    ) -> NDArray[np.float32]:
        """The float layer output from exact dots ``[M, O]``: ``sum_j float32(dot_j) scale_j``,
        times the per-row ``beta`` ``[M, 1]``, plus the bias (the float path's formula)."""
        y = np.zeros(dots[0].shape, dtype=F32)
        for d, wt in zip(dots, self.weights, strict=True):
            y += d.astype(F32) * wt.scale
        if beta is not None:
            y = y * beta
        if self.bias is not None:
            y = y + self.bias
        return y.astype(F32, copy=False)

    def _fused_scale(self) -> bool:
        """Whether the kernel's Scale stage gives the interior rows' float output exactly."""
        return len(self.weights) == 1 and self.weights[0].const == 0

    def _assembled(
        self, src: NDArray[Any], edge: NDArray[Any], gemm: kernels.BitGemm
    ) -> NDArray[Any]:
        """``[N, OH, OW, c]`` from the border rows ``edge`` (``c`` values a row) and the fused
        ``gemm`` run on the interior rectangle's rows (whose rows may be longer: sign bytes of
        whole words)."""
        n, c, ys, xs = src.shape[0], edge.shape[-1], *self.interior
        out = np.empty((n, *self.out_hw, c), dtype=edge.dtype)
        # sign bytes: copy each pixel as one element where they make a word
        unit = _PIXEL_UNITS[math.gcd(c, 8)] if edge.dtype == np.uint8 else edge.dtype
        if self.has_interior:
            rows = gemm(self._gather(src, "interior")).view(edge.dtype)
            rect = rows.reshape(n, ys.stop - ys.start, xs.stop - xs.start, -1)[..., :c]
            out.view(unit)[:, ys, xs] = rect.view(unit)
        edge = edge.view(unit).reshape(n, self.border.size, -1)
        out.view(unit)[:, self.border_yx[0], self.border_yx[1]] = edge
        return out

    def forward(self, x: Bits, beta: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
        """Float output ``[M, O]`` (rows in ``(n, oh, ow)`` order) for input bits ``x``;
        ``beta`` ``[N]``: XNOR-Net's per-sample input scale, or None.

        With the fused Scale stage, border rows are recomputed exactly and written over the
        kernel's rows, or -- when they are many and long (``assemble``) -- the kernel only sees
        the interior rectangle and the two parts are assembled.
        """
        n = x.data.shape[0]
        if beta is not None or not self._fused_scale():
            a = self.rows(x)
            dots = [self._exact_dots(wt, a) for wt in self.weights]
            rows = None if beta is None else np.repeat(beta, a.shape[0] // n)[:, None]
            return self.finish(dots, rows)
        wt = self.weights[0]
        if not self.border.size:
            return self._scaled(self.rows(x))
        src = self._source(x)
        edge = self.finish([self._border_dots(wt, src)])
        if self.assemble:
            return self._assembled(src, edge, self._scaled).reshape(-1, self.out_channels)
        y = self._scaled(self._gather(src, "all"))
        y[self._border_rows(n)] = edge
        return y

    def forward_bits(self, x: Bits, plan: ThresholdPlan) -> Bits:
        """Output sign bits (``plan`` from :meth:`threshold`) for input bits ``x``: the interior
        rows with the fused Threshold stage, the border rows from corrected dots."""
        wt = self.weights[0]
        if self.geometry is None:
            return Bits(plan.gemm(self.rows(x)), self.out_channels)
        n, nbo = x.data.shape[0], (self.out_channels + 7) // 8
        if not self.border.size:
            words = plan.gemm(self.rows(x))  # [M, ceil(O/64)]
            out = words.view(np.uint8).reshape(n, *self.out_hw, -1)[..., :nbo]
            return Bits(out, self.out_channels)
        src = self._source(x)
        edge = np.packbits(plan.bits(self._border_dots(wt, src)), axis=1, bitorder="little")
        return Bits(self._assembled(src, edge, plan.gemm), self.out_channels)

    def threshold(self, post: Callable[[NDArray[np.float32]], NDArray[np.float32]]):
        """The :class:`ThresholdPlan` giving ``sign(post(output)) >= 0`` from the dots, or None
        when no single threshold per channel exists (two GEMMs, or ``post`` not monotone).

        ``post`` is the elementwise float computation between this layer and the sign (e.g. a
        BatchNorm, applied to ``[D, O]``). It is evaluated on every dot value in
        ``[-K, K]``; the resulting signs must form one step per channel.
        """
        if len(self.weights) != 1:
            return None
        dots = np.arange(-self.real_k, self.real_k + 1, dtype=np.int32)
        rows = max(1, THRESHOLD_TABLE_ELEMENTS // self.out_channels)
        signs = np.concatenate(
            [
                post(self.finish([np.repeat(dots[i : i + rows, None], self.out_channels, 1)])) >= 0
                for i in range(0, dots.size, rows)
            ]
        )
        rising = (signs[1:] >= signs[:-1]).all(axis=0)
        falling = (signs[1:] <= signs[:-1]).all(axis=0)
        if not (rising | falling).all():
            return None
        ones = signs.sum(axis=0)
        # rising: bit set from the first one on; falling: set up to the last one (flip of >=)
        thr = np.where(rising, dots[-1] + 1 - ones, dots[0] + ones).astype(np.int64)
        thr = np.where(rising & (ones == 0), INT32_MAX, thr)
        flip = ~rising
        const = self.weights[0].const
        stage = kernels.Threshold(np.clip(thr + const, INT32_MIN, INT32_MAX), flip)
        thr32 = np.clip(thr, INT32_MIN, INT32_MAX).astype(np.int32)
        return ThresholdPlan(thr32, flip, self._prepared(stage))


def _span(index: NDArray[np.intp]) -> slice:
    """The contiguous run of indices ``index`` as a slice (empty: ``slice(0, 0)``)."""
    return slice(int(index[0]), int(index[-1]) + 1) if index.size else slice(0, 0)


def _row_words(data: NDArray[Any], k: int) -> NDArray[np.uint64]:
    """Sign words ``[N, ceil(k/64)]`` of 2-D bits (uint64 words already, or bytes)."""
    if data.dtype == np.uint64:
        return data
    words = np.zeros((data.shape[0], (k + 63) // 64), dtype=np.uint64)
    words.view(np.uint8)[:, : data.shape[1]] = data
    return words
