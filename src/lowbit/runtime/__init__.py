"""Inference without the training code: the graph, its loader and executors, and CPU kernels.

Nothing here imports torch; numpy and the compiled kernels do the work.
"""

from .graph import Graph, GraphError, Node

__all__ = ["Graph", "GraphError", "Node"]
