"""ONNX export of quantised models: QDQ for uniform grids, exact float constants otherwise.

:func:`export_onnx` traces the model with ``torch.fx`` (quantised layers, quantisers and
``torch.nn`` layers kept whole, user modules such as the ResNet option-A shortcut traced through),
runs it once in evaluation mode to record shapes, and writes the ONNX graph directly with
``onnx.helper`` (no TorchScript/dynamo exporter, no onnxscript). What the model computes in
evaluation mode is what the graph computes:

Weights
    ``uniform``/``affine`` codes with an integer zero point (affine int8, LSQ, stochastic
    rounding) are stored as integer initialisers feeding ``DequantizeLinear`` (per-channel
    ``axis=0`` when the scale is per output channel), which yields exactly the fake-quant weight
    ``S (c - Z)``. Codes that fit 4 bits use the ``INT4``/``UINT4`` types of opset 21; with
    ``opset < 21`` they are held in ``INT8``/``UINT8`` containers (same values). Binary, ternary,
    power-of-two and DoReFa weights (DoReFa's zero point ``(2^k - 1) / 2`` is not an integer)
    are stored as their dequantised float32 constants -- the exact fake-quant weights; their
    packed codes go in the ``.lowbit`` file written alongside by ``lowbit export``.
    ``ConvBnAct`` blocks export the folded weight and bias; BatchNorm elsewhere stays
    ``BatchNormalization``.

Activations (each layer's ``input_quant``, and standalone quantisers)
    * static uniform grids (affine/Jacob, LSQ, PACT, DoReFa) --
      ``QuantizeLinear -> DequantizeLinear`` with the quantiser's scale and zero point, always in
      an ``INT8``/``UINT8`` container: onnxruntime 1.31 accepts 4-bit QDQ on constant weights,
      but its QDQ graph rewrites (propagation through ``MaxPool``, ``QLinearConv`` fusion) reject
      4-bit activation tensors. A grid narrower than 8 bits is clipped to its real range
      ``[S (qmin - Z), S (qmax - Z)]`` before ``QuantizeLinear``, which is equivalent because
      rounding commutes with clipping;
    * BNN ``sign`` -- ``Where(x >= 0, 1, -1)`` (``sign(0) = +1``; ONNX ``Sign`` gives 0 there);
    * XNOR-Net -- ``ReduceMean(Abs(x))`` over the channel dim (or all non-batch dims) times that
      ``Where``;
    * stochastic rounding (evaluation: nearest on ``max|x| / QP``) -- a dynamic QDQ with scale
      ``max(ReduceMax(Abs(x)) / QP, tiny)``;
    * an affine activation quantiser that is still passing through (no range observed, or inside
      its ``quant_delay``) exports as nothing.

Agreement with the torch model: ``QuantizeLinear`` divides by the scale where the torch
quantisers multiply by its float32 reciprocal, and ORT's convolutions sum in another order, so a
value within a few ulps of a rounding boundary can land one code apart (int8 weights that could
saturate ORT's AVX2 u8s8 kernels are stored as uint8, see :mod:`lowbit.export.ort_saturation`); see
:func:`onnx_agreement` and ``tests/test_onnx_export.py`` for measured differences.
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..nn import ConvBnAct, QuantAct, QuantConv2d, QuantLinear, layer_weight_bias, weight_codes
from ..quant.base import Quantizer, QuantSpec
from .ort_saturation import avoid_u8s8_saturation

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "export_onnx", "export_onnx_run", "onnx_agreement"]

DEFAULT_OPSET = 21
"""Opset 21 is the first with 4-bit integer types for QuantizeLinear/DequantizeLinear."""
MIN_OPSET = 18  # reductions take their axes as an input; Pad takes axes
INT4_OPSET = 21
STATIC_ACTIVATIONS = ("affine", "lsq", "pact", "dorefa")

# (ONNX type, lowest, highest, 4-bit): the containers integer codes may be stored in
_CONTAINERS = (
    (TensorProto.INT4, -8, 7, True),
    (TensorProto.UINT4, 0, 15, True),
    (TensorProto.INT8, -128, 127, False),
    (TensorProto.UINT8, 0, 255, False),
)


class _Tracer(torch.fx.Tracer):
    """Keeps quantised layers and quantisers whole; traces through other user modules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        kept = (QuantConv2d, QuantLinear, ConvBnAct, QuantAct, Quantizer)
        return isinstance(m, kept) or super().is_leaf_module(m, module_qualified_name)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


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

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: set[str] = set()

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

    def op(self, op_type: str, inputs: Sequence[str], base: str, **attrs: Any) -> str:
        out = self.fresh(base)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out


