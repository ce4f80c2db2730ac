"""The inference graph: :class:`Node` and :class:`Graph` (numpy, no torch).

One graph builder (:mod:`lowbit.export.graph_builder`) makes it from a quantised model; the
``.lowbit`` writer and the ONNX writer serialise it; the loader reads it back through
:meth:`Graph.from_json`; the engines run it. Nodes are in topological order; each names its inputs
(the graph input or earlier nodes) and has one output named after itself.

Ops and their attributes (``attrs``) / arrays (``params``):

============== =========================================================================
``conv2d``     attrs ``stride``, ``padding``, ``dilation``, ``groups`` (pairs / int); a weight
``linear``     a weight; both may have ``bias`` and an ``input_quant``
``batchnorm``  params ``scale``, ``shift`` (per channel: ``y = x * scale + shift``); attrs ``dim``
``relu``       --
``clamp``      attrs ``min``, ``max`` (ReLU6, Hardtanh)
``maxpool2d``  attrs ``kernel_size``, ``stride``, ``padding`` (pairs)
``avgpool2d``  attrs ``kernel_size``, ``stride``, ``padding`` (pairs; the count includes padding)
``global_avgpool2d`` -- (average over H and W, keeps dims)
``flatten``    attrs ``start_dim``
``add``        two inputs
``slice``      attrs ``starts``, ``stops``, ``steps`` (one per dim; stop None = to the end)
``pad``        attrs ``pads``: [[before, after], ...] per dim, zero padding
============== =========================================================================

A weight is either float (``weight_float``) or integer codes (``weight_codes``, in the weight's
shape) with a :class:`~lowbit.contract.CodeSpec` (``weight_spec``). ``input_quant`` is an
:class:`~lowbit.contract.InputQuant`; ``shape`` the output shape (batch dim None) and
``methods`` the quantisation methods the layer was trained with (for summaries).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .activation import InputQuant
from .base import GraphError, Record, TensorGet, TensorPut, inline_get, inline_put, is_int
from .spec import CodeSpec

__all__ = [
    "MAX_DIM",
    "MAX_NAME",
    "MAX_NODES",
    "MAX_RANK",
    "OPS",
    "WEIGHTED_OPS",
    "Graph",
    "Methods",
    "Node",
    "Shape",
]

OPS = (
    "conv2d",
    "linear",
    "batchnorm",
    "relu",
    "clamp",
    "maxpool2d",
    "avgpool2d",
    "global_avgpool2d",
    "flatten",
    "add",
    "slice",
    "pad",
)
WEIGHTED_OPS = ("conv2d", "linear")
NODE_KEYS = (
    "name",
    "op",
    "inputs",
    "attrs",
    "shape",
    "methods",
    "weight",
    "bias",
    "params",
    "input_quant",
)
MAX_RANK = 8
MAX_NAME = 256
MAX_NODES = 100_000
MAX_DIM = 2**31
Shape = list[int | None]  # None for the batch dimension


def check_name(v: Any, where: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME:
        raise GraphError(f"{where} must be a name of 1 to {MAX_NAME} characters, got {v!r:.60}")
    return v


def check_shape(v: Any, where: str, batch: bool = True) -> list[Any]:
    """A shape list of positive dims (a leading None when ``batch``), rank <= MAX_RANK."""
    if not isinstance(v, list) or len(v) > MAX_RANK or (batch and (not v or v[0] is not None)):
        raise GraphError(f"{where} must be a list of at most {MAX_RANK} dims, got {v!r:.80}")
    for d in v[1:] if batch else v:
        if not (is_int(d) and 1 <= d <= MAX_DIM):
            raise GraphError(f"{where} dim must be an integer in [1, {MAX_DIM}], got {d!r:.60}")
    return [None if d is None else int(d) for d in v]


def jsonable(v: Any) -> Any:
    """Plain JSON values: tuples to lists, numpy scalars to Python numbers."""
    if isinstance(v, (list, tuple)):
        return [jsonable(e) for e in v]
    if isinstance(v, dict):
        return {str(k): jsonable(e) for k, e in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return v


def _finite(name: str, what: str, arr: NDArray[Any], size: int | None = None) -> None:
    if arr.dtype.kind not in "fiu" or (size is not None and arr.shape not in ((size,), ())):
        raise GraphError(
            f"node {name!r}: {what} must be real numbers"
            + ("" if size is None else f", one per output ({size})")
            + f", got shape {list(arr.shape)} ({arr.dtype})"
        )
    if not np.all(np.isfinite(arr)):
        raise GraphError(f"node {name!r}: {what} must be finite")


@dataclass(frozen=True)
class Methods:
    """The quantisation methods of a layer's weights and activations (None: float)."""

    weights: str | None = None
    activations: str | None = None

    def __post_init__(self) -> None:
        for v in (self.weights, self.activations):
            if v is not None and not (isinstance(v, str) and len(v) <= MAX_NAME):
                raise GraphError(f"methods must be names or null, got {v!r:.40}")


