"""Low-bit GEMM kernels against float32 ``torch.matmul`` (and onnxruntime int8) on real layers.

    lowbit bench kernels                              # all shapes, 1 and 2 threads
    python benchmarks/kernels.py --threads 1          # the same, one thread count
    python benchmarks/kernels.py --avx2-baseline      # also fp32 torch limited to AVX2
    python benchmarks/kernels.py --smoke              # tiny shapes, one repetition (CI)

Shapes are the GEMMs of real layers: ResNet-20 and VGG-small 3x3 convolutions as im2col GEMMs
(M = batch x output pixels, K = in-channels x 9, N = out-channels), MLP linears and a 4096 x 4096
linear, at batch 1 and 64. Every row times, with the same thread count (``torch.set_num_threads``,
the kernels' ``num_threads``, onnxruntime's ``intra_op_num_threads``):

    fp32      torch.matmul(a [M, K], w [K, N]) in float32
    binary    binary_gemm: packed {-1,+1} activations and weights, int32 out
    tern/bin  ternary_gemm_binary_act: {-1,0,+1} weight planes, packed {-1,+1} activations
    tern/int8 ternary_gemm_int8: int8 activations, ternary int8 weights
    int8      int8_gemm + Requant: uint8 activations, int8 weights, requantised to uint8
    ort int8  onnxruntime QLinearMatMul (uint8 x int8 -> uint8), same number of threads

Packing of the activations (pack_signs) is not timed: in a binary network the previous layer's
fused threshold output is already packed. Candidates are timed in interleaved rounds (each sample
runs one candidate for at least ``--min-time`` after a short warm-up) and the median sample is
reported, so slow drift of a shared machine affects all columns alike. ``x`` is fp32 time divided
by the kernel's time; ``int8 / ort`` is onnxruntime's time divided by int8's (above 1: faster than
onnxruntime); ``--avx2-baseline`` adds fp32 timed by a child process whose MKL / oneDNN / ATen are
held to AVX2, sampled in the same rounds. ``OMP_WAIT_POLICY`` defaults to ``PASSIVE``: torch and
the kernels each bring an OpenMP runtime, and threads of one spin-waiting after a call would slow
the other. OpenMP reads it when it loads, so without it in the environment the benchmark runs in
a child process that has it (:func:`run_module`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..fixedpoint import quantize_multiplier
from ..runtime import kernels
from .machine import speed_header, speed_meta

# name, M per image, K, N
LAYERS = [
    ("resnet20 conv 32x32 16->16", 32 * 32, 16 * 9, 16),
    ("resnet20 conv 16x16 32->32", 16 * 16, 32 * 9, 32),
    ("resnet20 conv 8x8 64->64", 8 * 8, 64 * 9, 64),
    ("vgg-small conv 32x32 128->128", 32 * 32, 128 * 9, 128),
    ("vgg-small conv 16x16 256->256", 16 * 16, 256 * 9, 256),
    ("vgg-small conv 8x8 512->512", 8 * 8, 512 * 9, 512),
    ("mlp linear 784->256", 1, 784, 256),
    ("mlp linear 256->256", 1, 256, 256),
    ("linear 4096->4096", 1, 4096, 4096),
]
SMOKE_LAYERS = [("smoke conv", 16, 27, 8), ("smoke linear", 1, 100, 10)]
KERNELS = ["binary", "tern/bin", "tern/int8", "int8", "ort int8"]


def sample(fn: Callable[[], object], min_time: float, warmup: float) -> float:
    """Seconds per call of fn: calls it untimed for ``warmup`` seconds (at least once when
    ``warmup > 0``), then timed, at least once and for at least ``min_time`` seconds."""
    if warmup > 0:
        end = time.perf_counter() + warmup
        fn()
        while time.perf_counter() < end:
            fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls


def run_module(module: str, argv: list[str], env: dict[str, str]) -> Any:
    """Run ``python -m module *argv --result FILE`` with ``env`` added to this environment (set
    before any OpenMP runtime loads) and return the JSON the child wrote to ``FILE``."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", module, *argv, "--result", result]
        subprocess.run(cmd, env={**os.environ, **env}, check=True)
        with open(result) as f:
            return json.load(f)


