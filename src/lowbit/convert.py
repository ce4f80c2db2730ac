"""``quantize(model, recipe)``: turn an ordinary ``nn.Module`` into its quantisation-aware form.

Every ``nn.Conv2d`` and ``nn.Linear`` is a candidate layer. In module-registration order the
first candidate is the *first layer* and the last one the *last layer* (the classifier), which
get the recipe's ``first_layer`` / ``last_layer`` rules; then override patterns (fnmatch globs on
module names) apply in recipe order. An ``nn.Embedding`` starts float and is quantised (weights
only, :class:`~lowbit.nn.QuantEmbedding`) when an override names it. Each layer is swapped for
:class:`~lowbit.nn.QuantConv2d` / :class:`~lowbit.nn.QuantLinear` (sharing the original
Parameters), or, with ``fold_bn``, for a :class:`~lowbit.nn.ConvBnAct` that folds the BatchNorm
that follows the conv.

Nothing is left float silently: layers lowbit cannot quantise (Conv1d, ConvTranspose2d, LSTM,
embeddings no override names, attention's projections, ...) stay float with a
:class:`PartialQuantizationWarning` naming them, and :func:`float_layers` lists them
(``lowbit.summary`` shows them as float). ``nn.MultiheadAttention`` stays float as a whole: its
``in_proj_weight`` is a bare Parameter and it never calls ``out_proj.forward`` (it reads the
weights directly), so a swapped layer would be silently bypassed; models with separate
``nn.Linear`` projections (``lowbit.models``' LLaMA family, most Hugging Face models) are
quantised fully.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .nn import (
    ConvBnAct,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    fuse_conv_bn,
    register_latent_clipping,
    weight_codes,
)
from .quant.base import Quantizer
from .recipe import ROLE_OF_SIDE, LayerQuant, QuantConfig, Recipe, RecipeError

QUANTIZED_TYPES = (QuantConv2d, QuantLinear, ConvBnAct, QuantEmbedding)
RecipeLike = Recipe | Mapping[str, Any] | str | Path
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
"""Layers that stay float by design (folded or applied in float at inference)."""


class PartialQuantizationWarning(UserWarning):
    """Some weighted layers of the model stay float (lowbit has no quantised form for them)."""


def _inside_attention(model: nn.Module) -> set[str]:
    """Names of the submodules of every ``nn.MultiheadAttention`` (it never calls their forward)."""
    found: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            found.update(f"{name}.{sub}" if name else sub for sub, _ in m.named_modules() if sub)
    return found


def candidate_layers(model: nn.Module) -> list[str]:
    """Names of the layers ``quantize`` considers, in module order (embeddings apart, and
    without the projections inside an ``nn.MultiheadAttention``, see the module docstring)."""
    attention = _inside_attention(model)
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
        and not isinstance(m, QUANTIZED_TYPES)
        and name not in attention
    ]


def embedding_layers(model: nn.Module) -> list[str]:
    """Names of the float ``nn.Embedding`` modules (quantised only when an override names them)."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Embedding) and not isinstance(m, QUANTIZED_TYPES)
    ]


def float_layers(
    model: nn.Module, plan: Mapping[str, LayerQuant | None] | None = None
) -> dict[str, str]:
    """``{name: type}`` of the weighted layers lowbit cannot quantise, which stay float.

    A layer counts when it owns a parameter, is not a candidate of :func:`quantize` (nor an
    already quantised layer, nor inside one, nor a quantiser, nor a layer ``plan`` — what
    :func:`resolve_layers` returned — quantises, such as an embedding an override names) and is
    not a normalisation layer; submodules of such a layer (an attention's ``out_proj``) are
    covered by it.
    """
    covered = set(candidate_layers(model))
    covered.update(n for n, layer in (plan or {}).items() if layer is not None)
    covered.update(n for n, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES))
    found: dict[str, str] = {}
    for name, m in model.named_modules():
        if name in covered or isinstance(m, (Quantizer, *NORM_TYPES)):
            continue
        if any(name.startswith(f"{c}.") for c in (*covered, *found)):
            continue
        if any(True for _ in m.parameters(recurse=False)) or isinstance(m, nn.MultiheadAttention):
            found[name] = type(m).__name__
    return found


def resolve_layers(model: nn.Module, recipe: RecipeLike) -> dict[str, LayerQuant | None]:
    """What each candidate layer of ``model`` gets under ``recipe`` (None: stays float).

    An override pattern that matches no layer is a RecipeError naming it.
    """
    recipe = Recipe.load(recipe)
    names = candidate_layers(model)
    if not names:
        raise RecipeError("the model has no nn.Conv2d or nn.Linear layer to quantise")
    embeddings = embedding_layers(model)
    for pattern in recipe.overrides:
        if not any(_matches(pattern, n) for n in (*names, *embeddings)):
            raise RecipeError(
                f"recipe key 'overrides.{pattern}' matches no layer; layers are: "
                f"{', '.join((*names, *embeddings))}"
            )
    plan = {
        name: recipe.resolve(
            name,
            first=i == 0,
            last=i == len(names) - 1,
            matched=[p for p in recipe.overrides if _matches(p, name)],
        )
        for i, name in enumerate(names)
    }
    for name in embeddings:
        matched = [p for p in recipe.overrides if _matches(p, name)]
        layer = recipe.resolve(name, first=False, last=False, matched=matched, base=False)
        if layer is not None and layer.activations is not None:
            raise RecipeError(
                f"recipe key 'overrides.{matched[-1]}' gives embedding {name!r} activations; an "
                "embedding looks up integer token ids, so only its weights can be quantised"
            )
        plan[name] = layer
    return plan


