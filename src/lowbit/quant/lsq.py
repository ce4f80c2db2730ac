"""Learned Step Size Quantization (Esser et al. 2019).

LSQ quantises ``v`` with a learned step ``s``::

    v_bar = round(clip(v / s, -QN, QP)),   v_hat = v_bar * s

signed data (weights): ``QN = 2^(b-1)``, ``QP = 2^(b-1) - 1``; unsigned data (post-ReLU
activations): ``QN = 0``, ``QP = 2^b - 1``. The option checks and grid helpers it uses live in
:mod:`lowbit.quant.functional`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..contract import InputQuant
from . import ops
from .base import Quantizer, QuantSpec, Role, channel_view, scale_grad
from .functional import (
    abs_rows,
    check_bool,
    check_int,
    check_per_channel,
    check_role,
    positive,
    signed_bounds,
    static_runtime_spec,
    uniform_grid_codes,
)
from .registry import ROLES, register


# --------------------------------------------------------------------------- LSQ module
@register("lsq", roles=ROLES)
class LSQ(Quantizer):
    """Learned Step Size Quantization (Esser et al. 2019), weights or activations.

    Forward ``v_hat = round(clip(v / s, -QN, QP)) * s`` (round half to even). Backward:
    ``dv_hat/dv = 1`` inside the range, 0 outside; ``dv_hat/ds`` by Eq. 3. Boundary convention
    (that of ``torch._fake_quantize_learnable_per_tensor_affine``): an element counts as inside
    when its *rounded* value ``round(v / s)`` lies in ``[-QN, QP]``; there ``dv_hat/ds =
    round(v/s) - v/s``, outside ``-QN`` or ``QP``. This differs from the paper's
    ``1{-QN < v/s < QP}`` only in the half step just beyond each clip edge, whose values round
    onto the edge level anyway. Forward and backward are the fused ``lowbit::lsq_quant``
    operator (:mod:`lowbit.quant.ops`). The step gradient is multiplied by ``gs = 1 / sqrt(N * QP)``
    (Eq. 4) through ``s_used = s * gs + (s - s * gs).detach()``, where ``N`` is the number of
    elements that share one step: all weights of the layer, the weights of one output channel
    when ``per_channel``, or the features of one sample (``x[0].numel()``) for activations.

    ``s`` is an ``nn.Parameter`` initialised on the first forward to ``2 * mean(|v|) / sqrt(QP)``
    (per output channel when ``per_channel``; activations: from the first batch). With
    ``per_channel`` its shape is unknown until then, so it starts as an
    ``UninitializedParameter`` (like ``torch.nn.LazyLinear``): an optimizer may hold it already,
    but run one forward (or load a state dict) before wrapping the model in DDP or saving it.
    The ``initialized`` buffer, saved in the state dict, stops a loaded step from being re-set.
    The step used is ``max(|s|, tiny)`` so it stays positive (see :func:`positive`).

    Args:
        role: ``"weight"`` or ``"activation"``.
        bits: 2..8.
        signed: None picks signed for weights and, for activations, unsigned if the first
            batch has ``min(x) >= 0`` else signed; the choice is kept in the ``signed`` buffer.
        per_channel: one step per output channel (dim 0); weights only.
        grad_scale: apply Eq. 4's ``gs`` (False: ``gs = 1``).
    """

    def __init__(
        self,
        role: Role = "weight",
        *,
        bits: int = 4,
        signed: bool | None = None,
        per_channel: bool = False,
        grad_scale: bool = True,
    ) -> None:
        super().__init__()
        self.role = check_role(role)  # type: ignore[misc]
        self.bits = check_int("bits", bits, 2, 8)
        if signed is not None:
            check_bool("signed", signed)
        self.per_channel = check_per_channel(per_channel, self.role)
        self.grad_scale = check_bool("grad_scale", grad_scale)
        self._sign_from_data = signed is None and self.role == "activation"
        self.step: nn.Parameter = (
            nn.parameter.UninitializedParameter() if per_channel else nn.Parameter(torch.ones(()))
        )
        self.register_buffer("signed", torch.tensor(signed is not False))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # Python mirror of the buffers: no host sync after the first call
        self._qn, self._qp = signed_bounds(self.bits, True)
        self.register_load_state_dict_pre_hook(LSQ._materialize_on_load)
        self.register_load_state_dict_post_hook(LSQ._reset_after_load)

    # -- initialisation: the only host syncs, once after construction or loading ---------------
    @torch.no_grad()
    def _prepare(self, x: Tensor) -> None:
        """Read the buffers; on first use decide the sign and initialise ``s`` from ``x``."""
        fresh = not bool(self.initialized)
        if fresh and self._sign_from_data:
            self.signed.fill_(bool(x.min() < 0))
        self._qn, self._qp = signed_bounds(self.bits, bool(self.signed))
        if fresh:
            if isinstance(self.step, nn.parameter.UninitializedParameter):
                self.step.materialize((x.shape[0],), device=x.device, dtype=x.dtype)
            mean_abs = abs_rows(x, self.per_channel).mean(dim=-1)
            self.step.copy_(positive(2.0 * mean_abs / math.sqrt(self._qp)))
            self.initialized.fill_(True)
        self._ready = True

    @staticmethod
    def _materialize_on_load(
        module: LSQ, state_dict: dict[str, Tensor], prefix: str, *_: Any
    ) -> None:
        key = prefix + "step"
        if isinstance(module.step, nn.parameter.UninitializedParameter) and key in state_dict:
            module.step.materialize(state_dict[key].shape)

    @staticmethod
    def _reset_after_load(module: LSQ, _incompatible: Any) -> None:
        module._ready = False

    # -- quantisation ------------------------------------------------------------------------
    def grad_factor(self, x: Tensor) -> float:
        """Eq. 4's ``gs = 1 / sqrt(N * QP)`` for input ``x`` (1.0 when ``grad_scale`` is off).

        ``QP`` is the one of the current sign, which an activation decides on its first call.
        """
        if not self.grad_scale:
            return 1.0
        if self.role == "activation":
            n = x[0].numel() if x.dim() > 0 else 1
        else:
            n = x.numel() // (x.shape[0] if self.per_channel else 1)
        return 1.0 / math.sqrt(n * self._qp)

    def _scale(self, x: Tensor) -> Tensor:
        """``s_used``: the positive step with Eq. 4's gradient scale, broadcastable to ``x``."""
        if not self._ready:
            self._prepare(x)
        s = channel_view(positive(self.step), x.dim(), 0 if self.per_channel else None)
        return scale_grad(s, self.grad_factor(x))

    def forward(self, x: Tensor) -> Tensor:
        return ops.lsq_quant(x, self._scale(x), self._qn, self._qp)

    @torch.no_grad()
    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        """Codes ``clamp(round(x / s), -QN, QP)``; spec ``uniform``, scale ``s``, no zero point.

        Initialises ``s`` from ``x`` first if no forward has done so, as ``forward`` would.
        """
        s, signed = self._scale(x), bool(self.signed)
        return uniform_grid_codes(x, s, self._qn, self._qp, self.bits, self.per_channel, signed)

    @torch.no_grad()
    def runtime_spec(self, x: Tensor) -> InputQuant | None:
        """Static ``uniform`` grid with the step forward uses for inputs shaped like ``x``.

        The step is ``s_used`` (Eq. 4's gradient-scale trick can move it by an ulp, so it is
        computed as forward computes it) and the multiplier ``1 / s_used``. ValueError for a
        weight quantiser or an activation step that no forward has initialised yet.
        """
        if self.role != "activation":
            return super().runtime_spec(x)
        if not bool(self.initialized):
            raise ValueError(
                "LSQ activation step is not initialised: run the model on data once before export"
            )
        s = self._scale(x).reshape(())
        spec = QuantSpec(
            "uniform", self.bits, -self._qn, self._qp, scale=s, signed=bool(self.signed)
        )
        return static_runtime_spec(spec, 1.0 / s)

    def extra_repr(self) -> str:
        return f"role={self.role}, bits={self.bits}, per_channel={self.per_channel}"
