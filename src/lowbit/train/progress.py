"""What the trainer prints while an epoch runs: a live bar on a terminal, plain lines elsewhere.

On a terminal a ``rich`` progress bar shows the step, loss, running accuracy and learning rate.
When the output is not a terminal (a log file, CI), a bar would print nothing useful, so one
plain line is printed every :data:`LOG_INTERVAL_S` seconds within the epoch instead (never
more than one per step), and one line at the end of every epoch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

LOG_INTERVAL_S = 20.0


class EpochProgress:
    """Progress of one epoch of ``steps`` steps; a no-op when ``enabled`` is False."""

    def __init__(
        self,
        console: Console,
        epoch: int,
        epochs: int,
        steps: int,
        *,
        enabled: bool = True,
        interval_s: float = LOG_INTERVAL_S,
    ) -> None:
        self.console, self.epoch, self.epochs, self.steps = console, epoch, epochs, steps
        self.interval_s = interval_s
        self.live = enabled and console.is_terminal
        self.plain = enabled and not console.is_terminal
        self._last = time.monotonic()
        self._bar = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}"),
            TextColumn("lr {task.fields[lr]:.3g}"),
            TimeElapsedColumn(),
            console=console,
            disable=not self.live,
        )
        self._task = self._bar.add_task("train", total=steps, loss=float("nan"), acc=0.0, lr=0.0)

    def __enter__(self) -> EpochProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def update(self, step: int, loss: float, acc: float, lr: float) -> None:
        """After step ``step`` (1-based) with the running loss and accuracy."""
        self._bar.update(self._task, completed=step, loss=loss, acc=acc, lr=lr)
        now = time.monotonic()
        if self.plain and step < self.steps and now - self._last >= self.interval_s:
            self._last = now
            self.console.print(
                f"epoch {self.epoch}/{self.epochs}  step {step}/{self.steps}  "
                f"loss {loss:.4f}  acc {acc:.4f}  lr {lr:.3g}",
                soft_wrap=True,
                highlight=False,
            )


def epoch_line(m: Mapping[str, Any], epochs: int) -> str:
    """The one line printed after every epoch (also in CI logs)."""
    val = ""
    if m["val_acc"] is not None:
        val = f"  val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f}"
    if "comm_ratio" in m:
        val += f"  comm {m['comm_bytes'] / 1024:.1f} KiB/step ({m['comm_ratio']:.1f}x)"
    return (
        f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4f} "
        f"acc {m['train_acc']:.4f}{val}  lr {m['lr']:.3g}  {m['epoch_time_s']:.1f}s"
    )
