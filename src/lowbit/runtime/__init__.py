"""Inference without the training code: the graph, its loader and executors, and CPU kernels.

Nothing here imports torch; numpy and the compiled kernels do the work.
"""

from .executor import Model, Prediction, classify, read_input
from .graph import Graph, GraphError, Node
from .integer import IntegerProgram, compile_integer
from .loader import (
    FileSummary,
    LowbitFileError,
    file_summary,
    graph_from_bytes,
    load,
    load_graph,
    loads,
)

__all__ = [
    "FileSummary",
    "Graph",
    "GraphError",
    "IntegerProgram",
    "LowbitFileError",
    "Model",
    "Node",
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
