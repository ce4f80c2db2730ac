"""Helpers shared by the quantiser families of :mod:`lowbit.quant`.

* option checks (:func:`check_int`, :func:`check_real`, :func:`check_bool`,
  :func:`check_choice`, :func:`check_role`, :func:`check_per_channel`): return the value or
  raise a ValueError that names the option and the bad value;
* the straight-through estimator :func:`straight_through` (Bengio et al. 2013);
* uniform-grid helpers (:func:`signed_bounds`, :func:`uniform_codes`, :func:`uniform_grid_codes`)
  and small tensor helpers (:func:`positive`, :func:`abs_rows`,
  :func:`scalar_like`);
* :class:`SeededRandom`, the module-owned random stream of the stochastic quantisers;
* :func:`static_runtime_spec`, the deployment form of a fixed-grid activation quantiser.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from numbers import Real
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from ..contract import StaticQuant
from . import ops
from .base import QuantSpec, Role, channel_view
from .registry import ROLES

CODE_DTYPE = torch.int32
"""dtype of the integer codes returned by the uniform-grid quantisers' ``codes``."""

MAX_SEED = 2**64 - 1
"""Largest seed :meth:`torch.Generator.manual_seed` takes."""

_T = TypeVar("_T")


# --------------------------------------------------------------------------- option checks
def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """Return ``value`` if it is an ``int`` (not a bool) in ``[low, high]`` (``high`` None: no
    upper bound), else ValueError naming ``name``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not (ok and low <= value and (high is None or value <= high)):  # type: ignore[operator]
        where = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {where}, got {value!r}")
    return value  # type: ignore[return-value]


def check_real(
    name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = False
) -> float:
    """Return ``float(value)`` if ``value`` is a finite real number (not a bool) in ``[low, high)``
    (``(low, high)`` when ``low_open``), else ValueError naming ``name``."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (low < value if low_open else low <= value) and value < high  # type: ignore[operator]
    if not ok:
        where = f"{'(' if low_open else '['}{low}, {high})"
        raise ValueError(f"{name} must be a finite number in {where}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool``, else ValueError naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: _T, choices: Sequence[_T]) -> _T:
    """Return ``value`` if it is one of ``choices``, else ValueError naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_role(role: object) -> Role:
    """Return ``role`` if it is ``"weight"`` or ``"activation"``, else ValueError."""
    return check_choice("role", role, ROLES)  # type: ignore[return-value]


def check_per_channel(per_channel: object, role: Role) -> bool:
    """Validate ``per_channel``: a bool, and only for weights (one scale per output channel)."""
    check_bool("per_channel", per_channel)
    if per_channel and role != "weight":
        raise ValueError(f"per_channel=True is only for weights, got role={role!r}")
    return bool(per_channel)


# --------------------------------------------------------------------------- straight-through
class _StraightThrough(torch.autograd.Function):
    """Forward returns the precomputed ``q``; backward passes ``g`` (times ``mask``) to ``x``."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, q: Tensor, mask: Tensor | None) -> Tensor:
        ctx.save_for_backward(mask)
        return q.view_as(q)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return (g if mask is None else g * mask), None, None


def straight_through(x: Tensor, q: Tensor, mask: Tensor | None = None) -> Tensor:
    """Straight-through estimator (Bengio et al. 2013): value ``q``, gradient ``g * mask`` to ``x``.

    ``q`` and ``mask`` are constants (no gradient flows into them); ``mask=None`` is the
    identity STE, ``dx = g``. The forward value is ``q`` bit for bit (unlike
    ``x + (q - x).detach()``, which costs two passes and can be an ulp off), so
    :meth:`Quantizer.codes` can reproduce it exactly.
    """
    return _StraightThrough.apply(x, q.detach(), mask)


# --------------------------------------------------------------------------- uniform grids
def signed_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """LSQ's ``(QN, QP)``: ``(2^(b-1), 2^(b-1) - 1)`` if ``signed``, else ``(0, 2^b - 1)``."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def uniform_codes(x: Tensor, inv_step: Tensor | float, low: int, high: int) -> Tensor:
    """Integer-valued float codes ``clamp(round(x * inv_step), low, high)`` (round half to even).

    Clamping after rounding equals rounding after clipping for integer bounds and costs one
    pass less. Every uniform quantiser computes its codes here, so ``forward`` and ``codes``
    agree bit for bit.
    """
    return (x * inv_step).round_().clamp_(low, high)


def uniform_grid_codes(
    x: Tensor, step: Tensor, qn: int, qp: int, bits: int, per_channel: bool, signed: bool = True
) -> tuple[Tensor, QuantSpec]:
    """Codes ``clamp(round(x / step), -QN, QP)`` and their ``uniform`` spec (no zero point).

    ``step`` holds one value (per tensor) or one per output channel (dim 0, ``per_channel``),
    in any shape with that many elements; the spec's scale is a scalar or a ``(C,)`` vector.
    """
    axis = 0 if per_channel else None
    scale = step.reshape(-1) if per_channel else step.reshape(())
    c = uniform_codes(x, 1.0 / channel_view(scale, x.dim(), axis), -qn, qp)
    spec = QuantSpec("uniform", bits, -qn, qp, scale=scale, axis=axis, signed=signed)
    return c.to(CODE_DTYPE), spec


def static_runtime_spec(spec: QuantSpec, inv_scale: Tensor | float) -> StaticQuant:
    """The :class:`~lowbit.contract.StaticQuant` of :meth:`Quantizer.runtime_spec`: the spec,
    plus the float32 multiplier ``inv_scale`` that forward applies before rounding (``codes =
    round(x * inv_scale)``), so a runtime reproduces the codes bit for bit."""
    inv = torch.as_tensor(inv_scale, dtype=torch.float32).detach().reshape(())
    return StaticQuant(spec.to_contract(), float(inv.item()))


# --------------------------------------------------------------------------- tensor helpers
def positive(t: Tensor) -> Tensor:
    """``max(|t|, tiny)``: a learned scale kept strictly positive without touching ``.data``.

    ``abs`` lets a step that an update pushed below zero keep learning (as ``|s|``); the floor at
    the dtype's smallest normal number keeps ``1 / s`` finite.
    """
    return t.abs().clamp_min(torch.finfo(t.dtype).tiny)


def abs_rows(x: Tensor, per_channel: bool) -> Tensor:
    """``|x|`` (detached) flattened to one row per output channel (dim 0), or to one row.

    Reduce with ``dim=-1`` to get a per-channel vector or a per-tensor scalar statistic.
    """
    a = x.detach().abs()
    return a.reshape(x.shape[0], -1) if per_channel else a.reshape(-1)


def scalar_like(x: Tensor, value: float) -> Tensor:
    """A 0-d tensor holding ``value`` in ``x``'s dtype and on its device."""
    return torch.full((), value, dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------- randomness
class SeededRandom:
    """Mixin for quantisers that draw random numbers from a generator they own.

    The subclass sets ``self.seed`` (checked with ``check_int("seed", seed, 0, MAX_SEED)``).
    The stream is that of a :class:`torch.Generator` on the input's device seeded with ``seed``;
    its state is held in a tensor (:meth:`rng_state`, created on the first call on a device,
    afresh, so re-seeded, when the input moves to another device) and advanced in place by the
    ``lowbit::uniform_from_state`` operator, so ``torch.compile`` traces the draws as one op with
    the state as module state. The global RNG is never touched.

    The state is the module's ``extra_state`` in ``state_dict``, so a checkpoint resumes the
    random stream where it stopped (restored when the state is next created on a device of the
    same kind; otherwise it is seeded afresh).
    """

    seed: int
    _rng_state: Tensor | None = None
    _rng_device: torch.device | None = None
    _saved_state: Tensor | None = None

    def rng_state(self, device: torch.device) -> Tensor:
        """The state (CPU uint8 tensor) of the module's stream on ``device``, created on first
        use. Call it once outside ``torch.compile`` (any eager forward does) before compiling."""
        if self._rng_state is None or self._rng_device != device:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            if self._saved_state is not None:
                with contextlib.suppress(RuntimeError):  # a state saved on another device kind
                    gen.set_state(self._saved_state)
                self._saved_state = None
            self._rng_state, self._rng_device = gen.get_state(), device
        return self._rng_state

    def get_extra_state(self) -> Tensor:
        """The generator state (a ByteTensor); that of a fresh seeded CPU one before first use."""
        if self._rng_state is not None:
            return self._rng_state.clone()
        if self._saved_state is not None:
            return self._saved_state
        return torch.Generator().manual_seed(self.seed).get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self._saved_state = state.clone()
        self._rng_state = None

    def uniform_like(self, x: Tensor) -> Tensor:
        """Draws ``u ~ U[0, 1)`` of ``x``'s shape, dtype and device from the module's stream."""
        return ops.uniform_from_state(x.detach(), self.rng_state(x.device))