# ----------------------------------------------------------------------------- QDQ


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
    if (lo, hi) != (tmin, tmax):
        if static_scale is None:
            raise ValueError(f"{base}: a dynamic scale needs a grid that fills its container")
        bounds = [np.float32(static_scale) * np.float32(v - zero_point) for v in (lo, hi)]
        x = g.op(
            "Clip",
            [x, g.const(f"{base}.lo", bounds[0]), g.const(f"{base}.hi", bounds[1])],
            f"{base}.clip",
        )
    q = g.op("QuantizeLinear", [x, scale, zp], f"{base}.q")
    return g.op("DequantizeLinear", [q, scale, zp], f"{base}.dq")


def _integral_zero_point(spec: QuantSpec) -> np.ndarray | None:
    """The spec's zero point as integers broadcast to the scale's shape, or None if fractional."""
    scale = _np(spec.scale)
    zp = np.zeros(scale.shape) if spec.zero_point is None else _np(spec.zero_point)
    zp = np.broadcast_to(zp.astype(np.float64), scale.shape)
    return zp.astype(np.int64) if np.all(zp == np.round(zp)) else None


def _weight(g: _Onnx, module: nn.Module, base: str) -> str:
    """The layer's weight as the forward pass uses it: DQ of integer codes, or a float constant."""
    weight, _ = layer_weight_bias(module)
    quant: Quantizer | None = getattr(module, "weight_quant", None)
    found = weight_codes(module)
    if found is not None:
        codes, spec = found
        zp = _integral_zero_point(spec)
        if spec.scheme in ("uniform", "affine") and zp is not None:
            lo, hi = min(spec.qmin, int(zp.min())), max(spec.qmax, int(zp.max()))
            kind, _, _ = _container(lo, hi, four_bit=g.opset >= INT4_OPSET)
            inputs = [
                g.int_const(f"{base}.weight_codes", _np(codes), kind),
                g.const(f"{base}.weight_scale", _np(spec.scale)),
                g.int_const(f"{base}.weight_zero_point", zp, kind),
            ]
            axis = {"axis": spec.axis} if spec.per_channel else {}
            return g.op("DequantizeLinear", inputs, f"{base}.weight", **axis)
    with torch.no_grad():
        value = weight if quant is None else quant(weight)
    return g.const(f"{base}.weight", _np(value))


def _sign(g: _Onnx, x: str, base: str) -> str:
    """``+1`` where ``x >= 0`` else ``-1`` (BNN's sign with ``sign(0) = +1``)."""
    ge = g.op("GreaterOrEqual", [x, g.const(f"{base}.zero", 0.0)], f"{base}.ge")
    one, minus = g.const(f"{base}.one", 1.0), g.const(f"{base}.minus_one", -1.0)
    return g.op("Where", [ge, one, minus], f"{base}.sign")


def _passing_through(quant: Quantizer) -> bool:
    """An affine activation quantiser without an observed range or inside its delay."""
    if quant.method != "affine" or quant.role != "activation":
        return False
    return bool(quant.steps < quant.quant_delay) or not bool(quant.initialized)


