"""The fused engine's instruction-set paths, chosen when a model loads.

``scalar`` (portable C), ``avx2`` (``vpmaddwd`` on int16 pairs) and ``avx512vnni``
(``vpdpbusd``); the default is the best one the CPU runs. ``LOWBIT_ISA=scalar|avx2|avx512vnni``
forces a path (an error names the variable when this CPU cannot run it), and so does the
``isa`` argument of :class:`~lowbit.runtime.fused.FusedEngine`.
"""

from __future__ import annotations

import os

from .. import kernels

__all__ = ["ISAS", "available_isas", "default_isa", "isa_code"]

ISAS = ("scalar", "avx2", "avx512vnni")
"""Every path, slowest first; the extension numbers them 0, 1, 2."""


def available_isas() -> tuple[str, ...]:
    """The paths this CPU runs (empty when the compiled extension is missing)."""
    ext = kernels.extension()
    return () if ext is None else ISAS[: ext.engine_cpu_isa() + 1]


def isa_code(name: str) -> int:
    """The extension's number for path ``name``; ValueError when this CPU cannot run it."""
    if name not in ISAS:
        raise ValueError(f"unknown ISA path {name!r}; expected one of {ISAS}")
    if name not in available_isas():
        have = ", ".join(available_isas()) or "none (the compiled extension is missing)"
        raise ValueError(f"ISA path {name!r} is not available on this CPU (available: {have})")
    return ISAS.index(name)


def default_isa() -> str:
    """``LOWBIT_ISA`` when set, else the fastest path this CPU runs."""
    forced = os.environ.get("LOWBIT_ISA", "")
    if forced:
        try:
            isa_code(forced)
        except ValueError as exc:
            raise ValueError(f"LOWBIT_ISA={forced!r}: {exc}") from None
        return forced
    have = available_isas()
    if not have:
        raise ValueError("the fused engine needs the compiled extension lowbit.runtime._kernels")
    return have[-1]
