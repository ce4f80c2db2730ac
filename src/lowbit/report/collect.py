"""What a report shows, read from run folders: scale trajectories, weights, sparsity.

* :func:`ttq_trajectories` -- TTQ's learned ``Wp`` and ``Wn`` per layer and epoch, from the
  ``scalars.jsonl`` the trainer writes (one JSON object per epoch);
* :func:`weight_pairs` -- per quantised layer, the float (latent) weights and the quantised
  weights the forward pass uses (``spec.dequantize(codes)``);
* :func:`layer_sparsity` -- per quantised layer, the share of zero quantised weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..nn import layer_weight_bias, weight_codes
from ..train.health import weight_zero_shares

TTQ_SCALES = {"wp": ".weight_quant.wp", "wn": ".weight_quant.wn"}


def ttq_trajectories(scalars_file: Path) -> dict[str, dict[str, list[float]]]:
    """``{layer: {"epoch": [...], "wp": [...], "wn": [...]}}`` from a ``scalars.jsonl``.

    A layer is listed when its ``<layer>.weight_quant.wp`` and ``.wn`` scalars are logged
    (TTQ); epochs missing one of them are skipped. Empty if the file does not exist.
    """
    if not Path(scalars_file).is_file():
        return {}
    found: dict[str, dict[str, list[float]]] = {}
    for line in Path(scalars_file).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        layers = {k.removesuffix(TTQ_SCALES["wp"]) for k in record if k.endswith(TTQ_SCALES["wp"])}
        for layer in sorted(layers):
            wn_key = layer + TTQ_SCALES["wn"]
            if wn_key not in record:
                continue
            series = found.setdefault(layer, {"epoch": [], "wp": [], "wn": []})
            series["epoch"].append(record["epoch"])
            series["wp"].append(record[layer + TTQ_SCALES["wp"]])
            series["wn"].append(record[wn_key])
    return found


@torch.no_grad()
def weight_pairs(model: nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{layer: (float weights, quantised weights)}`` for every quantised layer, flattened.

    The float weights are those the weight quantiser sees (BatchNorm folded for fused blocks);
    the quantised ones are their codes mapped back to reals, i.e. what inference computes with.
    """
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, module in model.named_modules():
        found = weight_codes(module)
        if found is None:
            continue
        codes, spec = found
        latent = layer_weight_bias(module)[0].detach().float().cpu().flatten().numpy()
        quantised = spec.dequantize(codes).detach().float().cpu().flatten().numpy()
        pairs[name] = (latent, quantised)
    return pairs


def float_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """``{layer: weights}`` of every conv and linear layer of a float model, flattened."""
    return {
        name: m.weight.detach().float().cpu().flatten().numpy()
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    }


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """``{layer: share of zero quantised weights}`` (see :mod:`lowbit.train.health`)."""
    return weight_zero_shares(model)
