"""Quantised gradient communication: bytes per step and accuracy of each DDP hook vs float32.

    python benchmarks/comm.py                    # 2 CPU processes (gloo), every hook, 3 seeds
    python benchmarks/comm.py --nproc 4 --epochs 10 --seeds 0
    python benchmarks/comm.py --smoke            # tiny: checks it runs

The script launches itself under ``torchrun`` (``python -m torch.distributed.run``); each worker
trains the same model on the embedded ``digits`` data once per (hook, seed) with the library's
Trainer (``train.comm.method``), so every run differs only in how gradients are exchanged. Bytes
per step are counted inside the hooks (what one rank hands to the collectives); accuracy is on
the digits test split, averaged over seeds, and compared with uncompressed DDP (``none``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

METHODS = ("none", "fp16", "int8", "qsgd", "sign_ef")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    """One rank: train every (method, seed) and let rank 0 write the results as JSON."""
    import torch
    from rich.console import Console

    from lowbit import quantize
    from lowbit.data import load_dataset
    from lowbit.models import create_model
    from lowbit.train import TrainConfig, Trainer
    from lowbit.train.distributed import is_main_process

    torch.set_num_threads(1)
    data = load_dataset("digits", seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for seed in args.seeds:
                torch.manual_seed(seed)
                model = create_model("mlp", num_classes=10, in_shape=data.in_shape)
                if args.recipe != "float":
                    quantize(model, args.recipe)
                config = TrainConfig.from_dict(
                    {
                        "epochs": args.epochs,
                        "batch_size": args.batch_size,
                        "optimizer": "adam",
                        "lr": args.lr,
                        "seed": seed,
                        "device": "cpu",
                        "eval_every": args.epochs,
                        "comm": {
                            "method": method,
                            "levels": args.levels,
                            "chunk": args.chunk,
                            "seed": seed,
                        },
                    }
                )
                run_dir = Path(tmp) / f"{method}-{seed}"
                trainer = Trainer(
                    model, data.train, data.val, config, run_dir, console=Console(quiet=True)
                )
                summary = trainer.fit()
                test = trainer.evaluate(data.test)
                rows.append({"method": method, "seed": seed, "test_acc": test["acc"], **summary})
    if is_main_process():
        Path(args.worker).write_text(json.dumps(rows, indent=1))


def table(rows: list[dict[str, Any]], methods: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per method: bytes per step, ratio to float32, mean test accuracy and its gap to ``none``."""
    out = []
    for method in methods:
        runs = [r for r in rows if r["method"] == method]
        out.append(
            {
                "method": method,
                "bytes_per_step": runs[0]["comm_bytes_per_step"],
                "fp32_bytes_per_step": runs[0]["comm_fp32_bytes_per_step"],
                "ratio": runs[0]["comm_ratio"],
                "test_acc": sum(r["test_acc"] for r in runs) / len(runs),
                "per_seed": [r["test_acc"] for r in runs],
            }
        )
    base = next((r["test_acc"] for r in out if r["method"] == "none"), None)
    for r in out:
        r["delta_points"] = None if base is None else 100 * (r["test_acc"] - base)
    return out


def show(results: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("hook", "bytes/step", "vs float32", "test acc", "vs none", "per seed"):
        t.add_column(col, justify="left" if col == "hook" else "right")
    for r in results:
        delta = "-" if r["delta_points"] is None else f"{r['delta_points']:+.2f} pt"
        seeds = " ".join(f"{a:.2%}" for a in r["per_seed"])
        t.add_row(
            r["method"],
            f"{r['bytes_per_step']:,.0f}",
            f"{r['ratio']:.2f}x",
            f"{r['test_acc']:.2%}",
            delta,
            seeds,
        )
    Console().print(t)


def main(argv: list[str] | None = None) -> list[dict[str, Any]] | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks)")
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--levels", type=int, default=7, help="QSGD levels s")
    p.add_argument("--chunk", type=int, default=2048, help="QSGD values per norm (0: bucket)")
    p.add_argument("--recipe", default="lsq", help="quantisation recipe, or 'float'")
    p.add_argument("--smoke", action="store_true", help="1 epoch, 1 seed")
    p.add_argument("--json", help="also write the table to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the JSON a worker writes
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.seeds = 1, [0]
    if args.worker:
        worker(args)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--smoke"]
        if args.smoke:
            forwarded += ["--epochs", "1", "--seeds", "0"]
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
            "--master_port", str(free_port()), __file__, *forwarded, "--worker", str(out),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env)
        rows = json.loads(out.read_text())
    results = table(rows, tuple(args.methods))
    title = (
        f"DDP gradient communication, {args.nproc} ranks (gloo), mlp/{args.recipe} on digits, "
        f"{args.epochs} epochs, seeds {args.seeds}"
    )
    show(results, title)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
