"""Fast CPU kernels for deployed low-bit layers: binary, ternary and int8 GEMMs (numpy in and out).

Every GEMM takes activations ``A`` as ``[M, K]`` rows and weights ``W`` as ``[N, K]`` rows (the
layout of ``nn.Linear`` and of a conv weight flattened to ``[O, C kh kw]``; convolutions run as
GEMMs through :func:`im2col`) and returns ``[M, N]``.

Bit layout (binary and ternary): a row of ``K`` signs is ``ceil(K / 64)`` ``uint64`` words; bit
``j`` of word ``w`` is element ``64 w + j`` and bit 1 means +1 (the bytes are those of
``lowbit.packing.pack_binary``). Padding bits past ``K`` are ignored by every kernel.

=============================  ================================================================
kernel                         computes
=============================  ================================================================
binary_gemm                    ``sum_k a_k w_k``, a, w in {-1, +1}: ``K - 2 popcount(a XOR w)``
ternary_gemm_binary_act        ``sum_k a_k t_k``, a in {-1, +1}, t in {-1, 0, +1} as two planes
ternary_gemm_int8              ``sum_k a_k t_k``, a int8, t int8 codes in {-1, 0, +1}
int8_gemm                      ``sum_k (a_k - Za) w_k``, a uint8, w int8
=============================  ================================================================

Each returns the int32 dots, or takes an output stage fused into the kernel, built once per
layer and reused: :class:`Threshold` (BatchNorm + sign: packed bits for the next binary layer),
:class:`Scale` (``dot * scale + bias`` in float32: XNOR-Net alpha, folded BatchNorm) or
:class:`Requant` (gemmlowp requantisation to uint8). ``binary_gemm_threshold``,
``binary_gemm_scale`` and ``int8_gemm_requant`` are one-call conveniences that build the stage.

All integer results are exact (bit-exact against int64 references). The compiled extension
``lowbit.runtime._kernels`` (C, OpenMP, AVX2 paths chosen at run time, see ``csrc/``) does the
work; ``LOWBIT_NO_AVX2=1``, ``LOWBIT_ISA=scalar`` or :func:`set_backend` selects its portable
scalar path (the fused engine, :mod:`lowbit.runtime.fused`, has its own ISA paths), and when the
extension is missing every function falls back to numpy (with one warning). ``num_threads=None``
uses the OpenMP default (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .stages import (
    _INT32_OUTPUT,
    OutputStage,
    Requant,
    Scale,
    Threshold,
    _int_scalar,
    _matrix,
    _pack_rows,
    _threads,
    _unpack_rows,
    _words,
)

try:
    from . import _kernels as _ext
except ImportError as _exc:  # pragma: no cover - depends on the build
    _ext = None
    _EXT_ERROR: ImportError | None = _exc
else:
    _EXT_ERROR = None

__all__ = [
    "BitGemm",
    "OutputStage",
    "Requant",
    "Scale",
    "Threshold",
    "backend",
    "binary_gemm",
    "binary_gemm_scale",
    "binary_gemm_threshold",
    "has_avx2",
    "im2col",
    "int8_gemm",
    "int8_gemm_requant",
    "pack_signs",
    "release_scratch",
    "set_backend",
    "ternary_gemm_binary_act",
    "ternary_gemm_int8",
    "ternary_planes",
]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# output stage -> the extension's mode number
_MODES = (
    {m: getattr(_ext, f"EPI_{m.upper()}") for m in ("int32", "threshold", "scale", "requant")}
    if _ext
    else {}
)
# The largest |(a - Za) w| of uint8 a, int8 w: sum_k cannot leave int32 while K <= 65793.
_INT8_PRODUCT_MAX = 255 * 128

_state = {"numpy": False, "warned": False}

# ----------------------------------------------------------------------------- backend


def _auto_avx2() -> bool:
    scalar = os.environ.get("LOWBIT_ISA", "") == "scalar"
    return not scalar and os.environ.get("LOWBIT_NO_AVX2", "") in ("", "0")


def backend() -> str:
    """The code path kernels run on: ``"avx2"``, ``"scalar"`` (portable C) or ``"numpy"``."""
    if _ext is None or _state["numpy"]:
        return "numpy"
    return "avx2" if _ext.avx2_enabled() else "scalar"


def has_avx2() -> bool:
    """Whether kernels run their AVX2 code (CPU support, extension built, not switched off)."""
    return backend() == "avx2"


def set_backend(name: str | None = None) -> str:
    """Force the code path: ``"avx2"``, ``"scalar"``, ``"numpy"``, or ``None`` for automatic.

    Automatic means the AVX2 path when the CPU has it and ``LOWBIT_NO_AVX2`` is unset or ``0``.
    Returns the backend now in use; raises ValueError for a path this machine cannot run.
    """
    if name not in (None, "avx2", "scalar", "numpy"):
        raise ValueError(f"backend must be 'avx2', 'scalar', 'numpy' or None, got {name!r}")
    if name not in (None, "numpy") and _ext is None:
        raise ValueError(f"backend {name!r} needs the compiled extension: {_EXT_ERROR}")
    if name == "avx2" and not _ext.cpu_has_avx2():
        raise ValueError("backend 'avx2' needs a CPU with AVX2, FMA and POPCNT")
    _state["numpy"] = name == "numpy"
    if _ext is not None:
        _ext.set_avx2(name == "avx2" or (name is None and _auto_avx2()))
    return backend()


def extension() -> Any:
    """The compiled extension module ``lowbit.runtime._kernels``, or None when it is missing."""
    return _ext


def release_scratch() -> None:
    """Free the packing buffers the compiled kernels keep between calls (a few per process, so
    repeated calls of a large GEMM do not page-fault on fresh memory every time)."""
    if _ext is not None:
        _ext.drop_pool()


def _use_ext() -> bool:
    if _ext is None and not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            f"lowbit.runtime._kernels is not available ({_EXT_ERROR}); using slow numpy kernels",
            RuntimeWarning,
            stacklevel=3,
        )
    return backend() != "numpy"


# ----------------------------------------------------------------------------- runner


def _run(
    kernel: str,
    operands: tuple,
    mnk: tuple[int, int, int],
    dot_bound: int,
    output: OutputStage | None,
    reference: Callable[[], NDArray[np.int64]],
    num_threads: int | None,
) -> NDArray[Any]:
    """Run ``kernel`` of the extension into ``output``, or take ``reference`` dots in numpy."""
    stage = _INT32_OUTPUT if output is None else output
    if not isinstance(stage, OutputStage):
        raise ValueError(f"output must be a Threshold, Scale or Requant stage, got {output!r}")
    stage._check(dot_bound)
    nt = _threads(num_threads)
    m, n, _ = mnk
    if not _use_ext():
        return stage._finish(reference())
    out = stage._alloc(m, n)
    getattr(_ext, kernel)(*operands, *mnk, nt, _MODES[stage.mode], out, stage._params(n))
    return out


def _bit_operands(a_bits: ArrayLike, w_bits: ArrayLike, k: int) -> tuple[NDArray, NDArray, int]:
    k = _int_scalar("k", k, 0, 2**30)
    a = _matrix("a_bits", a_bits, np.uint64)
    w = _matrix("w_bits", w_bits, np.uint64, a.shape[1])
    if a.shape[1] != _words(k):
        raise ValueError(
            f"a_bits has {a.shape[1]} words a row, but k={k} needs ceil(k/64)={_words(k)}"
        )
    return a, w, k


def _signs(bits: NDArray[np.uint64], k: int) -> NDArray[np.float64]:
    return 2.0 * _unpack_rows(bits, k) - 1.0


def _exact_matmul(a: NDArray, w: NDArray) -> NDArray[np.int64]:
    """``a @ w.T`` of integer-valued matrices in float64 (exact below 2^53) as int64."""
    return (a.astype(np.float64) @ w.astype(np.float64).T).astype(np.int64)


# ----------------------------------------------------------------------------- sign packing


def pack_signs(x: ArrayLike, *, num_threads: int | None = None) -> NDArray[np.uint64]:
    """Sign bits of float32 rows ``[M, K]`` as ``uint64 [M, ceil(K/64)]``: bit 1 where x >= 0.

    The binarisation ``sign(x)`` of BNN (Courbariaux et al. 2016) with sign(0) = +1; NaN gives 0.
    Padding bits are 0.
    """
    arr = _matrix("x", x, np.float32)
    nt = _threads(num_threads)
    if not _use_ext():
        return _pack_rows(arr >= 0)
    out = np.empty((arr.shape[0], _words(arr.shape[1])), dtype=np.uint64)
    _ext.pack_signs(arr, out, arr.shape[0], arr.shape[1], nt)
    return out


# ----------------------------------------------------------------------------- binary


def binary_gemm(
    a_bits: ArrayLike,
    w_bits: ArrayLike,
    k: int,
    output: OutputStage | None = None,
    *,
    num_threads: int | None = None,
) -> NDArray[Any]:
    """XNOR-popcount GEMM (XNOR-Net, Rastegari et al. 2016): ``K - 2 popcount(a XOR w)``.

    ``a_bits`` uint64 ``[M, ceil(k/64)]``, ``w_bits`` uint64 ``[N, ceil(k/64)]`` sign words;
    ``out[m, n] = sum_k a[m, k] w[n, k]`` over {-1, +1} values, int32 ``[M, N]``, or what the
    ``output`` stage (:class:`Threshold`, :class:`Scale`, :class:`Requant`) makes of it.
    """
    a, w, k = _bit_operands(a_bits, w_bits, k)

    def reference() -> NDArray[np.int64]:
        return _exact_matmul(_signs(a, k), _signs(w, k))

    mnk = (a.shape[0], w.shape[0], k)
    return _run("bitgemm", (a, w, None), mnk, k, output, reference, num_threads)


def binary_gemm_threshold(
    a_bits: ArrayLike,
    w_bits: ArrayLike,
    k: int,
    thresholds: ArrayLike,
    flip: ArrayLike | None = None,
    *,
    num_threads: int | None = None,
) -> NDArray[np.uint64]:
    """``binary_gemm`` with ``Threshold(thresholds, flip)``: packed sign bits for the next layer.

    Builds the stage on every call; a runtime should build the :class:`Threshold` once.
    """
    return binary_gemm(a_bits, w_bits, k, Threshold(thresholds, flip), num_threads=num_threads)


def binary_gemm_scale(
    a_bits: ArrayLike,
    w_bits: ArrayLike,
    k: int,
    scale: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    num_threads: int | None = None,
) -> NDArray[np.float32]:
    """``binary_gemm`` with ``Scale(scale, bias)``: ``dot * scale + bias`` in float32."""
    return binary_gemm(a_bits, w_bits, k, Scale(scale, bias), num_threads=num_threads)


class BitGemm:
    """A binary or ternary GEMM with its weights and output stage fixed and checked once: a
    layer's prepared kernel call (``binary_gemm`` / ``ternary_gemm_binary_act`` re-validate
    their weights and stage on every call, which dominates small GEMMs).

    ``w_pos`` uint64 ``[N, ceil(k/64)]`` sign words (binary, ``w_neg=None``) or the ``+1``
    plane with ``w_neg`` the ``-1`` plane (ternary, disjoint); ``output`` an output stage or
    None (int32 dots). ``gemm(a_bits)`` equals ``binary_gemm(a_bits, w_pos, k, output)`` (or
    the ternary one); ``a_bits`` must be C-contiguous uint64 ``[M, ceil(k/64)]``.
    """

    def __init__(
        self,
        w_pos: ArrayLike,
        w_neg: ArrayLike | None,
        k: int,
        output: OutputStage | None = None,
        *,
        num_threads: int | None = None,
    ) -> None:
        self.k = _int_scalar("k", k, 0, 2**30)
        self.words = _words(self.k)
        self.w = _matrix("w_pos", w_pos, np.uint64, self.words)
        self.neg = None if w_neg is None else _matrix("w_neg", w_neg, np.uint64, self.words)
        if self.neg is not None and (self.neg.shape != self.w.shape or (self.w & self.neg).any()):
            raise ValueError("w_neg must have w_pos's shape and no bit set where w_pos has one")
        self.output = _INT32_OUTPUT if output is None else output
        if not isinstance(self.output, OutputStage):
            raise ValueError(f"output must be a Threshold, Scale or Requant stage, got {output!r}")
        self.output._check(self.k)
        self.num_threads = _threads(num_threads)
        self._params = self.output._params(self.w.shape[0])

    def __call__(self, a_bits: NDArray[np.uint64]) -> NDArray[Any]:
        a = a_bits
        if a.dtype != np.uint64 or a.ndim != 2 or a.shape[1] != self.words:
            raise ValueError(f"a_bits must be uint64 [M, {self.words}], got {a.dtype} {a.shape}")
        if not a.flags.c_contiguous:
            raise ValueError("a_bits must be C-contiguous")
        if not _use_ext():
            if self.neg is None:
                return binary_gemm(a, self.w, self.k, self.output)
            return ternary_gemm_binary_act(a, self.w, self.neg, self.k, self.output, check=False)
        m, n = a.shape[0], self.w.shape[0]
        out = self.output._alloc(m, n)
        mode = _MODES[self.output.mode]
        _ext.bitgemm(a, self.w, self.neg, m, n, self.k, self.num_threads, mode, out, self._params)
        return out


# ----------------------------------------------------------------------------- ternary


def _ternary_codes(name: str, codes: ArrayLike, cols: int | None = None) -> NDArray[np.int8]:
    arr = _matrix(name, codes, np.int8, cols)
    bad = (arr < -1) | (arr > 1)
    if bad.any():
        raise ValueError(f"{name} must hold ternary codes -1, 0, +1, got {arr[bad][0]}")
    return arr


def ternary_planes(codes: ArrayLike) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """Ternary codes int8 ``[N, K]`` in {-1, 0, +1} as bit planes ``(pos, neg)``, each uint64
    ``[N, ceil(K/64)]``: ``pos`` has bit 1 where the code is +1, ``neg`` where it is -1."""
    arr = _ternary_codes("codes", codes)
    return _pack_rows(arr == 1), _pack_rows(arr == -1)


def ternary_gemm_binary_act(
    a_bits: ArrayLike,
    w_pos: ArrayLike,
    w_neg: ArrayLike,
    k: int,
    output: OutputStage | None = None,
    *,
    check: bool = True,
    num_threads: int | None = None,
) -> NDArray[Any]:
    """Ternary-weight GEMM with binary activations (TWN/TTQ weights, BNN activations).

    ``sum_k a_k t_k = popcount(nz) - 2 popcount((a XOR pos) AND nz)`` with ``nz = pos OR neg``:
    on a nonzero weight ``a_k t_k = +1`` exactly when the activation bit equals the ``pos`` bit.
    ``a_bits`` uint64 ``[M, ceil(k/64)]``; ``w_pos``/``w_neg`` planes from :func:`ternary_planes`.
    ``check=False`` skips the O(N K) test that the planes are disjoint (do it once at load time).
    Returns int32 ``[M, N]`` or the ``output`` stage's result.
    """
    a, pos, k = _bit_operands(a_bits, w_pos, k)
    neg = _matrix("w_neg", w_neg, np.uint64, pos.shape[1])
    if neg.shape != pos.shape:
        raise ValueError(f"w_neg shape {neg.shape} differs from w_pos shape {pos.shape}")
    if check and (pos & neg).any():
        raise ValueError("w_pos and w_neg share a set bit: a weight cannot be both +1 and -1")

    def reference() -> NDArray[np.int64]:
        t = _unpack_rows(pos, k).astype(np.float64) - _unpack_rows(neg, k)
        return _exact_matmul(_signs(a, k), t)

    mnk = (a.shape[0], pos.shape[0], k)
    return _run("bitgemm", (a, pos, neg), mnk, k, output, reference, num_threads)


def ternary_gemm_int8(
    a: ArrayLike,
    w: ArrayLike,
    output: OutputStage | None = None,
    *,
    check: bool = True,
    num_threads: int | None = None,
) -> NDArray[Any]:
    """Ternary-weight GEMM with int8 activations: ``sum_k a[m, k] w[n, k]``, exact in int32.

    ``a`` int8 ``[M, K]``; ``w`` int8 ``[N, K]`` ternary codes in {-1, 0, +1} (``check=False``
    skips the O(N K) range test; other values then give meaningless results). The AVX2 path
    multiplies with vpmaddubsw, whose int16 pair sums stay exact here (see ``csrc/int8gemm.c``).
    Returns int32 ``[M, N]`` or the ``output`` stage's result.
    """
    av = _matrix("a", a, np.int8)
    wv = _ternary_codes("w", w, av.shape[1]) if check else _matrix("w", w, np.int8, av.shape[1])
    mnk = (av.shape[0], wv.shape[0], av.shape[1])
    return _run(
        "ternary_int8gemm",
        (av, wv),
        mnk,
        128 * mnk[2],
        output,
        lambda: _exact_matmul(av, wv),
        num_threads,
    )


# ----------------------------------------------------------------------------- int8


def int8_gemm(
    a: ArrayLike,
    a_zero_point: int,
    w: ArrayLike,
    output: OutputStage | None = None,
    *,
    num_threads: int | None = None,
) -> NDArray[Any]:
    """Integer GEMM of Jacob et al. (2018): ``sum_k (a[m, k] - Za) w[n, k]`` in int32.

    ``a`` uint8 ``[M, K]`` with zero point ``Za`` in [0, 255]; ``w`` int8 ``[N, K]`` (weight zero
    point 0). Exact; K is limited to 65793 (``K 255 128 < 2^31``) so the sum cannot overflow.
    Returns int32 ``[M, N]``, or with ``output=Requant(...)`` the quantised uint8 layer output.
    """
    av = _matrix("a", a, np.uint8)
    wv = _matrix("w", w, np.int8, av.shape[1])
    zp = _int_scalar("a_zero_point", a_zero_point, 0, 255)
    mnk = (av.shape[0], wv.shape[0], av.shape[1])

    def reference() -> NDArray[np.int64]:
        return _exact_matmul(av.astype(np.int64) - zp, wv)

    bound = _INT8_PRODUCT_MAX * mnk[2]
    return _run("int8gemm", (av, zp, wv), mnk, bound, output, reference, num_threads)


def int8_gemm_requant(
    a: ArrayLike,
    a_zero_point: int,
    w: ArrayLike,
    bias: ArrayLike | None,
    m0: ArrayLike,
    shift: ArrayLike,
    out_zero_point: int,
    qmin: int = 0,
    qmax: int = 255,
    *,
    num_threads: int | None = None,
) -> NDArray[np.uint8]:
    """``int8_gemm`` with ``Requant(bias, m0, shift, out_zero_point, qmin, qmax)``: a quantised
    layer to uint8. Builds the stage on every call; a runtime should build the :class:`Requant`
    once per layer (its validation costs more than a small GEMM)."""
    stage = Requant(bias, m0, shift, out_zero_point, qmin, qmax)
    return int8_gemm(a, a_zero_point, w, stage, num_threads=num_threads)


# ----------------------------------------------------------------------------- im2col


def _pair(name: str, v: int | tuple[int, int], lo: int) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if len(pair) != 2 or any(
        isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < lo for p in pair
    ):
        raise ValueError(f"{name} must be an integer >= {lo} or a pair of them, got {v!r}")
    return int(pair[0]), int(pair[1])


def im2col(
    x: ArrayLike,
    kh: int,
    kw: int,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    pad_value: float = 0,
) -> NDArray[Any]:
    """Unfold conv patches: ``x [N, C, H, W]`` to ``[N OH OW, C kh kw]`` (any dtype).

    Row ``(n, oh, ow)`` holds the patch under output pixel ``(oh, ow)`` of image ``n``, columns in
    ``(c, i, j)`` order, i.e. matching a conv weight reshaped to ``[O, C kh kw]``, so
    ``conv(x, w) = (im2col(x) @ w.reshape(O, -1).T)`` reshaped to ``[N, OH, OW, O]``.
    ``padding`` pads with ``pad_value`` (use the zero point for quantised inputs).
    """
    arr = np.asarray(x)
    if arr.ndim != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {arr.shape}")
    kh, kw = _pair("kernel size", (kh, kw), 1)
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    if ph or pw:
        arr = np.pad(arr, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    n, c, h, w = arr.shape
    if h < kh or w < kw:
        raise ValueError(f"kernel {kh}x{kw} is larger than the padded input {h}x{w}")
    windows = np.lib.stride_tricks.sliding_window_view(arr, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    oh, ow = windows.shape[2], windows.shape[3]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
