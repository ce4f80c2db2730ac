"""``lowbit bench accuracy``: every method on one model and dataset, the same budget, n seeds.

Per seed the float32 model is trained once (``pretrain``); every row then starts from that
checkpoint and gets the same fine-tune budget (``train.epochs``): float32 keeps training in
float, each QAT method quantises and fine-tunes (as LSQ and TTQ do), and the post-training
baselines quantise the float32 row's final model with a few calibration batches and no
training. The best epoch on the validation split (carved from the training set) is kept; the
test split is only ever evaluated. The output folder::

    OUT/bench.yaml                    the effective bench configuration
    OUT/seed<k>/pretrain/             the float32 pre-training run of seed k
    OUT/seed<k>/<method>/             one lowbit run folder per row (``lowbit report`` reads it)
    OUT/timing.json                   QAT step-time overheads (measured once, on seed 0)
    OUT/results.{json,csv,md}         the table (see :mod:`lowbit.bench.table`)

A finished sub-run (its ``results.json`` exists) is not run again, so an interrupted bench
continues where it stopped when started again with the same ``out``. ``compute_time_s`` in the
results adds up the time of every part (pre-training, each row, the timing measurement), so it
is what the whole bench costs from scratch even when it ran in several sessions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..convert import quantize
from ..data import DatasetSplits, load_dataset
from ..models import create_model
from ..runs.folder import load_run, write_run_files
from ..runs.results import RESULTS
from ..runs.runner import finish_run, results_head, run_experiment
from ..train.checkpoint import save_checkpoint
from ..train.config import TrainConfig
from ..train.experiment import Experiment
from ..yamlio import load_yaml
from .config import FLOAT32, BenchConfig, BenchConfigError, BenchMethod, load_bench
from .machine import machine_info
from .ptq import apply_ptq, ptq_recipe
from .table import aggregate, check_goals, show_results, write_tables
from .timing import step_time_overheads


def run_accuracy_bench(
    dataset: str = "mnist5k",
    *,
    config: str | Path | Mapping[str, Any] | None = None,
    quick: bool = False,
    seeds: int | None = None,
    out: str | Path | None = None,
    methods: Sequence[str] | None = None,
    device: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the accuracy bench and write its table; returns the content of ``results.json``.

    Args:
        dataset: the packaged suite ``lowbit/recipes/bench/<dataset>.yaml`` (``mnist5k``,
            ``narrow``, ``cifar10``).
        config: a bench file or mapping instead of ``dataset``'s.
        quick: the CI mode -- one seed, one epoch per phase on small subsets; every row is
            produced, the figures mean nothing.
        seeds: number of seeds (0, 1, ...); default the bench's (3). Overrides quick's 1.
        out: output folder (default ``runs/bench-<name>[-quick]``).
        methods: only these rows (float32 is always kept: the deltas need it).
        device: run every phase on this device (``cpu``, ``cuda``, ``cuda:N``).
        console: where progress and the table are printed.
    """
    console = console or Console()
    bench = load_bench(config if config is not None else dataset)
    if methods:
        bench = bench.select(methods)
    if quick:
        bench = bench.as_quick()
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"seeds must be a positive int, got {seeds!r}")
        bench = replace(bench, seeds=seeds)
    if device is not None:
        bench = bench.on_device(device)
    out = Path(out) if out is not None else Path("runs") / default_folder(bench)
    out.mkdir(parents=True, exist_ok=True)
    check_resumable(out / "bench.yaml", bench)
    (out / "bench.yaml").write_text(yaml.safe_dump(bench.to_dict(), sort_keys=False))
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    timing: dict[str, Any] = {}
    pretrain_s = 0.0
    for seed in range(bench.seeds):
        console.rule(f"[bold]bench {bench.name}: seed {seed + 1} of {bench.seeds}")
        seed_runs, seed_timing, seconds = run_seed(bench, seed, out / f"seed{seed}", out, console)
        runs += seed_runs
        timing = timing or seed_timing
        pretrain_s += seconds
    rows = aggregate(bench, runs, timing["rows"])
    compute_s = pretrain_s + timing["measure_s"] + sum(r["wall_time_s"] for r in runs)
    device = bench.train.resolve_device()
    results = {
        "bench": bench.name,
        "description": bench.description,
        "quick": bench.quick,
        "seeds": bench.seeds,
        "model": dict(bench.model),
        "data": dict(bench.data),
        "budget": {
            "pretrain_epochs": 0 if bench.pretrain is None else bench.pretrain.epochs,
            "train_epochs": bench.train.epochs,
        },
        "machine": machine_info(device),
        "compute_time_s": compute_s,
        "timing_load_average": timing.get("load_average"),
        "session_time_s": time.perf_counter() - start,
        "rows": rows,
        "goals": check_goals(bench, rows),
        "runs": runs,
        "notes": bench.notes,
    }
    write_tables(out, results)
    show_results(results, console)
    return results


