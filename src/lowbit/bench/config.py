"""Accuracy-bench configurations: the packaged files ``lowbit/recipes/bench/<suite>.yaml``.

A bench file fixes one model, one dataset and one training budget, and lists the methods::

    name: mnist5k
    model: {name: lenet5}
    data: {name: mnist5k, val_fraction: 0.1}
    seeds: 3
    pretrain: {epochs: 6, optimizer: adam, lr: 0.002}   # float32, once per seed (null:
                                                       # every row trains from scratch)
    train: {epochs: 4, optimizer: adam, lr: 0.0005}     # every method's fine-tune budget
    calibration_batches: 8                             # post-training quantisation
    timing_steps: 20                                   # QAT step-time overhead
    quick: {epochs: 1, train_samples: 256, eval_samples: 256, timing_steps: 2}
    methods:                                           # table rows, in order
      float32: {}                                      # float fine-tune, same budget
      ttq: {quant: ttq}                                # any recipe (name, mapping, file)
      bnn: {quant: bnn, train: {lr: 0.002}}            # per-method train overrides
      ptq-int8: {ptq: int8}                            # calibrated, no retraining
    goals:                                             # checked in the table and report
      - {max_drop: 0.3, methods: [ttq]}
      - {beats_ptq: true}
    notes: free text printed by the report

Every method fine-tunes the same float32 checkpoint of its seed (the papers' practice), with
the same number of epochs; only what a method's recipe or its ``train`` overrides say differs.
The per-method overrides were chosen on the validation split, never on the test split.
Errors are :class:`BenchConfigError` naming the key.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from ..recipe import Recipe, RecipeError, read_mapping
from ..train.config import TrainConfig
from ..yamlio import load_yaml
from .ptq import PTQ_KINDS

BENCH_PACKAGE_DIR = ("recipes", "bench")
"""Where the bench files ship: package data ``lowbit/recipes/bench/<name>.yaml``."""

FLOAT32 = "float32"
TOP_KEYS = (
    "name",
    "description",
    "model",
    "data",
    "seeds",
    "pretrain",
    "train",
    "calibration_batches",
    "timing_steps",
    "quick",
    "methods",
    "goals",
    "notes",
)
METHOD_KEYS = ("quant", "train", "ptq")
QUICK_KEYS = ("epochs", "train_samples", "eval_samples", "timing_steps", "calibration_batches")
GOAL_KEYS = ("max_drop", "methods", "beats_ptq")


class BenchConfigError(ValueError):
    """A bench file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class BenchMethod:
    """One row of the bench: a QAT recipe, float32 (no recipe), or a post-training baseline."""

    name: str
    recipe: Recipe | None = None
    train_overrides: Mapping[str, Any] = field(default_factory=dict)
    ptq: str | None = None

    @property
    def kind(self) -> str:
        """``"float"``, ``"qat"`` or ``"ptq"``."""
        if self.ptq is not None:
            return "ptq"
        return "float" if self.recipe is None else "qat"


@dataclass(frozen=True)
class Goal:
    """``max_drop``: each listed method within this many points of float32 (top-1, mean);
    ``beats_ptq``: each QAT method above the post-training baseline of the same bits."""

    methods: tuple[str, ...] = ()
    max_drop: float | None = None
    beats_ptq: bool = False


@dataclass(frozen=True)
class QuickMode:
    """The CI setting: one seed, ``epochs`` per phase, small subsets (figures meaningless)."""

    epochs: int = 1
    train_samples: int = 256
    eval_samples: int = 256
    timing_steps: int = 2
    calibration_batches: int = 1


