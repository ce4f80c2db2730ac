"""Run folders: the files every run writes, and rebuilding a run's model from them.

A run folder (``lowbit train``, or one row of ``lowbit bench accuracy``) holds:

* ``experiment.yaml`` -- the experiment that ran (:class:`~lowbit.train.experiment.Experiment`);
* ``run.json`` -- what rebuilding and deploying the model needs without the data set:
  ``num_classes``, ``in_shape``, ``dataset`` and ``preprocess`` (the input normalisation
  ``x = (pixels * scale - mean) / std``, or null when the data set has none);
* ``fp/``, ``qat/`` -- one Trainer folder per phase (metrics, logs, checkpoints);
* ``results.json`` -- written last, in the one schema of :mod:`lowbit.runs.results`.

Folders written before ``run.json`` carried ``preprocess`` (``lowbit_run: 1``) still load; for
them :func:`run_preprocess` reads the constants from the data set once.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import yaml
from torch import nn
from torch.utils.data import Dataset, Subset

from ..convert import quantize
from ..data import DatasetSplits
from ..recipe import read_mapping
from ..train.checkpoint import load_checkpoint, meta_path, model_state
from ..train.experiment import Experiment, ExperimentError, build_model, load_data

RUN_FILES = ("experiment.yaml", "run.json")
RUN_VERSION = 2
"""``run.json``'s ``lowbit_run``: 2 adds ``preprocess``; version 1 folders are still read."""


class RunFolderError(ExperimentError):
    """A folder that is not a usable run folder, or one that cannot be written; one line."""


def is_run_folder(path: Path) -> bool:
    """True when ``path`` has the files :func:`load_run` needs."""
    return all((Path(path) / name).is_file() for name in RUN_FILES)


def preprocess_of(dataset: Dataset) -> dict[str, Any] | None:
    """The input normalisation of ``dataset`` (a Subset is looked through), or None."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not all(hasattr(dataset, k) for k in ("scale", "mean", "std")):
        return None
    return {
        "scale": float(dataset.scale),  # type: ignore[attr-defined]
        "mean": [float(v) for v in dataset.mean.reshape(-1)],  # type: ignore[attr-defined]
        "std": [float(v) for v in dataset.std.reshape(-1)],  # type: ignore[attr-defined]
    }


def writable_folder(run_dir: Path) -> Path:
    """Create ``run_dir`` and check a file can be written there; one-line RunFolderError if not."""
    run_dir = Path(run_dir)
    probe = run_dir / ".lowbit-write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"run folder {run_dir} is not writable: {_why(err)}") from None
    return run_dir


def _why(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    return err.strerror or str(err)


def write_run_files(run_dir: Path, exp: Experiment, data: DatasetSplits) -> dict[str, Any]:
    """Write ``experiment.yaml`` and ``run.json``; returns the run.json content."""
    run_dir = writable_folder(run_dir)
    info = {
        "lowbit_run": RUN_VERSION,
        "num_classes": data.num_classes,
        "in_shape": list(data.in_shape),
        "dataset": data.name,
        "preprocess": preprocess_of(data.test),
    }
    (run_dir / "experiment.yaml").write_text(yaml.safe_dump(exp.to_dict(), sort_keys=False))
    (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_run(run_dir: Path) -> tuple[Experiment, dict[str, Any]]:
    """The experiment and ``run.json`` of a run folder (RunFolderError naming what is wrong)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is not a folder")
    for needed in RUN_FILES:
        if not (run_dir / needed).is_file():
            raise RunFolderError(f"{run_dir} is not a lowbit run folder: {needed} is missing")
    exp = Experiment.from_dict(read_mapping(run_dir / "experiment.yaml"))
    try:
        info = json.loads((run_dir / "run.json").read_text())
        shape = tuple(int(v) for v in info["in_shape"])
        info["num_classes"] = int(info["num_classes"])
    except (ValueError, KeyError, TypeError) as err:
        raise RunFolderError(f"{run_dir / 'run.json'} is not a lowbit run.json: {err}") from None
    info["in_shape"] = list(shape)
    return exp, info


def run_preprocess(run_dir: Path) -> dict[str, Any] | None:
    """The run's input normalisation: from ``run.json`` (version 2), else from its data set."""
    exp, info = read_run(run_dir)
    if "preprocess" in info:
        return info["preprocess"]
    return preprocess_of(load_data(exp, exp.train.seed).test)


def final_checkpoint(phase_dir: Path) -> Path:
    """The checkpoint a finished phase hands on: the best on validation, else the last."""
    best = Path(phase_dir) / "checkpoints" / "best"
    return best if meta_path(best).exists() else Path(phase_dir) / "checkpoints" / "last"


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load a checkpoint's model state into ``model``."""
    tensors, _ = load_checkpoint(checkpoint)
    model.load_state_dict(model_state(tensors))


def final_phase(exp: Experiment) -> str:
    """The phase folder holding the run's final model: ``qat`` when quantised, else ``fp``."""
    return "fp" if exp.quant is None else "qat"


def load_run(run_dir: Path) -> tuple[Experiment, nn.Module, dict[str, Any]]:
    """Rebuild a run's final model (quantised when the run was) with its trained weights.

    Returns ``(experiment, model in eval mode, run.json content)``.
    """
    run_dir = Path(run_dir)
    exp, info = read_run(run_dir)
    model = build_model(exp, info["num_classes"], tuple(info["in_shape"]))
    if exp.quant is not None:
        quantize(model, exp.quant)
    checkpoint = final_checkpoint(run_dir / final_phase(exp))
    if not meta_path(checkpoint).exists():
        raise RunFolderError(f"{run_dir}: no checkpoint in {checkpoint.parent} (did it train?)")
    load_weights(model, checkpoint)
    model.eval()
    return exp, model, info


def has_progress(run_dir: Path) -> bool:
    """True once a run has trained something: a phase folder with a checkpoint or results."""
    run_dir = Path(run_dir)
    if (run_dir / "results.json").exists():
        return True
    return any((run_dir / phase / "checkpoints").is_dir() for phase in ("fp", "qat"))