def default_folder(bench: BenchConfig) -> str:
    return f"bench-{bench.name}" + ("-quick" if bench.quick else "")


SHARED_KEYS = (
    "model",
    "data",
    "pretrain",
    "train",
    "mode",
    "train_samples",
    "eval_samples",
    "calibration_batches",
)


def check_resumable(previous: Path, bench: BenchConfig) -> None:
    """Refuse to reuse the finished sub-runs of a different bench configuration.

    Seeds and the set of rows may change between runs in one folder (more seeds, more rows);
    the shared settings and the settings of every row present in both may not.
    """
    if not previous.is_file():
        return
    old = load_yaml(previous.read_text()) or {}
    new = load_yaml(yaml.safe_dump(bench.to_dict()))
    changed = [k for k in SHARED_KEYS if old.get(k) != new.get(k)]
    old_methods, new_methods = old.get("methods", {}), new["methods"]
    changed += [
        f"methods.{m}" for m in new_methods if m in old_methods and old_methods[m] != new_methods[m]
    ]
    if changed:
        raise BenchConfigError(
            f"{previous.parent} holds a bench run with other settings ({', '.join(changed)}); "
            "its finished rows would be reused: pass another out folder or delete it"
        )


# -- one seed --------------------------------------------------------------------------------
def run_seed(
    bench: BenchConfig, seed: int, seed_dir: Path, out: Path, console: Console
) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    """Pretrain, then every row; seed 0 also measures the step-time overheads.

    Returns the rows' results, the timing (seed 0, else empty) and the pre-training seconds.
    """
    data = bench_data(bench, seed)
    pretrained, pretrain_s = pretrain(bench, seed, data, seed_dir / "pretrain", console)
    runs = []
    for method in bench.methods:
        run_dir = seed_dir / method.name
        done = run_dir / RESULTS
        if done.exists():
            runs.append(json.loads(done.read_text()))
            continue
        console.rule(f"{bench.name} seed {seed}: {method.name}")
        if method.kind == "ptq":
            runs.append(run_ptq(bench, method, seed, data, seed_dir, console))
        else:
            runs.append(run_training(bench, method, seed, data, pretrained, run_dir, console))
    timing: dict[str, Any] = {}
    if seed == 0:
        timing = overheads(bench, data, pretrained, out / "timing.json", console)
    return runs, timing, pretrain_s


def bench_data(bench: BenchConfig, seed: int) -> DatasetSplits:
    """The seed's splits; in quick mode seeded subsets of ``train_samples`` / ``eval_samples``."""
    options = {k: v for k, v in bench.data.items() if k != "name"}
    splits = load_dataset(bench.data["name"], seed=seed, **options)
    generator = torch.Generator().manual_seed(seed)

    def cut(ds: Dataset, n: int | None) -> Dataset:
        if n is None or n >= len(ds):  # type: ignore[arg-type]
            return ds
        return Subset(ds, torch.randperm(len(ds), generator=generator)[:n].tolist())  # type: ignore[arg-type]

    return replace(
        splits,
        train=cut(splits.train, bench.train_samples),
        val=cut(splits.val, bench.eval_samples),
        test=cut(splits.test, bench.eval_samples),
    )


def _experiment(
    bench: BenchConfig, name: str, train: TrainConfig, quant: Any, seed: int, description: str
) -> Experiment:
    return Experiment(
        name=f"{bench.name}-{name}-seed{seed}",
        description=description,
        model=dict(bench.model),
        data=dict(bench.data),
        train=train,
        pretrain=None if quant is None else bench.pretrain_config(seed),
        quant=quant,
    )


def pretrain(
    bench: BenchConfig, seed: int, data: DatasetSplits, run_dir: Path, console: Console
) -> tuple[nn.Module, float]:
    """The seed's float32 model, trained with ``pretrain`` by the experiment runner (or
    reloaded if already trained), and the seconds its training took; without ``pretrain`` the
    seed's freshly initialised model (every row trains from scratch) and 0."""
    options = {k: v for k, v in bench.model.items() if k != "name"}
    init = create_model(bench.model["name"], data.num_classes, data.in_shape, seed=seed, **options)
    cfg = bench.pretrain_config(seed)
    if cfg is None:
        return init, 0.0
    if not (run_dir / RESULTS).exists():
        exp = _experiment(bench, "pretrain", cfg, None, seed, "float32 pre-training")
        console.rule(f"{bench.name} seed {seed}: float32 pre-training ({cfg.epochs} epochs)")
        run_experiment(exp, run_dir, data=data, initial_model=init, seed=seed, console=console)
    _, model, _ = load_run(run_dir)
    return model, json.loads((run_dir / RESULTS).read_text())["fp"]["wall_time_s"]


