"""Recipes: loading, validation errors that name the key, and per-layer resolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import Recipe, RecipeError
from lowbit.convert import resolve_layers
from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.quant import registry


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def test_every_registered_method_has_a_default_recipe() -> None:
    assert set(lowbit.methods()) == {
        "absmax",
        "affine",
        "binaryconnect",
        "bitnet",
        "bnn",
        "dorefa",
        "lsq",
        "pact",
        "pow2",
        "stochastic",
        "ttq",
        "twn",
        "xnor",
    }
    for method in lowbit.methods():
        recipe = Recipe.from_method(method)
        assert recipe.name == method
        used = {c["method"] for c in (recipe.weights, recipe.activations) if c is not None}
        assert method in used or method == "pact" or used == {"dorefa"}


@pytest.mark.parametrize(
    ("recipe", "needle"),
    [
        ({"method": "nosuch"}, "nosuch"),
        ({"weights": {"method": "nosuch"}}, "nosuch"),
        ({"method": "lsq", "bits": 9}, "bits"),
        ({"weights": {"method": "lsq", "bits": 1}}, "weights"),
        ({"weights": {"method": "lsq", "per_chanel": True}}, "per_chanel"),
        ({"weights": {"method": "lsq"}, "colour": "red"}, "colour"),
        ({"method": "bnn", "bits": 4}, "fixed at 1"),
        ({"weights": {"method": "ttq"}, "activations": {"method": "ttq"}}, "activations"),
        ({"weights": {"bits": 4}}, "method"),
        ({"weights": None, "activations": None}, "quantises nothing"),
        (
            {"weights": {"method": "lsq"}, "first_layer": {"weigths": {"bits": 8}}},
            "first_layer.weigths",
        ),
        (
            {"weights": {"method": "lsq"}, "overrides": {"fc": {"weights": {"bits": 11}}}},
            "overrides.fc",
        ),
        ({"weights": {"method": "lsq"}, "replace_relu": "tanh"}, "replace_relu"),
        ({"weights": {"method": "lsq"}, "fold_bn": "yes"}, "fold_bn"),
    ],
)
def test_bad_recipes_name_the_problem(recipe: dict, needle: str) -> None:
    with pytest.raises(RecipeError, match=needle):
        Recipe.load(recipe)


def test_pattern_matching_no_layer_is_an_error() -> None:
    recipe = {"method": "lsq", "overrides": {"classifier.*": "float"}}
    with pytest.raises(RecipeError, match=r"overrides\.classifier\.\*.*matches no layer"):
        lowbit.quantize(small_cnn(), recipe)


def test_model_without_layers_is_an_error() -> None:
    with pytest.raises(RecipeError, match=r"no nn\.Conv2d or nn\.Linear"):
        lowbit.quantize(nn.Sequential(nn.ReLU()), "lsq")


def test_yaml_toml_and_experiment_files(tmp_path) -> None:
    (tmp_path / "r.yaml").write_text("method: lsq\nbits: 3\n")
    (tmp_path / "r.toml").write_text('[weights]\nmethod = "twn"\n')
    (tmp_path / "exp.yaml").write_text("model: lenet5\nquant:\n  method: ttq\n")
    (tmp_path / "bad.yaml").write_text("weights: [unclosed\n")
    assert Recipe.load(tmp_path / "r.yaml").weights == {"method": "lsq", "bits": 3}
    assert Recipe.load(str(tmp_path / "r.toml")).weights == {"method": "twn"}
    assert Recipe.load(tmp_path / "exp.yaml").weights["method"] == "ttq"
    with pytest.raises(RecipeError, match=r"bad\.yaml"):
        Recipe.load(tmp_path / "bad.yaml")
    with pytest.raises(RecipeError, match=r"missing\.yaml"):
        Recipe.load(tmp_path / "missing.yaml")


def test_bits_shorthand_keeps_first_and_last_layer_at_8_bits() -> None:
    plan = resolve_layers(small_cnn(), {"method": "lsq", "bits": 2})
    assert [lq.weights.bits for lq in plan.values()] == [8, 2, 8]
    assert [lq.activations.bits for lq in plan.values()] == [8, 2, 8]


def test_override_merges_and_float_rule() -> None:
    recipe = {
        "method": "lsq",
        "overrides": {"3": {"weights": {"bits": 3, "per_channel": True}}, "7": "float"},
    }
    plan = resolve_layers(small_cnn(), recipe)
    assert plan["3"].weights.method == "lsq"
    assert plan["3"].weights.bits == 3
    assert plan["3"].weights.options == {"per_channel": True}
    assert plan["3"].activations.bits == 4
    assert plan["7"] is None


def test_later_overrides_win_and_method_change_replaces_options() -> None:
    recipe = {
        "weights": {"method": "lsq", "bits": 4, "per_channel": True},
        "overrides": {"*": {"weights": {"bits": 3}}, "[37]": {"weights": {"method": "twn"}}},
    }
    plan = resolve_layers(small_cnn(), recipe)
    assert plan["0"].weights == plan["0"].weights.__class__("lsq", 3, {"per_channel": True})
    assert plan["3"].weights.method == "twn"
    assert plan["3"].weights.options == {}
    assert plan["0"].activations is None


def test_bare_method_name_shorthand_ttq() -> None:
    model = lowbit.quantize(small_cnn(), "ttq")
    assert type(model[0]) is nn.Conv2d  # first layer float (TTQ paper)
    assert type(model[7]) is nn.Linear  # last layer float
    assert isinstance(model[3], QuantConv2d)
    assert type(model[3].weight_quant) is registry.get("ttq", "weight")
    assert model[3].input_quant is None


def test_quantize_accepts_recipe_objects_and_shares_parameters() -> None:
    base = small_cnn()
    weight = base[3].weight
    model = lowbit.quantize(base, Recipe.load({"method": "lsq"}))
    assert isinstance(model[7], QuantLinear)
    assert model[3].weight is weight
    out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)


def test_recipe_round_trips_through_dict() -> None:
    recipe = Recipe.load({"method": "pact", "overrides": {"3": {"activations": {"bits": 2}}}})
    again = Recipe.load(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()