@dataclass(frozen=True)
class BenchConfig:
    """A validated bench file (see the module docstring)."""

    name: str
    model: Mapping[str, Any]
    data: Mapping[str, Any]
    pretrain: TrainConfig | None
    train: TrainConfig
    methods: tuple[BenchMethod, ...]
    seeds: int = 3
    calibration_batches: int = 8
    timing_steps: int = 20
    quick_mode: QuickMode = field(default_factory=QuickMode)
    goals: tuple[Goal, ...] = ()
    description: str = ""
    notes: str = ""
    quick: bool = False
    train_samples: int | None = None
    eval_samples: int | None = None
    source: Mapping[str, Any] = field(default_factory=dict)

    def method(self, name: str) -> BenchMethod:
        for m in self.methods:
            if m.name == name:
                return m
        raise BenchConfigError(f"no method {name!r} in bench {self.name!r}")

    def train_config(self, method: BenchMethod, seed: int) -> TrainConfig:
        """The fine-tune config of ``method`` for ``seed``: the shared budget plus its overrides."""
        merged = {**self.train.to_dict(), **method.train_overrides, "seed": seed}
        merged["epochs"] = self.train.epochs  # the budget is the same for every method
        return _train_config(merged, f"methods.{method.name}.train")

    def pretrain_config(self, seed: int) -> TrainConfig | None:
        """The seed's float32 pre-training, None when every row trains from scratch."""
        return None if self.pretrain is None else replace(self.pretrain, seed=seed)

    def as_quick(self) -> BenchConfig:
        """The ``--quick`` variant: one seed, ``quick.epochs`` per phase, small subsets."""
        q = self.quick_mode
        short = {"epochs": q.epochs, "warmup_epochs": 0}
        return replace(
            self,
            seeds=1,
            pretrain=None
            if self.pretrain is None
            else replace(self.pretrain, **short, prefix="pretrain"),
            train=replace(self.train, **short, prefix="train"),
            calibration_batches=q.calibration_batches,
            timing_steps=q.timing_steps,
            quick=True,
            train_samples=q.train_samples,
            eval_samples=q.eval_samples,
        )

    def on_device(self, device: str) -> BenchConfig:
        """Every phase on ``device``; a BenchConfigError names a bad one."""
        try:
            return replace(
                self,
                pretrain=None
                if self.pretrain is None
                else _train_config({**self.pretrain.to_dict(), "device": device}, "pretrain"),
                train=_train_config({**self.train.to_dict(), "device": device}, "train"),
            )
        except BenchConfigError as err:
            raise BenchConfigError(f"--device: {err}") from err

    def select(self, names: Sequence[str]) -> BenchConfig:
        """Only the methods ``names`` (plus float32, which the deltas need), in bench order."""
        unknown = [n for n in names if n not in {m.name for m in self.methods}]
        if unknown:
            known = ", ".join(m.name for m in self.methods)
            raise BenchConfigError(f"unknown bench method {unknown[0]!r}; methods: {known}")
        keep = {*names, FLOAT32}
        return replace(self, methods=tuple(m for m in self.methods if m.name in keep))

    def to_dict(self) -> dict[str, Any]:
        """The file's content plus the effective settings (``mode`` quick or full, seeds)."""
        out = copy.deepcopy(dict(self.source))
        out.update(
            mode="quick" if self.quick else "full",
            seeds=self.seeds,
            pretrain=None if self.pretrain is None else self.pretrain.to_dict(),
            train=self.train.to_dict(),
            calibration_batches=self.calibration_batches,
            timing_steps=self.timing_steps,
            train_samples=self.train_samples,
            eval_samples=self.eval_samples,
            methods={m.name: out.get("methods", {}).get(m.name, {}) for m in self.methods},
        )
        return out


def _bench_folder() -> Traversable:
    return resources.files("lowbit").joinpath(*BENCH_PACKAGE_DIR)


def bench_names() -> list[str]:
    """The packaged benches (``lowbit bench accuracy --suite NAME``)."""
    return sorted(
        p.name.removesuffix(".yaml") for p in _bench_folder().iterdir() if p.name.endswith(".yaml")
    )


def packaged_bench(name: str) -> Mapping[str, Any]:
    """The mapping of packaged bench ``name``; a BenchConfigError lists the packaged ones."""
    file = _bench_folder() / f"{name}.yaml"
    if not file.is_file():
        raise BenchConfigError(
            f"no bench {name!r} (packaged benches: {', '.join(bench_names()) or 'none'}); "
            "pass a bench file with config=..."
        )
    return load_yaml(file.read_text())


def load_bench(source: str | Path | Mapping[str, Any]) -> BenchConfig:
    """A bench from a mapping, a YAML/TOML file, or a packaged bench name."""
    if isinstance(source, Mapping):
        return bench_from_dict(source)
    path = Path(source)
    if not path.exists() and path.suffix == "":
        try:
            return bench_from_dict(packaged_bench(str(source)))
        except (BenchConfigError, RecipeError) as err:
            raise BenchConfigError(f"bench {source}: {err}") from err
    try:
        return bench_from_dict(read_mapping(path))
    except (BenchConfigError, RecipeError) as err:
        raise BenchConfigError(f"{path}: {err}") from err


