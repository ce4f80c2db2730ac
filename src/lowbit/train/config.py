"""Training configuration: one validated, immutable dataclass.

``TrainConfig.from_dict`` is the entry point for recipes and CLI files: unknown keys and values of
the wrong type or range raise a :class:`ValueError` that names the key (``train.lr``) and the
value, so a typo in a config file is caught before any training starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass
from typing import Any

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")
COMM_METHODS = ("none", "fp16", "int8", "qsgd", "sign_ef")
SCHEDULES = ("cosine", "step", "constant")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

Check = Callable[[str, Any], Any]


def _fail(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{key} must be {expected}, got {value!r}")


def _integer(low: int, high: float = math.inf) -> Check:
    """An ``int`` (not a bool) in ``[low, high]``."""
    expected = f"an integer >= {low}" if high == math.inf else f"an integer in [{low}, {high}]"

    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _fail(key, value, expected)
        return value

    return check


def _real(low: float, high: float = math.inf, *, low_open: bool = False) -> Check:
    """A finite ``int``/``float`` (not a bool) in ``[low, high]`` (``(low, high]`` if open)."""
    bracket = "(" if low_open else "["
    expected = f"a finite number in {bracket}{low}, {high}]"

    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(key, value, expected)
        ok = math.isfinite(value) and value <= high and (value > low if low_open else value >= low)
        if not ok:
            raise _fail(key, value, expected)
        return float(value)

    return check


def _choice(options: tuple[str, ...]) -> Check:
    def check(key: str, value: Any) -> str:
        if value not in options:
            raise _fail(key, value, f"one of {options}")
        return value

    return check


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false")
    return value


def _device(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _DEVICE_RE.match(value):
        raise _fail(key, value, "'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    return value


def _optional(check: Check) -> Check:
    return lambda key, value: None if value is None else check(key, value)


def _milestones(key: str, value: Any) -> tuple[int, ...]:
    """A strictly increasing sequence of epoch numbers >= 1."""
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise _fail(key, value, "a list of increasing epoch numbers")
    items = tuple(_integer(1)(key, v) for v in value)
    if any(b <= a for a, b in itertools.pairwise(items)):
        raise _fail(key, value, "a strictly increasing list of epoch numbers")
    return items


@dataclass(frozen=True)
class CommConfig:
    """How DDP ranks exchange gradients (:mod:`lowbit.train.comm`); unused with one process.

    Attributes:
        method: ``"none"`` (float32 all-reduce), ``"fp16"``, ``"int8"`` (per-bucket scale,
            stochastic rounding), ``"qsgd"`` (Alistarh et al. 2017) or ``"sign_ef"`` (1 bit a
            value with error feedback).
        levels: QSGD's ``s``, the number of magnitude levels in ``[1, 127]``; codes take
            ``ceil(log2(2 s + 1))`` bits (7 levels: 4 bits, 8x fewer bytes than float32).
        chunk: QSGD's bucket size ``d``: one norm per ``chunk`` values (0: one per DDP bucket).
        seed: seeds the stochastic rounding (with the rank, step and bucket).
    """

    method: str = "none"
    levels: int = 7
    chunk: int = 2048
    seed: int = 0
    prefix: InitVar[str] = "train.comm"

    def __post_init__(self, prefix: str) -> None:
        _validate(self, _COMM_CHECKS, prefix)

    @classmethod
    def from_dict(cls, d: Any, prefix: str = "train.comm") -> CommConfig:
        """From a mapping (errors name ``<prefix>.<key>``) or a method name alone."""
        if isinstance(d, str):
            d = {"method": d}
        if not isinstance(d, Mapping):
            raise _fail(prefix, d, "a mapping like {method: qsgd, levels: 7}")
        _check_known_keys(d, cls, prefix)
        return cls(**d, prefix=prefix)


_COMM_CHECKS: dict[str, Check] = {
    "method": _choice(COMM_METHODS),
    "levels": _integer(1, 127),
    "chunk": _integer(0),
    "seed": _integer(0),
}


def _validate(config: Any, checks: Mapping[str, Check], prefix: str) -> None:
    """Check (and normalise) each field of a frozen config dataclass; errors name the key."""
    for name, check in checks.items():
        object.__setattr__(config, name, check(f"{prefix}.{name}", getattr(config, name)))


def _check_known_keys(d: Mapping[str, Any], cls: type, prefix: str) -> None:
    """A ValueError naming the first key of ``d`` that is not a field of ``cls``."""
    valid = tuple(f.name for f in dataclasses.fields(cls))
    for key in d:
        if key not in valid:
            raise ValueError(f"unknown key {prefix}.{key}; valid keys: {', '.join(valid)}")


def _comm(key: str, value: Any) -> CommConfig:
    return value if isinstance(value, CommConfig) else CommConfig.from_dict(value, prefix=key)


_CHECKS: dict[str, Check] = {
    "epochs": _integer(1),
    "batch_size": _integer(1),
    "optimizer": _choice(OPTIMIZERS),
    "lr": _real(0.0, low_open=True),
    "momentum": _real(0.0, 1.0),
    "nesterov": _boolean,
    "weight_decay": _real(0.0),
    "schedule": _choice(SCHEDULES),
    "warmup_epochs": _integer(0),
    "step_milestones": _milestones,
    "step_gamma": _real(0.0, 1.0, low_open=True),
    "seed": _integer(0),
    "device": _device,
    "amp": _boolean,
    "grad_clip": _optional(_real(0.0, low_open=True)),
    "num_workers": _integer(0),
    "eval_every": _integer(1),
    "checkpoint_every": _integer(1),
    "comm": _comm,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything the :class:`~lowbit.train.Trainer` needs besides the model and data.

    Attributes:
        epochs: passes over the training set (> 0).
        batch_size: samples per optimizer step (> 0).
        optimizer: ``"sgd"`` (with ``momentum``/``nesterov``), ``"adam"`` or ``"adamw"``.
        lr: peak learning rate (> 0).
        momentum: SGD momentum in ``[0, 1]``.
        nesterov: SGD Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 / decoupled decay (>= 0); quantiser scales are exempt.
        schedule: ``"cosine"`` annealing to 0 over all steps, ``"step"`` (multiply by
            ``step_gamma`` at each epoch in ``step_milestones``) or ``"constant"``.
        warmup_epochs: linear warm-up length in epochs (< ``epochs``), before the schedule.
        step_milestones: epochs after which the ``"step"`` schedule decays.
        step_gamma: decay factor of the ``"step"`` schedule in ``(0, 1]``.
        seed: seeds torch, numpy, ``random`` and the data order.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:i"``.
        amp: float16 autocast with gradient scaling; CUDA only.
        grad_clip: max global gradient L2 norm, or None for no clipping.
        num_workers: DataLoader worker processes.
        eval_every: evaluate on the validation set every this many epochs (and at the end).
        checkpoint_every: write the ``last`` checkpoint every this many epochs (and at the end).
        comm: gradient communication under DDP, a :class:`CommConfig` or a mapping
            ``{method: qsgd, levels: 7, seed: 0}`` (see :mod:`lowbit.train.comm`).
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: int = 0
    step_milestones: tuple[int, ...] = ()
    step_gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    grad_clip: float | None = None
    num_workers: int = 0
    eval_every: int = 1
    checkpoint_every: int = 1
    comm: CommConfig = CommConfig()
    prefix: InitVar[str] = "train"

    def __post_init__(self, prefix: str) -> None:
        _validate(self, _CHECKS, prefix)
        self._check_combinations(prefix)

    def _check_combinations(self, prefix: str) -> None:
        """Constraints that involve more than one field."""
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"{prefix}.warmup_epochs must be < {prefix}.epochs ({self.epochs}), "
                f"got {self.warmup_epochs!r}"
            )
        if self.schedule == "step" and not self.step_milestones:
            raise ValueError(f"{prefix}.step_milestones must be non-empty for schedule 'step'")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError(f"{prefix}.nesterov needs {prefix}.momentum > 0, got 0")
        if self.amp and self.device == "cpu":
            raise ValueError(f"{prefix}.amp is CUDA-only, but {prefix}.device is 'cpu'")

    @classmethod
    def valid_keys(cls) -> tuple[str, ...]:
        """The valid configuration keys."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "train") -> TrainConfig:
        """Build from a mapping; errors name ``<prefix>.<key>``. Missing keys take defaults."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{prefix} must be a mapping, got {d!r}")
        _check_known_keys(d, cls, prefix)
        return cls(**d, prefix=prefix)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-friendly dict (``from_dict(to_dict())`` gives an equal config)."""
        d = dataclasses.asdict(self)
        d["step_milestones"] = list(self.step_milestones)
        return d

    def resolve_device(self) -> torch.device:
        """The device to train on; ``amp`` on a non-CUDA device is a ValueError."""
        if self.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"train.device is {self.device!r} but CUDA is not available")
        if self.amp and device.type != "cuda":
            raise ValueError(f"train.amp is CUDA-only, but training runs on {device}")
        return device
