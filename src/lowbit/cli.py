"""The ``lowbit`` command: a thin layer over the library.

lowbit train [EXPERIMENT] [--run-dir DIR] [--device D] [--set key=value ...]
                                                                  train (FP, then QAT)
lowbit train --resume RUN [--device D] [--set train.epochs=N]      continue a run
lowbit eval RUN [--split test]                                    accuracy of a run's model
lowbit summary RUN|FILE                                           per-layer bits, sparsity, size
lowbit compare RUN [RUN ...]                                      table across runs
lowbit generate RUN --prompt TEXT                                 sample text from a language model
lowbit bench accuracy|kernels|models [--quick] ...                benchmarks
lowbit methods                                                    registered quantisers

Every command imports what it needs only once the command line is parsed (``lowbit --help``
and ``lowbit run`` load no torch). Errors a user can fix are one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .term import print_table
from .yamlio import load_yaml

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
    node[parts[-1]] = load_yaml(raw)


def _overridden(exp: Any, assignments: Sequence[str]) -> Any:
    """``exp`` with the ``--set``/``--device`` assignments applied (validated again)."""
    from .train.experiment import Experiment

    if not assignments:
        return exp
    raw = exp.to_dict()
    for assignment in assignments:
        _set_override(raw, assignment)
    return Experiment.from_dict(raw)


def _device_assignments(exp: Any, device: str | None) -> list[str]:
    if not device:
        return []
    phases = ("train", "pretrain") if exp.pretrain is not None else ("train",)
    return [f"{phase}.device={device}" for phase in phases]


RESUMABLE_KEYS = ("epochs", "device")
"""What ``--resume`` may change: a phase's epoch count (it trains on to the new count) and the
device; anything else would make the run differ from what its experiment.yaml records."""


def _without(raw: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    phases = {
        p: {k: v for k, v in raw[p].items() if k not in keys}
        for p in ("train", "pretrain")
        if raw.get(p) is not None
    }
    return {**raw, **phases}


def _resumed_experiment(args: argparse.Namespace) -> tuple[Any, Path]:
    """The run to continue: its recorded experiment with the changes --resume applies (more
    epochs, another device); an experiment file or any other change is refused."""
    from .runs.folder import read_run

    run_dir = Path(args.resume)
    if args.experiment is not None:
        raise ValueError(
            f"--resume {run_dir} continues the experiment recorded in {run_dir}/experiment.yaml;"
            f" an experiment file ({args.experiment}) cannot be given with it"
        )
    exp, _ = read_run(run_dir)
    changed = _overridden(exp, [*(args.set or []), *_device_assignments(exp, args.device)])
    old, new = exp.to_dict(), changed.to_dict()
    if _without(old, RESUMABLE_KEYS) != _without(new, RESUMABLE_KEYS):
        raise ValueError(
            f"--resume can change only {' and '.join(RESUMABLE_KEYS)} (--set "
            f"{' --set '.join(args.set or [])} changes what {run_dir} was trained with); "
            "start a new run with --run-dir instead"
        )
    for phase in ("pretrain", "train"):
        if old.get(phase) and new[phase]["epochs"] < old[phase]["epochs"]:
            raise ValueError(
                f"--resume cannot shorten a run: {phase}.epochs was {old[phase]['epochs']}"
            )
    return changed, run_dir


def _new_run_folder(args: argparse.Namespace, name: str) -> Path:
    """The folder of a new run; an existing one is refused unless only a run that never got
    to train left it (its experiment.yaml and run.json), which is reused."""
    from .runs.folder import RUN_FILES

    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{name}-{stamp}"
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--run-dir {run_dir} is a file, not a folder")
    if run_dir.exists() and any(p.name not in RUN_FILES for p in run_dir.iterdir()):
        raise ValueError(
            f"run folder {run_dir} already exists; use --resume {run_dir} "
            f"to continue it or choose another --run-dir"
        )
    return run_dir


def cmd_train(args: argparse.Namespace) -> int:
    from .runs import run_experiment
    from .train import distributed
    from .train.experiment import Experiment

    if args.resume:
        exp, run_dir = _resumed_experiment(args)
    else:
        exp = Experiment.load(args.experiment)
        exp = _overridden(exp, [*(args.set or []), *_device_assignments(exp, args.device)])
        run_dir = _new_run_folder(args, exp.name)
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
    from .runs import load_run
    from .train.experiment import load_data
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
    print_table(console, table)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .models import model_task
    from .runs import load_run
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

        print_table(console, file_summary(target).table())
        return 0
    from .model_summary import summary
    from .runs import load_run

    _, model, _ = load_run(target)
    print_table(console, summary(model, show=False).table())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        from .export.gguf_model import export_gguf
        from .runs import load_run

        out = export_gguf(
            load_run(Path(args.run))[1],
            args.output or Path(args.run) / "model.gguf",
            ternary_type=args.gguf_ternary,
            fallback=args.gguf_fallback,
            float_activations=args.float_activations,
        )
    else:
        from .runs import export_run

        out = export_run(
            args.run, args.output, format=args.format, ternary_layout=args.ternary_layout
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
    print_table(console, table)
    return 0


def _run_folders(paths: Sequence[str]) -> list[Path]:
    """The run folders named: a bench folder stands for its row folders (``seed*/<row>``)."""
    found: list[Path] = []
    for path in map(Path, paths):
        rows = sorted(p.parent for p in path.glob("seed*/*/results.json"))
        found += rows if rows and not (path / "run.json").is_file() else [path]
    return found


def cmd_compare(args: argparse.Namespace) -> int:
    from .runs import read_results, results_table

    folders = _run_folders(args.runs)
    labels = [str(f) if len({p.name for p in folders}) < len(folders) else f.name for f in folders]
    rows = [(label, read_results(f)) for label, f in zip(labels, folders, strict=True)]
    print_table(console, results_table(rows))
    return 0


def cmd_bench(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    if args.what == "accuracy":
        from .bench import run_accuracy_bench

        if extra:
            raise ValueError(f"lowbit bench accuracy: unknown option(s) {' '.join(extra)}")
        run_accuracy_bench(
            args.suite,
            quick=args.quick,
            seeds=args.seeds,
            out=args.out,
            methods=args.methods,
            device=args.device,
            console=console,
        )
    else:  # kernels / models: their own options are passed on
        import importlib

        options = [*extra, *(["--smoke"] if args.quick else [])]
        importlib.import_module(f"lowbit.bench.{args.what}").main(options)
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
    print_table(console, table)
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

    p = sub.add_parser("bench", help="benchmarks: accuracy table, kernels, whole models")
    benches = p.add_subparsers(dest="what", required=True)
    quick_help = "tiny budget, one seed / repetition: checks that it runs (CI)"
    b = benches.add_parser(
        "accuracy",
        help="every method on one model and data set, n seeds: docs/RESULTS.md",
        description="every method on one model and data set, the same budget, n seeds",
    )
    b.add_argument(
        "--suite",
        "--dataset",
        default="mnist5k",
        help="packaged bench: mnist5k (LeNet-5), narrow (8/16/32-channel CNN), cifar10",
    )
    b.add_argument("--quick", "--smoke", action="store_true", help=quick_help)
    b.add_argument("--seeds", type=int, help="number of seeds (default: the suite's)")
    b.add_argument("--out", help="output folder (default runs/bench-<suite>[-quick])")
    b.add_argument("--methods", nargs="+", help="only these rows (float32 is always kept)")
    b.add_argument("--device", help="cpu, cuda or cuda:N (default: the suite's, else auto)")
    b.set_defaults(func=cmd_bench)
    for what, text in (("kernels", "CPU GEMM kernels"), ("models", "whole exported models")):
        b = benches.add_parser(
            what,
            help=f"{text} vs float32 (options: lowbit bench {what} --help)",
            add_help=False,
        )
        b.add_argument("--quick", "--smoke", action="store_true", help=quick_help)
        b.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="Markdown report with plots for a run or bench folder")
    p.add_argument("run")
    p.add_argument("-o", "--output", help="default: RUN/report.md")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("methods", help="list the registered quantisation methods")
    p.set_defaults(func=cmd_methods)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that get one line and exit code 2: bad input, files, and the training faults
    (checked by the modules that raise them, imported by then)."""
    errors: list[type[BaseException]] = [ValueError, OSError]
    for module, name in (
        ("lowbit.train.checkpoint", "CheckpointError"),
        ("lowbit.train.trainer", "TrainingDiverged"),
    ):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        why = "no space left on the device" if err.errno == errno.ENOSPC else err.strerror
        return f"{why}: {err.filename}" if err.filename else why
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    func: Callable[..., int] = args.func
    if extra and func is not cmd_bench:
        build_parser().parse_args(argv)  # the usual argparse error for unknown options
    try:
        return func(args, extra) if func is cmd_bench else func(args)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/] (resume with lowbit train --resume RUN)")
        return 130
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        err_console.print(f"[bold red]error:[/] {_one_line(err)}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
