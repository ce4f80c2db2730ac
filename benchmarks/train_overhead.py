"""QAT training-step time of every method relative to float32, same model and batch, one run.

    python benchmarks/train_overhead.py                       # LeNet-5 1x28x28, batch 128, CPU
    python benchmarks/train_overhead.py --model resnet20 --in-shape 3,32,32 --batch 128
    python benchmarks/train_overhead.py --modes eager compiled --devices cpu cuda --amp
    python benchmarks/train_overhead.py --smoke               # tiny: checks it runs (CI)

For each device (``cpu``, and ``cuda`` when a GPU is present) and mode (``eager``, ``compiled``:
``torch.compile`` of the whole model, float32 and QAT alike), each method's step (forward,
backward, SGD step) is timed over ``--steps`` steps after a warm-up (which includes the
compilation), in blocks alternating with the float32 model's steps (same model, same batch), so
a change in the machine's load affects both alike. The QAT model's quantisers are initialised
from the batch (``lowbit.quant.initialize``) before compiling. The table gives median step times
and their ratio; ``--amp`` runs both under bfloat16 autocast. ``--clock cpu`` times CPU runs by
the process's CPU time instead of the wall clock, which other processes on a busy machine
disturb less.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import lowbit
from lowbit.models import create_model
from lowbit.quant import initialize

MODES = ("eager", "compiled")


class Stepper:
    """One model with its optimizer: ``step()`` runs and times one training step."""

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        compiled: bool,
        amp: bool,
        clock: str = "wall",
    ) -> None:
        self.x, self.y, self.amp = x, y, amp
        self.clock = time.process_time if clock == "cpu" else time.perf_counter
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.model = torch.compile(model.train()) if compiled else model.train()
        self.loss_fn = nn.CrossEntropyLoss()
        self.cuda = x.device.type == "cuda"

    def step(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        start = self.clock()
        self.optimizer.zero_grad(set_to_none=True)
        amp = torch.autocast(self.x.device.type, dtype=torch.bfloat16) if self.amp else None
        with amp or contextlib.nullcontext():
            loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        if self.cuda:
            torch.cuda.synchronize()
        return self.clock() - start


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


def default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def measure(args: argparse.Namespace, device: str, mode: str) -> list[dict[str, object]]:
    """Rows ``{device, mode, method, float32_ms, qat_ms, ratio}`` for every method."""
    in_shape = tuple(int(v) for v in args.in_shape.split(","))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *in_shape, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    compiled = mode == "compiled"
    if compiled:
        torch._dynamo.reset()
    # one float32 model per configuration (compiled once), timed against each method in turn
    fp_model = fresh_model(args.model, in_shape, 0).to(device)
    fp = Stepper(fp_model, x, y, compiled, args.amp, args.clock)
    rows = []
    for method in args.methods or lowbit.methods():
        model = lowbit.quantize(fresh_model(args.model, in_shape, 0), method).to(device)
        initialize(model, x)
        qat = Stepper(model, x, y, compiled, args.amp, args.clock)
        fp_t, qat_t = paired_times(fp, qat, args.steps, args.warmup)
        fp_ms, qat_ms = statistics.median(fp_t) * 1e3, statistics.median(qat_t) * 1e3
        rows.append(
            {
                "device": device,
                "mode": mode,
                "method": method,
                "float32_ms": fp_ms,
                "qat_ms": qat_ms,
                "ratio": qat_ms / fp_ms,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="lenet5")
    p.add_argument("--in-shape", default="1,28,28")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--methods", nargs="*", default=None, help="default: all registered")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if present")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for both models")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time (CPU runs on a loaded machine; not for GPU)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny run to check the script works")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.warmup = 8, 2, 1
    torch.set_num_threads(args.threads)
    devices = args.devices or default_devices()
    rows = [row for dev in devices for mode in args.modes for row in measure(args, dev, mode)]

    table = Table(
        title=f"QAT step time vs float32: {args.model} {args.in_shape} batch {args.batch},"
        f" {args.threads} CPU thread(s), {args.steps} steps, {args.clock} clock"
        f"{', bf16 autocast' if args.amp else ''}"
    )
    for col in ("device", "mode", "method", "float32 step (ms)", "QAT step (ms)", "ratio"):
        table.add_column(col, justify="left" if col in ("device", "mode", "method") else "right")
    for r in rows:
        table.add_row(
            str(r["device"]),
            str(r["mode"]),
            str(r["method"]),
            f"{r['float32_ms']:.2f}",
            f"{r['qat_ms']:.2f}",
            f"{r['ratio']:.2f}",
        )
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
