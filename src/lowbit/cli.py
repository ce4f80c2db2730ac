"""The ``lowbit`` command: a thin layer over the library.

lowbit train [EXPERIMENT] [--run-dir DIR] [--device D] [--set key=value ...]
                                                                  train (FP, then QAT)
lowbit train --resume RUN                                         continue a killed run
lowbit eval RUN [--split test]                                    accuracy of a run's model
lowbit summary RUN                                                per-layer bits, sparsity, size
lowbit compare RUN [RUN ...]                                      table across runs
lowbit generate RUN --prompt TEXT                                 sample text from a language model
lowbit methods                                                    registered quantisers
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def _set_override(config: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested mapping."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if isinstance(child, str):  # "model: lenet5" shorthand
            child = node[part] = {"name": child}
        if not isinstance(child, dict):
            raise ValueError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import distributed
    from .train.experiment import Experiment, run_experiment

    if args.resume:
        run_dir = Path(args.resume)
        source: Any = run_dir / "experiment.yaml"
        if not Path(source).is_file():
            raise ValueError(f"--resume {run_dir}: not a lowbit run folder (no experiment.yaml)")
    else:
        source = args.experiment
    exp = Experiment.load(source)
    assignments = list(args.set or [])
    if args.device:
        phases = ("train", "pretrain") if exp.pretrain is not None else ("train",)
        assignments += [f"{phase}.device={args.device}" for phase in phases]
    if assignments:
        raw = exp.to_dict()
        for assignment in assignments:
            _set_override(raw, assignment)
        exp = Experiment.from_dict(raw)
    if not args.resume:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{exp.name}-{stamp}"
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(
                f"run folder {run_dir} already exists; use --resume {run_dir} "
                f"to continue it or choose another --run-dir"
            )
    # under torchrun: join the ranks; all have read the recipe and checked the folder before
    # rank 0 writes to it, and only rank 0 prints
    distributed.setup(exp.train.resolve_device())
    distributed.barrier()
    console.quiet = not distributed.is_main_process()
    console.print(f"run folder: [bold]{run_dir}[/]")
    run_experiment(exp, run_dir, resume=bool(args.resume), console=console)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from .models import model_task
    from .train.experiment import load_data, load_run
    from .train.lm import lm_metrics, task_loss
    from .train.trainer import evaluate

    exp, model, _ = load_run(Path(args.run))
    data = load_data(exp, exp.train.seed)
    loader = DataLoader(getattr(data, args.split), batch_size=args.batch_size)
    text = model_task(exp.model["name"]) == "text"
    metrics = evaluate(model, loader, task_loss("text" if text else "image"))
    table = Table(title=f"{args.run}: {args.split} split")
    table.add_column("loss", justify="right")
    table.add_column("next-token accuracy" if text else "accuracy", justify="right")
    cells = [f"{metrics['loss']:.4f}", f"{metrics['acc']:.2%}"]
    if text:  # language models: bits per byte and perplexity
        table.add_column("bits/byte", justify="right")
        table.add_column("perplexity", justify="right")
        lm = lm_metrics(metrics["loss"])
        cells += [f"{lm['bpb']:.4f}", f"{lm['ppl']:.3f}"]
    table.add_row(*cells)
    console.print(table)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .models import model_task
    from .train.experiment import load_run
    from .train.lm import generate

    exp, model, _ = load_run(Path(args.run))
    if model_task(exp.model["name"]) != "text":
        raise ValueError(f"{args.run}: model {exp.model['name']!r} is not a language model")
    text = generate(
        model,
        args.prompt,
        args.tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    console.print(args.prompt + text, markup=False, highlight=False)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if target.is_file():
        from .runtime import file_summary

        console.print(file_summary(target).table())
        return 0
    from .model_summary import summary
    from .train.experiment import load_run

    _, model, _ = load_run(target)
    summary(model, console=console)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        from .export.gguf_model import export_gguf
        from .train.experiment import load_run

        out = export_gguf(
            load_run(Path(args.run))[1],
            args.output or Path(args.run) / "model.gguf",
            ternary_type=args.gguf_ternary,
            fallback=args.gguf_fallback,
            float_activations=args.float_activations,
        )
    elif args.format == "onnx":
        from .export.onnx import export_onnx_run

        out = export_onnx_run(args.run, args.output or Path(args.run) / "model.onnx")
    else:
        from .export import export_run

        out = export_run(
            args.run,
            args.output or Path(args.run) / "model.lowbit",
            ternary_layout=args.ternary_layout,
        )
    console.print(f"wrote [bold]{out}[/] ({out.stat().st_size:,} bytes)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import classify, load

    model = load(args.model, engine=args.engine)
    table = Table(title=f"{args.model} ({model.engine} engine)")
    table.add_column("input")
    for rank in range(1, args.top_k + 1):
        table.add_column(f"#{rank} (p)", justify="right")
    for label, pairs in classify(model, args.inputs, top_k=args.top_k):
        table.add_row(label, *[f"{c} ({p:.3f})" for c, p in pairs])
    console.print(table)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .train.experiment import results_table

    rows = []
    for run in args.runs:
        path = Path(run) / "results.json"
        if not path.is_file():
            raise ValueError(f"{run}: no results.json (unfinished or not a lowbit run)")
        rows.append(json.loads(path.read_text()))
    console.print(results_table(rows))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "accuracy":
        from .bench import run_accuracy_bench

        run_accuracy_bench(
            args.dataset,
            quick=args.quick,
            seeds=args.seeds,
            out=args.out,
            methods=args.methods,
            console=console,
        )
    else:  # kernels / models: their own options follow
        import importlib

        importlib.import_module(f"lowbit.bench.{args.what}").main(args.options)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = write_report(args.run, args.output)
    console.print(f"wrote [bold]{out}[/]")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .quant import registry
    from .recipe import default_recipe_dict

    table = Table(title="lowbit quantisation methods")
    for col in ("method", "quantises", "default recipe"):
        table.add_column(col)
    for name in registry.methods():
        table.add_row(
            name,
            ", ".join(registry.roles_of(name)),
            default_recipe_dict(name).get("description", ""),
        )
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an experiment (default: TTQ on embedded MNIST)")
    p.add_argument(
        "experiment",
        nargs="?",
        default=None,
        help="experiment YAML/TOML file or packaged name (default: mnist5k-ttq)",
    )
    p.add_argument("--run-dir", help="output folder (default: runs/<name>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the recipe's, else auto)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key, e.g. --set train.epochs=2 --set train.device=cuda",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's final model")
    p.add_argument("run")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a language-model run")
    p.add_argument("run")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--tokens", type=int, default=200, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("summary", help="per-layer bits, sparsity and size (run or .lowbit)")
    p.add_argument("target", help="a run folder or a .lowbit file")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("export", help="write a run's model as a .lowbit, ONNX or GGUF file")
    p.add_argument("run", help="a run folder")
    p.add_argument("-o", "--output", type=Path, help="default: RUN/model.lowbit, .onnx or .gguf")
    p.add_argument("--format", choices=("lowbit", "onnx", "gguf"), default="lowbit")
    p.add_argument(
        "--ternary-layout",
        choices=("5trit", "2bit"),
        default="5trit",
        help="ternary packing: 5 trits a byte (1.6 bits) or 2 bits a weight",
    )
    p.add_argument("--gguf-ternary", choices=("tq2_0", "tq1_0"), default="tq2_0")
    p.add_argument(
        "--gguf-fallback",
        choices=("f16", "f32"),
        help="GGUF: store ternary layers TQ blocks cannot hold in this type (default: error)",
    )
    p.add_argument(
        "--float-activations",
        action="store_true",
        help="GGUF: accept input quantisers llama.cpp does not reproduce (run them in float)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="classify images (PNG) or arrays (NPY) with a .lowbit model")
    p.add_argument("model", help="a .lowbit file")
    p.add_argument("inputs", nargs="+", help="PNG images or .npy arrays")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument(
        "--engine",
        choices=("auto", "float", "integer"),
        default="auto",
        help="integer-only engine where the model allows it (auto), or force one",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="accuracy / bits / size across runs")
    p.add_argument("runs", nargs="+")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "bench",
        help="benchmarks: accuracy table, kernels, whole models",
        description="lowbit bench accuracy [--quick] | lowbit bench kernels "
        "[--smoke ...] | lowbit bench models [--smoke ...]",
    )
    p.add_argument("what", choices=("accuracy", "kernels", "models"))
    p.add_argument("--dataset", default="mnist5k", help="accuracy: recipes/bench/<name>.yaml")
    p.add_argument("--quick", action="store_true", help="accuracy: one seed, tiny budget (CI)")
    p.add_argument("--seeds", type=int, help="accuracy: number of seeds (default: the file's)")
    p.add_argument("--out", help="accuracy: output folder (default runs/bench-<dataset>)")
    p.add_argument("--methods", nargs="+", help="accuracy: only these rows")
    p.add_argument(
        "options",
        nargs=argparse.REMAINDER,
        help="kernels/models: options of that benchmark (see --help after it)",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="Markdown report with plots for a run or bench folder")
    p.add_argument("run")
    p.add_argument("-o", "--output", help="default: RUN/report.md")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("methods", help="list the registered quantisation methods")
    p.set_defaults(func=cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .train import CheckpointError, TrainingDiverged

    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/] (resume with lowbit train --resume RUN)")
        return 130
    except (ValueError, FileNotFoundError, CheckpointError, TrainingDiverged) as err:
        err_console.print(f"[bold red]error:[/] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
