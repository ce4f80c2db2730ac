"""Whole exported models on the numpy runtime against float32 PyTorch (``lowbit bench models``).

    python benchmarks/models.py            # 3 models, every method, batch 1 and 64, 1 and 2 threads
    python benchmarks/models.py --smoke    # tiny: one model, batch 1, one round (CI)
    python benchmarks/models.py --help     # every option

The code is :mod:`lowbit.bench.models`.
"""

from lowbit.bench.models import main

if __name__ == "__main__":
    main()
