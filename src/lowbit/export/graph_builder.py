"""Turn a (quantised) PyTorch model into the inference :class:`~lowbit.contract.Graph`: the one
graph builder, whose graph both the ``.lowbit`` writer and the ONNX writer serialise.

:func:`build_graph` traces the model with ``torch.fx``, keeping quantised layers
(``QuantConv2d``, ``QuantLinear``, ``ConvBnAct``), quantisers and standard ``torch.nn`` layers
as leaves and tracing through everything else (e.g. the ResNet option-A shortcut becomes
``slice`` and ``pad`` nodes), runs it once on an example input in evaluation mode to record
every shape, and maps each node to a graph op:

* quantised layers export their weight as integer codes and spec (``weight_codes``; folded
  weights for ``ConvBnAct``, whose activation becomes a ``relu``/``clamp`` node), float layers
  as float32; the latent float weights of quantised layers are not exported;
* each layer's activation quantiser becomes its ``input_quant`` (a typed
  :class:`~lowbit.contract.InputQuant`) through :meth:`lowbit.quant.Quantizer.runtime_spec`; a
  standalone ``QuantAct`` joins the layer it feeds; weight specs are
  :meth:`lowbit.quant.QuantSpec.to_contract`; every node records its output ``shape`` and the
  layer's ``methods``;
* BatchNorm becomes ``batchnorm`` (``scale = gamma / sqrt(var + eps)``,
  ``shift = beta - mean * scale``), folded into the layer before it when that layer has float
  weights and nothing else reads its output (``fold_bn``).

Anything else raises ValueError naming the node and the module or function.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from ..contract import Graph, GraphError, InputQuant, Methods, Node
from ..nn import ConvBnAct, QuantAct, QuantConv2d, QuantLinear, layer_weight_bias, weight_codes
from ..quant.base import Quantizer
from ..runtime.shapes import infer_shapes

__all__ = [
    "EXAMPLE_SEED",
    "build_graph",
    "build_graph_with_values",
    "example_tensor",
]

EXAMPLE_SEED = 0
"""Seed of the random example input drawn when only a shape is given."""
LEAVES = (QuantConv2d, QuantLinear, ConvBnAct, Quantizer, QuantAct)
WEIGHTED = (nn.Conv2d, nn.Linear, ConvBnAct)
ALIASES = (nn.Identity, nn.Dropout, nn.Dropout2d)


class _Tracer(torch.fx.Tracer):
    """Keeps quantised layers and quantisers opaque (they are exported whole)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAVES) or super().is_leaf_module(m, module_qualified_name)


