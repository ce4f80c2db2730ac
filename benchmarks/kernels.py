"""Low-bit GEMM kernels against float32 torch.matmul on real layers (``lowbit bench kernels``).

    python benchmarks/kernels.py            # all shapes, 1 and 2 threads
    python benchmarks/kernels.py --smoke    # tiny shapes, one repetition (CI)
    python benchmarks/kernels.py --help     # every option

The code is :mod:`lowbit.bench.kernels`.
"""

from lowbit.bench.kernels import main

if __name__ == "__main__":
    main()
