"""The C++ kernels of the fused fake-quant operators, compiled on first use and cached.

:func:`native_kernels` builds ``csrc/fakequant.cpp`` with ``torch.utils.cpp_extension.load`` the
first time a fused operator runs on CPU (about a minute; the build is cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, in a folder per torch and
Python version, and reused by later processes while the source and torch are unchanged). A build
lock left by a process killed while building (torch's lock has no timeout, so every later
process would wait for it forever) is removed once it is older than :data:`STALE_LOCK_S`.

A build at ``pip install`` time is avoided on purpose:
the package installs with build isolation against whatever torch pip resolves, and a torch C++
extension must be compiled against the torch it runs with.

Where the build cannot run (no C++ compiler) it warns once and returns None, and the operators
use their torch formulas (:mod:`lowbit.quant.ops_reference`), which give the same values. The
environment variable ``LOWBIT_FAKEQUANT_NATIVE=0`` forces that path.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

ENV_SWITCH = "LOWBIT_FAKEQUANT_NATIVE"
SOURCE = Path(__file__).with_name("csrc") / "fakequant.cpp"
# No floating-point contraction (a*b+c stays two roundings, as in torch), so results match the
# torch formulas bit for bit. -fno-trapping-math lets round/floor compile to vector instructions;
# it does not change any value.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
AVX2_CFLAGS = ["-mavx2", "-mfma"]
STALE_LOCK_S = 900.0
"""A build lock older than this (seconds) was left by a killed build (a build takes ~1 minute)."""


def native_enabled() -> bool:
    """False when ``LOWBIT_FAKEQUANT_NATIVE`` is ``0`` (the torch formulas are used)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def native_kernels() -> ModuleType | None:
    """The compiled kernel module, or None (disabled, or the build failed)."""
    return _build() if native_enabled() else None


def build_flags() -> tuple[str, list[str]]:
    """Extension name and compiler flags for this CPU: AVX2 code where torch reports AVX2 or
    better, portable x86-64/other code elsewhere (the values are the same either way)."""
    import torch

    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "lowbit_fakequant_avx2", CFLAGS + AVX2_CFLAGS
    return "lowbit_fakequant", CFLAGS


def build_directory(name: str) -> Path:
    """The folder the kernels ``name`` are built in: under ``TORCH_EXTENSIONS_DIR`` (default
    ``~/.cache/torch_extensions``), one folder per torch and Python version."""
    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    tag = f"lowbit-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return Path(root) / tag / name


def clear_stale_lock(directory: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove ``directory/lock`` when it is older than ``max_age_s`` seconds (left by a build
    that was killed); True when it was removed."""
    lock = Path(directory) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    lock.unlink(missing_ok=True)
    return True


@cache
def _build() -> ModuleType | None:
    from torch.utils import cpp_extension  # heavy import, only when a kernel is first needed

    name, flags = build_flags()
    directory = build_directory(name)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if clear_stale_lock(directory):
            warnings.warn(
                f"lowbit: removed a stale build lock in {directory} (a killed build left it)",
                RuntimeWarning,
                stacklevel=3,
            )
        return cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=flags,
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as err:  # no compiler, no headers, a failed build: use the torch formulas
        warnings.warn(
            f"lowbit: fused fake-quant C++ kernels unavailable ({type(err).__name__}: {err}); "
            "using the torch formulas (same values, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
