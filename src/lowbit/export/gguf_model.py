"""Torch side of the GGUF export: a LLaMA model's parameters as numpy, through ``codes()``.

:func:`gguf_weights` is the only place that touches torch: it asks every quantised layer's
weight quantiser for its codes and :class:`~lowbit.quant.base.QuantSpec`, and hands
:func:`lowbit.export.gguf.write_llama_gguf` plain numpy arrays.

Activations: a GGUF file holds weights only; llama.cpp computes activations itself (float32,
and for TQ1_0/TQ2_0 matrix products int8 with one absmax scale per 256 values, its ``Q8_K``).
lowbit's 8-bit per-token ``absmax`` activations without the in-layer norm are that rule (the
same grid, per row of 256 or finer), so they pass. Any other input quantiser (BitNet's
in-layer RMSNorm, which the ``llama`` graph has no op for; fewer bits; LSQ, PACT, ...) changes
what the layer computes and is an error naming the layer, unless ``float_activations=True``
accepts that the GGUF model computes those activations in float.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.llama import LlamaForCausalLM, RMSNorm
from ..quant.bitnet import AbsMaxActivation
from .gguf import GGUFExportError, WeightEntry, write_llama_gguf

__all__ = ["activation_issue", "export_gguf", "gguf_weights"]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _matrix_entry(module: nn.Module) -> dict[str, Any]:
    weight = module.weight
    quantizer = getattr(module, "weight_quant", None)
    if quantizer is None:
        return {"values": _numpy(weight), "scheme": "float"}
    codes, spec = quantizer.codes(weight)
    entry: dict[str, Any] = {"values": _numpy(spec.dequantize(codes)), "scheme": spec.scheme}
    if spec.scheme == "ternary":
        entry.update(
            codes=codes.detach().cpu().numpy().astype(np.int8),
            scale=_numpy(spec.scale),
            scale_neg=None if spec.scale_neg is None else _numpy(spec.scale_neg),
            axis=spec.axis,
        )
    return entry


def activation_issue(module: nn.Module) -> str | None:
    """Why llama.cpp would not reproduce ``module``'s input quantiser (None: it would)."""
    q = getattr(module, "input_quant", None)
    if q is None:
        return None
    if isinstance(q, AbsMaxActivation):
        if q.norm:
            return "its input quantiser normalises (BitNet's in-layer RMSNorm, norm: true)"
        if q.bits == 8 and q.granularity == "token":
            return None
    return f"its input quantiser ({type(q).__name__}) has no llama.cpp form"


@torch.no_grad()
def gguf_weights(
    model: nn.Module, *, float_activations: bool = False
) -> tuple[dict[str, Any], dict[str, WeightEntry]]:
    """``(config, weights)`` of a lowbit LLaMA model for :func:`write_llama_gguf`: the config
    as a dict, and per Hugging Face parameter name a numpy :data:`WeightEntry`."""
    if not isinstance(model, LlamaForCausalLM):
        raise GGUFExportError(
            f"GGUF export writes lowbit's LLaMA family (lowbit.models.llama); got "
            f"{type(model).__name__}"
        )
    weights: dict[str, WeightEntry] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            issue = activation_issue(module)
            if issue is not None and not float_activations:
                raise GGUFExportError(
                    f"layer {name}: {issue}; llama.cpp computes activations itself. Train with "
                    "`norm: false` / 8-bit per-token absmax activations, or pass "
                    "float_activations=True (CLI --float-activations) to accept float inputs"
                )
            weights[f"{name}.weight"] = _matrix_entry(module)
        elif isinstance(module, RMSNorm):
            weights[f"{name}.weight"] = {"values": _numpy(module.weight), "scheme": "float"}
    return dataclasses.asdict(model.config), weights


def export_gguf(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    ternary_type: str = "tq2_0",
    float_type: str = "f16",
    fallback: str | None = None,
    float_activations: bool = False,
    name: str = "lowbit",
) -> Path:
    """Write a lowbit LLaMA model (float or quantised) as a llama.cpp GGUF file.

    Options as :func:`~lowbit.export.gguf.write_llama_gguf`; ``float_activations`` accepts
    input quantisers llama.cpp does not reproduce (see the module doc).
    """
    config, weights = gguf_weights(model, float_activations=float_activations)
    return write_llama_gguf(
        path,
        config,
        weights,
        ternary_type=ternary_type,
        float_type=float_type,
        fallback=fallback,
        name=name,
    )