class _Recorder(torch.fx.Interpreter):
    """Runs the traced model, keeping each node's output and, just before a module runs, the
    deployment form of its activation quantiser (which needs the actual input's shape)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}
        self.input_quants: dict[str, InputQuant | None] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "call_module":
            quant = _activation_quantizer(self.module.get_submodule(n.target))
            if quant is not None:
                x = self.env[n.args[0]]
                try:
                    self.input_quants[n.name] = quant.runtime_spec(x)
                except ValueError as err:
                    raise ValueError(
                        f"export: node {n.name!r} (module {n.target!r}): {err}"
                    ) from None
        out = super().run_node(n)
        # a copy: in-place modules (ReLU(inplace=True)) would overwrite the recorded value
        self.values[n.name] = out.detach().clone() if isinstance(out, Tensor) else out
        return out


def _activation_quantizer(module: nn.Module) -> Quantizer | None:
    if isinstance(module, Quantizer):
        return module
    if isinstance(module, QuantAct):
        return module.quantizer
    return getattr(module, "input_quant", None) if isinstance(module, WEIGHTED) else None


def example_tensor(example_input: Tensor | Sequence[int] | None) -> Tensor:
    """The example batch: a tensor as given (float32, CPU), or one sample of random normal
    values (seeded with :data:`EXAMPLE_SEED`) for a per-sample shape such as ``(1, 28, 28)``."""
    if example_input is None:
        raise ValueError(
            "example_input is needed: a tensor batch or the per-sample input shape, "
            "e.g. (1, 28, 28)"
        )
    if isinstance(example_input, Tensor):
        if example_input.dim() < 2:
            raise ValueError(
                f"example_input must be a batch [N, ...], got shape {list(example_input.shape)}"
            )
        return example_input.detach().to("cpu", torch.float32)
    shape = tuple(example_input)
    if not 1 <= len(shape) <= 3 or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ValueError(f"example_input shape must be 1 to 3 positive ints, got {example_input!r}")
    gen = torch.Generator().manual_seed(EXAMPLE_SEED)
    return torch.randn((1, *shape), generator=gen)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale`` (float64 math)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be exported")
    var = bn.running_var.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale.float().cpu().numpy(), shift.float().cpu().numpy()


class _Builder:
    """Walks the traced graph and emits graph nodes (see the module docstring)."""

    def __init__(
        self, model: nn.Module, fx_graph: torch.fx.Graph, rec: _Recorder, fold_bn: bool
    ) -> None:
        self.model = model
        self.fx_graph = fx_graph
        self.rec = rec
        self.fold_bn = fold_bn
        self.nodes: list[Node] = []
        self.env: dict[str, str] = {}  # fx node name -> graph value name
        self.pending: dict[str, InputQuant] = {}  # fx node -> input quant for its consumer
        self.emitted: dict[str, Node] = {}  # fx node -> the graph node that computes it
        self.modules: dict[str, str] = {}  # graph node -> the module path it comes from
        self.names: set[str] = set()
        self.inputs: list[str] = []

    # -- helpers -------------------------------------------------------------------------------
    def fail(self, n: torch.fx.Node, what: str) -> ValueError:
        return ValueError(f"export: node {n.name!r} ({n.op} {_target_name(n)}): {what}")

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def shape(self, fx_name: str) -> list[int | None]:
        value = self.rec.values[fx_name]
        return [None, *value.shape[1:]]

    def arg(self, n: torch.fx.Node, a: Any, quant_ok: bool = False) -> str:
        """The graph value of an fx argument (which must be a tensor computed earlier)."""
        if not isinstance(a, torch.fx.Node) or a.name not in self.env:
            raise self.fail(n, f"argument {a!r} is not a tensor of the model")
        if a.name in self.pending and not quant_ok:
            raise self.fail(n, "a standalone activation quantiser must feed a conv or linear layer")
        return self.env[a.name]

    def emit(
        self, n: torch.fx.Node, op: str, inputs: list[str], name: str | None = None, **fields: Any
    ) -> Node:
        node_name = self.unique(name or n.name)
        try:
            node = Node(node_name, op, inputs, shape=self.shape(n.name), **fields)
        except GraphError as err:
            raise self.fail(n, str(err)) from None
        self.nodes.append(node)
        if n.op == "call_module" and name is None:
            self.modules[node.name] = str(n.target)
        self.env[n.name] = node.name
        self.emitted[n.name] = node
        return node

    # -- dispatch ------------------------------------------------------------------------------
    def run(self) -> Graph:
        outputs: list[str] = []
        for n in self.fx_graph.nodes:
            if n.op == "placeholder":
                if self.inputs:
                    raise self.fail(n, "the model must take one input tensor")
                self.inputs.append(self.unique(n.name))
                self.env[n.name] = self.inputs[0]
            elif n.op == "call_module":
                self.module(n, self.model.get_submodule(n.target))
            elif n.op == "call_function":
                self.function(n)
            elif n.op == "call_method":
                self.method(n)
            elif n.op == "output":
                out = n.args[0]
                outputs = [self.arg(n, out)]
            else:
                raise self.fail(n, "parameters used directly in forward are not supported")
        value = self.rec.values[self.fx_graph_output_name()]
        meta = {"modules": self.modules}
        input_shape = self.shape(self.input_fx_name())
        return Graph(self.inputs, input_shape, self.nodes, outputs, meta, int(value.shape[-1]))

    def fx_graph_output_name(self) -> str:
        out = next(n for n in self.fx_graph.nodes if n.op == "output")
        return out.args[0].name

    def input_fx_name(self) -> str:
        return next(n.name for n in self.fx_graph.nodes if n.op == "placeholder")

    # -- modules -------------------------------------------------------------------------------
    def module(self, n: torch.fx.Node, m: nn.Module) -> None:
        if isinstance(m, WEIGHTED):
            self.weighted(n, m)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            self.batchnorm(n, m)
        elif isinstance(m, (Quantizer, QuantAct)):
            self.standalone_quant(n)
        elif isinstance(m, ALIASES):
            self.env[n.name] = self.arg(n, n.args[0])
        else:
            self.simple_module(n, m)

    def simple_module(self, n: torch.fx.Node, m: nn.Module) -> None:
        x = [self.arg(n, n.args[0])]
        if type(m) is nn.ReLU:
            self.emit(n, "relu", x)
        elif type(m) is nn.ReLU6:
            self.emit(n, "clamp", x, attrs={"min": 0.0, "max": 6.0})
        elif type(m) is nn.Hardtanh:
            self.emit(n, "clamp", x, attrs={"min": float(m.min_val), "max": float(m.max_val)})
        elif type(m) is nn.MaxPool2d:
            if m.ceil_mode or m.return_indices or _pair(m.dilation) != [1, 1]:
                raise self.fail(n, "MaxPool2d with ceil_mode, return_indices or dilation")
            self.emit(n, "maxpool2d", x, attrs=_pool_attrs(m.kernel_size, m.stride, m.padding))
        elif type(m) is nn.AvgPool2d:
            if m.ceil_mode or m.divisor_override or (not m.count_include_pad and m.padding):
                raise self.fail(
                    n, "AvgPool2d with ceil_mode, divisor_override or count_include_pad=False"
                )
            self.emit(n, "avgpool2d", x, attrs=_pool_attrs(m.kernel_size, m.stride, m.padding))
        elif type(m) is nn.AdaptiveAvgPool2d and _pair(m.output_size) == [1, 1]:
            self.emit(n, "global_avgpool2d", x)
        elif type(m) is nn.Flatten and m.end_dim == -1:
            self.emit(n, "flatten", x, attrs={"start_dim": int(m.start_dim)})
        else:
            raise self.fail(
                n,
                f"module type {type(m).__name__} is not supported by lowbit export "
                "(.lowbit and ONNX)",
            )

    def weighted(self, n: torch.fx.Node, m: nn.Module) -> None:
        conv = m.conv if isinstance(m, ConvBnAct) else m
        own_quant = self.rec.input_quants.get(n.name)
        pending = self.pending.get(n.args[0].name) if isinstance(n.args[0], torch.fx.Node) else None
        if pending is not None and getattr(m, "input_quant", None) is not None:
            raise self.fail(n, "input quantised twice (a QuantAct before a layer with input_quant)")
        x = self.arg(n, n.args[0], quant_ok=True)
        fields: dict[str, Any] = {"input_quant": own_quant if pending is None else pending}
        weight, bias = layer_weight_bias(m)
        found = weight_codes(m)
        if found is None:
            fields["weight_float"] = _np(weight)
        else:
            codes, spec = found
            fields["weight_codes"] = codes.detach().cpu().numpy().astype(np.int32)
            try:
                fields["weight_spec"] = spec.to_contract()
            except GraphError as err:
                raise self.fail(n, f"weight spec: {err}") from None
        fields["bias"] = None if bias is None else _np(bias)
        wq, aq = getattr(m, "weight_quant", None), getattr(m, "input_quant", None)
        fields["methods"] = Methods(
            None if wq is None else wq.method, None if aq is None else aq.method
        )
        if isinstance(conv, nn.Conv2d):
            node = self.emit(n, "conv2d", [x], attrs=_conv_attrs(n, conv, self), **fields)
        else:
            node = self.emit(n, "linear", [x], **fields)
        act = m.act if isinstance(m, ConvBnAct) else None
        if act is not None:
            attrs = {"min": 0.0, "max": 6.0} if isinstance(act, nn.ReLU6) else {}
            self.emit(
                n, "clamp" if attrs else "relu", [node.name], name=f"{n.name}_act", attrs=attrs
            )

    def batchnorm(self, n: torch.fx.Node, bn: nn.modules.batchnorm._BatchNorm) -> None:
        try:
            scale, shift = _bn_scale_shift(bn)
        except ValueError as err:
            raise self.fail(n, str(err)) from None
        prev = n.args[0]
        layer = self.emitted.get(prev.name) if isinstance(prev, torch.fx.Node) else None
        foldable = (
            self.fold_bn
            and layer is not None
            and layer.op in ("conv2d", "linear")
            and layer.weight_float is not None
            and len(prev.users) == 1
            and self.env[prev.name] == layer.name
        )
        if foldable:
            folded = _fold_into(layer, scale, shift, self.shape(n.name))
            self.nodes[self.nodes.index(layer)] = folded
            self.emitted = {k: folded if v is layer else v for k, v in self.emitted.items()}
            self.env[n.name] = layer.name
            return
        self.emit(
            n,
            "batchnorm",
            [self.arg(n, prev)],
            attrs={"dim": 1},
            params={"scale": scale, "shift": shift},
        )

    def standalone_quant(self, n: torch.fx.Node) -> None:
        x = self.arg(n, n.args[0])
        spec = self.rec.input_quants.get(n.name)
        self.env[n.name] = x
        if spec is not None:
            self.pending[n.name] = spec

    # -- functions and methods -----------------------------------------------------------------
    def function(self, n: torch.fx.Node) -> None:
        f = n.target
        if f in (operator.add, operator.iadd, torch.add) and len(n.args) == 2 and not n.kwargs:
            self.emit(n, "add", [self.arg(n, n.args[0]), self.arg(n, n.args[1])])
        elif f is operator.getitem:
            self.getitem(n)
        elif f is F.pad:
            self.pad(n)
        elif f in (F.relu, torch.relu):
            self.emit(n, "relu", [self.arg(n, n.args[0])])
        elif f is torch.flatten:
            self.flatten_like(n)
        elif f is F.adaptive_avg_pool2d and _pair(_arg(n, 1, "output_size")) == [1, 1]:
            self.emit(n, "global_avgpool2d", [self.arg(n, n.args[0])])
        else:
            raise self.fail(n, "function not supported by lowbit export (.lowbit and ONNX)")

    def method(self, n: torch.fx.Node) -> None:
        name = n.target
        if name == "size":
            return  # an int used by view/reshape, which are mapped by their shapes
        if name in ("contiguous", "clone"):
            self.env[n.name] = self.arg(n, n.args[0])
        elif name == "relu":
            self.emit(n, "relu", [self.arg(n, n.args[0])])
        elif name == "add" and len(n.args) == 2 and not n.kwargs:
            self.emit(n, "add", [self.arg(n, n.args[0]), self.arg(n, n.args[1])])
        elif name in ("flatten", "view", "reshape"):
            self.flatten_like(n)
        else:
            raise self.fail(n, "tensor method not supported by lowbit export (.lowbit and ONNX)")

    def flatten_like(self, n: torch.fx.Node) -> None:
        """flatten / view / reshape that keep dims before some ``start`` and merge the rest."""
        src = n.args[0]
        before = self.shape(src.name)
        after = self.shape(n.name)
        for start in range(1, len(before)):
            if after == [*before[:start], int(np.prod(before[start:]))]:
                self.emit(n, "flatten", [self.arg(n, src)], attrs={"start_dim": start})
                return
        if after == before:
            self.env[n.name] = self.arg(n, src)
            return
        raise self.fail(n, f"reshape {before} -> {after} is not a flatten")

    def getitem(self, n: torch.fx.Node) -> None:
        src, index = n.args
        ndim = len(self.shape(src.name))
        items = list(index) if isinstance(index, tuple) else [index]
        if items.count(Ellipsis) > 1 or not all(
            isinstance(i, slice) or i is Ellipsis for i in items
        ):
            raise self.fail(n, "only slicing with start:stop:step is supported")
        if Ellipsis in items:
            k = items.index(Ellipsis)
            items = items[:k] + [slice(None)] * (ndim - len(items) + 1) + items[k + 1 :]
        items += [slice(None)] * (ndim - len(items))
        bad = [
            s
            for s in items
            for v in (s.start, s.stop, s.step)
            if v is not None and not isinstance(v, int)
        ]
        if bad or len(items) != ndim or items[0] != slice(None):
            raise self.fail(n, "slices must be constant ints and keep the batch dimension")
        self.emit(
            n,
            "slice",
            [self.arg(n, src)],
            attrs={
                "starts": [s.start for s in items],
                "stops": [s.stop for s in items],
                "steps": [s.step for s in items],
            },
        )

    def pad(self, n: torch.fx.Node) -> None:
        src = n.args[0]
        pads = list(_arg(n, 1, "pad"))
        mode = _arg(n, 2, "mode", "constant")
        value = _arg(n, 3, "value", None)
        if mode != "constant" or value not in (None, 0, 0.0) or len(pads) % 2:
            raise self.fail(n, "only zero padding (mode='constant', value=0) is supported")
        ndim = len(self.shape(src.name))
        per_dim = [[0, 0] for _ in range(ndim)]
        for i in range(len(pads) // 2):  # F.pad lists the last dim first
            per_dim[ndim - 1 - i] = [int(pads[2 * i]), int(pads[2 * i + 1])]
        if any(p < 0 for pair in per_dim for p in pair) or per_dim[0] != [0, 0]:
            raise self.fail(n, "negative padding or padding of the batch dim is not supported")
        self.emit(n, "pad", [self.arg(n, src)], attrs={"pads": per_dim})


def _target_name(n: torch.fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__qualname__", getattr(t, "__name__", str(t)))


def _arg(n: torch.fx.Node, pos: int, key: str, default: Any = ...) -> Any:
    if len(n.args) > pos:
        return n.args[pos]
    if key in n.kwargs:
        return n.kwargs[key]
    if default is ...:
        raise ValueError(f"export: node {n.name!r}: missing argument {key!r}")
    return default


def _pool_attrs(kernel: Any, stride: Any, padding: Any) -> dict[str, Any]:
    return {
        "kernel_size": _pair(kernel),
        "stride": _pair(kernel if stride is None else stride),
        "padding": _pair(padding),
    }


def _conv_attrs(n: torch.fx.Node, conv: nn.Conv2d, b: _Builder) -> dict[str, Any]:
    if conv.padding_mode != "zeros":
        raise b.fail(n, f"padding_mode={conv.padding_mode!r} (only zero padding is supported)")
    padding = conv.padding
    if isinstance(padding, str):
        padding = _string_padding(n, conv, b)
    return {
        "stride": _pair(conv.stride),
        "padding": _pair(padding),
        "dilation": _pair(conv.dilation),
        "groups": int(conv.groups),
    }


def _string_padding(n: torch.fx.Node, conv: nn.Conv2d, b: _Builder) -> list[int]:
    if conv.padding == "valid":
        return [0, 0]
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    if any(t % 2 for t in total):
        raise b.fail(n, "padding='same' with an even kernel pads asymmetrically; not supported")
    return [t // 2 for t in total]


def _fold_into(layer: Node, scale: np.ndarray, shift: np.ndarray, shape: list[Any]) -> Node:
    """BatchNorm after a float layer: ``w' = w * scale`` per output, ``b' = b * scale + shift``
    (the layer node with the folded weight, bias and the BatchNorm's output shape)."""
    assert layer.weight_float is not None
    w = layer.weight_float.astype(np.float64)
    view = (-1,) + (1,) * (w.ndim - 1)
    b = np.zeros(w.shape[0]) if layer.bias is None else layer.bias.astype(np.float64)
    return dataclasses.replace(
        layer,
        weight_float=(w * scale.astype(np.float64).reshape(view)).astype(np.float32),
        bias=(b * scale + shift).astype(np.float32),
        shape=shape,
    )


def build_graph(
    model: nn.Module,
    example_input: Tensor | Sequence[int] | None = None,
    *,
    fold_bn: bool = True,
) -> Graph:
    """The inference graph of ``model`` in evaluation mode (the model is left as it was).

    ``example_input``: a batch tensor, or the per-sample input shape (a random batch of one is
    drawn). Raises ValueError for modules, functions or quantiser states it cannot export
    (e.g. an LSQ activation step never initialised by a forward on data).
    """
    return build_graph_with_values(model, example_input, fold_bn=fold_bn)[0]


@torch.no_grad()
def build_graph_with_values(
    model: nn.Module,
    example_input: Tensor | Sequence[int] | None = None,
    *,
    fold_bn: bool = True,
) -> tuple[Graph, dict[str, np.ndarray]]:
    """:func:`build_graph`, plus PyTorch's value of every graph value on ``example_input``.

    The dict maps the graph input and node names to the float32 arrays the PyTorch model
    computed for them (a node with no PyTorch counterpart, such as the pre-activation output of
    a ``ConvBnAct``, is absent), so a runtime can be checked layer by layer on the model's own
    inputs.
    """
    x = example_tensor(example_input)
    try:
        fx_graph = _Tracer().trace(model)
    except Exception as err:  # user code may fail to trace in any way
        raise ValueError(f"export: the model does not trace with torch.fx: {err}") from err
    gm = torch.fx.GraphModule(model, fx_graph)
    flags = {m: m.training for m in model.modules()}  # restored one by one (mixed modes)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        rec = _Recorder(gm)
        rec.run(x.to(device))
        builder = _Builder(model, fx_graph, rec, fold_bn)
        graph = builder.run()
    finally:
        for m, training in flags.items():
            m.train(training)
    graph.meta.update(
        producer=f"lowbit {__version__}",
        model=type(model).__name__,
        recipe=getattr(getattr(model, "lowbit_recipe", None), "name", None),
    )
    graph.validate()
    try:
        infer_shapes(graph)  # the shapes torch gave each node must be the graph's
    except GraphError as err:
        raise ValueError(f"export: {err}") from None
    # fx nodes are visited in order, so the last one mapped to a graph value computed it
    values = {v: _np(rec.values[fx]) for fx, v in builder.env.items()}
    return graph, values
