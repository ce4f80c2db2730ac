"""``lowbit report RUN_DIR``: a Markdown report with PNG figures for a run or a bench folder.

    from lowbit.report import write_report
    write_report("runs/bench-mnist5k", "docs/RESULTS.md")   # figures in docs/img/

A bench folder (``lowbit bench accuracy``) gets the table, the goals, accuracy vs bits and vs
size with their Pareto fronts, per-layer sparsity of every row and one run in detail; a run
folder (``lowbit train``) gets TTQ's Wp/Wn over training, weight histograms before and after
quantisation and per-layer sparsity.
"""

from __future__ import annotations

from pathlib import Path

from ..runs.folder import is_run_folder
from .bench_report import bench_report, is_bench_folder
from .figures import FigureFiles
from .runs import run_report

REPORT_NAME = "report.md"

__all__ = ["write_report"]


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the Markdown report of ``run_dir`` to ``output`` (default ``RUN_DIR/report.md``).

    PNG figures go to ``img/`` beside ``output`` and are linked relatively. Returns the path
    of the Markdown file. A folder that is neither a bench nor a run folder is a ValueError.
    """
    run_dir = Path(run_dir)
    output = Path(output) if output is not None else run_dir / REPORT_NAME
    figures = FigureFiles(output)
    if is_bench_folder(run_dir):
        text = bench_report(run_dir, output, figures)
    elif is_run_folder(run_dir):
        text = run_report(run_dir, figures)
    else:
        raise ValueError(
            f"run_dir {str(run_dir)!r} is neither a lowbit run folder (experiment.yaml, run.json) "
            "nor a bench folder (results.json from lowbit bench accuracy)"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return output
