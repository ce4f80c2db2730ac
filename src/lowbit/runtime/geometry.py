"""Window geometry of convolutions and pooling: attribute pairs, output sizes, windows, im2col."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from ..contract import GraphError, Node, is_int

__all__ = ["MAX_ATTR", "Conv", "attr_pair", "conv_geometry", "patch_index", "pool_geometry"]

MAX_ATTR = 2**16
"""Largest stride, padding, dilation, kernel size or group count accepted in a graph."""


def attr_pair(node: Node, key: str, default: int, lo: int) -> tuple[int, int]:
    """Attribute ``key`` of ``node`` as a pair of ints in ``[lo, MAX_ATTR]``."""
    v = node.attrs.get(key, default)
    pair = [v, v] if is_int(v) else v
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or not all(is_int(p) and lo <= p <= MAX_ATTR for p in pair)
    ):
        raise GraphError(
            f"node {node.name!r}: attribute {key!r} must be an int in [{lo}, {MAX_ATTR}] or a "
            f"pair of them, got {v!r}"
        )
    return int(pair[0]), int(pair[1])


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


def conv_geometry(node: Node, weight_shape: Sequence[int]) -> Conv:
    return Conv(
        kernel=(int(weight_shape[2]), int(weight_shape[3])),
        stride=attr_pair(node, "stride", 1, 1),
        padding=attr_pair(node, "padding", 0, 0),
        dilation=attr_pair(node, "dilation", 1, 1),
    )


def pool_geometry(node: Node) -> Conv:
    kernel = attr_pair(node, "kernel_size", 1, 1)
    stride = kernel if node.attrs.get("stride") is None else attr_pair(node, "stride", 1, 1)
    padding = attr_pair(node, "padding", 0, 0)
    if padding[0] * 2 > kernel[0] or padding[1] * 2 > kernel[1]:
        raise GraphError(f"node {node.name!r}: padding {padding} exceeds half the kernel {kernel}")
    return Conv(kernel, stride, padding)
