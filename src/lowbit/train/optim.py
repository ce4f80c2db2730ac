"""Optimizer, learning-rate schedule and quantiser-aware regularisation for the trainer.

Quantiser scales (TTQ's ``Wp``/``Wn``, LSQ's step ``s``, PACT's clip ``alpha``) are small tensors
whose size *is* the quantisation grid; weight decay would pull them towards zero for no reason,
so they are put in a parameter group without it. Methods that want their own penalty (PACT's L2
on ``alpha``) expose ``regularization()``, which the trainer adds to the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .config import TrainConfig

SCALE_NAMES = ("wp", "wn", "s", "alpha", "step")
"""Last name component of a quantiser scale (``layer.weight_quant.wp``): TTQ, LSQ, PACT."""


def is_quantizer_scale(name: str, tensor: Tensor) -> bool:
    """True for a 0-d or 1-d tensor whose name ends in one of :data:`SCALE_NAMES`.

    A lazily shaped (uninitialised) parameter, like LSQ's per-channel step before the first
    forward, counts as 1-d.
    """
    if name.rsplit(".", 1)[-1] not in SCALE_NAMES:
        return False
    return isinstance(tensor, nn.parameter.UninitializedParameter) or tensor.dim() <= 1


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: quantiser scales without weight decay, everything else with it.

    Parameters with ``requires_grad=False`` are left out; empty groups are dropped.
    """
    scales, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (scales if is_quantizer_scale(name, p) else others).append(p)
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
