"""The deployment contract: what training hands to export and export to the runtime (numpy only).

* :class:`CodeSpec` -- how a weight's integer codes map back to reals (scheme, bits,
  qmin/qmax, scale, zero point, scale_neg, axis, signed); :data:`SCHEMES` its schemes;
* :class:`InputQuant` -- how a layer quantises its input at run time: :class:`StaticQuant`,
  :class:`SignQuant`, :class:`SignMeanAbsQuant`, :class:`DynamicMaxAbsQuant`;
* :class:`Node` and :class:`Graph` -- the inference graph (shapes and methods are node fields).

Every record is frozen (except :class:`Graph`, whose ``meta`` a writer may extend), checks its
fields when constructed (a :class:`GraphError` naming the problem), compares arrays exactly, and
has one ``to_json``/``from_json`` pair whose ``put``/``get`` hooks decide where arrays live
(inline lists by default; named tensors in a ``.lowbit`` file). Training
(:meth:`lowbit.quant.Quantizer.codes` / ``runtime_spec``), the graph builder, both writers, the
loader and both engines use these types and nothing else.
"""

from .activation import (
    INPUT_QUANTS,
    DynamicMaxAbsQuant,
    InputQuant,
    SignMeanAbsQuant,
    SignQuant,
    StaticQuant,
    mean_abs,
    signs,
)
from .base import GraphError, TensorGet, TensorPut, inline_get, inline_put, is_int
from .graph import OPS, WEIGHTED_OPS, Graph, Methods, Node, Shape, jsonable
from .spec import MAX_CODE, SCHEMES, SPEC_TENSORS, CodeSpec

__all__ = [
    "INPUT_QUANTS",
    "MAX_CODE",
    "OPS",
    "SCHEMES",
    "SPEC_TENSORS",
    "WEIGHTED_OPS",
    "CodeSpec",
    "DynamicMaxAbsQuant",
    "Graph",
    "GraphError",
    "InputQuant",
    "Methods",
    "Node",
    "Shape",
    "SignMeanAbsQuant",
    "SignQuant",
    "StaticQuant",
    "TensorGet",
    "TensorPut",
    "inline_get",
    "inline_put",
    "is_int",
    "jsonable",
    "mean_abs",
    "signs",
]
