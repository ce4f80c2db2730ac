"""Quantisers, one module per family, registered under string names (see ``registry``)."""

from . import (
    affine,
    binary,
    bitnet,
    dorefa,
    functional,
    granularity,
    lsq,
    pact,
    pow2,
    stochastic,
    ternary,
)
from .base import Quantizer, QuantSpec, scale_grad
from .registry import create, get, methods, register, roles_of

__all__ = [
    "QuantSpec",
    "Quantizer",
    "affine",
    "binary",
    "bitnet",
    "create",
    "dorefa",
    "functional",
    "get",
    "granularity",
    "lsq",
    "methods",
    "pact",
    "pow2",
    "register",
    "roles_of",
    "scale_grad",
    "stochastic",
    "ternary",
]
