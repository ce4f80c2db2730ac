"""``lowbit.check(model, recipe)``: what quantising and exporting ``model`` would leave undone,
found before any training.

    report = lowbit.check(model, "ttq", example_input=(1, 28, 28))
    print("\\n".join(report.lines()))

The recipe is resolved against the model (an override pattern that matches no layer is a
:class:`~lowbit.recipe.RecipeError` naming it), a copy of the model is quantised, and the copy
is handed to the exporter's own graph builder (:func:`lowbit.export.build_graph`), so "exports"
means exactly what ``lowbit export`` will accept. The model itself is not changed.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .convert import RecipeLike, float_layers, quantize, resolve_layers
from .export import build_graph, example_tensor


@dataclass(frozen=True)
class CheckReport:
    """Layers that would stay float (``{name: why}``) and the export error, if any."""

    float_layers: dict[str, str] = field(default_factory=dict)
    export_error: str | None = None
    export_checked: bool = False

    @property
    def ok(self) -> bool:
        """True when every weighted layer is quantised and the model exports."""
        return not self.float_layers and self.export_error is None

    def lines(self) -> list[str]:
        """One line per finding (empty when :attr:`ok`)."""
        out = [f"layer {name} stays float: {why}" for name, why in self.float_layers.items()]
        if self.export_error is not None:
            out.append(f"the quantised model will not export: {self.export_error}")
        return out


def check(
    model: nn.Module,
    recipe: RecipeLike,
    example_input: Tensor | Sequence[int] | None = None,
) -> CheckReport:
    """Report every layer ``quantize(model, recipe)`` would leave float and whether the result
    exports (when ``example_input``, a batch or the per-sample shape, is given).

    Raises RecipeError for a recipe that does not fit the model (e.g. an override pattern that
    matches no layer). ``model`` is not changed.
    """
    plan = resolve_layers(model, recipe)
    kept: dict[str, str] = {
        name: "the recipe keeps it float" for name, lq in plan.items() if lq is None
    }
    kept.update(
        {n: f"lowbit cannot quantise {kind}" for n, kind in float_layers(model, plan).items()}
    )
    if example_input is None:
        return CheckReport(kept)
    trial = copy.deepcopy(model).cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(trial, recipe)
    return CheckReport(kept, _export_error(trial, example_input), True)


def _export_error(model: nn.Module, example_input: Any) -> str | None:
    """None when the exporter's graph builder accepts ``model``, else its message."""
    x = example_tensor(example_input)
    with torch.no_grad():  # one training-mode forward initialises data-driven quantiser state
        model.train()
        model(torch.cat([x, x]))
    try:
        build_graph(model, x)
    except (ValueError, TypeError, NotImplementedError) as err:
        return str(err)
    return None
