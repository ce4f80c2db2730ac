"""Run folders: one owner for what ``lowbit train`` and ``lowbit bench accuracy`` write and
what ``eval``, ``summary``, ``compare``, ``report`` and ``export`` read.

    from lowbit.runs import run_experiment, load_run, read_results, export_run
    results = run_experiment(Experiment.load("mnist5k-ttq"), Path("runs/ttq"))
    exp, model, info = load_run("runs/ttq")          # the final model, trained weights
"""

from .export import export_run
from .folder import (
    RunFolderError,
    final_checkpoint,
    is_run_folder,
    load_run,
    load_weights,
    read_run,
    run_preprocess,
    write_run_files,
)
from .results import read_results, results_table, write_results
from .runner import run_experiment

__all__ = [
    "RunFolderError",
    "export_run",
    "final_checkpoint",
    "is_run_folder",
    "load_run",
    "load_weights",
    "read_results",
    "read_run",
    "results_table",
    "run_experiment",
    "run_preprocess",
    "write_results",
    "write_run_files",
]
