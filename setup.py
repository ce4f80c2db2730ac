"""Build of the optional C extension ``lowbit.runtime._kernels`` (everything else: pyproject.toml).

The kernels are C11 (GNU) with OpenMP; AVX2 code paths are compiled per function
(``__attribute__((target("avx2,fma,popcnt")))``) and chosen at run time, so the module itself is
built for the baseline ISA. A build failure is not fatal: ``lowbit.runtime.kernels`` falls back to
numpy. Set ``LOWBIT_NO_OPENMP=1`` to build without OpenMP (single-threaded kernels).
"""

import os
import sys

from setuptools import Extension, setup

CSRC = "src/lowbit/runtime/csrc"
SOURCES = ("module", "driver", "bitgemm", "int8gemm", "engine", "qgemm")
openmp = sys.platform != "win32" and os.environ.get("LOWBIT_NO_OPENMP", "") in ("", "0")

setup(
    ext_modules=[
        Extension(
            "lowbit.runtime._kernels",
            sources=[f"{CSRC}/{name}.c" for name in SOURCES],
            depends=[f"{CSRC}/{h}.h" for h in ("lowbit_kernels", "transpose", "engine")],
            extra_compile_args=[
                "-O3",
                "-std=gnu11",
                "-ffp-contract=off",
                "-Wall",
                "-Werror=implicit-function-declaration",
            ]
            + (["-fopenmp"] if openmp else []),
            extra_link_args=["-fopenmp"] if openmp else [],
            optional=True,
        )
    ]
)
