"""Latent-weight clipping after optimizer steps (BNN, BinaryConnect).

Some methods keep the latent float weights inside a range (BNN: ``[-1, 1]``), declared by the
weight quantiser's ``latent_range``. :func:`register_latent_clipping` (called by
``lowbit.quantize``) records those weights, and one global optimizer step post-hook clamps them
after *any* optimizer's ``step()``, so a user's training loop needs no change. Loops that update
weights without ``torch.optim`` can call :func:`clip_latent_weights` after each update.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

_RANGES = WeakIdKeyDictionary()  # latent weight Parameter -> (low, high)
_hook_installed = False


def _latent_weights(model: nn.Module) -> list[tuple[Tensor, tuple[float, float]]]:
    found = []
    for module in model.modules():
        quant = getattr(module, "weight_quant", None)
        latent_range = getattr(quant, "latent_range", None)
        if latent_range is None:
            continue
        owner = module.conv if hasattr(module, "conv") else module
        found.append((owner.weight, latent_range))
    return found


def clip_latent_weights(model: nn.Module) -> None:
    """Clamp every latent weight of ``model`` whose quantiser declares a ``latent_range``."""
    with torch.no_grad():
        for weight, (lo, hi) in _latent_weights(model):
            weight.clamp_(lo, hi)


def register_latent_clipping(model: nn.Module) -> int:
    """Clamp ``model``'s latent weights after every optimizer step; returns how many are tracked."""
    global _hook_installed
    tracked = _latent_weights(model)
    for weight, latent_range in tracked:
        _RANGES[weight] = latent_range
    if tracked and not _hook_installed:
        register_optimizer_step_post_hook(_clip_after_step)
        _hook_installed = True
    clip_latent_weights(model)
    return len(tracked)


def _clip_after_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    if not _RANGES:
        return
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                bounds = _RANGES.get(p)
                if bounds is not None:
                    p.clamp_(*bounds)
