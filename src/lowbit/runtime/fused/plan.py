"""Translate a compiled :class:`~lowbit.runtime.integer.IntegerProgram` into fused steps.

The integer program fixes the arithmetic (grids, folded BatchNorms, multipliers, headroom,
quantised biases); this module only re-expresses each of its steps in the engine's terms, so the
engine computes exactly what :meth:`IntegerProgram.run` computes:

* a layer becomes one CONV step: ``raw = sum (q + a_off) w`` over uint8 codes, and the output
  stage ``v = raw 2^L + c`` with ``c = bias_q - (Z_in + a_off) colsum(w) 2^L`` (wrapping int32
  arithmetic; the true value fits int32 by the integer program's headroom bound, checked here),
  then the program's requantisation. A ReLU/clamp that is the layer's only consumer is fused
  into the clamp bounds. The output layer keeps its accumulator (CONV_ACC) and a DEQUANT step
  turns it into float logits;
* other ops become one step each, with RESCALE steps wherever the program rescales an input
  to another grid.

Anything else (grouped or non-int8 layers, codes wider than 8 bits into a layer, slices or pads
of the batch dimension) raises :class:`~lowbit.runtime.fused.steps.Unsupported`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ...contract import Node
from ...fixedpoint import INT32_MAX, INT32_MIN
from ..integer import IntegerProgram
from ..integer_ops import Grid
from . import steps as S
from .steps import StepSpec, Tensor, Unsupported


def _pair(node: Node, key: str, default: int) -> tuple[int, int]:
    v = node.attrs.get(key, default)
    v = default if v is None else v
    return (int(v), int(v)) if np.ndim(v) == 0 else (int(v[0]), int(v[1]))


def _wrap32(x: NDArray[np.int64]) -> NDArray[np.int32]:
    return ((x + 2**31) % 2**32 - 2**31).astype(np.int32)


@dataclass
class Plan:
    """Tensors, steps (in order), the float input/output shapes and the packed weights."""

    isa: int
    input_name: str
    output_name: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    steps: list[StepSpec] = field(default_factory=list)
    alias: dict[str, str] = field(default_factory=dict)
    weight_bytes: int = 0

    def name(self, tensor: str) -> str:
        while tensor in self.alias:
            tensor = self.alias[tensor]
        return tensor


class _Builder:
    def __init__(self, program: IntegerProgram, isa: int, ext: Any) -> None:
        self.program, self.ext = program, ext
        self.nodes = {n.name: n for n in program.graph.nodes}
        graph = program.graph
        self.plan = Plan(isa, graph.inputs[0], program.output_name)
        self.uses: dict[str, int] = {}
        for step in program.steps:
            for i in getattr(step, "inputs", None) or [step.input]:
                self.uses[i] = self.uses.get(i, 0) + 1
        self.fused_clamp: dict[str, tuple[int, int]] = {}

    # -- tensors -----------------------------------------------------------------------------
    def tensor(self, name: str, hwc: tuple[int, int, int], grid: Grid | None, rank: int) -> str:
        dtype, off = (S.I32, 0) if grid is None else S.storage(grid)
        self.plan.tensors[name] = Tensor(hwc, dtype, off, grid, rank)
        return name

    def get(self, name: str) -> Tensor:
        return self.plan.tensors[self.plan.name(name)]

    def on_grid(self, name: str, src: Grid, dst: Grid, tag: str) -> str:
        """``name`` (held on ``src``) as a tensor on ``dst``: a RESCALE step when they differ."""
        name = self.plan.name(name)
        if src == dst:
            return name
        t = self.plan.tensors[name]
        out = self.tensor(f"{name}@{tag}", t.hwc, dst, t.rank)
        r = S.rescale_fields(src, t.offset, dst, self.plan.tensors[out].offset)
        self.plan.steps.append(StepSpec(S.RESCALE, [name], out, _r_fields(r)))
        return out

    # -- input -------------------------------------------------------------------------------
    def input(self) -> None:
        graph, g = self.program.graph, self.program.input_grid
        shape = [int(d) for d in graph.input_shape[1:]]
        if len(shape) == 3:
            hwc, rank = (shape[1], shape[2], shape[0]), 4
        elif len(shape) == 1:
            hwc, rank = (1, 1, shape[0]), 2
        else:
            raise Unsupported(
                f"graph input shape {graph.input_shape} is neither [N, C, H, W] nor [N, F]"
            )
        name = self.tensor(self.plan.input_name, hwc, g, rank)
        t = self.plan.tensors[name]
        inv = np.float32(1.0) / np.float32(g.scale)
        fields = {
            "x0": int(np.array(inv, np.float32).view(np.int32)),
            "x1": g.qmin - g.zero_point,
            "x2": g.qmax - g.zero_point,
            "x3": g.zero_point + t.offset,
        }
        self.plan.steps.append(StepSpec(S.QUANT, [], name, fields))

    # -- layers ------------------------------------------------------------------------------
    def layer(self, step: Any) -> None:
        ep, gin = step.epilogue, step.grid_in
        src = self.on_grid(step.input, step.src, gin, step.name)
        t = self.plan.tensors[src]
        node = self.nodes[step.name]
        if node.op == "batchnorm":  # folded: name the layer itself
            node = self.nodes[node.inputs[0]]
        where = f"node {node.name!r} ({node.op})"
        if t.dtype != S.U8 or len(step.groups) != 1 or step.groups[0].w8 is None:
            raise Unsupported(f"{where}: needs 8-bit input codes, int8 weights and one group")
        w = step.groups[0].w  # [N, C kh kw] int64, C-major
        n_out = w.shape[0]
        if step.conv:
            kh, kw = (int(k) for k in step.kernel)
            c_in = w.shape[1] // (kh * kw)
            w = w.reshape(n_out, c_in, kh, kw).transpose(0, 2, 3, 1).reshape(n_out, -1)
            (sh, sw), (ph, pw) = step.stride, step.padding
            h, wd, c = t.hwc
            if c != c_in or t.rank != 4:
                raise Unsupported(f"{where}: input has {c} channels, weights {c_in}")
            hwc = ((h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1, n_out)
        else:
            if t.rank != 2 or t.hwc[2] != w.shape[1]:
                raise Unsupported(f"{where}: linear layer on a {t.rank}-D input")
            kh = kw = sh = sw = 1
            ph = pw = 0
            hwc = (1, 1, n_out)
        k = w.shape[1]
        kp, nbytes, scratch = self.ext.engine_sizes(self.plan.isa, n_out, k)
        packed = np.empty(nbytes, np.uint8)
        self.ext.engine_pack(
            self.plan.isa, np.ascontiguousarray(w.astype(np.int8)), n_out, k, packed
        )
        self.plan.weight_bytes += nbytes
        colsum = w.sum(axis=1)
        za = gin.zero_point + t.offset
        out = self.tensor(step.name, hwc, ep.grid, 4 if step.conv else 2)
        o = self.plan.tensors[out]
        fields = dict(
            kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw, x0=k, x1=kp, x3=za, r0=self.plan.isa,
            r1=int(kh == kw == 1 and sh == sw == 1 and ph == pw == 0 and kp == k),
        )  # fmt: skip
        if ep.grid is None:
            c = _wrap32(-za * colsum)
            m0 = lsh = rsh = np.zeros(n_out, np.int32)
            fields |= {"x2": 0, "x7": S.CONV_ACC}
        else:
            g = ep.grid
            lo, hi = self.fused_clamp.get(step.name, (g.qmin, g.qmax))
            fields |= {
                "x4": max(lo - g.zero_point, INT32_MIN),
                "x5": min(hi - g.zero_point, INT32_MAX),
                "x6": g.zero_point + o.offset,
            }
            if getattr(ep, "exact", False):
                c, m0, rsh, bias = self.exact_stage(ep, za * colsum, where)
                lsh = bias  # the int64 bias takes the left-shift slot (p3)
                fields |= {"x2": 0, "x7": S.CONV_EXACT}
            else:
                c, m0, lsh, rsh, hr = self.gemmlowp_stage(ep, za * colsum, gin, w, where)
                fields |= {"x2": hr, "x7": S.CONV_REQUANT}
        params = [packed, c, m0, lsh, rsh]
        work = hwc[0] * hwc[1] * n_out * k
        self.plan.steps.append(StepSpec(S.CONV, [src], out, fields, params, scratch, work))
        if ep.grid is None:
            self.dequant(out, n_out)

    @staticmethod
    def exact_stage(ep: Any, zp_colsum: NDArray[np.int64], where: str) -> tuple[NDArray, ...]:
        """Single-rounding stage: (c, m0, shift, int64 bias) of the integer program's exact
        epilogue ``Z + round_half_even((acc m0 + bias_q) 2^-shift)``."""
        m0, shift = ep.m0.astype(np.int64), ep.shift.astype(np.int64)
        if m0.min(initial=0) < 0 or m0.max(initial=0) > INT32_MAX or shift.min(initial=1) < 1:
            raise Unsupported(f"{where}: multiplier outside the C stage's range")
        if shift.max(initial=1) > 62:
            raise Unsupported(f"{where}: shift beyond 62 bits")
        c = _wrap32(-zp_colsum)
        bias = np.ascontiguousarray(ep.bias_q, np.int64)
        return c, m0.astype(np.int32), shift.astype(np.int32), bias

    @staticmethod
    def gemmlowp_stage(
        ep: Any, zp_colsum: NDArray[np.int64], gin: Grid, w: NDArray[np.int64], where: str
    ) -> tuple[Any, ...]:
        """gemmlowp stage with headroom: (c, m0, left shift, right shift, headroom), ``c``
        folding the bias and the zero-point correction into one wrapping int32 add."""
        hr = int(ep.headroom)
        centred = max(gin.zero_point - gin.qmin, gin.qmax - gin.zero_point)
        acc_bound = int(np.abs(w).sum(axis=1).max(initial=0)) * centred
        if acc_bound * 2**hr + int(np.abs(ep.bias_q).max(initial=0)) > INT32_MAX:
            raise Unsupported(f"{where}: accumulator with headroom may overflow int32")
        c = _wrap32(ep.bias_q.astype(np.int64) - zp_colsum * 2**hr)
        shift = ep.shift.astype(np.int64)
        dead = shift > 31  # every SRDHM result (never INT32_MIN) then rounds to 0
        m0 = np.where(dead, 0, ep.m0).astype(np.int32)
        rsh = np.where(dead, 0, np.maximum(shift, 0)).astype(np.int32)
        lsh = np.maximum(-shift, 0).astype(np.int32)
        return c, m0, lsh, rsh, hr

    def dequant(self, acc: str, n_out: int) -> None:
        t = self.plan.tensors[acc]
        name = self.tensor(f"{acc}#float", t.hwc, None, t.rank)
        scale = np.ascontiguousarray(self.program.output_scale, np.float64)
        bias = np.ascontiguousarray(self.program.output_bias, np.float64)
        if scale.size != n_out or bias.size != n_out:
            raise Unsupported("output scale / bias do not match the output layer")
        self.plan.steps.append(StepSpec(S.DEQUANT, [acc], name, {}, [scale, bias]))
        self.plan.output_name = name

    def fuse_clamps(self) -> None:
        """ReLU / clamp steps that are the only consumer of a layer or an add on their grid:
        their bounds go into the producer's output clamp."""
        producers = {}
        for s in self.program.steps:
            if type(s).__name__ == "_Layer":
                producers[s.name] = s.epilogue.grid
            elif self.nodes[s.name].op == "add":
                producers[s.name] = s.grid
        for step in self.program.steps:
            node = self.nodes.get(step.name)
            if node is None or node.op not in ("relu", "clamp"):
                continue
            (src_name,) = step.inputs
            g = step.grid
            if src_name not in producers or self.uses.get(src_name) != 1:
                continue
            if producers[src_name] != g or step.srcs[0] != g or step.grid_in != g:
                continue
            lo, hi = (int(v) for v in step.fn(np.array([g.qmin, g.qmax], np.int64)))
            self.fused_clamp[src_name] = (lo, hi)
            self.plan.alias[step.name] = src_name

    # -- other ops ---------------------------------------------------------------------------
    def op(self, step: Any) -> None:
        node = self.nodes[step.name]
        if step.name in self.plan.alias:
            return  # fused into the layer before it
        if node.op == "add":
            self.add(step)
            return
        gin, g = step.grid_in, step.grid
        pairs = zip(step.inputs, step.srcs, strict=True)
        ins = [self.on_grid(i, src, gin, step.name) for i, src in pairs]
        t = self.plan.tensors[ins[0]]
        where = f"node {node.name!r} ({node.op})"
        fields: dict[str, int] = {}
        if node.op in ("relu", "clamp"):
            lo, hi = (int(v) for v in step.fn(np.array([gin.qmin, gin.qmax], np.int64)))
            op, hwc, rank = S.RESCALE, t.hwc, t.rank
            fields = _r_fields(S.clamp_fields(gin, t.offset, lo, hi))
        elif node.op in ("maxpool2d", "avgpool2d", "global_avgpool2d"):
            op, hwc, rank, fields = self.pool(node, t, gin)
        elif node.op == "flatten":
            if int(node.attrs.get("start_dim", 1)) != 1:
                raise Unsupported(f"{where}: start_dim other than 1")
            h, w, c = t.hwc
            if t.rank == 2 or h == w == 1:
                self.plan.alias[step.name] = ins[0]
                self.plan.tensors[ins[0]] = Tensor(t.hwc, t.dtype, t.offset, t.grid, 2)
                return
            op, hwc, rank = S.FLATTEN, (1, 1, h * w * c), 2
        elif node.op == "slice":
            op, hwc, rank, fields = self.slice(node, t, where)
        elif node.op == "pad":
            op, hwc, rank, fields = self.pad(node, t, gin, where)
        else:
            raise Unsupported(f"{where}: op not supported by the fused engine")
        out = self.tensor(step.name if gin == g else f"{step.name}@in", hwc, gin, rank)
        self.plan.steps.append(StepSpec(op, ins, out, fields))
        if gin != g:
            self.plan.alias[step.name] = self.on_grid(out, gin, g, step.name)

    def add(self, step: Any) -> None:
        """One ADD step: both operands rescaled to the common grid, summed, clipped, rescaled
        to the output grid (with a fused ReLU's bounds)."""
        gin, g = step.grid_in, step.grid
        a, b = (self.plan.name(i) for i in step.inputs)
        ta, tb = self.plan.tensors[a], self.plan.tensors[b]
        if ta.hwc != tb.hwc:
            raise Unsupported(f"node {step.name!r} (add): operands of shapes {ta.hwc}, {tb.hwc}")
        out = self.tensor(step.name, ta.hwc, g, ta.rank)
        off = self.plan.tensors[out].offset
        r = S.rescale_fields(gin, 0, g, off)
        lo, hi = self.fused_clamp.get(step.name, (g.qmin, g.qmax))
        r[6], r[7] = lo + off, hi + off
        q = S.rescale_fields(step.srcs[0], ta.offset, gin, 0)
        u = S.rescale_fields(step.srcs[1], tb.offset, gin, 0)
        fields = {"x0": gin.zero_point, "x1": gin.qmin, "x2": gin.qmax}
        fields |= _r_fields(r) | _r_fields(q, "q") | _r_fields(u, "u")
        self.plan.steps.append(StepSpec(S.ADD, [a, b], out, fields))

    def pool(self, node: Node, t: Tensor, g: Grid) -> tuple[int, tuple[int, int, int], int, dict]:
        h, w, c = t.hwc
        if node.op == "global_avgpool2d":
            (kh, kw), (sh, sw), (ph, pw) = (h, w), (1, 1), (0, 0)
        else:
            kh, kw = _pair(node, "kernel_size", 1)
            sh, sw = _pair(node, "stride", 0)
            sh, sw = (kh, kw) if (sh, sw) == (0, 0) else (sh, sw)
            ph, pw = _pair(node, "padding", 0)
        hwc = ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1, c)
        fields = dict(kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw)
        if node.op == "maxpool2d":
            return S.MAXPOOL, hwc, 4, fields
        z = g.zero_point + t.offset
        include = node.attrs.get("count_include_pad") is not False
        fields |= {
            "x0": z,
            "x1": int(include),
            "x2": z,
            "x3": g.qmin + t.offset,
            "x4": g.qmax + t.offset,
        }
        return S.AVGPOOL, hwc, 4, fields

    def slice(
        self, node: Node, t: Tensor, where: str
    ) -> tuple[int, tuple[int, int, int], int, dict]:
        a = node.attrs
        dims = (0, 3, 1, 2) if t.rank == 4 else (0, 3)  # graph dim -> (batch, h, w, c) slot
        sizes = [None, *t.hwc]
        start, step_, size = [0, 0, 0, 0], [1, 1, 1, 1], [None, *t.hwc]
        for d, (lo, hi, st) in enumerate(zip(a["starts"], a["stops"], a["steps"], strict=True)):
            slot = dims[d]
            if slot == 0:
                if (lo, hi, st) not in ((None, None, None), (0, None, 1), (None, None, 1)):
                    raise Unsupported(f"{where}: slicing the batch dimension")
                continue
            r = range(sizes[slot])[slice(lo, hi, st)]
            if r.step < 1:
                raise Unsupported(f"{where}: negative slice step")
            start[slot], step_[slot], size[slot] = r.start, r.step, len(r)
        fields = {"x1": start[1], "x2": start[2], "x3": start[3],
                  "x5": step_[1], "x6": step_[2], "x7": step_[3]}  # fmt: skip
        return S.SLICE, (size[1], size[2], size[3]), t.rank, fields

    def pad(
        self, node: Node, t: Tensor, g: Grid, where: str
    ) -> tuple[int, tuple[int, int, int], int, dict]:
        pads = [tuple(int(v) for v in p) for p in node.attrs["pads"]]
        if t.rank == 2:
            pads = [pads[0], (0, 0), (0, 0), pads[1]]
        else:
            pads = [pads[0], pads[2], pads[3], pads[1]]
        if pads[0] != (0, 0) or any(v < 0 for p in pads for v in p):
            raise Unsupported(f"{where}: padding the batch dimension or negative padding")
        hwc = tuple(d + lo + hi for d, (lo, hi) in zip(t.hwc, pads[1:], strict=True))
        fields = {
            "x0": pads[1][0],
            "x2": pads[2][0],
            "x4": pads[3][0],
            "x6": g.zero_point + t.offset,
        }
        return S.PAD, hwc, t.rank, fields


def _r_fields(r: list[int], prefix: str = "r") -> dict[str, int]:
    return {f"{prefix}{i}": v for i, v in enumerate(r)}


def build_plan(program: IntegerProgram, isa: int, ext: Any) -> Plan:
    """The fused plan of ``program`` with weights packed for ISA number ``isa``."""
    b = _Builder(program, isa, ext)
    b.fuse_clamps()
    b.input()
    for step in program.steps:
        if type(step).__name__ == "_Layer":
            b.layer(step)
        else:
            b.op(step)
    _merge_add_rescales(b.plan)
    return b.plan


def _merge_add_rescales(plan: Plan) -> None:
    """A RESCALE of an ADD's output becomes that ADD's second output (one pass instead of two:
    the wide sum a later add reads, and its 8-bit copy the next layer reads)."""
    producer = {s.out: s for s in plan.steps if s.op == S.ADD}
    kept = []
    for step in plan.steps:
        add = producer.get(step.ins[0]) if step.op == S.RESCALE else None
        if add is None or add.out2 is not None:
            kept.append(step)
            continue
        add.out2 = step.out
        add.fields |= {f"v{i}": step.fields[f"r{i}"] for i in range(8)}
    plan.steps = kept
