"""The files a training run leaves in its run directory.

* ``metrics.csv`` -- one row per epoch (:data:`COLUMNS`); validation cells are empty on epochs
  without evaluation;
* ``scalars.jsonl`` -- one JSON object per epoch with every 0-d quantiser scale
  (``{"epoch": 3, "fc.weight_quant.wp": 0.71, ...}``): TTQ's ``Wp``/``Wn`` trajectories;
* ``tb/`` -- TensorBoard event files (the same numbers, step = epoch);
* ``metrics.json`` -- the run's summary, written at the end.

Rows are appended and flushed epoch by epoch, so a killed run keeps its history. On resume from
a checkpoint taken after epoch ``k``, rows of later epochs (written before the kill but after the
checkpoint) are dropped and TensorBoard is told to purge steps ``> k``, so nothing is doubled.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .optim import quantizer_tensors

COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "epoch_time_s",
    "step_time_ms",
)


def quantizer_scalars(model: nn.Module) -> dict[str, float]:
    """Every initialised 0-d floating-point parameter or buffer of a quantiser, by full name."""
    return {
        name: float(t.detach())
        for name, t in quantizer_tensors(model).items()
        if not isinstance(t, nn.parameter.UninitializedTensorMixin)
        and t.dim() == 0
        and t.is_floating_point()
    }


def _keep_lines(file: Path, keep: Any) -> list[str]:
    """The lines of ``file`` (empty if missing) for which ``keep(line)`` holds."""
    if not file.exists():
        return []
    return [line for line in file.read_text().splitlines(keepends=True) if keep(line)]


def _csv_epoch_at_most(done: int) -> Any:
    return lambda line: line.startswith("epoch,") or int(line.split(",", 1)[0]) <= done


def _json_epoch_at_most(done: int) -> Any:
    return lambda line: json.loads(line)["epoch"] <= done


class RunLog:
    """Writes the run directory's logs; a disabled log (non-main DDP rank) writes nothing.

    Args:
        run_dir: the run directory (created if missing).
        done_epochs: epochs already completed (0 for a fresh run, which starts the logs anew).
        enabled: False makes every method a no-op.
    """

    def __init__(self, run_dir: Path, done_epochs: int, *, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / "metrics.csv"
        self.jsonl_path = self.run_dir / "scalars.jsonl"
        rows = _keep_lines(self.csv_path, _csv_epoch_at_most(done_epochs)) if done_epochs else []
        self.csv_path.write_text(",".join(COLUMNS) + "\n" if not rows else "".join(rows))
        scalars = _keep_lines(self.jsonl_path, _json_epoch_at_most(done_epochs))
        self.jsonl_path.write_text("".join(scalars) if done_epochs else "")
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when logging

        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=done_epochs + 1)

    def log_epoch(self, metrics: Mapping[str, Any], scalars: Mapping[str, float]) -> None:
        """Append one epoch: ``metrics`` has the :data:`COLUMNS` (None for 'not measured')."""
        if not self.enabled:
            return
        epoch = metrics["epoch"]
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow(["" if metrics[c] is None else metrics[c] for c in COLUMNS])
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"epoch": epoch, **scalars}) + "\n")
        for key in COLUMNS[1:]:
            value = metrics[key]
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(key.replace("_", "/", 1), value, epoch)
        for name, value in scalars.items():
            self.writer.add_scalar(f"quant/{name}", value, epoch)
        self.writer.flush()

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``metrics.json``."""
        if self.enabled:
            (self.run_dir / "metrics.json").write_text(json.dumps(dict(summary), indent=2) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
