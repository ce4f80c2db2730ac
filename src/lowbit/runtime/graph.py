"""The inference graph: what a ``.lowbit`` file holds, as plain numpy data (no torch).

``export`` builds a :class:`Graph` from a quantised model; the file stores it (packed); the
runtime loads it back and executes it. Nodes are in topological order; each names its inputs
(graph inputs or earlier nodes) and has one output named after itself.

Ops and their attributes (``attrs``) / arrays (``params``):

============== =========================================================================
``conv2d``     attrs ``stride``, ``padding``, ``dilation``, ``groups`` (pairs / int); a weight
``linear``     a weight; both may have ``bias`` and an ``input_quant`` (activation spec)
``batchnorm``  params ``scale``, ``shift`` (per channel: ``y = x * scale + shift``, folded from
               gamma, beta, mean, var); attrs ``dim`` (channel axis, 1)
``relu``       --
``clamp``      attrs ``min``, ``max`` (ReLU6, Hardtanh)
``maxpool2d``  attrs ``kernel_size``, ``stride``, ``padding`` (pairs)
``avgpool2d``  attrs ``kernel_size``, ``stride``, ``padding`` (pairs)
``global_avgpool2d`` -- (adaptive average pooling to 1x1, keeps dims)
``flatten``    attrs ``start_dim``
``add``        two inputs
``slice``      attrs ``starts``, ``stops``, ``steps`` (one per dim; stop None = to the end)
``pad``        attrs ``pads``: [[before, after], ...] per dim, zero padding
============== =========================================================================

A weight is either float (``weight_float``) or integer codes (``weight_codes``, unpacked,
in the weight's shape) with ``weight_spec``: the :class:`lowbit.quant.QuantSpec` as a dict
(``QuantSpec.to_dict()``: scheme, bits, qmin, qmax, scale, zero_point, scale_neg, axis, signed),
so dequantising codes with the spec gives the fake-quant weight exactly.

An ``input_quant`` describes how the layer quantises its input at run time, one of:

* ``{"kind": "static", "spec": {...}, "inv_scale": float}`` -- ``codes =
  clip(round_half_even(x * inv_scale) + zp, qmin, qmax)`` with a fixed uniform/affine spec (LSQ,
  PACT, DoReFa, affine/Jacob); ``inv_scale`` is the float32 multiplier the quantiser itself
  applies (``n / alpha`` for PACT), which makes the codes bit-exact; without it ``1 / scale``;
* ``{"kind": "sign"}`` -- codes ``+1`` where ``x >= 0`` else ``-1``, scale 1 (BNN);
* ``{"kind": "sign_mean_abs", "per_sample": bool}`` -- XNOR-Net: sign codes times
  ``beta = mean(|x|)`` over the channel dim (or over all non-batch dims per sample);
* ``{"kind": "dynamic_max_abs", "qmax": int}`` -- symmetric grid with scale ``max|x| / qmax``
  computed per call (stochastic rounding's evaluation path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
INPUT_QUANT_KINDS = ("static", "sign", "sign_mean_abs", "dynamic_max_abs")


class GraphError(ValueError):
    """A graph that is not well formed; the message names the node."""


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    weight_float: np.ndarray | None = None
    weight_codes: np.ndarray | None = None
    weight_spec: dict[str, Any] | None = None
    bias: np.ndarray | None = None
    input_quant: dict[str, Any] | None = None


@dataclass
class Graph:
    inputs: list[str]
    input_shape: list[int | None]  # None for the batch dimension
    nodes: list[Node]
    outputs: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check ops, references (topological order), weights and input-quant kinds."""
        known = set(self.inputs)
        for node in self.nodes:
            if node.op not in OPS:
                raise GraphError(f"node {node.name!r}: unknown op {node.op!r}")
            missing = [i for i in node.inputs if i not in known]
            if missing:
                raise GraphError(
                    f"node {node.name!r}: input {missing[0]!r} is not defined before it"
                )
            if node.name in known:
                raise GraphError(f"node {node.name!r}: name used twice")
            if node.op in WEIGHTED_OPS:
                has_float = node.weight_float is not None
                has_codes = node.weight_codes is not None and node.weight_spec is not None
                if has_float == has_codes:
                    raise GraphError(
                        f"node {node.name!r}: needs either a float weight or codes with a spec"
                    )
            if (
                node.input_quant is not None
                and node.input_quant.get("kind") not in INPUT_QUANT_KINDS
            ):
                raise GraphError(
                    f"node {node.name!r}: unknown input_quant kind {node.input_quant.get('kind')!r}"
                )
            known.add(node.name)
        for out in self.outputs:
            if out not in known:
                raise GraphError(f"graph output {out!r} is not a node")
