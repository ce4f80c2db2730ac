"""Recipes: which quantiser each layer of a model gets.

A recipe is a mapping (from a dict, a YAML or TOML file, or a method's packaged default)::

    method: lsq            # start from lowbit/recipes/lsq.yaml (optional)
    bits: 2                # shorthand: bits of weights and activations (optional)
    weights: {method: lsq, bits: 2, per_channel: true}   # null keeps weights float
    activations: {method: lsq, bits: 2}                 # null keeps activations float
    first_layer: {weights: {method: lsq, bits: 8}, activations: {method: lsq, bits: 8}}
    last_layer: float      # "float": leave the layer alone; "same": no special rule
    overrides:             # by module name or glob, applied in order, later wins
      "layer3.*": {weights: {bits: 3}}
      "fc": float
    fold_bn: false         # fold Conv2d+BatchNorm2d pairs (Jacob et al.)
    replace_relu: null     # "identity"/"hardtanh": binary activations need signed inputs

A side given as a mapping is merged into what the layer had: ``{bits: 3}`` changes the bits and
keeps the method; naming another method replaces the side. ``lowbit.quantize`` resolves the recipe
per layer; errors name the recipe key at fault.
"""

from __future__ import annotations

import copy
import inspect
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .quant import registry
from .quant.base import Quantizer
from .yamlio import load_yaml

FLOAT = "float"
SAME = "same"
TOP_KEYS = (
    "name",
    "description",
    "method",
    "bits",
    "weights",
    "activations",
    "first_layer",
    "last_layer",
    "overrides",
    "fold_bn",
    "replace_relu",
)
SIDES = ("weights", "activations")
ROLE_OF_SIDE = {"weights": "weight", "activations": "activation"}
RELU_REPLACEMENTS = ("identity", "hardtanh")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the key."""


@dataclass(frozen=True)
class QuantConfig:
    """One quantiser: method name, bits (None: the method's fixed width) and other options."""

    method: str
    bits: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], key: str) -> QuantConfig:
        if "method" not in d:
            raise RecipeError(f"recipe key {key!r} needs a 'method' (one of {registry.methods()})")
        options = {k: v for k, v in d.items() if k not in ("method", "bits")}
        return cls(method=d["method"], bits=d.get("bits"), options=options)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method}
        if self.bits is not None:
            d["bits"] = self.bits
        d.update(self.options)
        return d

    def build(self, role: str, key: str = "") -> Quantizer:
        """Instantiate the quantiser; bad method, bits or options: a RecipeError naming ``key``."""
        try:
            cls = registry.get(self.method, role)  # type: ignore[arg-type]
            options = dict(self.options)
            if self.bits is not None:
                if not isinstance(self.bits, int) or isinstance(self.bits, bool):
                    raise ValueError(f"bits must be an integer, got {self.bits!r}")
                if _takes_bits(cls):
                    options["bits"] = self.bits
            quantizer = registry.create(self.method, role, **options)  # type: ignore[arg-type]
        except (ValueError, TypeError) as err:
            raise RecipeError(f"recipe key {key or role!r}: {err}") from err
        if self.bits is not None and quantizer.bits != self.bits:
            raise RecipeError(
                f"recipe key {key + '.bits' if key else 'bits'!r}: method {self.method!r} is "
                f"fixed at {quantizer.bits} bit(s), got bits={self.bits}"
            )
        return quantizer


@dataclass(frozen=True)
class LayerQuant:
    """What one layer gets once the recipe is resolved: None on a side keeps it float."""

    weights: QuantConfig | None
    activations: QuantConfig | None


