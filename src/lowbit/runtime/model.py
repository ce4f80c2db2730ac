"""A runnable inference graph: :class:`Model` (float or integer engine) and :class:`Prediction`.

:class:`Model` executes the graph in float32 between layers (a whole forward pass runs the
compiled :class:`~lowbit.runtime.program.Program`: channels-last activations, packed sign bits
between binary layers; :meth:`Model.run_node` evaluates one node, with the same values) and
reproduces the fake-quant PyTorch model's evaluation outputs *to float tolerance*. Every
quantiser is applied as the training code applies it (:meth:`lowbit.contract.InputQuant.
fake_quantize`): the same codes bit for bit (static grids multiply by the file's float32
``inv_scale``, as PyTorch does, before rounding half to even) and the same float32 scales; only
the order of the sums differs (BLAS / popcount kernels instead of PyTorch's convolution), so a
layer's output differs by a few float32 ulps. Rarely such a difference moves a value across a
rounding or sign boundary of the next quantiser, changing one code by one step, and the change
propagates. The tolerance, as the tests check it:

* layer by layer (each node fed PyTorch's own input): ``|out - ref| <= 1e-5 max|ref|``;
* end to end: at least 97 % of the logits within ``1e-4 max|ref|`` on random inputs (all of them
  unless a code flipped), and top-1 agreement >= 99.9 % on the MNIST-5k test split for a
  trained model of every method.

Stochastic rounding's evaluation path (``dynamic_max_abs``) takes its scale from the whole
batch, as the PyTorch quantiser does, so its outputs depend on the batch they are computed in.
Which kernel each layer runs on: :mod:`lowbit.runtime.layers`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from ..contract import Graph, GraphError, Node, is_int
from .integer import IntegerProgram, compile_integer
from .layers import Layer
from .ops import NODE_OPS
from .program import Program
from .shapes import infer_shapes

__all__ = ["ENGINES", "Model", "Prediction", "top_classes"]

ENGINES = ("float", "integer", "auto")
F32 = np.float32


class Prediction(NamedTuple):
    """Top-k classes of each sample (``[N, k]``, best first) and their softmax probabilities."""

    indices: NDArray[np.int64]
    probs: NDArray[np.float32]


def top_classes(logits: NDArray[Any], k: int) -> Prediction:
    """The ``k`` largest softmax probabilities of each row of ``logits`` (best first)."""
    if not is_int(k) or k < 1:
        raise ValueError(f"top_k must be a positive int, got {k!r}")
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    idx = np.argsort(-probs, axis=1, kind="stable")[:, : min(k, probs.shape[1])]
    return Prediction(idx.astype(np.int64), np.take_along_axis(probs, idx, 1).astype(F32))


class Model:
    """A runnable inference graph: ``model(x)`` gives logits, ``model.predict(x, k)`` the top-k.

    ``engine``: ``"float"`` runs every layer on its kernel with float32 between layers (outputs
    equal the fake-quant model's to float tolerance); ``"integer"`` runs the integer-only engine
    of :mod:`lowbit.runtime.integer` (uint8/int8 codes, int32 accumulators, fixed-point
    requantisation; a GraphError for a graph that is not integer-only); ``"auto"`` takes the
    integer engine where the graph allows it. ``self.engine`` says which one runs.

    Built from a validated :class:`Graph` (:func:`lowbit.runtime.load` reads one from a
    ``.lowbit`` file). Construction checks every shape (:func:`infer_shapes`), decodes the
    weights once and plans the float engine's forward pass (``self.program``); it raises
    :class:`GraphError` for a graph it cannot run. Calls may come from several threads (scratch
    buffers are per thread).
    """

    def __init__(self, graph: Graph, source: str | Path = "<graph>", engine: str = "float") -> None:
        graph.validate()
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.graph = graph
        self.source = str(source)
        self.shapes = infer_shapes(graph)
        self.layers = {
            n.name: Layer(n, self.shapes[n.inputs[0]], self.shapes[n.name])
            for n in graph.nodes
            if n.op in ("conv2d", "linear")
        }
        self.integer: IntegerProgram | None = None
        if engine != "float":
            try:
                self.integer = compile_integer(graph)
            except GraphError:
                if engine == "integer":
                    raise
        self.engine = "float" if self.integer is None else "integer"
        self.program = None
        if self.integer is None:
            self.program = Program(graph, self.layers, self.shapes)

    @property
    def input_shape(self) -> list[int]:
        """Per-sample input shape (without the batch dimension)."""
        return [int(d) for d in self.graph.input_shape[1:]]

    @property
    def num_classes(self) -> int:
        return int(self.shapes[self.graph.outputs[0]][-1])

    @property
    def meta(self) -> dict[str, Any]:
        return self.graph.meta

    def kernels(self) -> dict[str, str]:
        """The kernel each weighted node runs on (see :func:`plan_layer`)."""
        return {name: layer.kind for name, layer in self.layers.items()}

    def __call__(self, x: NDArray[Any]) -> NDArray[np.float32]:
        """Logits ``[N, classes]`` for a float batch ``[N, *input_shape]`` (NCHW or NC)."""
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu" or list(arr.shape[1:]) != self.input_shape or arr.ndim < 2:
            raise ValueError(
                f"x must be a real array of shape [N, {', '.join(map(str, self.input_shape))}], "
                f"got dtype {arr.dtype} and shape {list(arr.shape)}"
            )
        if self.integer is not None:
            return self.integer.run(arr.astype(F32)).astype(F32)
        assert self.program is not None
        return self.program.run(arr.astype(F32))

    def run_node(self, node: Node, inputs: list[NDArray[np.float32]]) -> NDArray[np.float32]:
        """Evaluate one node of the graph on the given input arrays (float32)."""
        if node.name in self.layers:
            return self.layers[node.name](inputs[0])
        return NODE_OPS[node.op](node, inputs)

    def predict(self, x: NDArray[Any], top_k: int = 5) -> Prediction:
        """Top-``top_k`` classes (best first) and their softmax probabilities."""
        return top_classes(self(x), top_k)
