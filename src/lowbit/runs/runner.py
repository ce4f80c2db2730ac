"""The one experiment runner: float pre-training, quantisation, fine-tuning, into a run folder.

``lowbit train`` runs an experiment with it, and ``lowbit bench accuracy`` runs each of its
trained rows with it (a row starts from its seed's shared float32 model, ``start_from``).
Before anything trains, the recipe is checked against the model (:func:`lowbit.check`): an
override that matches no layer stops the run, and every layer that would stay float or fail to
export is printed. The folder's files are described in :mod:`lowbit.runs.folder` and
:mod:`lowbit.runs.results`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from ..convert import quantize
from ..data import DatasetSplits
from ..models import model_task
from ..preflight import CheckReport, check
from ..term import print_table
from ..train.checkpoint import CHECKPOINT_NAMES, meta_path
from ..train.config import TrainConfig
from ..train.distributed import is_main_process
from ..train.experiment import Experiment, build_model, load_data
from ..train.health import QuantHealthCallback
from ..train.lm import add_lm_metrics, task_loss
from ..train.trainer import Trainer
from .folder import final_checkpoint, load_weights, preprocess_of, write_run_files
from .results import HEALTH_BATCH, elapsed, measure, results_table, write_results


def check_experiment(
    exp: Experiment, model: nn.Module, in_shape: tuple[int, ...]
) -> CheckReport | None:
    """:func:`lowbit.check` of the experiment's recipe on its float model (None: no recipe).

    Language models get no export verdict: the ``.lowbit``/ONNX graph builder takes float
    inputs, and language models export to GGUF (``lowbit export RUN --format gguf``)."""
    if exp.quant is None:
        return None
    text = model_task(exp.model["name"]) == "text"
    return check(model, exp.quant, example_input=None if text else in_shape)


def _phases(exp: Experiment, pretrained: bool) -> list[tuple[str, TrainConfig]]:
    phases: list[tuple[str, TrainConfig]] = []
    if exp.pretrain is not None and not pretrained:
        phases.append(("fp", exp.pretrain))
    phases.append(("fp", exp.train) if exp.quant is None else ("qat", exp.train))
    return phases


def _has_checkpoint(phase_dir: Path) -> bool:
    return any(meta_path(phase_dir / "checkpoints" / n).exists() for n in CHECKPOINT_NAMES)


def run_experiment(
    exp: Experiment,
    run_dir: Path,
    *,
    resume: bool = False,
    console: Console | None = None,
    data: DatasetSplits | None = None,
    initial_model: nn.Module | None = None,
    seed: int | None = None,
    method: str | None = None,
    export: bool = False,
) -> dict[str, Any]:
    """Run every phase of ``exp`` into ``run_dir``; returns the results (also results.json).

    With ``resume``, finished phases are skipped (their weights reloaded) and an interrupted
    phase continues from its newest consistent checkpoint. ``data`` replaces the experiment's
    own splits (the bench's seeded subsets); ``initial_model`` is the float model to start
    from (copied) instead of building it, in place of the ``pretrain`` phase, which then ran
    elsewhere; ``method`` labels the run in ``results.json`` (default: the recipe's name);
    ``export`` also writes ``model.lowbit`` and records its size.
    """
    console = console or Console()
    run_dir = Path(run_dir)
    main = is_main_process()
    started = time.perf_counter()
    data = data if data is not None else load_data(exp, exp.train.seed)
    torch.manual_seed(exp.train.seed)
    if initial_model is not None:
        model = copy.deepcopy(initial_model)
    else:
        model = build_model(exp, data.num_classes, data.in_shape)
    report = check_experiment(exp, model, data.in_shape)
    for line in report.lines() if report is not None else []:
        console.print(f"[yellow]check:[/] {line}", highlight=False, soft_wrap=True)
    if main:
        write_run_files(run_dir, exp, data)
    results = results_head(exp, "float" if exp.quant is None else "qat", seed, method)
    phases = _phases(exp, initial_model is not None)
    loss_fn = task_loss(model_task(exp.model["name"]))
    for phase, config in phases:
        if phase == "qat":
            quantize(model, exp.quant)
        results[phase] = _run_phase(
            model,
            data,
            config,
            run_dir / phase,
            resume=resume,
            console=console,
            name=exp.name,
            quantised=phase == "qat",
            loss_fn=loss_fn,
        )
    last = results[phases[-1][0]]
    results.update(
        epochs=last["epochs"],
        mean_step_time_ms=last.get("mean_step_time_ms"),
        train_time_s=sum(results[phase]["wall_time_s"] for phase, _ in phases),
    )
    if loss_fn is not None:  # language models: bits per byte and perplexity
        add_lm_metrics(results)
    return finish_run(exp, run_dir, model, data, results, started, export=export, console=console)


def results_head(
    exp: Experiment, kind: str, seed: int | None = None, method: str | None = None
) -> dict[str, Any]:
    """The identifying keys of a run's results (see :mod:`lowbit.runs.results`)."""
    return {
        "name": exp.name,
        "model": exp.model["name"],
        "data": exp.data["name"],
        "method": method if method is not None else None if exp.quant is None else exp.quant.name,
        "kind": kind,
        "seed": exp.train.seed if seed is None else seed,
    }


def finish_run(
    exp: Experiment,
    run_dir: Path,
    model: nn.Module,
    data: DatasetSplits,
    results: dict[str, Any],
    started: float,
    *,
    export: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Measure the final ``model`` (accuracy, bits, size, sparsity, health), add it to
    ``results`` and write ``results.json`` (main process); ``started``: a perf_counter reading."""
    main = is_main_process()
    export_to = run_dir / "model.lowbit" if export and main else None
    device = exp.train.resolve_device()
    results.update(
        measure(
            model,
            data,
            device,
            export_to=export_to,
            preprocess=preprocess_of(data.test),
            loss_fn=task_loss(model_task(exp.model["name"])),
        )
    )
    results["wall_time_s"] = elapsed(started)
    if main:
        results = write_results(run_dir, results)
        if console is not None:
            table = results_table([(run_dir.name, results)], title=f"{exp.name}: results")
            print_table(console, table)
    return results


def _run_phase(
    model: nn.Module,
    data: DatasetSplits,
    config: TrainConfig,
    phase_dir: Path,
    *,
    resume: bool,
    console: Console,
    name: str,
    quantised: bool,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """Train one phase (or reload it when a resumed run finished it); its summary with "test"."""
    console.rule(f"[bold]{name}: {phase_dir.name} phase ({config.epochs} epochs)")
    # The quantised phase warns about dead layers (all-zero codes, collapsed activations).
    callbacks = (
        [QuantHealthCallback(data.val, batch_size=HEALTH_BATCH, console=console)]
        if quantised
        else []
    )
    trainer = Trainer(
        model,
        data.train,
        data.val,
        config,
        phase_dir,
        test_set=data.test,
        loss_fn=loss_fn,
        console=console,
        callbacks=callbacks,
    )
    done = phase_dir / "metrics.json"
    finished = json.loads(done.read_text()) if resume and done.exists() else None
    if finished is not None and finished["epochs"] >= config.epochs:
        console.print(f"{phase_dir.name}: finished earlier, reloading its weights")
        metrics = finished
    else:  # new, interrupted, or given more epochs on --resume: train on
        metrics = trainer.fit(resume=resume and _has_checkpoint(phase_dir))
    load_weights(model, final_checkpoint(phase_dir))
    summary = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    summary["test"] = trainer.evaluate(data.test)
    return summary
