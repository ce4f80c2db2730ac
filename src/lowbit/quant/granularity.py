"""Activation granularity: which elements share one dynamic scale.

A transformer's activations vary by orders of magnitude from token to token, so one scale per
tensor wastes most of the grid on the few large tokens. Any activation quantiser can take

* ``granularity: tensor`` -- one statistic over the whole input;
* ``granularity: token`` -- one per row of the last dimension (each token of ``(B, T, D)``, each
  sample of ``(N, D)``);
* ``granularity: group`` with ``group_size: g`` -- one per run of ``g`` consecutive features of
  the last dimension (``D`` must be a multiple of ``g``).

:func:`grouped` gives the view in which the statistic is a reduction over the last dimension
(``(..., D / g, g)`` for groups), :func:`absmax` that statistic with ``keepdim``, so that
``codes = round(grouped(x) * (q / absmax))`` broadcasts. The helpers hold no state.
"""

from __future__ import annotations

from torch import Tensor

from .functional import check_choice, check_int

GRANULARITIES = ("tensor", "token", "group")


def check_granularity(granularity: object, group_size: object) -> tuple[str, int | None]:
    """``(granularity, group_size)`` validated: ``group_size`` is an int >= 1 exactly when
    ``granularity`` is ``"group"`` (None otherwise); else a ValueError naming the option."""
    check_choice("granularity", granularity, GRANULARITIES)
    if granularity == "group":
        return "group", check_int("group_size", group_size, 1)
    if group_size is not None:
        raise ValueError(f"group_size is only for granularity 'group', got {granularity!r}")
    return str(granularity), None


def grouped(x: Tensor, granularity: str, group_size: int | None) -> Tensor:
    """``x`` viewed so that one scale covers each row of the last dimension.

    ``tensor``: flattened to one row; ``token``: unchanged; ``group``: ``(..., D / g, g)``. A
    last dimension that ``group_size`` does not divide is a ValueError naming both.
    """
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "token":
        return x if x.dim() > 0 else x.reshape(1)
    d = x.shape[-1] if x.dim() > 0 else 1
    if group_size is None or d % group_size:
        raise ValueError(f"group_size {group_size} does not divide the last dimension ({d})")
    return x.reshape(*x.shape[:-1], d // group_size, group_size)


def absmax(x: Tensor, eps: float) -> Tensor:
    """``max(max|x|, eps)`` over the last dimension of a :func:`grouped` view, kept as size 1."""
    return x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(eps)
