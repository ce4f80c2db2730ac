"""Output shapes of a graph's nodes (:func:`infer_shapes`), checking every op's attributes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..contract import Graph, GraphError, Node, Shape, is_int
from .geometry import MAX_ATTR, conv_geometry, pool_geometry

__all__ = ["MAX_ACTIVATION_ELEMENTS", "infer_shapes", "pads", "slices"]

MAX_ACTIVATION_ELEMENTS = 2**26
"""Largest number of elements one sample may have at any node (graph validation refuses more)."""
F32 = np.float32


def _need_rank(node: Node, shape: Shape, rank: int) -> None:
    if len(shape) != rank:
        raise GraphError(f"node {node.name!r} ({node.op}) needs a {rank}-D input, got {shape}")


def _shape_conv2d(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    _need_rank(node, x, 4)
    ws = node.weight_shape
    groups = node.attrs.get("groups", 1)
    if not is_int(groups) or not 1 <= groups <= MAX_ATTR:
        raise GraphError(f"node {node.name!r}: groups must be a positive int, got {groups!r}")
    if len(ws) != 4 or ws[1] * groups != x[1] or ws[0] % groups:
        raise GraphError(
            f"node {node.name!r}: weight shape {list(ws)} with groups={groups} does not fit "
            f"input {x}"
        )
    oh, ow = conv_geometry(node, ws).out_hw(node, x[2], x[3])
    return [None, ws[0], oh, ow]


def _shape_linear(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    _need_rank(node, x, 2)
    ws = node.weight_shape
    if len(ws) != 2 or ws[1] != x[1]:
        raise GraphError(f"node {node.name!r}: weight shape {list(ws)} does not fit input {x}")
    return [None, ws[0]]


def _shape_batchnorm(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    if node.attrs.get("dim", 1) != 1 or len(x) < 2:
        raise GraphError(f"node {node.name!r}: batchnorm works on dim 1 of an (N, C, ...) input")
    for key in ("scale", "shift"):
        p = node.params.get(key)
        if p is None or np.shape(p) != (x[1],):
            raise GraphError(
                f"node {node.name!r}: param {key!r} must have shape ({x[1]},), got "
                f"{None if p is None else np.shape(p)}"
            )
    return list(x)


def _shape_same(node: Node, ins: list[Shape]) -> Shape:
    return list(ins[0])


def _shape_clamp(node: Node, ins: list[Shape]) -> Shape:
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    for v in (lo, hi):
        real = isinstance(v, (int, float)) and not isinstance(v, bool)
        if v is not None and not (real and abs(v) <= np.finfo(F32).max):
            raise GraphError(f"node {node.name!r}: clamp bounds must be float32 numbers or None")
    if lo is not None and hi is not None and lo > hi:
        raise GraphError(f"node {node.name!r}: clamp min {lo} > max {hi}")
    return list(ins[0])


def _shape_pool(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    _need_rank(node, x, 4)
    oh, ow = pool_geometry(node).out_hw(node, x[2], x[3])
    return [None, x[1], oh, ow]


def _shape_global_pool(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    _need_rank(node, x, 4)
    return [None, x[1], 1, 1]


def _shape_flatten(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    start = node.attrs.get("start_dim", 1)
    if not is_int(start) or not 1 <= start < len(x):
        raise GraphError(
            f"node {node.name!r}: start_dim must be in [1, {len(x) - 1}], got {start!r}"
        )
    return [*x[:start], math.prod(x[start:])]


def _shape_add(node: Node, ins: list[Shape]) -> Shape:
    if len(ins) != 2 or ins[0] != ins[1]:
        raise GraphError(f"node {node.name!r}: add needs two inputs of one shape, got {ins}")
    return list(ins[0])


def _dim_list(node: Node, key: str, n: int, ok: Callable[[Any], bool]) -> list[Any]:
    v = node.attrs.get(key)
    if not isinstance(v, (list, tuple)) or len(v) != n or not all(ok(e) for e in v):
        raise GraphError(
            f"node {node.name!r}: attribute {key!r} must list {n} valid values, got {v!r}"
        )
    return list(v)


def slices(node: Node, ndim: int) -> tuple[slice, ...]:
    """The slice attributes as Python slices (steps >= 1; batch dim untouched)."""
    bounded = lambda e: e is None or (is_int(e) and abs(e) <= 2**31)  # noqa: E731
    starts = _dim_list(node, "starts", ndim, bounded)
    stops = _dim_list(node, "stops", ndim, bounded)
    steps = _dim_list(node, "steps", ndim, lambda e: e is None or (is_int(e) and 1 <= e <= 2**31))
    if starts[0] not in (None, 0) or stops[0] is not None or steps[0] not in (None, 1):
        raise GraphError(f"node {node.name!r}: slice may not cut the batch dimension")
    return tuple(slice(a, b, c) for a, b, c in zip(starts, stops, steps, strict=True))


def _shape_slice(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    sl = slices(node, len(x))
    out: Shape = [None]
    for d, s in zip(x[1:], sl[1:], strict=True):
        size = len(range(*s.indices(d)))
        if size < 1:
            raise GraphError(f"node {node.name!r}: slice {s} of a dim of size {d} is empty")
        out.append(size)
    return out


def pads(node: Node, ndim: int) -> list[tuple[int, int]]:
    pads = _dim_list(
        node,
        "pads",
        ndim,
        lambda e: (
            isinstance(e, (list, tuple))
            and len(e) == 2
            and all(is_int(p) and 0 <= p <= MAX_ATTR for p in e)
        ),
    )
    if tuple(pads[0]) != (0, 0):
        raise GraphError(f"node {node.name!r}: pad may not pad the batch dimension")
    return [(int(a), int(b)) for a, b in pads]


def _shape_pad(node: Node, ins: list[Shape]) -> Shape:
    (x,) = ins
    widths = pads(node, len(x))
    return [None, *(d + a + b for d, (a, b) in zip(x[1:], widths[1:], strict=True))]


_SHAPES: dict[str, Callable[[Node, list[Shape]], Shape]] = {
    "conv2d": _shape_conv2d,
    "linear": _shape_linear,
    "batchnorm": _shape_batchnorm,
    "relu": _shape_same,
    "clamp": _shape_clamp,
    "maxpool2d": _shape_pool,
    "avgpool2d": _shape_pool,
    "global_avgpool2d": _shape_global_pool,
    "flatten": _shape_flatten,
    "add": _shape_add,
    "slice": _shape_slice,
    "pad": _shape_pad,
}
_ARITY = {"add": 2}


def infer_shapes(graph: Graph) -> dict[str, Shape]:
    """Output shape of every input and node (batch dim None); GraphError where one cannot fit.

    Also refuses nodes whose per-sample output exceeds :data:`MAX_ACTIVATION_ELEMENTS`, so a
    graph that validates cannot ask for a huge activation.
    """
    shape = graph.input_shape
    if (
        len(graph.inputs) != 1
        or not isinstance(shape, list)
        or not 2 <= len(shape) <= 4
        or shape[0] is not None
        or not all(is_int(d) and d >= 1 for d in shape[1:])
    ):
        raise GraphError(
            f"the graph needs one input of shape [None, ...] with 1 to 3 positive dims, got "
            f"inputs {graph.inputs} and input_shape {shape}"
        )
    if len(graph.outputs) != 1:
        raise GraphError(f"the graph needs exactly one output, got {graph.outputs}")
    shapes: dict[str, Shape] = {graph.inputs[0]: [None, *(int(d) for d in shape[1:])]}
    for node in graph.nodes:
        if len(node.inputs) != _ARITY.get(node.op, 1):
            raise GraphError(f"node {node.name!r} ({node.op}) has {len(node.inputs)} inputs")
        out = _SHAPES[node.op](node, [shapes[i] for i in node.inputs])
        if math.prod(out[1:]) > MAX_ACTIVATION_ELEMENTS:
            raise GraphError(f"node {node.name!r}: output {out} is too large")
        if node.shape is not None and node.shape != out:
            raise GraphError(
                f"node {node.name!r}: declared shape {node.shape} but the graph gives {out}"
            )
        shapes[node.name] = out
    classes = shapes[graph.outputs[0]][-1]
    if graph.num_classes is not None and graph.num_classes != classes:
        raise GraphError(f"num_classes {graph.num_classes} but the output has {classes} values")
    return shapes
