"""``summary(model)``: per-layer method, bits, parameters, sparsity and the model's size.

Sizes are in bits as the deployment format stores them (:func:`lowbit.packing.stored_bits`, the
one definition of size: binary 1 bit a weight, ternary 1.6, n-bit codes at the fewest bits that
hold them, each layer's codes padded to whole bytes as in the file) plus scales/zero points in
float32; everything else (float layers, biases,
BatchNorm) in float32. The float32 reference counts every parameter and BatchNorm statistic at
32 bits. Files written by ``export`` are measured in bytes by ``lowbit summary FILE``.

Sparsity has one definition too (:func:`weight_zero_counts`): the share of a layer's quantised
weights whose real value ``spec.dequantize(codes)`` is exactly zero. Layers that stay float
because lowbit cannot quantise them (:func:`lowbit.convert.float_layers`) are listed as float.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from .convert import float_layers
from .nn import ConvBnAct, QuantConv2d, QuantLinear, layer_weight_bias, weight_codes
from .packing import stored_bits
from .quant.base import Quantizer, QuantSpec

FLOAT_BITS = 32


@dataclass
class LayerRow:
    name: str
    kind: str
    weight_method: str
    weight_bits: float
    act_method: str
    act_bits: int
    params: int
    sparsity: float | None
    size_bits: int


@dataclass
class ModelSummary:
    layers: list[LayerRow]
    total_params: int
    size_bits: int
    float32_bits: int

    @property
    def compression(self) -> float:
        """float32 size over quantised size."""
        return self.float32_bits / max(self.size_bits, 1)

    def to_dict(self) -> dict[str, object]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "total_params": self.total_params,
            "size_bits": self.size_bits,
            "float32_bits": self.float32_bits,
            "compression": self.compression,
        }

    def table(self) -> Table:
        t = Table(title="lowbit model summary")
        for col in (
            "layer",
            "type",
            "weights",
            "w bits",
            "activations",
            "a bits",
            "params",
            "sparsity",
            "size (KiB)",
        ):
            t.add_column(col, justify="left" if col in ("layer", "type") else "right")
        for r in self.layers:
            t.add_row(
                r.name,
                r.kind,
                r.weight_method,
                f"{r.weight_bits:g}",
                r.act_method,
                "-" if r.act_bits == 0 else str(r.act_bits),
                f"{r.params:,}",
                "-" if r.sparsity is None else f"{r.sparsity:.1%}",
                f"{r.size_bits / 8192:.2f}",
            )
        t.caption = (
            f"{self.total_params:,} parameters; {self.size_bits / 8192:.1f} KiB vs "
            f"{self.float32_bits / 8192:.1f} KiB float32 ({self.compression:.1f}x smaller)"
        )
        return t


def summary(model: nn.Module, console: Console | None = None, show: bool = True) -> ModelSummary:
    """Summarise a (quantised) model; prints a table unless ``show`` is False."""
    rows: list[LayerRow] = []
    counted: set[int] = set()
    others = float_layers(model)
    for name, module in model.named_modules():
        if name in others:
            rows.append(_float_row(name, module))
        elif _counts_as_layer(name, module, others, counted):
            rows.append(_layer_row(name, module))
        else:
            continue
        counted.update(id(t) for t in (*module.parameters(), *module.buffers()))
    rest = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    rest += sum(
        b.numel()
        for n, b in model.named_buffers()
        if id(b) not in counted and _is_inference_buffer(n)
    )
    total = sum(p.numel() for p in model.parameters())
    stats = sum(b.numel() for n, b in model.named_buffers() if _is_inference_buffer(n))
    result = ModelSummary(
        layers=rows,
        total_params=total,
        size_bits=sum(r.size_bits for r in rows) + FLOAT_BITS * rest,
        float32_bits=FLOAT_BITS * (total + stats),
    )
    if show:
        (console or Console()).print(result.table())
    return result


def _counts_as_layer(
    name: str, module: nn.Module, others: dict[str, str], counted: set[int]
) -> bool:
    """A conv/linear/embedding layer not yet counted and not inside a layer that stays float."""
    layer_types = (QuantConv2d, QuantLinear, ConvBnAct, nn.Conv2d, nn.Linear, nn.Embedding)
    if not isinstance(module, layer_types) or id(_layer_weight(module)) in counted:
        return False
    return not any(name.startswith(f"{o}.") for o in others)


def _is_inference_buffer(name: str) -> bool:
    """BatchNorm running statistics are needed at inference; quantiser state counts per layer."""
    return name.endswith(("running_mean", "running_var"))


@torch.no_grad()
def weight_zero_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per quantised layer: ``(zero weights, weights)`` of its quantised weight.

    Zeros are counted on the dequantised codes, ``spec.dequantize(codes) == 0``, so every scheme
    is judged by the real value it computes with (DoReFa's offset grid has no zero level; a
    binary layer never has zeros; a ternary or pow2 layer may).
    """
    counts: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        found = weight_codes(module)
        if found is not None:
            counts[name] = (_zeros(*found), found[0].numel())
    return counts


def _zeros(codes: Tensor, spec: QuantSpec) -> int:
    """How many of ``codes`` stand for the real value zero."""
    return int((spec.dequantize(codes) == 0).sum())


def weight_sparsity(model: nn.Module) -> float | None:
    """Share of zero quantised weights over every quantised layer (None: nothing quantised)."""
    counts = weight_zero_counts(model).values()
    total = sum(n for _, n in counts)
    return None if total == 0 else sum(z for z, _ in counts) / total


def _float_row(name: str, module: nn.Module) -> LayerRow:
    """A layer lowbit cannot quantise: float32, every parameter it owns."""
    params = sum(p.numel() for p in module.parameters())
    return LayerRow(
        name=name,
        kind=type(module).__name__,
        weight_method="float",
        weight_bits=FLOAT_BITS,
        act_method="float",
        act_bits=0,
        params=params,
        sparsity=None,
        size_bits=FLOAT_BITS * params,
    )


def _layer_row(name: str, module: nn.Module) -> LayerRow:
    with torch.no_grad():
        weight, bias = layer_weight_bias(module)
    wq: Quantizer | None = getattr(module, "weight_quant", None)
    aq: Quantizer | None = getattr(module, "input_quant", None)
    bias_bits = FLOAT_BITS * (0 if bias is None else bias.numel())
    kind = type(module).__name__
    if wq is None:
        weight_bits, sparsity, scale_bits, method = FLOAT_BITS, None, 0, "float"
    else:
        codes, spec = weight_codes(module)
        weight_bits, method = stored_bits(spec.scheme, spec.qmin, spec.qmax), wq.method
        sparsity = _zeros(codes, spec) / max(codes.numel(), 1)
        scale_bits = FLOAT_BITS * sum(
            t.numel() for t in (spec.scale, spec.zero_point, spec.scale_neg) if t is not None
        )
    return LayerRow(
        name=name,
        kind=kind,
        weight_method=method,
        weight_bits=weight_bits,
        act_method="float" if aq is None else aq.method,
        act_bits=0 if aq is None else aq.bits,
        params=weight.numel(),
        sparsity=sparsity,
        size_bits=8 * math.ceil(weight_bits * weight.numel() / 8 - 1e-9) + scale_bits + bias_bits,
    )


def _layer_weight(module: nn.Module) -> Tensor:
    """The float weight Parameter a layer owns (a fused block's is its conv's)."""
    return module.conv.weight if isinstance(module, ConvBnAct) else module.weight