def _activation(g: _Onnx, quant: Quantizer, x: str, shape: Sequence[int], base: str) -> str:
    """The ONNX ops of an activation quantiser applied to ``x`` (of per-sample ``shape``)."""
    method = quant.method
    if _passing_through(quant):
        return x
    if method in STATIC_ACTIVATIONS:
        with torch.no_grad():
            _, spec = quant.codes(torch.zeros((1, *shape[1:])))
        s = float(_np(spec.scale).reshape(()))
        zp = _integral_zero_point(spec)
        if spec.scale.numel() != 1 or zp is None:
            raise ValueError(f"{base}: activation quantiser {method!r} is not a per-tensor grid")
        scale = g.const(f"{base}.scale", np.float32(s))
        return _qdq(g, x, scale, int(zp.reshape(())), spec.qmin, spec.qmax, base, s)
    if method == "bnn":
        return _sign(g, x, base)
    if method == "xnor":
        axes = list(range(1, len(shape))) if quant.per_sample else [1]
        mag = g.op("Abs", [x], f"{base}.abs")
        beta = g.op(
            "ReduceMean", [mag, g.const(f"{base}.axes", axes, np.int64)], f"{base}.beta", keepdims=1
        )
        return g.op("Mul", [beta, _sign(g, x, base)], f"{base}.out")
    if method == "stochastic":
        qn, qp = 2 ** (quant.bits - 1), 2 ** (quant.bits - 1) - 1
        amax = g.op("ReduceMax", [g.op("Abs", [x], f"{base}.abs")], f"{base}.amax", keepdims=0)
        ratio = g.op("Div", [amax, g.const(f"{base}.qp", float(qp))], f"{base}.ratio")
        tiny = g.const(f"{base}.tiny", np.finfo(np.float32).tiny)
        scale = g.op("Max", [ratio, tiny], f"{base}.scale")
        return _qdq(g, x, scale, 0, -qn, qp, base, None)
    raise ValueError(f"{base}: no ONNX form for activation quantiser {type(quant).__name__}")


# ----------------------------------------------------------------------------- layers


def _pads(padding: Any, module: nn.Module, base: str) -> list[int]:
    if isinstance(padding, str) or getattr(module, "padding_mode", "zeros") != "zeros":
        raise ValueError(f"{base}: only explicit zero padding exports, got {padding!r}")
    p = list(padding) if isinstance(padding, Sequence) else [padding, padding]
    return [*p, *p]


def _layer(g: _Onnx, module: nn.Module, x: str, shape: Sequence[int], base: str) -> str:
    """A (quantised) conv/linear/ConvBnAct: input quantiser, layer, fused activation."""
    quant = getattr(module, "input_quant", None)
    if quant is not None:
        x = _activation(g, quant, x, shape, f"{base}.input_quant")
    conv = module.conv if isinstance(module, ConvBnAct) else module
    _, bias = layer_weight_bias(module)
    inputs = [x, _weight(g, module, base)]
    if bias is not None:
        inputs.append(g.const(f"{base}.bias", _np(bias)))
    if isinstance(conv, nn.Conv2d):
        attrs = {
            "kernel_shape": list(conv.kernel_size),
            "strides": list(conv.stride),
            "pads": _pads(conv.padding, conv, base),
            "dilations": list(conv.dilation),
            "group": conv.groups,
        }
        y = g.op("Conv", inputs, base, **attrs)
    elif len(shape) == 2:
        y = g.op("Gemm", inputs, base, transB=1)
    else:
        y = g.op("MatMul", [x, g.op("Transpose", [inputs[1]], f"{base}.wt", perm=[1, 0])], base)
        if bias is not None:
            y = g.op("Add", [y, inputs[2]], f"{base}.add")
    act = getattr(module, "act", None)
    return y if act is None else _simple(g, act, y, f"{base}.act")


def _simple(g: _Onnx, m: nn.Module, x: str, base: str) -> str:
    """Parameter-free ``torch.nn`` layers (and eval-mode BatchNorm)."""
    if isinstance(m, nn.ReLU):
        return g.op("Relu", [x], base)
    if isinstance(m, (nn.ReLU6, nn.Hardtanh)):
        lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (m.min_val, m.max_val)
        return g.op("Clip", [x, g.const(f"{base}.lo", lo), g.const(f"{base}.hi", hi)], base)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        c = m.num_features
        params = [
            m.weight if m.affine else torch.ones(c),
            m.bias if m.affine else torch.zeros(c),
            m.running_mean,
            m.running_var,
        ]
        names = [g.const(f"{base}.{k}", _np(p)) for k, p in zip("gbmv", params, strict=True)]
        return g.op("BatchNormalization", [x, *names], base, epsilon=m.eps)
    if isinstance(m, nn.MaxPool2d):
        return g.op("MaxPool", [x], base, **_pool_attrs(m, base))
    if isinstance(m, nn.AvgPool2d):
        if m.divisor_override is not None:
            raise ValueError(f"{base}: AvgPool2d divisor_override does not export")
        return g.op(
            "AveragePool",
            [x],
            base,
            count_include_pad=int(m.count_include_pad),
            **_pool_attrs(m, base),
        )
    if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
        return g.op("GlobalAveragePool", [x], base)
    if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
        return g.op("Flatten", [x], base, axis=1)
    raise ValueError(f"{base}: no ONNX export for module {type(m).__name__}")