@dataclass
class Recipe:
    """A validated quantisation recipe (see the module docstring for the format)."""

    weights: dict[str, Any] | None
    activations: dict[str, Any] | None = None
    first_layer: Any = SAME
    last_layer: Any = SAME
    overrides: dict[str, Any] = field(default_factory=dict)
    fold_bn: bool = False
    replace_relu: str | None = None
    name: str = "custom"
    description: str = ""

    def __post_init__(self) -> None:
        self.validate()

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, source: Recipe | Mapping[str, Any] | str | Path) -> Recipe:
        """A recipe from a Recipe, a dict, a YAML/TOML file path, or a method name."""
        if isinstance(source, Recipe):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.suffix.lower() in (".yaml", ".yml", ".toml", ".json") or path.exists():
                return cls.from_file(path)
            return cls.from_method(str(source))
        raise RecipeError(
            f"a recipe must be a Recipe, a dict, a file path or a method name, got "
            f"{type(source).__name__}"
        )

    @classmethod
    def from_method(cls, method: str) -> Recipe:
        """The packaged default recipe of ``method`` (``lowbit/recipes/<method>.yaml``)."""
        return cls.from_dict({"method": method})

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """Load a YAML, TOML or JSON recipe file; an experiment file's ``quant`` section is used."""
        data = read_mapping(Path(path))
        if "quant" in data and isinstance(data["quant"], Mapping):
            data = data["quant"]
        try:
            return cls.from_dict(data)
        except RecipeError as err:
            raise RecipeError(f"{path}: {err}") from err

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Build from a mapping; ``method``/``bits`` expand to the method's default recipe."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping, got {type(data).__name__}")
        unknown = [k for k in data if k not in TOP_KEYS]
        if unknown:
            raise RecipeError(
                f"unknown recipe key {unknown[0]!r}; valid keys: {', '.join(TOP_KEYS)}"
            )
        merged: dict[str, Any] = {}
        if "method" in data:
            merged = default_recipe_dict(data["method"])
        for k, v in data.items():
            if k not in ("method", "bits"):
                merged[k] = copy.deepcopy(v)
        if "bits" in data:
            _apply_bits(merged, data["bits"])
        return cls(**{k: v for k, v in merged.items() if k in TOP_KEYS})

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "weights": copy.deepcopy(self.weights),
            "activations": copy.deepcopy(self.activations),
            "first_layer": copy.deepcopy(self.first_layer),
            "last_layer": copy.deepcopy(self.last_layer),
            "overrides": copy.deepcopy(self.overrides),
            "fold_bn": self.fold_bn,
            "replace_relu": self.replace_relu,
        }

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every key; build each quantiser once so bad bits/options fail now."""
        self.weights = _normalise_side(self.weights, "weights")
        self.activations = _normalise_side(self.activations, "activations")
        if self.weights is None and self.activations is None:
            raise RecipeError("recipe quantises nothing: give 'weights' and/or 'activations'")
        for side in SIDES:
            cfg = getattr(self, side)
            if cfg is not None:
                QuantConfig.from_dict(cfg, side).build(ROLE_OF_SIDE[side], side)
        self.first_layer = _normalise_rule(self.first_layer, "first_layer")
        self.last_layer = _normalise_rule(self.last_layer, "last_layer")
        if not isinstance(self.overrides, Mapping):
            raise RecipeError(
                f"recipe key 'overrides' must map patterns to rules, got "
                f"{type(self.overrides).__name__}"
            )
        self.overrides = {
            str(p): _normalise_rule(r, f"overrides.{p}") for p, r in self.overrides.items()
        }
        if not isinstance(self.fold_bn, bool):
            raise RecipeError(f"recipe key 'fold_bn' must be true or false, got {self.fold_bn!r}")
        if self.replace_relu not in (None, *RELU_REPLACEMENTS):
            raise RecipeError(
                f"recipe key 'replace_relu' must be null or one of "
                f"{RELU_REPLACEMENTS}, got {self.replace_relu!r}"
            )
        # Resolving the rules over the base checks that every merge yields a buildable quantiser.
        for key, rule in self._rules():
            self._apply(rule, self._base(), key, validate=True)

    # -- resolution ------------------------------------------------------------------------
    def resolve(
        self, name: str, *, first: bool, last: bool, matched: list[str], base: bool = True
    ) -> LayerQuant | None:
        """The quantisers of layer ``name``; None leaves the layer float.

        ``matched`` lists the override patterns that match ``name`` (in recipe order). With
        ``base`` False the layer starts float rather than with the recipe's base quantisers
        (embeddings: only overrides quantise them).
        """
        current: dict[str, Any] | None = self._base() if base else None
        if first:
            current = self._apply(self.first_layer, current, "first_layer")
        if last:
            current = self._apply(self.last_layer, current, "last_layer")
        for pattern in matched:
            current = self._apply(self.overrides[pattern], current, f"overrides.{pattern}")
        if current is None:
            return None
        sides = {
            s: None if current[s] is None else QuantConfig.from_dict(current[s], s) for s in SIDES
        }
        if sides["weights"] is None and sides["activations"] is None:
            return None
        return LayerQuant(**sides)

    def _base(self) -> dict[str, Any]:
        return {"weights": self.weights, "activations": self.activations}

    def _rules(self) -> list[tuple[str, Any]]:
        rules = [("first_layer", self.first_layer), ("last_layer", self.last_layer)]
        return rules + [(f"overrides.{p}", r) for p, r in self.overrides.items()]

    def _apply(
        self, rule: Any, current: dict[str, Any] | None, key: str, validate: bool = False
    ) -> dict[str, Any] | None:
        if rule == FLOAT:
            return None
        if rule == SAME:
            return current
        out = dict(current) if current is not None else {"weights": None, "activations": None}
        for side in SIDES:
            if side not in rule:
                continue
            out[side] = _merge_side(out[side], rule[side], f"{key}.{side}")
            if validate and out[side] is not None:
                QuantConfig.from_dict(out[side], f"{key}.{side}").build(
                    ROLE_OF_SIDE[side], f"{key}.{side}"
                )
        return out


def default_recipe_dict(method: str) -> dict[str, Any]:
    """The packaged default recipe of ``method`` as a plain dict."""
    files = resources.files("lowbit") / "recipes"
    path = files / f"{method}.yaml"
    if not path.is_file():
        known = sorted(
            p.name.removesuffix(".yaml") for p in files.iterdir() if p.name.endswith(".yaml")
        )
        raise RecipeError(
            f"unknown method {method!r} in recipe key 'method'; methods with a "
            f"default recipe: {', '.join(known)}"
        )
    data = load_yaml(path.read_text())
    data.setdefault("name", method)
    return data


def _takes_bits(cls: type) -> bool:
    return "bits" in inspect.signature(cls.__init__).parameters


def _apply_bits(recipe: dict[str, Any], bits: Any) -> None:
    """The ``bits`` shorthand: set the bits of the base weight and activation quantisers.

    Fixed-width methods (BNN, TWN, ...) accept only their own width; ``build`` checks it.
    """
    for side in SIDES:
        cfg = recipe.get(side)
        if isinstance(cfg, Mapping):
            recipe[side] = {**cfg, "bits": bits}


def _normalise_side(value: Any, key: str) -> dict[str, Any] | None:
    if value is None or value == FLOAT:
        return None
    if isinstance(value, str):
        return {"method": value}
    if isinstance(value, Mapping):
        if "method" not in value:
            raise RecipeError(f"recipe key {key!r} needs a 'method' (one of {registry.methods()})")
        return dict(value)
    raise RecipeError(f"recipe key {key!r} must be a mapping, a method name or null, got {value!r}")


def _normalise_rule(rule: Any, key: str) -> Any:
    if rule is None or rule == SAME:
        return SAME
    if rule == FLOAT:
        return FLOAT
    if isinstance(rule, Mapping):
        bad = [k for k in rule if k not in SIDES]
        if bad:
            raise RecipeError(
                f"recipe key '{key}.{bad[0]}' is not valid; a layer rule sets "
                f"'weights' and/or 'activations', or is 'float' or 'same'"
            )
        return {k: (None if v in (None, FLOAT) else v) for k, v in rule.items()}
    raise RecipeError(f"recipe key {key!r} must be 'float', 'same' or a mapping, got {rule!r}")


def _merge_side(current: dict[str, Any] | None, change: Any, key: str) -> dict[str, Any] | None:
    if change is None:
        return None
    if isinstance(change, str):
        change = {"method": change}
    if not isinstance(change, Mapping):
        raise RecipeError(f"recipe key {key!r} must be a mapping, a method name or null")
    if "method" in change and (current is None or change["method"] != current.get("method")):
        return dict(change)
    if current is None:
        raise RecipeError(
            f"recipe key {key!r} changes options but names no 'method', and the "
            f"layer has no quantiser there to change"
        )
    return {**current, **change}


def read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        is_toml = path.suffix.lower() == ".toml"
        data = tomllib.loads(text) if is_toml else load_yaml(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise RecipeError(f"recipe file {str(path)!r} is not valid: {err}") from err
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {str(path)!r} must hold a mapping at the top level")
    return data