PASSIVE_WAIT = {"OMP_WAIT_POLICY": "PASSIVE"}
"""OpenMP threads sleep after a parallel region instead of spinning (see the module doc)."""


def time_interleaved(samplers: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median of ``rounds`` samples of every candidate, taken in interleaved rounds."""
    samples: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(rounds):
        for name, take in samplers.items():
            samples[name].append(take())
    return {name: statistics.median(values) for name, values in samples.items()}


class Avx2Torch:
    """A child process timing fp32 torch with MKL / oneDNN / ATen held to AVX2 (the ISA of the
    target machines); it answers one sample per request, so it joins the interleaved rounds.

    The child is ``python -m module --serve-fp32``, whose ``serve_fp32`` reads one JSON request
    a line and answers seconds per call (this module: a ``torch.matmul`` of ``m, k, n``).
    """

    def __init__(self, module: str = "lowbit.bench.kernels") -> None:
        env = dict(
            os.environ,
            MKL_ENABLE_INSTRUCTIONS="AVX2",
            ONEDNN_MAX_CPU_ISA="AVX2",
            ATEN_CPU_CAPABILITY="avx2",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--serve-fp32"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def sample(self, **request: Any) -> float:
        """Seconds per call of the child's candidate for ``request``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def serve_fp32() -> None:
    """The child side of :class:`Avx2Torch`: one JSON request a line, one time a line."""
    shape, a, w = None, None, None
    for line in sys.stdin:
        r = json.loads(line)
        if shape != (r["m"], r["k"], r["n"]):
            shape = (r["m"], r["k"], r["n"])
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(shape[:2], generator=gen)
            w = torch.randn(shape[1:], generator=gen)
        torch.set_num_threads(r["threads"])
        print(sample(partial(torch.matmul, a, w), r["min"], r["warm"]), flush=True)


def ort_qlinear_matmul(w_kn: np.ndarray, scales: tuple[float, float, float], threads: int):
    """An onnxruntime session computing QLinearMatMul(a uint8, w int8 [K, N]) -> uint8."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    a_scale, w_scale, y_scale = scales
    inits = [
        numpy_helper.from_array(np.array(a_scale, np.float32), "a_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "a_zp"),
        numpy_helper.from_array(w_kn, "w"),
        numpy_helper.from_array(np.array(w_scale, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(y_scale, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "y_zp"),
    ]
    node = helper.make_node(
        "QLinearMatMul",
        ["a", "a_scale", "a_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp"],
        ["y"],
    )
    graph = helper.make_graph(
        [node],
        "qlinear_matmul",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, w_kn.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [None, w_kn.shape[1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def candidates(m: int, k: int, n: int, threads: int, with_ort: bool, seed: int):
    """The callables of one shape: fp32 torch and every kernel, on random data."""
    rng = np.random.default_rng(seed)
    a32 = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32))
    w32 = torch.from_numpy(rng.standard_normal((k, n), dtype=np.float32))
    a_bits = kernels.pack_signs(a32.numpy())
    w_bits = kernels.pack_signs(np.ascontiguousarray(w32.numpy().T))
    t_codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    pos, neg = kernels.ternary_planes(t_codes)
    a_s8 = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    a_u8 = rng.integers(0, 256, size=(m, k)).astype(np.uint8)
    w_s8 = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    scales = (0.02, 0.005, 0.05 * np.sqrt(k))
    m0, shift = quantize_multiplier(scales[0] * scales[1] / scales[2])
    requant = kernels.Requant(rng.integers(-1000, 1000, n), m0, shift, 128)  # built once a layer
    fns = {
        "fp32": lambda: torch.matmul(a32, w32),
        "binary": lambda: kernels.binary_gemm(a_bits, w_bits, k, num_threads=threads),
        "tern/bin": lambda: kernels.ternary_gemm_binary_act(
            a_bits, pos, neg, k, check=False, num_threads=threads
        ),
        "tern/int8": lambda: kernels.ternary_gemm_int8(
            a_s8, t_codes, check=False, num_threads=threads
        ),
        "int8": lambda: kernels.int8_gemm(a_u8, 128, w_s8, requant, num_threads=threads),
    }
    if with_ort:
        session = ort_qlinear_matmul(np.ascontiguousarray(w_s8.T), scales, threads)
        fns["ort int8"] = lambda: session.run(None, {"a": a_u8})
    return fns


def shapes(smoke: bool, batches: list[int]) -> list[tuple[str, int, int, int, int]]:
    layers = SMOKE_LAYERS if smoke else LAYERS
    return [(name, b, per_image * b, k, n) for b in batches for name, per_image, k, n in layers]


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    avx2 = Avx2Torch() if args.avx2_baseline else None
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, batch, m, k, n in shapes(args.smoke, args.batches):
                fns = candidates(m, k, n, threads, args.ort, seed=m + k + n)
                samplers = {
                    key: partial(sample, fn, args.min_time, args.warmup) for key, fn in fns.items()
                }
                if avx2:
                    samplers["fp32 avx2"] = partial(
                        avx2.sample,
                        m=m,
                        k=k,
                        n=n,
                        threads=threads,
                        min=args.min_time,
                        warm=args.warmup,
                    )
                times = time_interleaved(samplers, args.rounds)
                rows.append(
                    {"layer": name, "batch": batch, "M": m, "K": k, "N": n, "threads": threads}
                    | {f"t_{key}": value for key, value in times.items()}
                )
    finally:
        if avx2:
            avx2.close()
    return rows


def ms_and_ratio(row: dict, key: str, base: float) -> str:
    t = row.get(f"t_{key}")
    return "-" if t is None else f"{t * 1e3:.3f} ({base / t:.1f}x)"


def render(rows: list[dict], console: Console) -> None:
    avx2 = any("t_fp32 avx2" in r for r in rows)
    for threads in sorted({r["threads"] for r in rows}):
        table = Table(title=f"{threads} thread(s): ms per GEMM (speed-up vs fp32 torch.matmul)")
        for col in ["layer", "batch", "M x K x N", "fp32 ms", *KERNELS, "int8 / ort"]:
            table.add_column(col, justify="left" if col == "layer" else "right")
        if avx2:
            table.add_column("fp32 AVX2 ms", justify="right")
            table.add_column("vs fp32 AVX2: bin / tern / t8 / int8", justify="right")
        for r in (r for r in rows if r["threads"] == threads):
            base = r["t_fp32"]
            cells = [r["layer"], str(r["batch"]), f"{r['M']} x {r['K']} x {r['N']}"]
            cells += [f"{base * 1e3:.3f}"] + [ms_and_ratio(r, key, base) for key in KERNELS]
            ort = r.get("t_ort int8")
            cells.append("-" if ort is None else f"{ort / r['t_int8']:.2f}")
            if avx2:
                b2 = r["t_fp32 avx2"]
                ratios = " / ".join(f"{b2 / r[f't_{k}']:.1f}" for k in KERNELS[:4])
                cells += [f"{b2 * 1e3:.3f}", ratios]
            table.add_row(*cells)
        console.print(table)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--min-time", type=float, default=0.05, help="seconds per sample")
    p.add_argument("--warmup", type=float, default=0.01, help="untimed seconds before a sample")
    p.add_argument("--no-ort", dest="ort", action="store_false", help="skip onnxruntime")
    p.add_argument("--avx2-baseline", action="store_true", help="also fp32 torch on AVX2 only")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repetition")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--serve-fp32", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_fp32:
        serve_fp32()
        return []
    if "OMP_WAIT_POLICY" not in os.environ:
        argv = sys.argv[1:] if argv is None else list(argv)
        return run_module("lowbit.bench.kernels", argv, PASSIVE_WAIT)["results"]
    if args.smoke:
        args.rounds, args.min_time, args.warmup = 1, 0.0, 0.0
    if any(t < 1 for t in args.threads):
        p.error("--threads must be positive")
    console = Console(width=220)
    meta = speed_meta()
    console.print(speed_header(meta, args.rounds))
    rows = measure(args)
    render(rows, console)
    for path in (args.json, args.result):
        if path:
            with open(path, "w") as f:
                json.dump({"meta": meta, "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
