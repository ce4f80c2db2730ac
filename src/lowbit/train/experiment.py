"""Experiments: model + data + recipe + training phases, run end to end into one folder.

An experiment file (YAML/TOML) looks like::

    name: mnist5k-ttq
    seed: 0
    device: auto
    model: {name: lenet5}                 # any registered model, plus its options
    data: {name: mnist5k, val_fraction: 0.1}
    pretrain: {epochs: 4, optimizer: adam, lr: 0.002}    # optional full-precision phase
    quant: ttq                            # a recipe (method name, mapping, file) or null
    train: {epochs: 4, optimizer: adam, lr: 0.0005}      # QAT fine-tune (or the only phase)

The papers' pipeline (LSQ, TTQ) is one experiment: train in float (``pretrain``), then quantise
and fine-tune from the best float weights (``train``). A run folder holds ``experiment.yaml``
(the resolved configuration), ``run.json`` (what is needed to rebuild the model), one Trainer
folder per phase (``fp/``, ``qat/``: metrics, logs, checkpoints) and ``results.json``; the
runner and the run folder's files are :mod:`lowbit.runs`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from ..data import list_datasets, load_dataset
from ..models import create_model, list_models, model_task
from ..recipe import Recipe, RecipeError, read_mapping
from ..yamlio import load_yaml
from .config import TrainConfig

EXPERIMENT_KEYS = (
    "name",
    "description",
    "seed",
    "device",
    "model",
    "data",
    "pretrain",
    "quant",
    "train",
)
DATA_KEYS = ("name", "data_dir", "val_fraction", "download", "augment", "path", "seq_len")
DEFAULT_EXPERIMENT = "mnist5k-ttq"


class ExperimentError(ValueError):
    """An experiment file or run folder that cannot be used; the message names the key or file."""


@dataclass
class Experiment:
    """A validated experiment configuration."""

    name: str
    model: dict[str, Any]
    data: dict[str, Any]
    train: TrainConfig
    pretrain: TrainConfig | None = None
    quant: Recipe | None = None
    description: str = ""

    @classmethod
    def load(cls, source: str | Path | Mapping[str, Any] | None = None) -> Experiment:
        """From a mapping, a file, or a packaged experiment name (None: the default)."""
        if source is None:
            source = DEFAULT_EXPERIMENT
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        path = Path(source)
        if not path.exists():
            packaged = resources.files("lowbit") / "recipes" / "experiments" / f"{source}.yaml"
            if not packaged.is_file():
                raise ExperimentError(
                    f"no experiment file {str(source)!r}, and no packaged experiment of that "
                    f"name (packaged: {', '.join(packaged_experiments())})"
                )
            return cls.from_dict(load_yaml(packaged.read_text()))
        try:
            return cls.from_dict(read_mapping(path))
        except (ExperimentError, RecipeError, ValueError) as err:
            raise ExperimentError(f"{path}: {err}") from err

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Experiment:
        unknown = [k for k in d if k not in EXPERIMENT_KEYS]
        if unknown:
            raise ExperimentError(
                f"unknown experiment key {unknown[0]!r}; valid keys: {', '.join(EXPERIMENT_KEYS)}"
            )
        shared = {k: d[k] for k in ("seed", "device") if k in d}
        model = _named_section(d, "model")
        if model["name"] not in list_models():
            raise ExperimentError(
                f"model.name: unknown model {model['name']!r}; registered: "
                f"{', '.join(list_models())}"
            )
        data = _named_section(d, "data")
        if data["name"] not in list_datasets():
            raise ExperimentError(
                f"data.name: unknown dataset {data['name']!r}; registered: "
                f"{', '.join(list_datasets())}"
            )
        bad = [k for k in data if k not in DATA_KEYS]
        if bad:
            raise ExperimentError(f"unknown key data.{bad[0]}; valid keys: {', '.join(DATA_KEYS)}")
        task = model_task(model["name"])
        if (task == "text") != (data["name"] in list_datasets("text")):
            raise ExperimentError(
                f"model {model['name']!r} is a {task} model; data.name {data['name']!r} must be "
                f"a {task} dataset (text: {', '.join(list_datasets('text'))})"
            )
        quant = None
        if d.get("quant") is None and d.get("pretrain") is not None:
            raise ExperimentError(
                "experiment key 'pretrain' needs a 'quant' recipe to fine-tune "
                "with; for a float-only run give 'train' alone"
            )
        if d.get("quant") is not None:
            try:
                quant = Recipe.load(d["quant"])
            except RecipeError as err:
                raise ExperimentError(f"quant: {err}") from err
        return cls(
            name=str(d.get("name", "experiment")),
            description=str(d.get("description", "")),
            model=model,
            data=data,
            train=_train_config(d.get("train", {}), "train", shared),
            pretrain=None
            if d.get("pretrain") is None
            else _train_config(d["pretrain"], "pretrain", shared),
            quant=quant,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "model": copy.deepcopy(self.model),
            "data": copy.deepcopy(self.data),
            "pretrain": None if self.pretrain is None else self.pretrain.to_dict(),
            "quant": None if self.quant is None else self.quant.to_dict(),
            "train": self.train.to_dict(),
        }
        return out


def packaged_experiments() -> list[str]:
    folder = resources.files("lowbit") / "recipes" / "experiments"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def _named_section(d: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = d.get(key)
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, Mapping) or "name" not in value:
        raise ExperimentError(f"experiment key {key!r} must name a {key}: {{name: ...}}")
    return dict(value)


def _train_config(section: Any, prefix: str, shared: Mapping[str, Any]) -> TrainConfig:
    if not isinstance(section, Mapping):
        raise ExperimentError(f"experiment key {prefix!r} must be a mapping, got {section!r}")
    try:
        return TrainConfig.from_dict({**shared, **section}, prefix=prefix)
    except ValueError as err:
        raise ExperimentError(str(err)) from err


# -- building --------------------------------------------------------------------------------
def build_model(exp: Experiment, num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    """The float model of ``exp`` (errors name ``model.*``)."""
    options = {k: v for k, v in exp.model.items() if k != "name"}
    try:
        return create_model(
            exp.model["name"], num_classes=num_classes, in_shape=in_shape, **options
        )
    except (ValueError, TypeError) as err:
        raise ExperimentError(f"model: {err}") from err


def load_data(exp: Experiment, seed: int):
    options = {k: v for k, v in exp.data.items() if k != "name"}
    try:
        return load_dataset(exp.data["name"], seed=seed, **options)
    except ValueError as err:
        raise ExperimentError(f"data: {err}") from err