def _pair(v: Any) -> list[int]:
    return list(v) if isinstance(v, Sequence) else [v, v]


def _pool_attrs(m: nn.Module, base: str) -> dict[str, Any]:
    k, s, p = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
    attrs = {"kernel_shape": k, "strides": s, "pads": [*p, *p], "ceil_mode": int(m.ceil_mode)}
    if isinstance(m, nn.MaxPool2d):
        attrs["dilations"] = _pair(m.dilation)
    return attrs


# ----------------------------------------------------------------------------- functions


def _slice(g: _Onnx, x: str, index: Any, rank: int, base: str) -> str:
    """``x[index]`` for a tuple of slices (basic slicing only)."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(s, slice) for s in index) or len(index) > rank:
        raise ValueError(f"{base}: only slicing with ':' ranges exports, got {index!r}")
    big = np.iinfo(np.int64).max
    starts = [s.start or 0 for s in index]
    ends = [big if s.stop is None else s.stop for s in index]
    steps = [s.step or 1 for s in index]
    parts = [
        g.const(f"{base}.{k}", v, np.int64)
        for k, v in (
            ("starts", starts),
            ("ends", ends),
            ("axes", list(range(len(index)))),
            ("steps", steps),
        )
    ]
    return g.op("Slice", [x, *parts], base)


def _pad(g: _Onnx, x: str, pad: Sequence[int], value: float, rank: int, base: str) -> str:
    """``F.pad`` (constant mode): torch lists ``(begin, end)`` pairs from the last dim back."""
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    pads = g.const(f"{base}.pads", [*begins, *ends], np.int64)
    return g.op("Pad", [x, pads, g.const(f"{base}.value", float(value))], base, mode="constant")


def _call(g: _Onnx, n: torch.fx.Node, args: list[Any], rank: int) -> str:
    """Supported functions and methods: add, relu, flatten(1), slicing, constant F.pad."""
    base, target = n.name, n.target
    kwargs = n.kwargs
    if target in (operator.add, torch.add, "add"):
        if n.kwargs.get("alpha", 1) != 1:
            raise ValueError(f"{base}: torch.add with alpha does not export")
        ins = [a if isinstance(a, str) else g.const(f"{base}.c", float(a)) for a in args[:2]]
        return g.op("Add", ins, base)
    if target in (F.relu, torch.relu, "relu"):
        return g.op("Relu", [args[0]], base)
    if target in (torch.flatten, "flatten"):
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        if start != 1 or end not in (-1, rank - 1):
            raise ValueError(f"{base}: only flatten(x, 1) exports")
        return g.op("Flatten", [args[0]], base, axis=1)
    if target is operator.getitem:
        return _slice(g, args[0], args[1], rank, base)
    if target is F.pad:
        pad = args[1] if len(args) > 1 else kwargs["pad"]
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        value = args[3] if len(args) > 3 else kwargs.get("value", 0.0)
        if mode != "constant":
            raise ValueError(f"{base}: F.pad mode {mode!r} does not export")
        return _pad(g, args[0], pad, value or 0.0, rank, base)
    raise ValueError(f"{base}: no ONNX export for {n.op} {target!r}")


# ----------------------------------------------------------------------------- export


def _shape(n: torch.fx.Node) -> list[int]:
    meta = n.meta.get("tensor_meta")
    if meta is None:
        raise ValueError(f"{n.name}: not a single tensor")
    return list(meta.shape)


def _graph(model: nn.Module, example: Tensor, opset: int) -> onnx.GraphProto:
    gm = torch.fx.GraphModule(model, _Tracer().trace(model))
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    modules = dict(model.named_modules())
    g = _Onnx(opset)
    names: dict[str, str] = {}
    out_info: onnx.ValueInfoProto | None = None

    def arg(a: Any) -> Any:
        return names[a.name] if isinstance(a, torch.fx.Node) else a

    for n in gm.graph.nodes:
        args = [arg(a) for a in n.args]
        if n.op == "placeholder":
            names[n.name] = g.fresh("input")
            continue
        if n.op == "output":
            if not isinstance(n.args[0], torch.fx.Node):
                raise ValueError("the model must return a single tensor")
            out = g.op("Identity", [names[n.args[0].name]], "output")
            out_info = helper.make_tensor_value_info(
                out, TensorProto.FLOAT, ["batch", *_shape(n.args[0])[1:]]
            )
            continue
        first = n.args[0] if n.args else None
        in_shape = _shape(first) if isinstance(first, torch.fx.Node) else []
        if n.op == "call_module":
            m = modules[n.target]
            if isinstance(m, (nn.Identity, nn.Dropout)):
                names[n.name] = args[0]
            elif isinstance(m, (ConvBnAct, nn.Conv2d, nn.Linear)):
                names[n.name] = _layer(g, m, args[0], in_shape, n.target)
            elif isinstance(m, (QuantAct, Quantizer)):
                q = m.quantizer if isinstance(m, QuantAct) else m
                names[n.name] = _activation(g, q, args[0], in_shape, n.target)
            else:
                names[n.name] = _simple(g, m, args[0], n.target)
        elif n.op in ("call_function", "call_method"):
            names[n.name] = _call(g, n, args, len(in_shape))
        else:
            raise ValueError(f"{n.name}: no ONNX export for {n.op} {n.target!r}")
    if out_info is None:
        raise ValueError("the traced model has no output")
    x_info = helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, ["batch", *example.shape[1:]]
    )
    return helper.make_graph(g.nodes, "lowbit", [x_info], [out_info], initializer=g.inits)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: Tensor,
    *,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Write ``model`` (quantised by :func:`lowbit.quantize`, or float) as an ONNX QDQ graph.

    ``example_input`` is a float batch ``(N, C, H, W)`` or ``(N, F)``; the exported input has a
    dynamic batch dimension. The model is exported in evaluation mode (its training flags are
    restored afterwards); ``opset`` in ``[18, onnx's newest]`` (21 or later for 4-bit types).
    The result passes ``onnx.checker.check_model(full_check=True)``; it is written to ``path``
    and returned. Raises ValueError naming the node for parts with no ONNX form.

    8-bit weights of a layer whose uint8 activations times int8 weights could saturate int16 in
    ONNX Runtime's u8s8 kernels on x86 CPUs without VNNI are stored as uint8 (codes + 128, zero
    point + 128: the same real weights), which ORT runs with its exact u8u8 kernels; see
    :mod:`lowbit.export.ort_saturation` (a layer that cannot take that form falls back to float
    weights with a warning naming it).
    """
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an integer in [{MIN_OPSET}, {newest}], got {opset!r}")
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise ValueError(
            f"example_input must be a batch tensor (N, ...), got {type(example_input).__name__}"
        )
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        graph = _graph(model, example_input.detach().float().cpu(), opset)
    finally:
        for m, training in flags.items():
            m.train(training)
    for message in avoid_u8s8_saturation(graph):  # exact in ORT on AVX2-only CPUs too
        warnings.warn(message, stacklevel=2)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="lowbit")
    proto.ir_version = helper.find_min_ir_version_for(opsets)
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, tmp)
    os.replace(tmp, path)
    return proto


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
            expected = _np(model(x))
    finally:
        for m, training in flags.items():
            m.train(training)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    top1 = float(np.mean(got.argmax(axis=1) == expected.argmax(axis=1)))
    return {"max_abs_diff": float(np.abs(got - expected).max()), "top1_agreement": top1}


def export_onnx_run(
    run_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET
) -> Path:
    """Export a run folder's final model (``lowbit export RUN --format onnx -o model.onnx``).

    The example input is a zero batch of the run's input shape. Returns ``out_path``.
    """
    from ..train.experiment import load_run

    _, model, info = load_run(Path(run_dir))
    example = torch.zeros((1, *info["in_shape"]))
    export_onnx(model, out_path, example, opset=opset)
    return Path(out_path)
