"""The fused integer engine: a whole integer-only network in one C call per forward pass.

:class:`FusedEngine` takes a compiled :class:`~lowbit.runtime.integer.IntegerProgram` (which
fixes every grid, multiplier and rounding) and plans it once (:mod:`.plan`): weights packed for
the chosen ISA path (:mod:`.isa`), every tensor channels last as uint8 codes (or int32 on wide
grids), BatchNorm folded, ReLU/clamp fused into the producing layer's (or add's) output stage.
For each (batch size, thread count) it then lays the tensors out in one arena (buffers reused
once their last reader has run), with per-thread GEMM scratch, and writes the program's step
rows with the final addresses; a call patches the input address and runs ``engine_run`` once.
Nothing is allocated per call except the returned logits. Each calling thread gets its own
instances (the GIL is released while the program runs, so threads may run it at once).

Why this shape (docs/benchmarks.md measured the integer engine in numpy at 0.06-0.7x float32
torch): the GEMMs were a minority of its time; the rest was requantisation, im2col gathers,
residual adds and Python between layers. Here each layer is one pass over its input rows in
blocks of ``ENG_MB`` output pixels: gather (im2col of uint8 codes, runs of ``kw`` pixels
copied at once), GEMM on the block while it is in cache (``vpdpbusd`` on AVX-512 VNNI,
``vpmaddwd`` on int16 pairs on AVX2, plain C otherwise), and the output stage writing the next
layer's codes directly; an add rescales both operands, adds, clamps, rescales (and writes the
copy the next layer reads) in one pass. One C call per forward makes batch-1 latency a matter
of the kernels, not of Python.

The result equals :meth:`IntegerProgram.run` bit for bit (tests force every ISA path): the
same integer arithmetic, in C (``csrc/engine.c``, ``csrc/qgemm.c``); the zero point of the
uint8 input codes is removed per output column (``c = -Z colsum(w)``, exact in wrapping int32
arithmetic because the true accumulator fits int32).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import kernels
from ..integer import IntegerProgram
from . import steps as S
from .isa import ISAS, available_isas, default_isa, isa_code
from .plan import Plan, build_plan
from .steps import Unsupported

__all__ = ["ISAS", "FusedEngine", "Unsupported", "available_isas", "default_isa"]

ALIGN = 64


@dataclass
class _Instance:
    """A plan laid out for one batch size and thread count."""

    rows: NDArray[np.int64]
    arena: NDArray[np.uint8]
    output: NDArray[np.float32]


def _layout(plan: Plan, batch: int) -> tuple[dict[str, int], int]:
    """Arena offsets of every tensor (first fit; a buffer is reused after its last reader)."""
    last: dict[str, int] = {}
    for k, step in enumerate(plan.steps):
        for name in step.ins:
            last[name] = k
    last[plan.output_name] = len(plan.steps)
    live: list[tuple[int, int, str]] = []  # (offset, size, name)
    offsets: dict[str, int] = {}
    top = 0
    for k, step in enumerate(plan.steps):
        for out in step.outs:
            size = -(-plan.tensors[out].nbytes(batch) // ALIGN) * ALIGN
            at = 0
            for off, sz, _ in sorted(live):
                if off - at >= size:
                    break
                at = max(at, off + sz)
            offsets[out] = at
            live.append((at, size, out))
            top = max(top, at + size)
        live = [b for b in live if last.get(b[2], -1) > k]
    return offsets, top


class FusedEngine:
    """Runs an :class:`IntegerProgram` with the fused C engine (see the module docstring).

    ``isa``: ``"scalar"``, ``"avx2"``, ``"avx512vnni"`` or None for :func:`default_isa`
    (``LOWBIT_ISA`` or the fastest path of this CPU). Raises :class:`Unsupported` (naming the
    node) for programs it cannot run, ValueError for an ISA this CPU lacks.
    """

    def __init__(self, program: IntegerProgram, isa: str | None = None) -> None:
        ext = kernels.extension()
        if ext is None:
            raise Unsupported("the fused engine needs the compiled extension")
        if ext.ENG_FIELDS != S.FIELDS:
            raise Unsupported(f"extension has {ext.ENG_FIELDS} step fields, expected {S.FIELDS}")
        self.isa = default_isa() if isa is None else isa
        self._ext = ext
        self.plan = build_plan(program, isa_code(self.isa), ext)
        self._local = threading.local()  # instances per calling thread: arenas are not shared
        out = self.plan.tensors[self.plan.output_name]
        self._out_rank, self._out_hwc = out.rank, out.hwc
        self._in = self.plan.tensors[self.plan.input_name]

    @property
    def weight_bytes(self) -> int:
        """Bytes of packed weights the engine holds."""
        return self.plan.weight_bytes

    @property
    def _instances(self) -> dict[tuple[int, int], _Instance]:
        """This thread's planned instances by (batch size, thread count)."""
        if not hasattr(self._local, "instances"):
            self._local.instances = {}
        return self._local.instances

    def _instance(self, batch: int, threads: int) -> _Instance:
        key = (batch, threads)
        if key not in self._instances:
            plan = self.plan
            offsets, top = _layout(plan, batch)
            scratch = max((s.scratch_bytes for s in plan.steps), default=0) * threads
            arena = np.zeros(top + scratch + ALIGN, np.uint8)
            base = arena.ctypes.data
            base += -base % ALIGN
            where = {name: base + off for name, off in offsets.items()}
            where["#scratch"] = base + top
            rows = np.zeros((len(plan.steps), S.FIELDS), np.int64)
            for row, spec in zip(rows, plan.steps, strict=True):
                S.fill(spec, row, plan.tensors, where, batch, threads)
            start = where[plan.output_name] - arena.ctypes.data
            count = batch * int(np.prod(self._out_hwc))
            output = arena[start : start + 4 * count].view(np.float32)
            self._instances[key] = _Instance(rows, arena, output)
        return self._instances[key]

    def __call__(self, x: NDArray[Any], num_threads: int | None = None) -> NDArray[np.float32]:
        """Float logits for a float input batch in the graph layout (``[N, C, H, W]`` or
        ``[N, F]``); ``num_threads`` None: the OpenMP default (``OMP_NUM_THREADS``)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        h, w, c = self._in.hwc
        want = (c, h, w) if self._in.rank == 4 else (c,)
        if x.shape[1:] != want:
            raise ValueError(
                f"input must have shape [N, {', '.join(map(str, want))}], got {x.shape}"
            )
        threads = self._ext.max_threads() if num_threads is None else num_threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"num_threads must be a positive integer or None, got {threads!r}")
        inst = self._instance(x.shape[0], threads)
        inst.rows[0, S.F["in0"]] = x.ctypes.data
        self._ext.engine_run(inst.rows)
        out = inst.output.copy()
        oh, ow, oc = self._out_hwc
        if self._out_rank == 4:
            return np.ascontiguousarray(out.reshape(x.shape[0], oh, ow, oc).transpose(0, 3, 1, 2))
        return out.reshape(x.shape[0], oc)
