"""``results.json``: the one schema every run folder ends with (``lowbit train`` and each row of
``lowbit bench accuracy``), and the table ``lowbit compare`` prints from it.

Keys (``results_version`` 1)::

    name, model, data, method (null for float), kind ("float", "qat" or "ptq"), seed
    fp, qat            per-phase training summaries, each with its "test" loss and accuracy
    val_acc, test_acc  the final model's top-1 on the validation and test splits
    bits_w, bits_a     weight / activation bits of the inner layers (float: 32)
    size_bits, float32_bits, compression      lowbit.summary's size (the file's bit widths)
    size_bytes, size_source, size_error       the exported .lowbit file's bytes when one was
                                              written ("export"), else the summary's ("summary")
    sparsity           share of zero quantised weights (null for float)
    health             the final model's health warnings
    wall_time_s        seconds the run took

:func:`read_results` also reads the two older schemas (a ``lowbit train`` run without bits and
sparsity, a bench row without ``size_bits``), filling what they lack.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import DatasetSplits
from ..model_summary import summary, weight_sparsity
from ..train.health import check_health, first_batch
from ..train.trainer import evaluate

RESULTS = "results.json"
RESULTS_VERSION = 1
EVAL_BATCH = 256
HEALTH_BATCH = 256


def bits_w_a(model: nn.Module) -> tuple[float, int]:
    """The weight and activation bits of the inner layers (first and last layer excluded).

    The most common pair over the inner layers (all layers when there are at most two); float
    is 32 bits.
    """
    rows = summary(model, show=False).layers
    inner = rows[1:-1] if len(rows) > 2 else rows
    pairs = Counter((r.weight_bits, r.act_bits or 32) for r in inner)
    return pairs.most_common(1)[0][0]


def file_size(
    model: nn.Module, path: Path, in_shape: Sequence[int], preprocess: Mapping[str, Any] | None
) -> tuple[int | None, str | None]:
    """``(bytes, None)`` of the ``.lowbit`` file exported to ``path``, or ``(None, why)``."""
    from ..export import export

    try:
        export(model, path, example_input=tuple(in_shape), preprocess=preprocess)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:
        return None, f"export failed: {err}"
    return path.stat().st_size, None


def measure(
    model: nn.Module,
    data: DatasetSplits,
    device: torch.device | str,
    *,
    export_to: Path | None = None,
    preprocess: Mapping[str, Any] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """Accuracy, bits, size, sparsity and health of a final model (the schema's measured keys).

    With ``export_to`` the model is also exported there and the file's bytes recorded.
    """
    model.to(device).eval()

    def acc(ds: Dataset) -> float:
        loader = DataLoader(ds, batch_size=EVAL_BATCH)
        return evaluate(model, loader, loss_fn, device=device)["acc"]

    size = summary(model, show=False)
    bits_w, bits_a = bits_w_a(model)
    size_bytes, error = None, None
    if export_to is not None:
        size_bytes, error = file_size(model, export_to, data.in_shape, preprocess)
    issues = check_health(model, first_batch(data.val, HEALTH_BATCH).to(device))
    return {
        "val_acc": acc(data.val),
        "test_acc": acc(data.test),
        "bits_w": bits_w,
        "bits_a": bits_a,
        "size_bits": size.size_bits,
        "float32_bits": size.float32_bits,
        "compression": size.compression,
        "size_bytes": size_bytes if size_bytes is not None else math.ceil(size.size_bits / 8),
        "size_source": "summary" if size_bytes is None else "export",
        "size_error": error,
        "sparsity": weight_sparsity(model),
        "health": [i.message for i in issues],
    }


def write_results(run_dir: Path, results: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``results.json`` (the schema version added); returns what was written."""
    out = {"results_version": RESULTS_VERSION, **results}
    (Path(run_dir) / RESULTS).write_text(json.dumps(out, indent=2) + "\n")
    return out


def elapsed(started: float) -> float:
    """Seconds since ``started``, a :func:`time.perf_counter` reading."""
    return time.perf_counter() - started


def read_results(run_dir: Path) -> dict[str, Any]:
    """A run folder's ``results.json`` in the current schema (older schemas filled in).

    A ValueError names the folder when there is no results.json (unfinished or not a run).
    """
    file = Path(run_dir) / RESULTS
    if not file.is_file():
        raise ValueError(f"{run_dir}: no results.json (unfinished or not a lowbit run folder)")
    try:
        r = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(r, dict) or "rows" in r:
        raise ValueError(f"{file}: not the results of one run (a bench folder holds rows)")
    if "results_version" not in r:  # the schemas of lowbit < 0.2
        r.setdefault("kind", "float" if r.get("method") in (None, "float32") else "qat")
        if "size_bits" not in r and "size_bytes" in r:
            r["size_bits"] = 8 * r["size_bytes"]
        for key in ("bits_w", "bits_a", "sparsity", "float32_bits", "compression", "val_acc"):
            r.setdefault(key, None)
        r.setdefault("name", Path(run_dir).name)
    return r


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def results_table(
    runs: Sequence[tuple[str, Mapping[str, Any]]], title: str = "lowbit runs"
) -> Table:
    """One row per ``(label, results)`` of a run folder: accuracies, bits, size, compression."""
    table = Table(title=title)
    columns = ("run", "model", "method", "bits w/a", "float test acc", "test acc")
    for col in (*columns, "size (KiB)", "vs float32"):
        left = col in ("run", "model", "method")
        table.add_column(col, justify="left" if left else "right", overflow="fold")
    lm = any("test_bpb" in r for _, r in runs)  # language models: bits per byte too
    if lm:
        table.add_column("float test bpb", justify="right")
        table.add_column("quantised test bpb", justify="right")
    for label, r in runs:
        fp = r.get("fp", {}).get("test", {}).get("acc")
        bits = "-" if r.get("bits_w") is None else f"{r['bits_w']:g}/{r['bits_a']}"
        compression = r.get("compression")
        fp_bpb = r.get("fp", {}).get("test", {}).get("bpb")
        bpb = (
            []
            if not lm
            else [
                "-" if fp_bpb is None else f"{fp_bpb:.4f}",
                "-" if r.get("test_bpb") is None else f"{r['test_bpb']:.4f}",
            ]
        )
        table.add_row(
            label,
            str(r.get("model", "?")),
            str(r.get("method") or "float32"),
            bits,
            _percent(fp),
            _percent(r.get("test_acc")),
            "-" if r.get("size_bits") is None else f"{r['size_bits'] / 8192:.1f}",
            "-" if compression is None else f"{compression:.1f}x",
            *bpb,
        )
    return table
