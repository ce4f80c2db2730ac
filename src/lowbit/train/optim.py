"""Optimizer, learning-rate schedule and quantiser-aware regularisation for the trainer.

Quantiser scales (TTQ's ``Wp``/``Wn``, LSQ's step ``s``, PACT's clip ``alpha``) are small tensors
whose size *is* the quantisation grid; weight decay would pull them towards zero for no reason,
so every parameter owned by a quantiser module is put in a parameter group without it (found
by ownership, ``isinstance(module, Quantizer)``, not by name). Methods that want their own
penalty (PACT's L2 on ``alpha``) expose ``regularization()``, which the trainer adds to the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..quant.base import Quantizer
from .config import TrainConfig


def quantizer_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer owned by a quantiser module (``isinstance(m, Quantizer)``),
    by qualified name: TTQ's ``Wp``/``Wn``, LSQ's step, PACT's ``alpha``, observers' state."""
    found: dict[str, Tensor] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, Quantizer):
            for name, t in (*module.named_parameters(), *module.named_buffers()):
                found.setdefault(f"{prefix}.{name}" if prefix else name, t)
    return found


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: quantiser parameters (their scales) without weight decay,
    everything else with it. Parameters with ``requires_grad=False`` are left out; empty groups
    are dropped.
    """
    owned = {id(t) for t in quantizer_tensors(model).values()}
    scales, others = [], []
    for p in model.parameters():
        if p.requires_grad:
            (scales if id(p) in owned else others).append(p)
    groups = [
        {"params": others, "weight_decay": weight_decay},
        {"params": scales, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam (L2 decay) or AdamW (decoupled decay) over ``model``."""
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of ``config.lr`` at optimizer step ``i`` (0-based).

    With ``W = warmup_epochs * steps_per_epoch`` warm-up steps and ``T = epochs *
    steps_per_epoch`` steps in all: ``(i + 1) / W`` for ``i < W``; then, with ``t = i - W``,

    * cosine (Loshchilov & Hutter 2017, no restarts, to 0): ``(1 + cos(pi * t / (T - W))) / 2``;
    * step: ``gamma ** #{m in milestones : i >= m * steps_per_epoch}``;
    * constant: ``1``.
    """
    warmup = config.warmup_epochs * steps_per_epoch
    span = config.epochs * steps_per_epoch - warmup
    boundaries = [m * steps_per_epoch for m in config.step_milestones]

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(i - warmup, span) / span))
        if config.schedule == "step":
            return config.step_gamma ** sum(i >= b for b in boundaries)
        return 1.0

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step :class:`~torch.optim.lr_scheduler.LambdaLR` following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps_per_epoch))


def regularizers(model: nn.Module) -> list[Callable[[], Tensor]]:
    """The ``regularization()`` methods of ``model``'s modules (PACT's ``lambda/2 * alpha^2``)."""
    found = (getattr(m, "regularization", None) for m in model.modules())
    return [r for r in found if callable(r)]
