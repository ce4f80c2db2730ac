"""ONNX export: the inference :class:`~lowbit.contract.Graph` written as an ONNX QDQ graph.

``.lowbit`` and ONNX are two serialisers of one graph (:func:`~lowbit.export.build_graph`), so
both accept the same models. :func:`graph_to_onnx` writes the graph with ``onnx.helper`` (no
TorchScript/dynamo exporter), reading scales, zero points and bit widths from the typed specs
(:class:`~lowbit.contract.CodeSpec`, :class:`~lowbit.contract.InputQuant`), never a method name:

Weights
    ``uniform``/``affine`` codes with an integer zero point are integer initialisers feeding
    ``DequantizeLinear`` (per-channel ``axis`` when the scale is per channel), which yields
    exactly the fake-quant weight ``S (c - Z)``. Codes that fit 4 bits use the ``INT4``/``UINT4``
    types of opset 21; with ``opset < 21`` they are held in ``INT8``/``UINT8`` containers (same
    values). Any other spec (binary, ternary, power-of-two, a fractional zero point such as
    DoReFa's ``(2^k - 1) / 2``) is stored as its dequantised float32 constant -- the exact
    fake-quant weight; its packed codes go in the ``.lowbit`` file. Float weights (BatchNorm
    folded in where the graph folded it) are float32 constants; other BatchNorms are ``Mul`` and
    ``Add`` by the graph's per-channel scale and shift.

Input quantisers
    * :class:`~lowbit.contract.StaticQuant` -- ``QuantizeLinear -> DequantizeLinear`` with the
      spec's scale and zero point, always in an ``INT8``/``UINT8`` container: onnxruntime 1.31
      accepts 4-bit QDQ on constant weights, but its QDQ graph rewrites (propagation through
      ``MaxPool``, ``QLinearConv`` fusion) reject 4-bit activation tensors. A grid narrower than
      8 bits is clipped to its real range ``[S (qmin - Z), S (qmax - Z)]`` first, which is
      equivalent because rounding commutes with clipping;
    * :class:`~lowbit.contract.SignQuant` -- ``Where(x >= 0, 1, -1)`` (``sign(0) = +1``; ONNX
      ``Sign`` gives 0 there);
    * :class:`~lowbit.contract.SignMeanAbsQuant` -- ``ReduceMean(Abs(x))`` over the channel dim
      (or all non-batch dims) times that ``Where``;
    * :class:`~lowbit.contract.DynamicMaxAbsQuant` -- a dynamic QDQ with scale
      ``max(ReduceMax(Abs(x)) / qmax, tiny)``.

Every graph node's output is the ONNX value of the same name (the graph input is ``input``, the
result also ``output``), so the two files can be compared node for node. Initialisers and
helper ops are named after the module a node came from (``meta["modules"]``). The input
normalisation (``preprocess``: ``scale``, ``mean``, ``std``; raw pixels ``p`` become
``(p * scale - mean) / std`` per channel) is stored in ``metadata_props`` under
``lowbit.preprocess`` (JSON), beside ``lowbit.num_classes``.

Agreement with the torch model: ``QuantizeLinear`` divides by the scale where the torch
quantisers multiply by its float32 reciprocal, and ORT's convolutions sum in another order, so a
value within a few ulps of a rounding boundary can land one code apart (int8 weights that could
saturate ORT's AVX2 u8s8 kernels are stored as uint8, see :mod:`lowbit.export.ort_saturation`);
see :func:`onnx_agreement` and ``tests/test_onnx_export.py`` for measured differences.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from ..contract import (
    CodeSpec,
    DynamicMaxAbsQuant,
    Graph,
    InputQuant,
    Node,
    SignMeanAbsQuant,
    SignQuant,
    StaticQuant,
)
from ..runtime.onnx_model import PREPROCESS_KEY
from ..runtime.shapes import infer_shapes
from .files import write_atomic
from .graph_builder import build_graph
from .ort_saturation import avoid_u8s8_saturation

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "PREPROCESS_KEY",
    "export_onnx",
    "export_onnx_run",
    "graph_to_onnx",
    "onnx_agreement",
    "write_onnx",
]

DEFAULT_OPSET = 21
"""Opset 21 is the first with 4-bit integer types for QuantizeLinear/DequantizeLinear."""
MIN_OPSET = 18  # reductions take their axes as an input; Pad takes axes
INT4_OPSET = 21
INPUT, OUTPUT = "input", "output"

# (ONNX type, lowest, highest, 4-bit): the containers integer codes may be stored in
_CONTAINERS = (
    (TensorProto.INT4, -8, 7, True),
    (TensorProto.UINT4, 0, 15, True),
    (TensorProto.INT8, -128, 127, False),
    (TensorProto.UINT8, 0, 255, False),
)


def _container(lo: int, hi: int, four_bit: bool) -> tuple[int, int, int]:
    """The smallest ONNX integer type holding ``[lo, hi]``: ``(type, type_min, type_max)``.

    The 4-bit types only when ``four_bit`` (weights at opset 21 or later).
    """
    for kind, tmin, tmax, is_four_bit in _CONTAINERS:
        if (four_bit or not is_four_bit) and tmin <= lo and hi <= tmax:
            return kind, tmin, tmax
    raise ValueError(f"integer codes in [{lo}, {hi}] do not fit an 8-bit ONNX type")


class _Onnx:
    """Accumulates ONNX nodes and initialisers with unique names."""

    def __init__(self, opset: int, reserved: Sequence[str]) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: set[str] = set(reserved)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def const(self, base: str, value: Any, dtype: Any = np.float32) -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def int_const(self, base: str, values: np.ndarray, kind: int) -> str:
        """An initialiser of integer ``values`` in ONNX type ``kind`` (4-bit types packed)."""
        name = self.fresh(base)
        flat = [int(v) for v in np.asarray(values).reshape(-1)]
        self.inits.append(helper.make_tensor(name, kind, list(np.shape(values)), flat))
        return name

    def op(
        self, op_type: str, inputs: Sequence[str], base: str, out: str | None = None, **attrs: Any
    ) -> str:
        """Append an op; its output is ``out`` (a reserved graph value name) or a fresh name."""
        name = self.fresh(base) if out is None else out
        self.nodes.append(
            helper.make_node(
                op_type,
                list(inputs),
                [name],
                name=self.fresh(base) if out is not None else name,
                **attrs,
            )
        )
        return name


# ----------------------------------------------------------------------------- quantisers


def _qdq(
    g: _Onnx,
    x: str,
    scale: str,
    zero_point: int,
    lo: int,
    hi: int,
    base: str,
    static_scale: float | None,
) -> str:
    """``DequantizeLinear(QuantizeLinear(x))`` on the grid ``[lo, hi]`` (per tensor).

    A grid narrower than its container is clipped first (to ``S (lo - Z)``, ``S (hi - Z)``),
    which needs the scale as a number (``static_scale``).
    """
    kind, tmin, tmax = _container(min(lo, zero_point), max(hi, zero_point), four_bit=False)
    zp = g.int_const(f"{base}.zero_point", np.asarray(zero_point), kind)
    if (lo, hi) != (tmin, tmax) and static_scale is not None:
        bounds = [np.float32(static_scale) * np.float32(v - zero_point) for v in (lo, hi)]
        x = g.op(
            "Clip",
            [x, g.const(f"{base}.lo", bounds[0]), g.const(f"{base}.hi", bounds[1])],
            f"{base}.clip",
        )
    q = g.op("QuantizeLinear", [x, scale, zp], f"{base}.q")
    return g.op("DequantizeLinear", [q, scale, zp], f"{base}.dq")


def _sign(g: _Onnx, x: str, base: str) -> str:
    """``+1`` where ``x >= 0`` else ``-1`` (BNN's sign with ``sign(0) = +1``)."""
    ge = g.op("GreaterOrEqual", [x, g.const(f"{base}.zero", 0.0)], f"{base}.ge")
    one, minus = g.const(f"{base}.one", 1.0), g.const(f"{base}.minus_one", -1.0)
    return g.op("Where", [ge, one, minus], f"{base}.sign")


def _input_quant(g: _Onnx, iq: InputQuant, x: str, rank: int, base: str) -> str:
    """The ONNX ops of a layer's input quantiser applied to ``x`` (of rank ``rank``)."""
    if isinstance(iq, StaticQuant):
        zp = iq.spec.integer_zero_point()
        if zp is None:
            raise ValueError(f"{base}: a static input quantiser needs an integer zero point")
        s = float(iq.scale)
        scale = g.const(f"{base}.scale", np.float32(s))
        return _qdq(g, x, scale, int(zp.reshape(())), iq.spec.qmin, iq.spec.qmax, base, s)
    if isinstance(iq, SignQuant):
        return _sign(g, x, base)
    if isinstance(iq, SignMeanAbsQuant):
        axes = list(range(1, rank)) if iq.per_sample else [1]
        mag = g.op("Abs", [x], f"{base}.abs")
        beta = g.op(
            "ReduceMean", [mag, g.const(f"{base}.axes", axes, np.int64)], f"{base}.beta", keepdims=1
        )
        return g.op("Mul", [beta, _sign(g, x, base)], f"{base}.out")
    if isinstance(iq, DynamicMaxAbsQuant):
        if iq.qmax > 127:
            raise ValueError(f"{base}: a dynamic grid of qmax {iq.qmax} does not fit int8")
        amax = g.op("ReduceMax", [g.op("Abs", [x], f"{base}.abs")], f"{base}.amax", keepdims=0)
        ratio = g.op("Div", [amax, g.const(f"{base}.qp", float(iq.qmax))], f"{base}.ratio")
        tiny = g.const(f"{base}.tiny", np.finfo(np.float32).tiny)
        scale = g.op("Max", [ratio, tiny], f"{base}.scale")
        # |x| / scale <= qmax: the int8 container never saturates, no clip needed
        return _qdq(g, x, scale, 0, -128, 127, base, None)
    raise ValueError(f"{base}: no ONNX form for input quantiser {type(iq).__name__}")


def _weight(g: _Onnx, node: Node, base: str) -> str:
    """The weight as the layer uses it: DQ of integer codes, or a float constant."""
    spec: CodeSpec | None = node.weight_spec
    if spec is None:
        return g.const(f"{base}.weight", node.weight_float)
    zp = spec.integer_zero_point() if spec.uniform_grid else None
    if zp is None:
        return g.const(f"{base}.weight", spec.dequantize(node.weight_codes))  # type: ignore[arg-type]
    lo, hi = min(spec.qmin, int(zp.min())), max(spec.qmax, int(zp.max()))
    kind, _, _ = _container(lo, hi, four_bit=g.opset >= INT4_OPSET)
    inputs = [
        g.int_const(f"{base}.weight_codes", np.asarray(node.weight_codes), kind),
        g.const(f"{base}.weight_scale", spec.scale),
        g.int_const(f"{base}.weight_zero_point", zp, kind),
    ]
    axis = {"axis": spec.axis} if spec.per_channel else {}
    return g.op("DequantizeLinear", inputs, f"{base}.weight", **axis)


# ----------------------------------------------------------------------------- nodes


def _layer(g: _Onnx, node: Node, x: str, rank: int, base: str) -> str:
    if node.input_quant is not None:
        x = _input_quant(g, node.input_quant, x, rank, f"{base}.input_quant")
    inputs = [x, _weight(g, node, base)]
    if node.bias is not None:
        inputs.append(g.const(f"{base}.bias", node.bias))
    if node.op == "linear":
        return g.op("Gemm", inputs, base, node.name, transB=1)
    a = node.attrs
    pads = _pair(a.get("padding", 0))
    return g.op(
        "Conv",
        inputs,
        base,
        node.name,
        kernel_shape=list(node.weight_shape[2:]),
        strides=_pair(a.get("stride", 1)),
        pads=[*pads, *pads],
        dilations=_pair(a.get("dilation", 1)),
        group=int(a.get("groups", 1)),
    )


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, (int, np.integer)) else [int(e) for e in v]


