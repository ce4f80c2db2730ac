"""The machine a bench ran on, for the results table and ``docs/RESULTS.md``."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from typing import Any

import torch

import lowbit


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name", else /proc/cpuinfo, else platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.strip().startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU model, cores, torch threads, accelerator, library versions and the date (UTC)."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "lowbit": lowbit.__version__,
        "platform": platform.platform(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def describe(info: dict[str, Any]) -> str:
    """One line: ``Intel Xeon ..., 2 cores (2 torch threads), torch 2.x, CPU only``."""
    where = f"GPU {info['gpu']}" if info.get("gpu") else "CPU only"
    threads = info["torch_threads"]
    return (
        f"{info['cpu']}, {info['cores']} cores ({threads} torch thread"
        f"{'' if threads == 1 else 's'}), "
        f"torch {info['torch']}, Python {info['python']}, {where}; {info['date']}"
    )


def speed_meta() -> dict[str, Any]:
    """What a speed benchmark's figures depend on: CPU, kernel backend, torch and its ISA."""
    from ..runtime import kernels
    from ..runtime.fused import default_isa

    try:
        isa = default_isa()
    except ValueError as exc:
        isa = f"unavailable ({exc})"
    return {
        "cpu": cpu_model(),
        "kernels": kernels.backend(),
        "engine_isa": isa,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def speed_header(meta: dict[str, Any], rounds: int) -> str:
    """The line a speed benchmark prints above its table."""
    return (
        f"{meta['cpu']} | kernels: {meta['kernels']} | fused engine ISA: {meta['engine_isa']} | "
        f"torch {meta['torch']} "
        f"({meta['torch_cpu_capability']}) | median of {rounds} interleaved rounds"
    )
