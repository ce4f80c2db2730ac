"""Benchmarks: ``lowbit bench accuracy`` (every method, same model and budget, n seeds) and the
post-training quantisation baselines it compares against.

    from lowbit.bench import run_accuracy_bench
    results = run_accuracy_bench("mnist5k", quick=True, out="runs/bench-quick")
"""

from .accuracy import run_accuracy_bench
from .config import BenchConfig, BenchConfigError, BenchMethod, load_bench
from .ptq import apply_ptq, ptq_int8, ptq_recipe, ptq_uniform

__all__ = [
    "BenchConfig",
    "BenchConfigError",
    "BenchMethod",
    "apply_ptq",
    "load_bench",
    "ptq_int8",
    "ptq_recipe",
    "ptq_uniform",
    "run_accuracy_bench",
]