def run_training(
    bench: BenchConfig,
    method: BenchMethod,
    seed: int,
    data: DatasetSplits,
    pretrained: nn.Module,
    run_dir: Path,
    console: Console,
) -> dict[str, Any]:
    """One trained row, run by the experiment runner from the seed's float32 model: float32
    keeps training in float, a QAT row quantises and fine-tunes."""
    cfg = bench.train_config(method, seed)
    start = "fine-tuned from the seed's float32 model" if bench.pretrain else "trained from scratch"
    description = f"bench row {method.name}: {start}"
    exp = _experiment(bench, method.name, cfg, method.recipe, seed, description)
    return run_experiment(
        exp,
        run_dir,
        data=data,
        initial_model=pretrained,
        seed=seed,
        method=method.name,
        export=True,
        console=console,
    )


def calibration_batches(
    data: DatasetSplits, cfg: TrainConfig, count: int, seed: int
) -> list[Tensor]:
    """``count`` training batches (inputs only) in a seeded random order."""
    loader = DataLoader(
        data.train,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    batches = []
    for x, _ in loader:
        batches.append(x)
        if len(batches) == count:
            break
    return batches


def run_ptq(
    bench: BenchConfig,
    method: BenchMethod,
    seed: int,
    data: DatasetSplits,
    seed_dir: Path,
    console: Console,
) -> dict[str, Any]:
    """Quantise the float32 row's final model with a PTQ baseline (:func:`lowbit.calibrate`
    on a few training batches, no training); saved as a run folder like every other row."""
    started = time.perf_counter()
    assert method.ptq is not None
    cfg = bench.train_config(bench.method(FLOAT32), seed)
    _, model, _ = load_run(seed_dir / FLOAT32)
    model.to(cfg.resolve_device())
    batches = calibration_batches(data, cfg, bench.calibration_batches, seed)
    apply_ptq(method.ptq, model, batches, seed=seed)
    run_dir = seed_dir / method.name
    description = (
        f"post-training {method.ptq} quantisation of the float32 row, "
        f"{len(batches)} calibration batches, no training"
    )
    exp = _experiment(bench, method.name, cfg, ptq_recipe(method.ptq), seed, description)
    write_run_files(run_dir, exp, data)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    meta = {"ptq": method.ptq, "calibration_batches": len(batches), "epoch": 0}
    save_checkpoint(run_dir / "qat" / "checkpoints" / "best", tensors, meta)
    console.print(f"{method.name}: calibrated on {len(batches)} batches")
    results = {**results_head(exp, "ptq", seed, method.name), "epochs": 0}
    return finish_run(exp, run_dir, model, data, results, started, export=True)


def overheads(
    bench: BenchConfig, data: DatasetSplits, pretrained: nn.Module, file: Path, console: Console
) -> dict[str, Any]:
    """``{"rows": {name: {"step_ms", "overhead"}}, "measure_s": seconds, "load_average": 1-min
    load average after measuring}``, from ``file`` if it has every trained row, else measured
    anew (and written there). The load average tells how busy the machine was."""
    if file.exists():
        timing = json.loads(file.read_text())
        if {m.name for m in bench.methods if m.kind != "ptq"} <= set(timing.get("rows", {})):
            return timing
    console.print("measuring QAT step-time overheads")
    started = time.perf_counter()
    rows = measure_overheads(bench, data, pretrained)
    timing = {
        "rows": rows,
        "measure_s": time.perf_counter() - started,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    file.write_text(json.dumps(timing, indent=2) + "\n")
    return timing


def measure_overheads(
    bench: BenchConfig, data: DatasetSplits, pretrained: nn.Module
) -> dict[str, dict[str, float]]:
    """Step-time overhead of every trained row over float32, on one batch of training data."""
    cfg = bench.train_config(bench.method(FLOAT32), 0)
    device = cfg.resolve_device()
    loader = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=False)
    x, y = next(iter(loader))
    builders = {
        m.name: (lambda model, r=m.recipe: quantize(model, r))
        for m in bench.methods
        if m.kind == "qat"
    }
    return step_time_overheads(
        pretrained, builders, x.to(device), y.to(device), cfg, bench.timing_steps
    )
