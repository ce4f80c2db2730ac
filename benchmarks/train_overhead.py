"""QAT training-step time of every method relative to float32, same model and batch, one run.

    python benchmarks/train_overhead.py                 # all methods, LeNet-5 on 1x28x28, batch 128
    python benchmarks/train_overhead.py --smoke         # tiny: checks it runs (CI)

Each method's step (forward, backward, optimizer step) is timed over ``--steps`` steps after a
warm-up; float32 is timed before and after the methods and averaged, so slow drift of the machine
does not favour either side. The table gives the median step time and the ratio to float32.
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


def step_times(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int
) -> list[float]:
    """Seconds per training step (forward + backward + SGD step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


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

    fp_runs = [
        statistics.median(
            step_times(fresh_model(args.model, in_shape, 0), x, y, args.steps, args.warmup)
        )
    ]
    medians = {}
    for method in methods:
        model = lowbit.quantize(fresh_model(args.model, in_shape, 0), method)
        medians[method] = statistics.median(step_times(model, x, y, args.steps, args.warmup))
    fp_runs.append(
        statistics.median(
            step_times(fresh_model(args.model, in_shape, 0), x, y, args.steps, args.warmup)
        )
    )
    fp = sum(fp_runs) / len(fp_runs)

    table = Table(
        title=f"QAT step time vs float32: {args.model} {args.in_shape} batch {args.batch},"
        f" {args.threads} thread(s), {args.steps} steps"
    )
    for col in ("method", "step (ms)", "ratio to float32"):
        table.add_column(col, justify="right" if col != "method" else "left")
    table.add_row("float32", f"{fp * 1e3:.2f}", "1.00")
    ratios = {}
    for method, t in medians.items():
        ratios[method] = t / fp
        table.add_row(method, f"{t * 1e3:.2f}", f"{t / fp:.2f}")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"float32_ms": fp * 1e3, "ratios": ratios, "args": vars(args)}, f, indent=2)
    return ratios


if __name__ == "__main__":
    main()
