"""lowbit: train, compress and run neural networks with 1- to 8-bit weights and activations.

The public API::

    import lowbit
    model = lowbit.quantize(model, "ttq")      # or a dict, a YAML/TOML path, a Recipe
    lowbit.summary(model)                       # per-layer bits, sparsity, size vs float32
    lowbit.methods()                            # registered quantiser names
"""

from .convert import quantize, quantizers, regularization
from .quant import methods
from .recipe import Recipe, RecipeError
from .summary import summary

__version__ = "0.1.0"
__all__ = [
    "Recipe",
    "RecipeError",
    "methods",
    "quantize",
    "quantizers",
    "regularization",
    "summary",
]
