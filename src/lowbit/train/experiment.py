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
folder per phase (``fp/``, ``qat/``: metrics, logs, checkpoints) and ``results.json``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table
from torch import nn

from ..convert import quantize
from ..data import DatasetSplits, list_datasets, load_dataset
from ..model_summary import summary
from ..models import create_model, list_models, model_task
from ..recipe import Recipe, RecipeError, read_mapping
from .checkpoint import load_checkpoint, model_state
from .config import TrainConfig
from .distributed import is_main_process
from .health import QuantHealthCallback
from .lm import add_lm_metrics, task_loss
from .trainer import Trainer

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
            return cls.from_dict(yaml.safe_load(packaged.read_text()))
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


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    tensors, _ = load_checkpoint(checkpoint)
    model.load_state_dict(model_state(tensors))


def final_checkpoint(phase_dir: Path) -> Path:
    """The checkpoint a finished phase hands on: the best on validation, else the last."""
    best = phase_dir / "checkpoints" / "best"
    return best if Path(f"{best}.json").exists() else phase_dir / "checkpoints" / "last"


def write_run_files(run_dir: Path, exp: Experiment, data: DatasetSplits) -> None:
    """``experiment.yaml`` and ``run.json``: what :func:`load_run` needs to rebuild the model."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "experiment.yaml").write_text(yaml.safe_dump(exp.to_dict(), sort_keys=False))
    info = {
        "num_classes": data.num_classes,
        "in_shape": list(data.in_shape),
        "dataset": data.name,
        "lowbit_run": 1,
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))


# -- running ---------------------------------------------------------------------------------
def run_experiment(
    exp: Experiment, run_dir: Path, *, resume: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """Run every phase of ``exp`` into ``run_dir``; returns the results (also results.json).

    With ``resume``, finished phases are skipped (their weights reloaded) and an interrupted
    phase continues from its last checkpoint.
    """
    console = console or Console()
    run_dir = Path(run_dir)
    main = is_main_process()
    data = load_data(exp, exp.train.seed)
    torch.manual_seed(exp.train.seed)
    model = build_model(exp, data.num_classes, data.in_shape)
    if main:
        write_run_files(run_dir, exp, data)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "name": exp.name,
        "model": exp.model["name"],
        "data": exp.data["name"],
    }
    phases: list[tuple[str, TrainConfig]] = []
    if exp.pretrain is not None:
        phases.append(("fp", exp.pretrain))
    phases.append(("fp", exp.train) if exp.quant is None else ("qat", exp.train))
    for phase, config in phases:
        if phase == "qat":
            quantize(model, exp.quant)
        phase_dir = run_dir / phase
        console.rule(f"[bold]{exp.name}: {phase} phase ({config.epochs} epochs)")
        # The quantised phase warns about dead layers (all-zero codes, collapsed activations).
        callbacks = [QuantHealthCallback(console=console)] if phase == "qat" else []
        trainer = Trainer(
            model,
            data.train,
            data.val,
            config,
            phase_dir,
            test_set=data.test,
            loss_fn=task_loss(model_task(exp.model["name"])),
            console=console,
            callbacks=callbacks,
        )
        done = Path(phase_dir / "metrics.json")
        if resume and done.exists():
            console.print(f"{phase}: finished earlier, reloading its weights")
            metrics = json.loads(done.read_text())
        else:
            can_resume = resume and Path(f"{phase_dir / 'checkpoints' / 'last'}.json").exists()
            metrics = trainer.fit(resume=can_resume)
        load_weights(model, final_checkpoint(phase_dir))
        results[phase] = {k: metrics[k] for k in metrics if not isinstance(metrics[k], dict)}
        results[phase]["test"] = trainer.evaluate(data.test)
    size = summary(model, show=False)
    results.update(
        method=None if exp.quant is None else exp.quant.name,
        size_bits=size.size_bits,
        float32_bits=size.float32_bits,
        compression=size.compression,
        wall_time_s=time.perf_counter() - start,
    )
    final = results[phases[-1][0]]["test"]
    results["test_acc"] = final["acc"]
    if model_task(exp.model["name"]) == "text":
        add_lm_metrics(results)
    if main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        console.print(results_table([results], title=f"{exp.name}: results"))
    return results


def results_table(rows: list[Mapping[str, Any]], title: str = "lowbit runs") -> Table:
    """One row per run: phase accuracies, size and compression."""
    table = Table(title=title)
    for col in (
        "run",
        "model",
        "method",
        "float test acc",
        "quantised test acc",
        "size (KiB)",
        "vs float32",
    ):
        left = col in ("run", "model", "method")
        table.add_column(col, justify="left" if left else "right", overflow="fold")
    lm = any("test_bpb" in r for r in rows)  # language models: bits per byte too
    if lm:
        table.add_column("float test bpb", justify="right")
        table.add_column("quantised test bpb", justify="right")
    for r in rows:
        fp = r.get("fp", {}).get("test", {})
        qat = r.get("qat", {}).get("test", {})
        cells = [
            str(r.get("name", "?")),
            str(r.get("model", "?")),
            str(r.get("method") or "float32"),
            "-" if fp.get("acc") is None else f"{fp['acc']:.2%}",
            "-" if qat.get("acc") is None else f"{qat['acc']:.2%}",
            f"{r['size_bits'] / 8192:.1f}",
            f"{r['compression']:.1f}x",
        ]
        if lm:
            cells += ["-" if s.get("bpb") is None else f"{s['bpb']:.4f}" for s in (fp, qat)]
        table.add_row(*cells)
    return table


def load_run(run_dir: Path) -> tuple[Experiment, nn.Module, dict[str, Any]]:
    """Rebuild a run's final model (quantised when the run was) with its trained weights."""
    run_dir = Path(run_dir)
    for needed in ("experiment.yaml", "run.json"):
        if not (run_dir / needed).is_file():
            raise ExperimentError(f"{run_dir} is not a lowbit run folder: {needed} is missing")
    exp = Experiment.from_dict(read_mapping(run_dir / "experiment.yaml"))
    info = json.loads((run_dir / "run.json").read_text())
    model = build_model(exp, info["num_classes"], tuple(info["in_shape"]))
    phase = "fp" if exp.quant is None else "qat"
    if exp.quant is not None:
        quantize(model, exp.quant)
    checkpoint = final_checkpoint(run_dir / phase)
    if not Path(f"{checkpoint}.json").exists():
        raise ExperimentError(f"{run_dir}: no checkpoint in {checkpoint.parent} (did it train?)")
    load_weights(model, checkpoint)
    model.eval()
    return exp, model, info
