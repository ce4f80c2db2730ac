"""Training health checks for quantised models: dead layers and collapsed activations.

Quantisation can silently kill a layer. Two symptoms are checked:

* **dead weights** -- the share of a layer's quantised weights that are exactly zero
  (``spec.dequantize(codes) == 0`` for the layer's integer codes, see
  :func:`lowbit.nn.weight_codes`) reaches ``zero_threshold`` (default 0.99). A ternary layer whose
  threshold ``delta`` exceeds every ``|w|`` (TWN with a large ``delta_factor``, TTQ with ``t``
  near 1) ends here: it outputs only its bias.
* **collapsed activations** -- on a batch of validation inputs, the most frequent code of an
  activation quantiser holds ``level_threshold`` (default 0.99) of the values: the layer sees
  (almost) one constant input level, e.g. an unsigned quantiser fed post-ReLU zeros, or a binary
  activation that is always ``+1``.

:func:`check_health` runs both on a model; :class:`QuantHealthCallback` runs it after every
training epoch (``Trainer(callbacks=[QuantHealthCallback()])``), warns through
:mod:`warnings` and the trainer's ``rich`` console, and records every epoch in
``run_dir/health.json``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..calibration import activation_quantizers, recording_inputs
from ..model_summary import weight_zero_counts
from .distributed import is_main_process

DEFAULT_ZERO_THRESHOLD = 0.99
DEFAULT_LEVEL_THRESHOLD = 0.99
HEALTH_FILE = "health.json"
IssueKind = Literal["dead_weights", "collapsed_activations"]


class QuantHealthWarning(UserWarning):
    """A quantised layer that is dead (all-zero weights) or whose input collapsed to one level."""


@dataclass(frozen=True)
class HealthIssue:
    """One unhealthy layer: ``share`` is its zero-weight share or its dominant-level share."""

    layer: str
    kind: IssueKind
    share: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_threshold(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def weight_zero_shares(model: nn.Module) -> dict[str, float]:
    """Per quantised layer: the share of its quantised weights that are exactly zero."""
    return {n: z / max(total, 1) for n, (z, total) in weight_zero_counts(model).items()}


def _dominant_share(codes: Tensor) -> float:
    """The share of the most frequent value of ``codes``."""
    _, counts = torch.unique(codes.flatten(), return_counts=True)
    return float(counts.max()) / max(codes.numel(), 1)


@torch.no_grad()
def activation_level_shares(model: nn.Module, batch: Tensor) -> dict[str, float]:
    """Per activation quantiser: the share of its most frequent code on ``batch`` (eval mode).

    One forward pass of ``model`` on ``batch`` in evaluation mode (the mode is restored after);
    each activation quantiser's input is recorded and turned into codes by the quantiser's own
    ``codes``, which is the level set the next layer computes with. Keys are layer names.
    """
    quantizers = activation_quantizers(model)
    if not quantizers:
        return {}
    was_training = model.training
    model.eval()
    try:
        seen: dict[str, Tensor] = {}
        with recording_inputs(quantizers, seen.__setitem__):
            model(batch)
        return {name: _dominant_share(quantizers[name].codes(x)[0]) for name, x in seen.items()}
    finally:
        model.train(was_training)


def check_health(
    model: nn.Module,
    batch: Tensor | None = None,
    *,
    zero_threshold: float = DEFAULT_ZERO_THRESHOLD,
    level_threshold: float = DEFAULT_LEVEL_THRESHOLD,
) -> list[HealthIssue]:
    """The unhealthy layers of ``model``; empty when every quantised layer is alive.

    A layer is *dead* when the share of zero quantised weights is ``>= zero_threshold``; its
    input has *collapsed* when one code holds ``>= level_threshold`` of an activation
    quantiser's values on ``batch`` (skipped when ``batch`` is None).
    """
    zero_threshold = _check_threshold("zero_threshold", zero_threshold)
    level_threshold = _check_threshold("level_threshold", level_threshold)
    issues = [
        HealthIssue(
            name,
            "dead_weights",
            share,
            f"layer {name!r}: {share:.1%} of its quantised weights are zero "
            f"(threshold {zero_threshold:.0%}); the layer is dead",
        )
        for name, share in weight_zero_shares(model).items()
        if share >= zero_threshold
    ]
    if batch is not None:
        issues += [
            HealthIssue(
                name,
                "collapsed_activations",
                share,
                f"layer {name!r}: its quantised input collapsed to one level ({share:.1%} of the "
                f"values on a validation batch share one code, threshold {level_threshold:.0%})",
            )
            for name, share in activation_level_shares(model, batch).items()
            if share >= level_threshold
        ]
    return issues


def first_batch(data: Dataset, batch_size: int) -> Tensor:
    """The inputs of the first ``batch_size`` samples of a map-style ``(input, target)`` set."""
    inputs, _ = next(iter(DataLoader(data, batch_size=batch_size, shuffle=False)))
    return inputs


class QuantHealthCallback:
    """Trainer callback: after each epoch, warn about dead layers and collapsed activations.

    Args:
        data: a batch of inputs (Tensor) or a map-style ``(input, target)`` dataset whose first
            ``batch_size`` samples form the batch; None (default) uses the trainer's
            validation set.
        batch_size: samples taken from ``data`` (> 0).
        zero_threshold, level_threshold: see :func:`check_health`.
        console: where the warnings are printed (default: the trainer's console).

    Each issue is raised as a :class:`QuantHealthWarning` and printed; every epoch (issues or
    not) is appended to ``history`` and written to ``<run_dir>/health.json`` as
    ``{"epochs": [{"epoch": 1, "issues": [...]}, ...]}``.
    """

    def __init__(
        self,
        data: Tensor | Dataset | None = None,
        *,
        batch_size: int = 256,
        zero_threshold: float = DEFAULT_ZERO_THRESHOLD,
        level_threshold: float = DEFAULT_LEVEL_THRESHOLD,
        console: Console | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.data = data
        self.batch_size = batch_size
        self.zero_threshold = _check_threshold("zero_threshold", zero_threshold)
        self.level_threshold = _check_threshold("level_threshold", level_threshold)
        self.console = console
        self.history: list[dict[str, Any]] = []
        self._batch: Tensor | None = data if isinstance(data, Tensor) else None

    def _inputs(self, trainer: Any) -> Tensor:
        if self._batch is None:
            source = self.data if self.data is not None else trainer.val_set
            self._batch = first_batch(source, self.batch_size)
        return self._batch.to(trainer.device)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> list[HealthIssue]:
        """Check ``trainer.model``; warn, print and record the issues; return them."""
        issues = check_health(
            trainer.model,
            self._inputs(trainer),
            zero_threshold=self.zero_threshold,
            level_threshold=self.level_threshold,
        )
        self.history.append({"epoch": epoch, "issues": [i.to_dict() for i in issues]})
        console = self.console if self.console is not None else trainer.console
        for issue in issues:
            warnings.warn(f"epoch {epoch}: {issue.message}", QuantHealthWarning, stacklevel=2)
            if is_main_process():
                console.print(f"[yellow]health warning:[/] epoch {epoch}: {issue.message}")
        if is_main_process():
            path = Path(trainer.run_dir) / HEALTH_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"epochs": self.history}, indent=2) + "\n")
        return issues
