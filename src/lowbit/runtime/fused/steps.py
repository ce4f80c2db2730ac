"""Step rows of a fused program: the field layout shared with ``csrc/engine.h``.

A step is one row of ``FIELDS`` int64 values. :class:`StepSpec` holds a step before addresses
exist (tensor names and parameter arrays); :func:`fill` writes the row for one batch size once
the tensors have their place in the arena.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ...fixedpoint import INT32_MAX, INT32_MIN, quantize_multiplier
from ..integer_ops import Grid

# ops (engine.h)
QUANT, CONV, RESCALE, ADD, MAXPOOL, AVGPOOL, SLICE, PAD, FLATTEN, DEQUANT = range(1, 11)
# fields (engine.h), in order
NAMES = (
    "op", "in0", "in1", "out", "b", "h", "w", "c", "oh", "ow", "oc", "kh", "kw", "sh", "sw",
    "ph", "pw", "t0", "t1", "to", "p0", "p1", "p2", "p3", "p4", "scratch", "x0", "x1", "x2",
    "x3", "x4", "x5", "x6", "x7", "r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "q0", "q1",
    "q2", "q3", "q4", "q5", "q6", "q7", "u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7",
    "out2", "t2", "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "threads", "scratch_bytes",
)  # fmt: skip
F = {name: i for i, name in enumerate(NAMES)}
FIELDS = len(NAMES)
RS_NONE, RS_POW2, RS_MULT = 0, 1, 2
CONV_REQUANT, CONV_ACC, CONV_EXACT = 0, 1, 2
U8, I32 = 0, 1


class Unsupported(ValueError):
    """A graph (or part of one) the fused engine does not run; the message names the node."""


@dataclass(frozen=True)
class Tensor:
    """A value between steps: per-sample shape ``(h, w, c)`` (channels last), element type,
    the offset added to codes to store them (uint8), the grid, and the graph rank (2 or 4)."""

    hwc: tuple[int, int, int]
    dtype: int
    offset: int
    grid: Grid | None
    rank: int

    def nbytes(self, batch: int) -> int:
        return batch * math.prod(self.hwc) * (4 if self.dtype == I32 else 1)


def storage(grid: Grid) -> tuple[int, int]:
    """``(dtype, offset)`` a grid's codes are stored with: uint8 when ``[qmin, qmax]`` shifted
    by an offset fits ``[0, 255]``, else int32."""
    off = -grid.qmin if grid.qmin < 0 else 0
    if grid.qmax + off <= 255 and 0 <= grid.zero_point + off <= 255:
        return U8, off
    return I32, 0


def rescale_fields(src: Grid, src_off: int, dst: Grid, dst_off: int) -> list[int]:
    """The eight ``r`` fields moving stored codes from ``src`` to ``dst`` as
    :func:`lowbit.runtime.integer.rescale` does (pow2 shift, fixed-point multiplier, or none)."""
    mode, a, lsh, rsh = RS_NONE, 0, 0, 0
    if src != dst:
        mantissa, exponent = math.frexp(src.scale / dst.scale)
        if mantissa == 0.5 and exponent <= 0:
            mode, a = RS_POW2, 1 - exponent
        else:
            m0, shift = quantize_multiplier(src.scale / dst.scale)
            mode, a, lsh, rsh = RS_MULT, m0, max(-shift, 0), max(shift, 0)
    return [
        src.zero_point + src_off,
        mode,
        a,
        lsh,
        rsh,
        dst.zero_point + dst_off,
        dst.qmin + dst_off,
        dst.qmax + dst_off,
    ]


def clamp_fields(grid: Grid, offset: int, lo: int, hi: int) -> list[int]:
    """``r`` fields that only clamp codes to ``[lo, hi]`` (ReLU, clamp) on one grid."""
    z = grid.zero_point + offset
    return [z, RS_NONE, 0, 0, 0, z, lo + offset, hi + offset]


@dataclass
class StepSpec:
    """A step before addresses: ``ins``/``out`` tensor names, ``fields`` by name, ``params``
    (arrays whose addresses go into p0..p4), ``work``: MACs (threads are given by size)."""

    op: int
    ins: list[str]
    out: str
    fields: dict[str, int] = field(default_factory=dict)
    params: list[NDArray[Any]] = field(default_factory=list)
    scratch_bytes: int = 0
    work: int = 0
    out2: str | None = None

    @property
    def outs(self) -> list[str]:
        return [self.out] if self.out2 is None else [self.out, self.out2]


def fill(
    spec: StepSpec,
    row: NDArray[np.int64],
    tensors: dict[str, Tensor],
    where: dict[str, int],
    batch: int,
    threads: int,
) -> None:
    """Write ``spec`` for ``batch`` samples into ``row`` (``where``: tensor name -> address)."""
    row[:] = 0
    row[F["op"]] = spec.op
    first = tensors[spec.ins[0]] if spec.ins else tensors[spec.out]
    out = tensors[spec.out]
    row[F["b"]] = batch
    row[F["h"]], row[F["w"]], row[F["c"]] = first.hwc
    row[F["oh"]], row[F["ow"]], row[F["oc"]] = out.hwc
    for i, name in enumerate(spec.ins[:2]):
        row[F[f"in{i}"]] = where[name]
        row[F[f"t{i}"]] = tensors[name].dtype
    row[F["out"]] = where[spec.out]
    row[F["to"]] = out.dtype
    if spec.out2 is not None:
        row[F["out2"]] = where[spec.out2]
        row[F["t2"]] = tensors[spec.out2].dtype
    for i, p in enumerate(spec.params):
        row[F[f"p{i}"]] = p.ctypes.data
    for name, value in spec.fields.items():
        if not INT32_MIN * 2**32 <= value < INT32_MAX * 2**32:
            raise Unsupported(f"step field {name}={value} out of range")
        row[F[name]] = value
    row[F["scratch"]] = where.get("#scratch", 0)
    row[F["scratch_bytes"]] = spec.scratch_bytes
    elements = batch * math.prod(out.hwc)
    useful = max(spec.work * batch // 2**20, elements // 2**17, 1)  # a thread per 1M MACs
    row[F["threads"]] = min(threads, useful)
