"""Model builders by name, timm-style: ``register_model``, ``create_model``, ``list_models``.

A builder is any callable ``builder(num_classes, in_shape, **options) -> nn.Module`` (a class or
a function). ``create_model`` checks the common arguments, refuses options the builder does not
take, and initialises the weights (:func:`~lowbit.models.layers.init_weights`), optionally from
its own seeded generator so that the global RNG is left untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .layers import init_weights

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}
_TASKS: dict[str, str] = {}
TASKS = ("image", "text")
_COMMON = ("num_classes", "in_shape")


def register_model(name: str, task: str = "image") -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: make ``builder`` the model called ``name`` (names are unique).

    ``task``: ``"image"`` (inputs ``(N, C, H, W)``, class logits) or ``"text"`` (token ids
    ``(N, T)``, next-token logits ``(N, T, vocab)``; ``num_classes`` is the vocabulary).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def deco(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"model {name!r} is already registered: {_REGISTRY[name]}")
        _REGISTRY[name] = builder
        _TASKS[name] = task
        return builder

    return deco


def list_models(task: str | None = None) -> list[str]:
    """Registered model names, sorted; only those of ``task`` (``image``/``text``) if given."""
    return sorted(n for n in _REGISTRY if task is None or _TASKS[n] == task)


def model_task(name: str) -> str:
    """``"image"`` or ``"text"``: what model ``name`` takes (see :func:`register_model`)."""
    _lookup(name)
    return _TASKS[name]


def model_options(name: str) -> list[str]:
    """The keyword options model ``name`` takes besides ``num_classes`` and ``in_shape``."""
    params = inspect.signature(_lookup(name)).parameters
    return [p for p in params if p not in _COMMON]


def create_model(
    name: str,
    num_classes: int = 10,
    in_shape: Sequence[int] = (1, 28, 28),
    *,
    seed: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` for ``(C, H, W) = in_shape`` inputs and ``num_classes`` outputs.

    ``kwargs`` are the model's own options (see :func:`model_options`); an unknown one is a
    ValueError listing the valid ones. With ``seed`` the construction runs under a forked global
    RNG and the weights are drawn from ``torch.Generator().manual_seed(seed)``: the same seed
    gives the same weights and the caller's RNG stream is not advanced.
    """
    builder = _lookup(name)
    valid = model_options(name)
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise ValueError(
            f"model {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    shape = check_in_shape(in_shape)
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if seed is None:
        model = builder(num_classes=num_classes, in_shape=shape, **kwargs)
        init_weights(model)
        return model
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        model = builder(num_classes=num_classes, in_shape=shape, **kwargs)
    init_weights(model, torch.Generator().manual_seed(seed))
    return model


def check_in_shape(in_shape: Sequence[int]) -> tuple[int, ...]:
    """``in_shape`` as a tuple of positive ints, ``(C, H, W)`` for images or ``(T,)`` (the
    context length) for token sequences, else a ValueError naming it."""
    shape = tuple(in_shape) if isinstance(in_shape, (tuple, list)) else ()
    if len(shape) not in (1, 3) or not all(_is_int(d) and d > 0 for d in shape):
        raise ValueError(f"in_shape must be (C, H, W) or (T,) with positive ints, got {in_shape!r}")
    return shape


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _lookup(name: str) -> ModelBuilder:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name]
