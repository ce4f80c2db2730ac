"""Post-training quantisation (PTQ) baselines: quantise a trained float model, no retraining.

The bench's question is whether quantisation-*aware* training beats simply quantising the
trained float model. Both baselines use lowbit's own quantisers and recipes, calibrated on a
few training batches with no gradient step (:func:`lowbit.calibrate`):

* **int8** (:func:`ptq_int8`): the ``affine`` recipe of Jacob et al. (2018) -- int8 symmetric
  per-channel weights, BatchNorm folded into the convs, uint8 activations whose ranges are the
  quantisers' own EMA min/max observers, run in training mode over the calibration batches while
  every other module stays in evaluation mode (BatchNorm statistics untouched).
* **4-bit** (:func:`ptq_uniform`): the ``lsq`` recipe at 4 bits (first and last layer 8-bit),
  i.e. the very quantisers LSQ fine-tunes, with each step ``s`` set by minimising the
  quantisation error ``||Q_s(v) - v||^2`` over ``s = f * max|v| / QP`` for a grid of ``f`` in
  ``(0, 1]`` (the MSE-based clipping search of PTQ practice), on the layer's weights and on the
  activation quantiser's calibration inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import activation_quantizers, calibrate
from ..convert import quantize
from ..nn import layer_weight_bias
from ..quant.functional import signed_bounds
from ..quant.lsq import LSQ
from ..recipe import Recipe

MSE_GRID = 64  # clipping fractions f = 1/64, 2/64, ..., 1
MAX_CALIBRATION_VALUES = 1 << 20  # activation values kept per quantiser for the step search


PTQ_KINDS = ("int8", "4bit")


def _check_kind(kind: str) -> str:
    if kind not in PTQ_KINDS:
        raise ValueError(f"kind must be one of {PTQ_KINDS}, got {kind!r}")
    return kind


def ptq_recipe(kind: str, bits: int = 4) -> Recipe:
    """The recipe a PTQ baseline applies: ``affine`` for ``int8``, ``lsq`` at ``bits`` for
    ``4bit`` (whose inner layers then have ``bits`` bits; 4 by default)."""
    if _check_kind(kind) == "int8":
        return Recipe.load("affine")
    return Recipe.load({"method": "lsq", "bits": bits})


def apply_ptq(kind: str, model: nn.Module, batches: Iterable[Tensor], seed: int = 0) -> nn.Module:
    """Quantise a trained float ``model`` in place with baseline ``kind`` (``int8``/``4bit``)."""
    if _check_kind(kind) == "int8":
        return ptq_int8(model, batches)
    return ptq_uniform(model, batches, bits=4, seed=seed)


def ptq_int8(model: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Quantise a trained float ``model`` in place with the int8 ``affine`` recipe, calibrated."""
    quantize(model, ptq_recipe("int8"))
    return calibrate(model, batches)


@torch.no_grad()
def mse_step(quantizer: LSQ, v: Tensor, grid: int = MSE_GRID) -> Tensor:
    """Set and return the LSQ step minimising ``||Q_s(v) - v||^2`` over ``s = f max|v| / QP``.

    ``f`` runs over ``1/grid, 2/grid, ..., 1``: ``f = 1`` is the max-based step (no clipping),
    smaller ``f`` clip outliers to resolve the bulk finer. The quantiser's own forward (eval
    mode) computes ``Q_s``, so the search sees exactly the grid training would use.
    """
    was_training = quantizer.training
    quantizer.eval()
    quantizer(v)  # initialises a fresh quantiser (sign, shape) before the search
    _, qp = signed_bounds(quantizer.bits, bool(quantizer.signed))
    top = v.abs().max().clamp_min(torch.finfo(v.dtype).tiny) / qp
    best_err, best = None, quantizer.step.detach().clone()
    for i in range(1, grid + 1):
        quantizer.step.fill_(float(top) * i / grid)
        err = (quantizer(v) - v).square().sum()
        if best_err is None or err < best_err:
            best_err, best = err, quantizer.step.detach().clone()
    quantizer.step.copy_(best)
    quantizer.train(was_training)
    return best


def _calibration_sample(values: list[Tensor], generator: torch.Generator) -> Tensor:
    """All recorded values of one quantiser, flattened; a seeded random subset if too many."""
    flat = torch.cat([v.flatten() for v in values])
    if flat.numel() <= MAX_CALIBRATION_VALUES:
        return flat
    keep = torch.randperm(flat.numel(), generator=generator)[:MAX_CALIBRATION_VALUES]
    return flat[keep.to(flat.device)]


def ptq_uniform(
    model: nn.Module, batches: Iterable[Tensor], bits: int = 4, seed: int = 0
) -> nn.Module:
    """Quantise a trained float ``model`` in place with LSQ quantisers at ``bits``, MSE steps.

    Inner layers get ``bits`` for weights and activations, the first and last layer 8 bits (the
    ``lsq`` recipe). Weight steps are searched on the layer's weights, activation steps on the
    quantiser's inputs over ``batches`` (see :func:`mse_step`); ``seed`` picks the subset of
    calibration values when there are more than :data:`MAX_CALIBRATION_VALUES`.
    """
    quantize(model, ptq_recipe("4bit", bits))
    seen: dict[str, list[Tensor]] = {}
    calibrate(model, batches, record=lambda n, x: seen.setdefault(n, []).append(x))
    generator = torch.Generator().manual_seed(seed)
    acts = activation_quantizers(model)
    for name, values in seen.items():
        if isinstance(acts[name], LSQ):
            mse_step(acts[name], _calibration_sample(values, generator))
    for module in model.modules():
        quant: Any = getattr(module, "weight_quant", None)
        if isinstance(quant, LSQ):
            mse_step(quant, layer_weight_bias(module)[0].detach())
    model.eval()
    return model