def bench_from_dict(d: Mapping[str, Any]) -> BenchConfig:
    """Validate a bench mapping; errors name the key."""
    _check_keys(d, TOP_KEYS, "bench")
    for key in ("model", "data", "train", "methods"):
        if key not in d:
            raise BenchConfigError(f"bench key {key!r} is missing")
    model, data = _named(d["model"], "model"), _named(d["data"], "data")
    methods = _methods(d["methods"])
    if FLOAT32 not in {m.name for m in methods}:
        raise BenchConfigError(f"bench key 'methods' needs a {FLOAT32!r} row (the reference)")
    return BenchConfig(
        name=str(d.get("name", data["name"])),
        description=str(d.get("description", "")),
        notes=str(d.get("notes", "")),
        model=model,
        data=data,
        seeds=_positive_int(d.get("seeds", 3), "seeds"),
        pretrain=None
        if "pretrain" in d and d["pretrain"] is None
        else _train_config(d.get("pretrain", d["train"]), "pretrain"),
        train=_train_config(d["train"], "train"),
        calibration_batches=_positive_int(d.get("calibration_batches", 8), "calibration_batches"),
        timing_steps=_positive_int(d.get("timing_steps", 20), "timing_steps"),
        quick_mode=_quick(d.get("quick", {})),
        methods=methods,
        goals=_goals(d.get("goals", []), {m.name for m in methods}),
        source=copy.deepcopy(dict(d)),
    )


def _check_keys(d: Any, valid: Sequence[str], where: str) -> None:
    if not isinstance(d, Mapping):
        raise BenchConfigError(f"{where} must be a mapping, got {d!r}")
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise BenchConfigError(f"unknown key {where}.{unknown[0]}; valid keys: {', '.join(valid)}")


def _named(value: Any, key: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, Mapping) or "name" not in value:
        raise BenchConfigError(f"bench key {key!r} must name a {key}: {{name: ...}}")
    return dict(value)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BenchConfigError(f"bench key {key!r} must be a positive int, got {value!r}")
    return value


def _train_config(section: Any, key: str) -> TrainConfig:
    try:
        return TrainConfig.from_dict(section, prefix=key)
    except ValueError as err:
        raise BenchConfigError(str(err)) from err


def _methods(section: Any) -> tuple[BenchMethod, ...]:
    if not isinstance(section, Mapping) or not section:
        raise BenchConfigError("bench key 'methods' must map method names to their settings")
    return tuple(_method(str(name), spec or {}) for name, spec in section.items())


def _method(name: str, spec: Any) -> BenchMethod:
    where = f"methods.{name}"
    _check_keys(spec, METHOD_KEYS, where)
    ptq = spec.get("ptq")
    if ptq is not None and ptq not in PTQ_KINDS:
        raise BenchConfigError(f"{where}.ptq must be one of {PTQ_KINDS}, got {ptq!r}")
    if ptq is not None and ("quant" in spec or "train" in spec):
        raise BenchConfigError(f"{where}: a 'ptq' row takes no 'quant' or 'train' settings")
    if name == FLOAT32 and (ptq is not None or spec.get("quant") is not None):
        raise BenchConfigError(f"{where} is the float reference: it takes no 'quant' or 'ptq'")
    if name != FLOAT32 and ptq is None and spec.get("quant") is None:
        raise BenchConfigError(f"{where} needs a 'quant' recipe or a 'ptq' kind")
    overrides = spec.get("train", {})
    _check_keys(overrides, TrainConfig.valid_keys(), f"{where}.train")
    if "epochs" in overrides:
        raise BenchConfigError(f"{where}.train.epochs: every method gets the bench's budget")
    recipe = None
    if spec.get("quant") is not None:
        try:
            recipe = Recipe.load(spec["quant"])
        except RecipeError as err:
            raise BenchConfigError(f"{where}.quant: {err}") from err
    return BenchMethod(name=name, recipe=recipe, train_overrides=dict(overrides), ptq=ptq)


def _quick(section: Any) -> QuickMode:
    _check_keys(section, QUICK_KEYS, "quick")
    return QuickMode(**{k: _positive_int(v, f"quick.{k}") for k, v in section.items()})


def _goals(section: Any, names: set[str]) -> tuple[Goal, ...]:
    if not isinstance(section, list):
        raise BenchConfigError(f"bench key 'goals' must be a list, got {section!r}")
    goals = []
    for i, g in enumerate(section):
        where = f"goals[{i}]"
        _check_keys(g, GOAL_KEYS, where)
        methods = tuple(str(m) for m in g.get("methods", []))
        missing = [m for m in methods if m not in names]
        if missing:
            raise BenchConfigError(f"{where}.methods: unknown method {missing[0]!r}")
        drop = g.get("max_drop")
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, int | float)):
            raise BenchConfigError(f"{where}.max_drop must be a number, got {drop!r}")
        goals.append(Goal(methods, None if drop is None else float(drop), bool(g.get("beats_ptq"))))
    return tuple(goals)