def quantize(model: nn.Module, recipe: RecipeLike) -> nn.Module:
    """Quantise ``model`` in place following ``recipe`` and return it.

    ``recipe`` is a :class:`Recipe`, a dict, a YAML/TOML file path or a method name
    (``"ttq"`` means ``lowbit/recipes/ttq.yaml``). Build the optimizer after this call, or
    keep the one you have: the float Parameters are shared with the quantised layers, but new
    quantiser parameters (TTQ's Wp/Wn, LSQ's step, PACT's alpha) only reach an optimizer that
    is created afterwards.
    """
    recipe = Recipe.load(recipe)
    _refuse_quantized(model)
    plan = resolve_layers(model, recipe)
    left_float = float_layers(model, plan)
    if left_float:
        listed = ", ".join(f"{n} ({t})" for n, t in left_float.items())
        warnings.warn(
            f"these layers stay float (lowbit quantises Conv2d, Linear and, when an override "
            f"names them, Embedding): {listed}",
            PartialQuantizationWarning,
            stacklevel=2,
        )
    if recipe.replace_relu is not None and _gets_base_activations(plan, recipe):
        _replace_relus(model, recipe.replace_relu)
    elif recipe.replace_relu is not None:
        warnings.warn(
            f"recipe {recipe.name!r}: no layer gets its activation quantiser, so the ReLUs are "
            "kept (replace_relu is not applied)",
            PartialQuantizationWarning,
            stacklevel=2,
        )
    if recipe.fold_bn:
        fused = fuse_conv_bn(
            model,
            weight_quant_factory=lambda n: _build(plan.get(n), "weights", n),
            input_quant_factory=lambda n: _build(plan.get(n), "activations", n),
        )
        for name in fused:
            plan.pop(name, None)
    for name, layer_quant in plan.items():
        if layer_quant is None:
            continue
        old = model.get_submodule(name)
        wq = _build(layer_quant, "weights", name)
        if isinstance(old, nn.Embedding):
            _set_submodule(model, name, QuantEmbedding.from_float(old, weight_quant=wq))
            continue
        aq = _build(layer_quant, "activations", name)
        cls = QuantConv2d if isinstance(old, nn.Conv2d) else QuantLinear
        _set_submodule(model, name, cls.from_float(old, weight_quant=wq, input_quant=aq))
    for module in model.modules():
        weight_codes(module)  # initialise weight-derived quantiser state (TTQ Wp/Wn, LSQ step)
    register_latent_clipping(model)
    model.lowbit_recipe = recipe  # read by summary() and export
    return model


def _refuse_quantized(model: nn.Module) -> None:
    """A RecipeError when ``model`` was quantised already (quantize() takes a float model)."""
    done = getattr(model, "lowbit_recipe", None)
    if done is not None or any(isinstance(m, QUANTIZED_TYPES) for m in model.modules()):
        how = f" with recipe {done.name!r}" if done is not None else ""
        raise RecipeError(
            f"the model is already quantised{how}; quantize() takes a float model (build a "
            "fresh one, or keep the quantised one)"
        )


def _gets_base_activations(plan: Mapping[str, LayerQuant | None], recipe: Recipe) -> bool:
    """True when some layer gets the recipe's own activation quantiser (not a first/last rule)."""
    base = recipe.activations
    return base is not None and any(
        lq is not None and lq.activations is not None and lq.activations.to_dict() == base
        for lq in plan.values()
    )


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every quantiser module of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}


def regularization(model: nn.Module) -> Tensor | float:
    """Sum of the quantisers' own loss terms (PACT's L2 on alpha); add it to the training loss."""
    return sum(
        (q.regularization() for q in quantizers(model).values() if hasattr(q, "regularization")),
        0.0,
    )


def _build(layer_quant: LayerQuant | None, side: str, layer: str) -> Quantizer | None:
    if layer_quant is None:
        return None
    cfg: QuantConfig | None = getattr(layer_quant, side)
    if cfg is None:
        return None
    return cfg.build(ROLE_OF_SIDE[side], f"{side} of layer {layer!r}")


def _matches(pattern: str, name: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _replace_relus(model: nn.Module, replacement: str) -> None:
    """Swap nn.ReLU modules: binary activations need signed inputs (sign(relu(x)) is always +1)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    for name in names:
        new = nn.Identity() if replacement == "identity" else nn.Hardtanh()
        _set_submodule(model, name, new)
