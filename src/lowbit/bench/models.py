"""Whole exported models on the numpy runtime against the float32 PyTorch model, same threads.

    lowbit bench models                                   # all models, methods, batches, threads
    python benchmarks/models.py --models vgg_small --methods bnn --batches 64
    python benchmarks/models.py --smoke                   # tiny: one model, batch 1 (CI)

Every model (ResNet-20 and VGG-small on 3x32x32, LeNet-5 on 1x28x28; 10 classes) is quantised
with each method's packaged recipe (``bnn`` and ``xnor``: binary with 8-bit first/last layers;
``ttq``, ``twn``: ternary weights; ``lsq``: 4-bit; ``affine``: int8), run once in train mode on
random data so that lazily initialised activation ranges and steps are set, switched to eval and
exported with :func:`lowbit.export.export` (untrained weights: speed does not depend on them).
The timed call is ``lowbit.runtime.load(file, engine="auto")(x)`` (the integer-only engine where
the graph allows it, LSQ and affine; the float engine with the packed kernels otherwise) against
the unquantised model of the same architecture in eval mode under ``torch.inference_mode``.

Both sides run on the same batch and thread count: each thread count runs in a child process
with ``OMP_NUM_THREADS`` (and the BLAS thread variables) set and ``torch.set_num_threads``, and
``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (see :mod:`lowbit.bench.kernels`;
sleeping OpenMP threads wake up more slowly, which costs torch most at batch 1 with 2 threads:
``OMP_WAIT_POLICY=ACTIVE python benchmarks/models.py`` measures the other way). After one
untimed call of every candidate, candidates are sampled in interleaved rounds (each sample: at
least ``--min-time`` seconds, at least one call) and the median sample is reported, so a shared
machine's drift affects all columns alike. ``speedup`` is fp32 time over the runtime's time;
``--avx2-baseline`` adds the float32 model timed by a child process whose MKL / oneDNN / ATen
are held to AVX2 (the kernels' ISA), sampled in the same rounds (``speedup_avx2``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ..convert import quantize
from ..export import export
from ..export.onnx import export_onnx
from ..models import create_model
from ..recipe import Recipe
from ..runtime import load
from .kernels import PASSIVE_WAIT, Avx2Torch, run_module, sample, time_interleaved
from .machine import speed_header, speed_meta

MODELS = {"resnet20": (3, 32, 32), "vgg_small": (3, 32, 32), "lenet5": (1, 28, 28)}
METHODS = ["bnn", "xnor", "ttq", "twn", "twn_a8", "lsq", "affine"]
RECIPE_FILES = {"twn_a8": "mnist5k-twn-a8.yaml"}
"""Methods benchmarked with a shipped experiment recipe (its ``quant`` section)."""
NUM_CLASSES = 10
SMOKE_MODEL = "lenet5"
ROW_KEYS = (
    "model",
    "batch",
    "threads",
    "method",
    "engine",
    "fp32_ms",
    "lowbit_ms",
    "speedup",
    "fp32_avx2_ms",
    "speedup_avx2",
    "ort_ms",
    "speedup_ort",
    "peak_rss_mib",
)


def quantized_copy(model: torch.nn.Module, method: str, shape: tuple[int, ...]) -> torch.nn.Module:
    """``model`` quantised with ``method``'s recipe, after one train-mode forward on random data
    (initialises lazy activation scales), in eval mode."""
    recipe: Any = method
    if method in RECIPE_FILES:
        recipe = resources.files("lowbit.recipes") / "experiments" / RECIPE_FILES[method]
        recipe = Recipe.from_file(Path(str(recipe)))
    q = quantize(copy.deepcopy(model), recipe)
    q.train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        q(torch.randn(8, *shape, generator=gen))
    return q.eval()


def float_model(name: str) -> torch.nn.Module:
    """The unquantised model (seeded weights), eval mode."""
    return create_model(name, NUM_CLASSES, MODELS[name], seed=0).eval()


def export_all(
    models: list[str], methods: list[str], folder: Path, onnx: bool
) -> dict[str, dict[str, dict[str, str | None]]]:
    """Export every (model, method) into ``folder`` as ``.lowbit`` (and ``.onnx`` when asked
    and the exporter has a form for it): ``{model: {method: {"lowbit": path, "onnx": path}}}``."""
    files: dict[str, dict[str, dict[str, str | None]]] = {}
    for name in models:
        shape, base = MODELS[name], float_model(name)
        files[name] = {}
        for method in methods:
            q = quantized_copy(base, method, shape)
            path = folder / f"{name}-{method}.lowbit"
            export(q, path, example_input=shape)
            files[name][method] = {"lowbit": str(path), "onnx": None}
            if onnx:
                onnx_path = folder / f"{name}-{method}.onnx"
                try:
                    export_onnx(q, onnx_path, torch.zeros(1, *shape))
                except ValueError:
                    continue
                files[name][method]["onnx"] = str(onnx_path)
    return files


def ort_session(path: str, threads: int) -> Any:
    """An ONNX Runtime session of an exported file (all graph optimisations: QDQ pairs around
    Conv / MatMul become its int8 QLinear kernels), ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def peak_rss(path: str, batch: int) -> float:
    """Peak resident memory (MiB, ``VmHWM``: not inherited across ``exec`` as ``ru_maxrss`` is)
    of a fresh torch-free process that loads ``path`` and runs one forward pass of ``batch``
    samples (the runtime's footprint: interpreter, numpy, weights as held, activations)."""
    code = (
        "import sys, numpy as np, lowbit.runtime as rt\n"
        "m = rt.load(sys.argv[1], engine='auto')\n"
        "m(np.zeros([int(sys.argv[2]), *m.input_shape], np.float32))\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
        "print(int(hwm[0].split()[1]) / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, path, str(batch)], capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def _torch_forward(net: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        net(x)


def _input(name: str, batch: int) -> torch.Tensor:
    return torch.randn(batch, *MODELS[name], generator=torch.Generator().manual_seed(batch))


def measure(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The child side: time every model and batch of ``spec`` at this process's thread count."""
    threads, min_time = spec["threads"], spec["min_time"]
    torch.set_num_threads(threads)
    avx2 = Avx2Torch("lowbit.bench.models") if spec["avx2"] else None
    rows = []
    try:
        for name, files in spec["files"].items():
            net = float_model(name)
            runtimes = {m: load(f["lowbit"], engine="auto") for m, f in files.items()}
            sessions = {
                m: ort_session(f["onnx"], threads) for m, f in files.items() if f.get("onnx")
            }
            for batch in spec["batches"]:
                x = _input(name, batch)
                fns = {"fp32": partial(_torch_forward, net, x)}
                fns |= {m: partial(rt, x.numpy()) for m, rt in runtimes.items()}
                fns |= {
                    f"ort {m}": partial(sess.run, None, {"input": x.numpy()})
                    for m, sess in sessions.items()
                }
                for fn in fns.values():  # warm-up: caches, scratch buffers, lazy inits
                    fn()
                samplers = {k: partial(sample, fn, min_time, 0.0) for k, fn in fns.items()}
                if avx2 is not None:
                    request = {"model": name, "batch": batch, "threads": threads}
                    samplers["fp32 avx2"] = partial(avx2.sample, **request, min=min_time)
                times = time_interleaved(samplers, spec["rounds"])
                avx2_s = times.get("fp32 avx2")
                for method, rt in runtimes.items():
                    ort_s = times.get(f"ort {method}")
                    rows.append(
                        {
                            "model": name,
                            "batch": batch,
                            "threads": threads,
                            "method": method,
                            "engine": engine_name(rt),
                            "fp32_ms": 1e3 * times["fp32"],
                            "lowbit_ms": 1e3 * times[method],
                            "speedup": times["fp32"] / times[method],
                            "fp32_avx2_ms": None if avx2_s is None else 1e3 * avx2_s,
                            "speedup_avx2": None if avx2_s is None else avx2_s / times[method],
                            "ort_ms": None if ort_s is None else 1e3 * ort_s,
                            "speedup_ort": None if ort_s is None else times["fp32"] / ort_s,
                            "peak_rss_mib": files[method].get("rss", {}).get(str(batch)),
                        }
                    )
    finally:
        if avx2 is not None:
            avx2.close()
    return rows


def engine_name(model: Any) -> str:
    """``fused/<isa>`` for the fused integer engine, else the Model's engine name."""
    fused = getattr(model, "fused", None)
    return f"fused/{fused.isa}" if fused is not None else model.engine


def serve_fp32() -> None:
    """The child side of :class:`~lowbit.bench.kernels.Avx2Torch`: one JSON request a line
    (model, batch, threads, min), seconds per float32 forward a line."""
    key, fn = None, None
    for line in sys.stdin:
        r = json.loads(line)
        torch.set_num_threads(r["threads"])
        if key != (r["model"], r["batch"]):
            key = (r["model"], r["batch"])
            fn = partial(_torch_forward, float_model(r["model"]), _input(*key))
            fn()  # warm-up
        print(sample(fn, r["min"], 0.0), flush=True)


def render(rows: list[dict[str, Any]], console: Console) -> None:
    """One table per thread count, a row per model x batch x method: ms per batch, speed-up
    over float32 torch (and AVX2-only float32 when measured), ONNX Runtime on the ONNX export,
    the runtime's peak resident memory."""
    avx2 = any(r["fp32_avx2_ms"] is not None for r in rows)
    for threads in sorted({r["threads"] for r in rows}):
        table = Table(title=f"{threads} thread(s): ms per batch (x = speed-up over float32 torch)")
        heads = ["model", "batch", "method", "engine", "fp32 ms", "lowbit ms", "x"]
        heads += ["x AVX2 fp32"] if avx2 else []
        heads += ["ORT int8 ms", "ORT x", "lowbit / ORT", "peak RSS MiB"]
        for h in heads:
            table.add_column(h, justify="left" if h in ("model", "method", "engine") else "right")
        for r in sorted(
            (r for r in rows if r["threads"] == threads),
            key=lambda r: (list(MODELS).index(r["model"]), r["batch"], METHODS.index(r["method"])),
        ):
            ort = r["ort_ms"]
            cells = [r["model"], str(r["batch"]), r["method"], r["engine"]]
            cells += [f"{r['fp32_ms']:.2f}", f"{r['lowbit_ms']:.2f}", f"{r['speedup']:.2f}"]
            cells += [f"{r['speedup_avx2']:.2f}"] if avx2 else []
            cells += ["-", "-", "-"] if ort is None else [
                f"{ort:.2f}", f"{r['speedup_ort']:.2f}", f"{ort / r['lowbit_ms']:.2f}"
            ]  # fmt: skip
            rss = r.get("peak_rss_mib")
            cells.append("-" if rss is None else f"{rss:.0f}")
            table.add_row(*cells)
        console.print(table)


def thread_env(threads: int) -> dict[str, str]:
    """Environment of a child timing at ``threads`` threads (OpenMP, BLAS, MKL; OpenMP threads
    sleep when idle unless ``OMP_WAIT_POLICY`` is set)."""
    n = str(threads)
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    wait = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", PASSIVE_WAIT["OMP_WAIT_POLICY"])}
    return wait | dict.fromkeys(names, n)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--min-time", type=float, default=0.05, help="seconds per sample")
    p.add_argument("--avx2-baseline", action="store_true", help="also fp32 torch on AVX2 only")
    p.add_argument("--smoke", action="store_true", help="tiny: one model, batch 1, one round")
    p.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime on the ONNX export")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--serve-fp32", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_fp32:
        serve_fp32()
        return []
    if args.worker:
        with open(args.worker) as f:
            rows = measure(json.load(f))
        with open(args.result, "w") as f:
            json.dump(rows, f)
        return rows
    if args.smoke:
        args.models, args.batches, args.threads = [SMOKE_MODEL], [1], [1]
        args.rounds, args.min_time = 1, 0.0
    if any(t < 1 for t in args.threads) or any(b < 1 for b in args.batches) or args.rounds < 1:
        p.error("--threads, --batches and --rounds must be positive")
    console = Console(width=200)
    meta = speed_meta()
    console.print(speed_header(meta, args.rounds))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        files = export_all(args.models, args.methods, Path(tmp), onnx=not args.no_ort)
        if not args.no_memory:
            for per_method in files.values():
                for f in per_method.values():
                    f["rss"] = {str(b): peak_rss(str(f["lowbit"]), b) for b in args.batches}
        for threads in args.threads:
            spec = {
                "files": files,
                "threads": threads,
                "batches": args.batches,
                "rounds": args.rounds,
                "min_time": args.min_time,
                "avx2": args.avx2_baseline,
            }
            spec_path = Path(tmp) / f"spec-{threads}.json"
            spec_path.write_text(json.dumps(spec))
            worker = ["--worker", str(spec_path)]
            rows += run_module("lowbit.bench.models", worker, thread_env(threads))
    render(rows, console)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
