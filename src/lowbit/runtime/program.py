"""The float engine's whole-graph plan: channels-last activations, packed bits between binary
layers, in-place elementwise steps (built once when a :class:`~lowbit.runtime.Model` loads).

:meth:`Model.run_node <lowbit.runtime.model.Model.run_node>` evaluates one node in the graph's
``[N, C, H, W]`` layout; a whole forward pass instead runs this :class:`Program`, which computes
the same values with less data movement:

* 4-D activations are kept channels last (``[N, H, W, C]``), the layout a convolution's GEMM
  produces, so no layer transposes its output; ops without a channels-last form here (average
  pooling, flatten, ...) see their input transposed back (their float sums then run in the
  reference order).
* A binary/ternary layer whose output only feeds ``sign`` quantisers -- directly, through one
  BatchNorm, and through max-pooling -- emits packed sign bits with the kernels' fused threshold
  stage (:meth:`~lowbit.runtime.packed.PackedGemm.threshold`); the BatchNorm becomes a no-op and
  max-pooling an OR of bits. Other packed layers pack their float input once, as bits per pixel.
* BatchNorm, ReLU, clamp and add write into their input when nothing else reads it, and values
  are released after their last use.

Every value equals the one :meth:`Model.run_node` computes, bit for bit (the signs given as bits
are those the float path would take).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..contract import Graph, Node, Shape, SignQuant
from .geometry import pool_geometry
from .layers import Layer
from .ops import NODE_OPS, batchnorm, to_channels_first, to_channels_last
from .packed import Bits, ThresholdPlan, pool_bits, window_reduce
from .shapes import pads, slices

__all__ = ["Program"]

F32 = np.float32

Value = Any  # a float array (channels last when 4-D) or Bits
Step = tuple[str, list[str], Callable[[list[Value]], Value], list[str]]


class Program:
    """A compiled forward pass of ``graph`` (see the module docstring); ``run(x)`` gives what
    evaluating every node with ``run_node`` gives."""

    def __init__(self, graph: Graph, layers: dict[str, Layer], shapes: dict[str, Shape]) -> None:
        self.graph = graph
        self.layers = layers
        self.shapes = shapes
        self.uses = Counter(i for n in graph.nodes for i in n.inputs) + Counter(graph.outputs)
        self.consumers: dict[str, list[Node]] = {}
        for node in graph.nodes:
            for i in node.inputs:
                self.consumers.setdefault(i, []).append(node)
        self.plans: dict[str, ThresholdPlan] = {}
        self.bits: set[str] = set()
        for node in graph.nodes:
            self._fuse_threshold(node)
        # values a step may overwrite (once nothing else reads them): the channels-last copy of
        # a 4-D input, and what the steps below allocate
        self.fresh = {graph.inputs[0]} if len(shapes[graph.inputs[0]]) == 4 else set()
        last_use = {i: k for k, n in enumerate(graph.nodes) for i in n.inputs}
        self.steps: list[Step] = []
        for k, node in enumerate(graph.nodes):
            release = [v for v in dict.fromkeys(node.inputs) if last_use[v] == k]
            release = [v for v in release if v not in graph.outputs]
            self.steps.append((node.name, node.inputs, self._step(node), release))

    # -- planning ------------------------------------------------------------------------------
    def _packed_sign_layer(self, node: Node) -> bool:
        layer = self.layers.get(node.name)
        return layer is not None and layer.packed is not None and isinstance(layer.iq, SignQuant)

    def _sign_only(self, name: str) -> bool:
        """Whether value ``name`` is only ever read through a sign (packed sign layers, or
        max-pooling whose output is sign-only)."""
        users = self.consumers.get(name, [])
        if not users or name in self.graph.outputs:
            return False
        return all(
            self._packed_sign_layer(u) or (u.op == "maxpool2d" and self._sign_only(u.name))
            for u in users
        )

    def _fuse_threshold(self, node: Node) -> None:
        """Plan ``node`` to emit sign bits when it is a packed layer read only through signs,
        directly or after a BatchNorm that only it feeds."""
        layer = self.layers.get(node.name)
        users = self.consumers.get(node.name, [])
        if layer is None or layer.packed is None or self.uses[node.name] != 1 or not users:
            return
        (user,) = users
        bn = user if user.op == "batchnorm" and len(self.shapes[user.name]) in (2, 4) else None
        value = node.name if bn is None else bn.name
        if not self._sign_only(value):
            return
        post: Callable[[NDArray[np.float32]], NDArray[np.float32]] = (
            (lambda y: y) if bn is None else (lambda y: batchnorm(bn, y))
        )
        plan = layer.packed.threshold(post)
        if plan is None:
            return
        self.plans[node.name] = plan
        self.bits.add(node.name)
        self._mark_bits(value)

    def _mark_bits(self, name: str) -> None:
        self.bits.add(name)
        for user in self.consumers[name]:
            if user.op == "maxpool2d":
                self._mark_bits(user.name)

    def _in_place(self, name: str) -> bool:
        """Whether a step may overwrite value ``name`` (a fresh buffer nothing else reads)."""
        return name in self.fresh and self.uses[name] == 1

    # -- steps ---------------------------------------------------------------------------------
    def _step(self, node: Node) -> Callable[[list[Value]], Value]:
        op, rank = node.op, len(self.shapes[node.name])
        if node.name in self.layers:
            layer = self.layers[node.name]
            self.fresh.add(node.name)
            if node.name in self.plans:
                plan = self.plans[node.name]
                return lambda a: layer.forward_bits(a[0], plan)
            return lambda a: layer.forward(a[0])
        if node.name in self.bits:
            if op == "batchnorm":
                return lambda a: a[0]
            geo = pool_geometry(node)
            return lambda a: pool_bits(a[0], geo.kernel, geo.stride, geo.padding)
        channels_last = op != "batchnorm" or rank in (2, 4)  # BN: channels are the last axis
        if op in ("batchnorm", "relu", "clamp", "add") and channels_last:
            self.fresh.add(node.name)
            return self._elementwise(node)
        if op == "maxpool2d":
            self.fresh.add(node.name)
            geo = pool_geometry(node)
            return lambda a: window_reduce(
                a[0], geo.kernel, geo.stride, geo.padding, np.maximum, -np.inf
            )
        if rank == 4 and op in ("slice", "pad"):
            self.fresh.add(node.name)
            return _slice_last(node) if op == "slice" else _pad_last(node)
        return self._generic(node)

    def _elementwise(self, node: Node) -> Callable[[list[Value]], Value]:
        """BatchNorm (channels are the last axis of 2-D and channels-last 4-D values), ReLU,
        clamp and add, written into an input nothing else reads."""
        out = [i if self._in_place(i) else None for i in node.inputs]
        target = next((k for k, o in enumerate(out) if o is not None), None)
        if node.op == "add":
            return lambda a: np.add(a[0], a[1], out=None if target is None else a[target])
        place = target is not None
        if node.op == "relu":
            return lambda a: np.maximum(a[0], F32(0), out=a[0] if place else None)
        if node.op == "clamp":
            lo, hi = node.attrs.get("min"), node.attrs.get("max")
            lo, hi = (None if v is None else F32(v) for v in (lo, hi))
            return lambda a: np.clip(a[0], lo, hi, out=a[0] if place else None)
        scale = np.asarray(node.params["scale"], F32)
        shift = np.asarray(node.params["shift"], F32)

        def batchnorm(a: list[Value]) -> Value:
            y = np.multiply(a[0], scale, out=a[0] if place else None)
            return np.add(y, shift, out=y)

        return batchnorm

    def _generic(self, node: Node) -> Callable[[list[Value]], Value]:
        """Any other op in the graph layout: 4-D inputs transposed to ``[N, C, H, W]`` and a 4-D
        output back to channels last."""
        to_graph = [len(self.shapes[i]) == 4 for i in node.inputs]
        back = len(self.shapes[node.name]) == 4
        fn = NODE_OPS[node.op]

        def generic(a: list[Value]) -> Value:
            args = [to_channels_first(v) if t else v for v, t in zip(a, to_graph, strict=True)]
            y = fn(node, args)
            return to_channels_last(y) if back else y

        return generic

    # -- execution -----------------------------------------------------------------------------
    def run(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """The graph's output for a float32 input batch in the graph layout."""
        name = self.graph.inputs[0]
        env: dict[str, Value] = {name: to_channels_last(x) if x.ndim == 4 else x}
        for out, inputs, fn, release in self.steps:
            env[out] = fn([env[i] for i in inputs])
            for v in release:
                del env[v]
        y = env[self.graph.outputs[0]]
        assert not isinstance(y, Bits)
        return to_channels_first(y) if y.ndim == 4 else y


def _slice_last(node: Node) -> Callable[[list[Value]], Value]:
    """A 4-D slice on a channels-last value."""
    s = slices(node, 4)
    sl = (s[0], s[2], s[3], s[1])
    return lambda a: np.ascontiguousarray(a[0][sl])


def _pad_last(node: Node) -> Callable[[list[Value]], Value]:
    """A 4-D zero pad on a channels-last value."""
    p = pads(node, 4)
    last = [p[0], p[2], p[3], p[1]]

    def pad(a: list[Value]) -> Value:
        x = a[0]
        out = np.zeros([d + lo + hi for d, (lo, hi) in zip(x.shape, last, strict=True)], x.dtype)
        out[tuple(slice(lo, lo + d) for d, (lo, _) in zip(x.shape, last, strict=True))] = x
        return out

    return pad
