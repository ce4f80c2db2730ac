"""QAT training-step time of every method relative to float32, same model and batch, one run.

    python benchmarks/train_overhead.py                 # all methods, LeNet-5 on 1x28x28, batch 128
    python benchmarks/train_overhead.py --smoke         # tiny: checks it runs (CI)

Each method's step (forward, backward, SGD step) is timed over ``--steps`` steps after a warm-up,
in blocks alternating with the float32 model's steps (same model, same batch), so a change in
the machine's load affects both alike. The table gives median step times and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import lowbit
from lowbit.models import create_model


class Stepper:
    """One model with its optimizer: ``step()`` runs and times one training step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model.train(), x, y
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.loss_fn = nn.CrossEntropyLoss()

    def step(self) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn(self.model(self.x), self.y).backward()
        self.optimizer.step()
        return time.perf_counter() - start


def paired_times(
    a: Stepper, b: Stepper, steps: int, warmup: int, rounds: int = 3
) -> tuple[list[float], list[float]]:
    """Step times of ``a`` and ``b`` measured in alternating blocks, so that a change in the
    machine's load affects both alike."""
    for _ in range(warmup):
        a.step()
        b.step()
    times_a: list[float] = []
    times_b: list[float] = []
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        times_a += [a.step() for _ in range(per_round)]
        times_b += [b.step() for _ in range(per_round)]
    return times_a, times_b


def fresh_model(name: str, in_shape: tuple[int, int, int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_shape=in_shape)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="lenet5")
    p.add_argument("--in-shape", default="1,28,28")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--methods", nargs="*", default=None, help="default: all registered")
    p.add_argument("--smoke", action="store_true", help="tiny run to check the script works")
    p.add_argument("--json", help="also write the ratios to this JSON file")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.warmup = 8, 2, 1
    torch.set_num_threads(args.threads)
    in_shape = tuple(int(v) for v in args.in_shape.split(","))
    x = torch.randn(args.batch, *in_shape)
    y = torch.randint(0, 10, (args.batch,))
    methods = args.methods or lowbit.methods()

    fp_ms, medians = {}, {}
    for method in methods:
        fp = Stepper(fresh_model(args.model, in_shape, 0), x, y)
        qat = Stepper(lowbit.quantize(fresh_model(args.model, in_shape, 0), method), x, y)
        fp_t, qat_t = paired_times(fp, qat, args.steps, args.warmup)
        fp_ms[method] = statistics.median(fp_t) * 1e3
        medians[method] = statistics.median(qat_t) * 1e3

    table = Table(
        title=f"QAT step time vs float32: {args.model} {args.in_shape} batch {args.batch},"
        f" {args.threads} thread(s), {args.steps} steps"
    )
    for col in ("method", "float32 step (ms)", "QAT step (ms)", "ratio to float32"):
        table.add_column(col, justify="right" if col != "method" else "left")
    ratios = {}
    for method, t in medians.items():
        ratios[method] = t / fp_ms[method]
        table.add_row(method, f"{fp_ms[method]:.2f}", f"{t:.2f}", f"{ratios[method]:.2f}")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"float32_ms": fp_ms, "qat_ms": medians, "ratios": ratios, "args": vars(args)},
                f,
                indent=2,
            )
    return ratios


if __name__ == "__main__":
    main()