def _pool_attrs(node: Node) -> dict[str, Any]:
    kernel = _pair(node.attrs["kernel_size"])
    stride = kernel if node.attrs.get("stride") is None else _pair(node.attrs["stride"])
    pads = _pair(node.attrs.get("padding", 0))
    return {"kernel_shape": kernel, "strides": stride, "pads": [*pads, *pads]}


def _node(g: _Onnx, node: Node, ins: list[str], rank: int, base: str) -> str:
    """The ONNX ops of one graph node; the last one writes the value ``node.name``."""
    op, out, x = node.op, node.name, ins[0] if ins else ""
    if op in ("conv2d", "linear"):
        return _layer(g, node, x, rank, base)
    if op == "relu":
        return g.op("Relu", [x], base, out)
    if op == "clamp":
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
        bounds = [
            "" if v is None else g.const(f"{base}.{k}", float(v))
            for k, v in (("lo", lo), ("hi", hi))
        ]
        return g.op("Clip", [x, *bounds], base, out)
    if op == "batchnorm":
        view = [-1] + [1] * (rank - 2)
        scale = g.const(f"{base}.scale", np.reshape(node.params["scale"], view))
        shift = g.const(f"{base}.shift", np.reshape(node.params["shift"], view))
        return g.op("Add", [g.op("Mul", [x, scale], f"{base}.mul"), shift], base, out)
    if op == "maxpool2d":
        return g.op("MaxPool", [x], base, out, **_pool_attrs(node))
    if op == "avgpool2d":
        return g.op("AveragePool", [x], base, out, count_include_pad=1, **_pool_attrs(node))
    if op == "global_avgpool2d":
        return g.op("GlobalAveragePool", [x], base, out)
    if op == "flatten":
        start = int(node.attrs.get("start_dim", 1))
        if start == 1:
            return g.op("Flatten", [x], base, out, axis=1)
        shape = g.const(f"{base}.shape", [0] * start + [-1], np.int64)
        return g.op("Reshape", [x, shape], base, out)
    if op == "add":
        return g.op("Add", ins, base, out)
    if op == "slice":
        big = np.iinfo(np.int64).max
        a = node.attrs
        parts = [
            g.const(f"{base}.{k}", v, np.int64)
            for k, v in (
                ("starts", [s or 0 for s in a["starts"]]),
                ("ends", [big if s is None else s for s in a["stops"]]),
                ("axes", list(range(len(a["starts"])))),
                ("steps", [s or 1 for s in a["steps"]]),
            )
        ]
        return g.op("Slice", [x, *parts], base, out)
    if op == "pad":
        begins = [int(p[0]) for p in node.attrs["pads"]]
        ends = [int(p[1]) for p in node.attrs["pads"]]
        pads = g.const(f"{base}.pads", [*begins, *ends], np.int64)
        value = g.const(f"{base}.value", 0.0)
        return g.op("Pad", [x, pads, value], base, out, mode="constant")
    raise ValueError(f"node {node.name!r}: no ONNX form for op {op!r}")  # pragma: no cover


