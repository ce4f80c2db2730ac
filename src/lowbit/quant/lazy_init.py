"""Explicit initialisation of lazily initialised quantisers, before ``torch.compile``.

Some quantisers set state from the first data they see: LSQ's step (and an activation's sign),
TTQ's ``Wp``/``Wn``, the random streams of BinaryConnect and stochastic rounding (created on
the input's device). That first call reads buffers on the host, so it must run eagerly; after it
the forward has no data-dependent Python branch and ``torch.compile(model, fullgraph=True)``
traces it. :func:`initialize` is that eager step; an ordinary first training step before
compiling does the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["initialize"]


@torch.no_grad()
def initialize(model: nn.Module, *inputs: Any, **kwargs: Any) -> nn.Module:
    """Initialise ``model``'s quantisers from one batch: ``model(*inputs, **kwargs)`` once, in
    evaluation mode and without gradients, then every module's train/eval mode as before.

    Evaluation mode leaves the training state alone: BatchNorm running statistics, the affine
    observers' ranges, ConvBnAct and quant-delay step counters and the random streams do not
    advance. Quantisers already initialised (or loaded from a checkpoint) keep their values.
    Returns ``model``. A ``torch.compile`` wrapper is unwrapped (the call must run eagerly).
    """
    model = getattr(model, "_orig_mod", model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        model(*inputs, **kwargs)
    finally:
        for module, training in modes:
            module.training = training
    return model
