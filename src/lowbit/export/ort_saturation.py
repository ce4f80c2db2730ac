"""Keep ONNX Runtime's x86 int8 kernels exact: no int16 saturation of u8 x s8 products.

With its default graph optimisations ONNX Runtime (CPU) fuses ``DequantizeLinear -> Conv/Gemm/
MatMul (-> QuantizeLinear)`` into ``QLinearConv``/``QGemm``/``QLinearMatMul`` when the activation
is uint8 (on x86 ``QDQIsInt8Allowed()`` is false, so int8 activations are not fused). Those run
MLAS's QGEMM, and with int8 weights its dispatch ``GemmU8S8Dispatch`` is
``MlasGemmU8S8DispatchAvx2`` on AVX2 and AVX-512 machines without VNNI: the kernels
``MlasGemmU8S8KernelAvx2`` / ``...Avx512Core`` multiply with ``vpmaddubsw``, which adds two
adjacent ``u8 * s8`` products into a *saturating* int16. With full-range activations (codes up to
255) and weights (codes beyond +-64) a pair exceeds 32767 and the result is silently wrong. VNNI
(``vpdpbusds``) and AMX accumulate in int32 and are exact, which is why the error only shows on
some x86 CPUs (``MlasPlatformU8S8Overflow()`` in ``mlas/lib/platform.cpp`` is exactly the test
``GemmU8U8Dispatch != GemmU8S8Dispatch``).

uint8 weights take ``GemmU8U8Dispatch`` instead: ``MlasGemmU8U8KernelAvx2`` widens both operands
to int16 (``vpmovzxbw``) and multiplies with ``vpmaddwd`` into int32, which is exact; on VNNI/AMX
machines uint8 weights are routed to the u8s8 kernels with the sign bit flipped, also exact.
``QLinearConv`` accepts uint8 weights as long as every output channel has the same zero point.

:func:`avoid_u8s8_saturation` therefore rewrites each layer of an exported graph whose worst-case
pair of products could leave int16: its int8 weight codes ``c`` with zero point ``Z`` become
uint8 ``c + 128`` with zero point ``Z + 128`` (the same real weights ``S (c - Z)``); a layer with
per-channel zero points that differ (``QLinearConv`` refuses those) gets its weights as exact float
constants instead, with a warning naming it. :func:`saturation_risks` lists the layers at risk in
any ONNX graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = ["PAIR_MAX", "PAIR_MIN", "Risk", "avoid_u8s8_saturation", "saturation_risks"]

PAIR_MAX, PAIR_MIN = 32767, -32768  # the int16 that vpmaddubsw saturates a pair of products to
WEIGHTED = ("Conv", "Gemm", "MatMul")
# ops between a QDQ pair and a layer that ORT's QDQ propagation moves the pair across (the codes'
# range is unchanged); weights may reach a MatMul through a Transpose
PASS_THROUGH = (
    "MaxPool",
    "Relu",
    "Flatten",
    "Reshape",
    "Transpose",
    "Identity",
    "Squeeze",
    "Unsqueeze",
)


@dataclass(frozen=True)
class Risk:
    """A layer whose u8 x s8 pairs can leave int16: its largest activation code (as uint8) and
    the range of its int8 weight codes."""

    layer: str
    act_max: int
    w_min: int
    w_max: int

    def message(self) -> str:
        return (
            f"layer {self.layer!r}: uint8 activation codes up to {self.act_max} times int8 "
            f"weight codes in [{self.w_min}, {self.w_max}] can exceed int16 "
            f"({2 * self.act_max * max(self.w_max, -self.w_min)} > {PAIR_MAX}) in ONNX Runtime's "
            "u8s8 kernels on x86 CPUs without VNNI (vpmaddubsw saturates)"
        )


class _View:
    """Producers and initialisers of a graph, by tensor name."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer = {out: n for n in graph.node for out in n.output}
        self.inits = {t.name: t for t in graph.initializer}

    def source(self, name: str) -> onnx.NodeProto | None:
        """The first producer of ``name`` above pass-through ops, or None (a graph input)."""
        node = self.producer.get(name)
        while node is not None and node.op_type in PASS_THROUGH:
            node = self.producer.get(node.input[0])
        return node

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def act_max(self, name: str) -> int | None:
        """Largest uint8 code ORT's kernels can see for the layer input ``name``, or None.

        An int8 tensor counts as shifted by 128 (ORT converts int8 activations to uint8 when it
        has no s8s8 kernel). A ``Clip`` right before the ``QuantizeLinear`` bounds the codes.
        """
        dq = self.source(name)
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            return None
        zp_t = self.inits.get(dq.input[2])
        if zp_t is None or zp_t.data_type not in (TensorProto.UINT8, TensorProto.INT8):
            return None
        signed = zp_t.data_type == TensorProto.INT8
        hi = 127 if signed else 255
        q = self.producer.get(dq.input[0])
        clip = None if q is None or q.op_type != "QuantizeLinear" else self.producer.get(q.input[0])
        scale, zp = self.const(dq.input[1]), self.const(dq.input[2])
        bound = None
        if clip is not None and clip.op_type == "Clip" and len(clip.input) == 3:
            bound = self.const(clip.input[2])
        if bound is not None and scale is not None and scale.size == 1:
            code = np.rint(np.float64(bound) / np.float64(scale.reshape(()))) + int(zp.reshape(()))
            hi = int(np.clip(code, -128 if signed else 0, hi))
        return hi + 128 if signed else hi

    def int8_weight(self, name: str) -> onnx.NodeProto | None:
        """The ``DequantizeLinear`` of int8 initialiser codes that feeds weight ``name``."""
        dq = self.source(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        codes = self.inits.get(dq.input[0])
        return dq if codes is not None and codes.data_type == TensorProto.INT8 else None


def _risks(view: _View) -> list[tuple[Risk, onnx.NodeProto]]:
    found = []
    for node in view.graph.node:
        if node.op_type not in WEIGHTED or len(node.input) < 2:
            continue
        act_max = view.act_max(node.input[0])
        dq = view.int8_weight(node.input[1])
        if act_max is None or dq is None:
            continue
        codes = view.const(dq.input[0]).astype(np.int64)
        w_min, w_max = int(codes.min(initial=0)), int(codes.max(initial=0))
        if 2 * act_max * w_max > PAIR_MAX or 2 * act_max * w_min < PAIR_MIN:
            found.append((Risk(node.name, act_max, w_min, w_max), dq))
    return found


def saturation_risks(graph: onnx.GraphProto) -> list[Risk]:
    """Layers of ``graph`` whose u8 x s8 products could saturate int16 in ORT on AVX2 CPUs."""
    return [risk for risk, _ in _risks(_View(graph))]


def _replace(view: _View, name: str, array: np.ndarray) -> None:
    old = view.inits[name]
    new = numpy_helper.from_array(array, name)
    old.CopyFrom(new)


def avoid_u8s8_saturation(graph: onnx.GraphProto) -> list[str]:
    """Rewrite the layers of ``graph`` at risk (in place); returns one warning per float fallback.

    uint8 weights (``c + 128``, zero point ``Z + 128``) when the zero points of the layer are one
    value; otherwise the weight's ``DequantizeLinear`` becomes its exact float32 value. Afterwards
    :func:`saturation_risks` is empty.
    """
    view = _View(graph)
    warnings = []
    done: set[str] = set()  # a weight read by several layers is rewritten once
    for risk, dq in _risks(view):
        if dq.output[0] in done:
            continue
        done.add(dq.output[0])
        codes = view.const(dq.input[0]).astype(np.int64)
        if len(dq.input) < 3:  # no zero point: 0, given explicitly to become 128
            name = f"{dq.input[0]}.zero_point"
            graph.initializer.append(numpy_helper.from_array(np.int8(0), name))
            view.inits[name] = graph.initializer[-1]
            dq.input.append(name)
        zp = view.const(dq.input[2]).astype(np.int64)
        if np.unique(zp).size == 1:
            _replace(view, dq.input[0], (codes + 128).astype(np.uint8))
            _replace(view, dq.input[2], (zp + 128).astype(np.uint8))
            continue
        scale = view.const(dq.input[1]).astype(np.float32)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * codes.ndim
        if scale.size > 1:
            shape[axis % codes.ndim] = -1
        value = scale.reshape(shape) * (codes - zp.reshape(shape)).astype(np.float32)
        graph.node.remove(dq)
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), dq.output[0]))
        warnings.append(
            f"{risk.message()}; its per-channel zero points differ, so its weights "
            "are exported as float32 (exact, 4x larger, no int8 kernel)"
        )
    return warnings