@dataclass(frozen=True, eq=False)
class Node(Record):
    """One graph node (see the module docstring); construction checks its fields."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, NDArray[np.float32]] = field(default_factory=dict)
    weight_float: NDArray[np.float32] | None = None
    weight_codes: NDArray[Any] | None = None
    weight_spec: CodeSpec | None = None
    bias: NDArray[np.float32] | None = None
    input_quant: InputQuant | None = None
    shape: Shape | None = None
    methods: Methods | None = None

    def __post_init__(self) -> None:
        name = check_name(self.name, "node name")
        if self.op not in OPS:
            raise GraphError(f"node {name!r}: unknown op {self.op!r:.40}; known: {', '.join(OPS)}")
        if not isinstance(self.inputs, list):
            raise GraphError(f"node {name!r}: inputs must be a list")
        for i in self.inputs:
            check_name(i, f"node {name!r} input")
        if not isinstance(self.attrs, dict) or not isinstance(self.params, dict):
            raise GraphError(f"node {name!r}: attrs and params must be dicts")
        if self.shape is not None:
            try:
                object.__setattr__(self, "shape", check_shape(self.shape, "shape"))
            except GraphError as err:
                raise GraphError(f"node {name!r}: {err}") from None
        if self.methods is not None and not isinstance(self.methods, Methods):
            raise GraphError(f"node {name!r}: methods must be a Methods")
        if self.input_quant is not None and not isinstance(self.input_quant, InputQuant):
            raise GraphError(
                f"node {name!r}: input_quant must be an InputQuant, got "
                f"{type(self.input_quant).__name__}"
            )
        if self.weight_spec is not None and not isinstance(self.weight_spec, CodeSpec):
            raise GraphError(
                f"node {name!r}: weight_spec must be a CodeSpec, got "
                f"{type(self.weight_spec).__name__}"
            )
        for key, arr in self.params.items():
            _finite(name, f"param {key!r}", np.asarray(arr))
        self._check_weight()

    def _check_weight(self) -> None:
        name = self.name
        has_float = self.weight_float is not None
        has_codes = self.weight_codes is not None and self.weight_spec is not None
        if self.op not in WEIGHTED_OPS:
            if has_float or has_codes or self.bias is not None or self.input_quant is not None:
                raise GraphError(f"node {name!r}: a {self.op} node has no weight or input_quant")
            return
        if has_float == has_codes:
            raise GraphError(f"node {name!r}: needs either a float weight or codes with a spec")
        if has_float:
            w = np.asarray(self.weight_float)
            if w.dtype.kind != "f":
                raise GraphError(f"node {name!r}: the float weight must be floats")
            _finite(name, "the float weight", w)
        else:
            w = np.asarray(self.weight_codes)
            try:
                self.weight_spec.check_codes(w)  # type: ignore[union-attr]
            except GraphError as err:
                raise GraphError(f"node {name!r}: {err}") from None
        if w.ndim < 1:
            raise GraphError(f"node {name!r}: the weight must have at least one dim")
        if self.bias is not None:
            _finite(name, "bias", np.asarray(self.bias), w.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        w = self.weight_float if self.weight_float is not None else self.weight_codes
        return tuple(int(d) for d in np.shape(w))

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self, put: TensorPut = inline_put) -> dict[str, Any]:
        """The node as a JSON object; ``put`` stores its arrays (default: inline)."""
        name = self.name
        d: dict[str, Any] = {
            "name": name,
            "op": self.op,
            "inputs": list(self.inputs),
            "attrs": jsonable(self.attrs),
            "shape": jsonable(self.shape),
        }
        if self.methods is not None:
            d["methods"] = {
                "weights": self.methods.weights,
                "activations": self.methods.activations,
            }
        if self.weight_float is not None:
            d["weight"] = {"tensor": put(f"{name}.weight", self.weight_float, None), "spec": None}
        elif self.weight_spec is not None:
            d["weight"] = {
                "tensor": put(f"{name}.weight", self.weight_codes, self.weight_spec),
                "spec": self.weight_spec.to_json(put, f"{name}.weight"),
            }
        if self.bias is not None:
            d["bias"] = put(f"{name}.bias", self.bias, None)
        if self.params:
            d["params"] = {k: put(f"{name}.{k}", v, None) for k, v in self.params.items()}
        if self.input_quant is not None:
            d["input_quant"] = self.input_quant.to_json(put, f"{name}.input_quant")
        return d

    @classmethod
    def from_json(cls, d: Any, get: TensorGet = inline_get, index: int = 0) -> Node:
        """A node of a JSON object (:meth:`to_json`); GraphError naming the node."""
        where = f"nodes[{index}]"
        if not isinstance(d, dict):
            raise GraphError(f"{where} must be a JSON object")
        unknown = [k for k in d if k not in NODE_KEYS]
        if unknown:
            raise GraphError(f"{where} has unknown key {unknown[0]!r:.40}")
        name = check_name(d.get("name"), f"{where}.name")
        where = f"node {name!r}"
        op = d.get("op")
        if not isinstance(op, str) or op not in OPS:
            raise GraphError(f"{where}: unknown op {op!r:.40}; this reader knows {', '.join(OPS)}")
        inputs = d.get("inputs")
        if not isinstance(inputs, list):
            raise GraphError(f"{where}.inputs must be a list")
        attrs = d.get("attrs") or {}
        params = d.get("params") or {}
        if not isinstance(attrs, dict) or not isinstance(params, dict):
            raise GraphError(f"{where}.attrs and .params must be JSON objects")
        methods = d.get("methods")
        if methods is not None:
            if not isinstance(methods, dict) or set(methods) - {"weights", "activations"}:
                raise GraphError(f"{where}.methods must map weights/activations to method names")
            methods = Methods(**methods)
        fields: dict[str, Any] = {}
        weight = d.get("weight")
        if weight is not None:
            if not isinstance(weight, dict) or "tensor" not in weight:
                raise GraphError(f"{where}.weight must be an object with a tensor")
            if weight.get("spec") is None:
                fields["weight_float"] = get(weight["tensor"], f"{where}.weight.tensor", False)
            else:
                fields["weight_codes"] = get(weight["tensor"], f"{where}.weight.tensor", True)
                fields["weight_spec"] = CodeSpec.from_json(
                    weight["spec"], get, f"{where}.weight.spec"
                )
        if d.get("bias") is not None:
            fields["bias"] = get(d["bias"], f"{where}.bias", False)
        fields["params"] = {k: get(v, f"{where}.params.{k}", False) for k, v in params.items()}
        fields["input_quant"] = InputQuant.from_json(
            d.get("input_quant"), get, f"{where}.input_quant"
        )
        return cls(
            name, op, list(inputs), dict(attrs), shape=d.get("shape"), methods=methods, **fields
        )


@dataclass(eq=False)
class Graph(Record):
    """Nodes in topological order, one input and one output; ``meta`` is free-form
    (producer, model, recipe, ``preprocess``...), ``num_classes`` the output's last dim."""

    inputs: list[str]
    input_shape: Shape
    nodes: list[Node]
    outputs: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None

    def validate(self) -> None:
        """Check references (topological order, unique names), node types and ``num_classes``."""
        known = set(self.inputs)
        for node in self.nodes:
            if not isinstance(node, Node):
                raise GraphError(f"graph nodes must be Nodes, got {type(node).__name__}")
            missing = [i for i in node.inputs if i not in known]
            if missing:
                raise GraphError(
                    f"node {node.name!r}: input {missing[0]!r} is not defined before it"
                )
            if node.name in known:
                raise GraphError(f"node {node.name!r}: name used twice")
            known.add(node.name)
        for out in self.outputs:
            if out not in known:
                raise GraphError(f"graph output {out!r} is not a node")
        n = self.num_classes
        if n is not None and not (is_int(n) and n >= 1):
            raise GraphError(f"num_classes must be a positive integer, got {n!r:.40}")

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def to_json(self, put: TensorPut = inline_put) -> dict[str, Any]:
        """The graph as a JSON object; ``put`` stores node arrays (default: inline)."""
        return {
            "inputs": list(self.inputs),
            "input_shape": jsonable(self.input_shape),
            "outputs": list(self.outputs),
            "num_classes": self.num_classes,
            "meta": jsonable(self.meta),
            "nodes": [n.to_json(put) for n in self.nodes],
        }

    @classmethod
    def from_json(cls, d: Any, get: TensorGet = inline_get) -> Graph:
        """The validated graph of a JSON object (:meth:`to_json`); GraphError naming the key
        or node."""
        if not isinstance(d, dict):
            raise GraphError("the graph must be a JSON object")
        for key in ("nodes", "inputs", "outputs", "input_shape"):
            if not isinstance(d.get(key), list):
                raise GraphError(f"header has no list {key!r}")
        if not 0 < len(d["nodes"]) <= MAX_NODES:
            raise GraphError(f"the graph must have 1 to {MAX_NODES} nodes")
        for n in (*d["inputs"], *d["outputs"]):
            check_name(n, "graph input/output")
        input_shape = check_shape(d["input_shape"], "input_shape")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise GraphError("meta must be a JSON object")
        nodes = [Node.from_json(n, get, i) for i, n in enumerate(d["nodes"])]
        graph = cls(
            list(d["inputs"]),
            input_shape,
            nodes,
            list(d["outputs"]),
            dict(meta),
            d.get("num_classes"),
        )
        graph.validate()
        return graph
