"""QAT step-time overhead: training-step time of a quantised model over its float32 twin.

One step is what the trainer does per batch: forward, loss (plus the quantisers' own
regularisation terms), backward and the optimizer step, with the bench's optimizer settings.
Every model is timed on the same batch; the median over ``steps`` timed steps (after
``warmup`` untimed ones) is its step time. The float32 model is timed before and after the
quantised ones and the two medians averaged, so a slow drift of a shared machine does not
favour either side (the approach of ``benchmarks/train_overhead.py``).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..train.config import TrainConfig
from ..train.optim import build_optimizer, regularizers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_ms(
    model: nn.Module, x: Tensor, y: Tensor, config: TrainConfig, steps: int, warmup: int = 2
) -> float:
    """Median milliseconds of one training step of ``model`` on ``(x, y)``.

    Trains a deep copy (``model`` itself is left untouched) with ``config``'s optimizer.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    model = copy.deepcopy(model).to(x.device).train()
    optimizer = build_optimizer(model, config)
    extra = regularizers(model)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for i in range(warmup + steps):
        _sync(x.device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y) + sum(r() for r in extra)
        loss.backward()
        optimizer.step()
        _sync(x.device)
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def step_time_overheads(
    float_model: nn.Module,
    builders: Mapping[str, Callable[[nn.Module], nn.Module]],
    x: Tensor,
    y: Tensor,
    config: TrainConfig,
    steps: int,
) -> dict[str, dict[str, float]]:
    """``{name: {"step_ms", "overhead"}}`` for each quantised model ``builders[name](copy)``.

    ``overhead`` is the step time over the float32 step time (itself under ``"float32"``, 1.0).
    """
    before = median_step_ms(float_model, x, y, config, steps)
    timed = {
        name: median_step_ms(build(copy.deepcopy(float_model)), x, y, config, steps)
        for name, build in builders.items()
    }
    fp = 0.5 * (before + median_step_ms(float_model, x, y, config, steps))
    out = {"float32": {"step_ms": fp, "overhead": 1.0}}
    out.update({n: {"step_ms": ms, "overhead": ms / fp} for n, ms in timed.items()})
    return out
