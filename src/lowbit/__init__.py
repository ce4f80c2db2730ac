"""lowbit: train, compress and run neural networks with 1- to 8-bit weights and activations.

The public API::

    import lowbit
    model = lowbit.quantize(model, "ttq")      # or a dict, a YAML/TOML path, a Recipe
    lowbit.check(model, "ttq", example_input=(1, 28, 28))  # layers left float, exportability
    lowbit.calibrate(model, batches)            # set data-driven quantiser state, no training
    lowbit.summary(model)                       # per-layer bits, sparsity, size vs float32
    lowbit.methods()                            # registered quantiser names
    lowbit.export(model, "model.lowbit", example_input=(1, 28, 28))   # bit-packed file
    lowbit.load("model.lowbit")(x)              # numpy inference, no torch needed

Names are imported on first use, so ``import lowbit.runtime`` (numpy only) does not pull in
torch and the training code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "quantize": "lowbit.convert",
    "calibrate": "lowbit.calibration",
    "Calibration": "lowbit.calibration",
    "check": "lowbit.preflight",
    "quantizers": "lowbit.convert",
    "regularization": "lowbit.convert",
    "methods": "lowbit.quant",
    "Recipe": "lowbit.recipe",
    "RecipeError": "lowbit.recipe",
    "summary": "lowbit.model_summary",
    "export": "lowbit.export",
    "load": "lowbit.runtime",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
