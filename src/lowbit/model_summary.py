"""``summary(model)``: per-layer method, bits, parameters, sparsity and the model's size.

Sizes are in bits as the deployment format stores them: quantised weights at their bit width
plus their scales/zero points in float32; everything else (float layers, biases, BatchNorm) in
float32. The float32 reference counts every parameter and BatchNorm statistic at 32 bits.
Files written by ``export`` are measured in bytes by ``lowbit summary FILE``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from .nn import ConvBnAct, QuantConv2d, QuantLinear, layer_weight_bias, weight_codes
from .quant.base import Quantizer

FLOAT_BITS = 32


@dataclass
class LayerRow:
    name: str
    kind: str
    weight_method: str
    weight_bits: int
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
                str(r.weight_bits),
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
    for name, module in model.named_modules():
        layer_types = (QuantConv2d, QuantLinear, ConvBnAct, nn.Conv2d, nn.Linear, nn.Embedding)
        if isinstance(module, layer_types) and id(_layer_weight(module)) not in counted:
            rows.append(_layer_row(name, module))
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


def _is_inference_buffer(name: str) -> bool:
    """BatchNorm running statistics are needed at inference; quantiser state counts per layer."""
    return name.endswith(("running_mean", "running_var"))


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
        weight_bits, method = spec.bits, wq.method
        sparsity = float((codes == 0).float().mean()) if spec.qmin < 0 < spec.qmax else None
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
        size_bits=weight_bits * weight.numel() + scale_bits + bias_bits,
    )


def _layer_weight(module: nn.Module) -> Tensor:
    """The float weight Parameter a layer owns (a fused block's is its conv's)."""
    return module.conv.weight if isinstance(module, ConvBnAct) else module.weight
