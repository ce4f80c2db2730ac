"""Inference without the training code: the loader, the float and integer engines, CPU kernels.

Nothing here imports torch; numpy and the compiled kernels do the work. The graph and its
specs are the contract types of :mod:`lowbit.contract`.
"""

from ..contract import Graph, GraphError, Node
from .inputs import classify, read_input
from .integer import IntegerProgram, compile_integer
from .loader import LowbitFileError, graph_from_bytes, load, load_graph, loads
from .model import Model, Prediction
from .onnx_model import OnnxModel
from .summary import FileSummary, file_summary

__all__ = [
    "FileSummary",
    "Graph",
    "GraphError",
    "IntegerProgram",
    "LowbitFileError",
    "Model",
    "Node",
    "OnnxModel",
    "Prediction",
    "classify",
    "compile_integer",
    "file_summary",
    "graph_from_bytes",
    "load",
    "load_graph",
    "loads",
    "read_input",
]