def graph_to_onnx(graph: Graph, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The ONNX model of ``graph`` (validated; checked with ``onnx.checker``, full check).

    ``opset`` in ``[18, onnx's newest]`` (21 or later for 4-bit weight types). The input has a
    dynamic batch dimension; ``graph.meta["preprocess"]`` goes to ``metadata_props``.

    8-bit weights of a layer whose uint8 activations times int8 weights could saturate int16 in
    ONNX Runtime's u8s8 kernels on x86 CPUs without VNNI are stored as uint8 (codes + 128, zero
    point + 128: the same real weights), which ORT runs with its exact u8u8 kernels; see
    :mod:`lowbit.export.ort_saturation` (a layer that cannot take that form falls back to float
    weights with a warning naming it).
    """
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an integer in [{MIN_OPSET}, {newest}], got {opset!r}")
    graph.validate()
    shapes = infer_shapes(graph)
    g = _Onnx(opset, [INPUT, OUTPUT, *(n.name for n in graph.nodes)])
    names = {graph.inputs[0]: INPUT}
    modules = graph.meta.get("modules", {})
    for node in graph.nodes:
        ins = [names[i] for i in node.inputs]
        rank = len(shapes[node.inputs[0]])
        base = str(modules.get(node.name, node.name))
        names[node.name] = _node(g, node, ins, rank, base)
    out = g.op("Identity", [names[graph.outputs[0]]], OUTPUT, OUTPUT)
    dims = lambda s: ["batch", *s[1:]]  # noqa: E731
    x_info = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, dims(graph.input_shape))
    y_info = helper.make_tensor_value_info(out, TensorProto.FLOAT, dims(shapes[graph.outputs[0]]))
    body = helper.make_graph(g.nodes, "lowbit", [x_info], [y_info], initializer=g.inits)
    for message in avoid_u8s8_saturation(body):  # exact in ORT on AVX2-only CPUs too
        warnings.warn(message, stacklevel=2)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(body, opset_imports=opsets, producer_name="lowbit")
    proto.ir_version = helper.find_min_ir_version_for(opsets)
    props = {"lowbit.num_classes": str(shapes[graph.outputs[0]][-1])}
    if graph.meta.get("preprocess") is not None:
        props[PREPROCESS_KEY] = json.dumps(graph.meta["preprocess"], sort_keys=True)
    helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def write_onnx(
    graph: Graph, path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET
) -> onnx.ModelProto:
    """Write ``graph`` as an ONNX file at ``path`` (atomically, creating missing folders, with
    normal permissions; a one-line ExportError when the disk refuses). Returns the model."""
    proto = graph_to_onnx(graph, opset=opset)
    write_atomic(path, proto.SerializeToString())
    return proto


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    preprocess: dict[str, Any] | None = None,
) -> onnx.ModelProto:
    """Write ``model`` (quantised by :func:`lowbit.quantize`, or float) as an ONNX QDQ graph.

    The graph is the one :func:`~lowbit.export.build_graph` makes for ``.lowbit`` files.
    ``example_input`` is a float batch ``(N, C, H, W)`` or ``(N, F)``; the exported input has a
    dynamic batch dimension. The model is exported in evaluation mode (its training flag is
    restored afterwards); ``preprocess`` (``{"scale", "mean", "std"}``) is recorded in
    ``metadata_props``. Raises ValueError naming the node for parts with no exportable form.
    """
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise ValueError(
            f"example_input must be a batch tensor (N, ...), got {type(example_input).__name__}"
        )
    graph = build_graph(model, example_input)
    if preprocess is not None:
        graph.meta["preprocess"] = dict(preprocess)
    return write_onnx(graph, path, opset=opset)


def onnx_agreement(
    model: nn.Module,
    path: str | os.PathLike[str],
    inputs: Tensor,
    *,
    graph_optimization: bool = True,
) -> dict[str, float]:
    """Compare the ONNX file at ``path`` (run by onnxruntime, CPU) with ``model`` in eval mode.

    Returns ``max_abs_diff`` (largest absolute output difference) and ``top1_agreement``
    (share of rows of ``inputs`` whose argmax over dim 1 agrees). ``graph_optimization=False``
    turns onnxruntime's graph rewrites off (``ORT_DISABLE_ALL``), so the graph runs op by op;
    with them on (the default, as deployed) constant-folded weights and QDQ propagation change
    the float summation order, which moves values lying within a few ulps of a rounding
    boundary to the neighbouring code.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not graph_optimization:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = inputs.detach().float().cpu()
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            expected = model(x).detach().cpu().numpy()
    finally:
        for m, training in flags.items():
            m.train(training)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    top1 = float(np.mean(got.argmax(axis=1) == expected.argmax(axis=1)))
    return {"max_abs_diff": float(np.abs(got - expected).max()), "top1_agreement": top1}


def export_onnx_run(
    run_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET
) -> Path:
    """Export a run folder's final model (``lowbit export RUN --format onnx -o model.onnx``),
    with the run's input normalisation in ``metadata_props``. Returns ``out_path``."""
    from .run import run_graph

    write_onnx(run_graph(run_dir), out_path, opset=opset)
    return Path(out_path)
