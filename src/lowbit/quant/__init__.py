"""Quantisers, one module per family, registered under string names (see ``registry``)."""

from . import (
    affine,
    binary,
    bitnet,
    dorefa,
    functional,
    granularity,
    lsq,
    ops,
    pact,
    pow2,
    stochastic,
    ternary,
)
from .base import Quantizer, QuantSpec, scale_grad
from .lazy_init import initialize
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
    "initialize",
    "lsq",
    "methods",
    "ops",
    "pact",
    "pow2",
    "register",
    "roles_of",
    "scale_grad",
    "stochastic",
    "ternary",
]
