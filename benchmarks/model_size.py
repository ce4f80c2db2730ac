"""Sizes of exported ``.lowbit`` files of ResNet-20 (3x32x32, 10 classes) against float32.

    python benchmarks/model_size.py                      # table
    python benchmarks/model_size.py --json sizes.json    # and the numbers as JSON

Each method's packaged default recipe (first/last-layer rules included) quantises the same
ResNet-20; the model is exported with :func:`lowbit.export.export` and the files are measured in
bytes. "weights" are the conv/linear weight tensors as stored (packed codes plus their float32
scales; biases and BatchNorm not counted), compared with the float32 weights of the exported
unquantised model; "file" compares whole files. Goals (issue 4): binary >= 28x, ternary >= 18x,
4-bit >= 7.5x smaller than float32 for the conv/linear weights.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import lowbit
from lowbit.export import export
from lowbit.models import create_model
from lowbit.runtime import file_summary

IN_SHAPE = (3, 32, 32)
CASES = (  # (label, recipe or None for float32, ternary layout, goal for the weights ratio)
    ("float32", None, "5trit", None),
    ("bnn (binary)", "bnn", "5trit", 28.0),
    ("ttq (ternary, 5 trits/byte)", "ttq", "5trit", 18.0),
    ("twn (ternary, 5 trits/byte)", "twn", "5trit", 18.0),
    ("ttq (ternary, 2-bit layout)", "ttq", "2bit", None),
    ("lsq 4-bit", "lsq", "5trit", 7.5),
    ("affine int8", "affine", "5trit", None),
)


def build(recipe: str | None) -> torch.nn.Module:
    """ResNet-20 (seed 0), quantised by ``recipe``; one training-mode batch initialises the
    activation ranges/steps (sizes do not depend on the values)."""
    model = create_model("resnet20", num_classes=10, in_shape=IN_SHAPE, seed=0)
    if recipe is not None:
        lowbit.quantize(model, recipe)
        model.train()
        with torch.no_grad():
            model(torch.randn(8, *IN_SHAPE, generator=torch.Generator().manual_seed(0)))
    return model.eval()


def layer_rule(rows: list[dict[str, Any]], i: int) -> str:
    r = rows[i]
    return f"{r['weights'] or 'float'} {r['bits']:.3g}b"


def measure(folder: Path) -> list[dict[str, Any]]:
    results = []
    for label, recipe, layout, goal in CASES:
        path = export(
            build(recipe),
            folder / f"{label.split()[0]}-{layout}.lowbit",
            example_input=IN_SHAPE,
            ternary_layout=layout,
        )
        s = file_summary(path)
        results.append(
            {
                "method": label,
                "recipe": recipe,
                "ternary_layout": layout,
                "goal": goal,
                "file_bytes": s.file_bytes,
                "weight_bytes": s.weight_bytes,
                "weight_params": sum(r["params"] for r in s.rows),
                "first_layer": layer_rule(s.rows, 0),
                "last_layer": layer_rule(s.rows, -1),
            }
        )
    base = results[0]
    for r in results:
        r["weights_ratio"] = base["weight_bytes"] / r["weight_bytes"]
        r["file_ratio"] = base["file_bytes"] / r["file_bytes"]
        r["bits_per_weight"] = 8 * r["weight_bytes"] / r["weight_params"]
        r["meets_goal"] = None if r["goal"] is None else r["weights_ratio"] >= r["goal"]
    return results


def table(results: list[dict[str, Any]]) -> Table:
    t = Table(title="ResNet-20 (3x32x32, 10 classes): .lowbit file sizes vs float32")
    for col in (
        "method",
        "first / last layer",
        "weights (B)",
        "bits/weight",
        "weights vs fp32",
        "file (B)",
        "file vs fp32",
        "goal",
    ):
        t.add_column(col, justify="left" if col in ("method", "first / last layer") else "right")
    for r in results:
        goal = (
            "-"
            if r["goal"] is None
            else f">= {r['goal']:g}x " + ("[green]ok[/]" if r["meets_goal"] else "[red]missed[/]")
        )
        t.add_row(
            r["method"],
            f"{r['first_layer']} / {r['last_layer']}",
            f"{r['weight_bytes']:,}",
            f"{r['bits_per_weight']:.3f}",
            f"{r['weights_ratio']:.2f}x",
            f"{r['file_bytes']:,}",
            f"{r['file_ratio']:.2f}x",
            goal,
        )
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--keep", type=Path, help="write the .lowbit files to this folder")
    args = parser.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        results = measure(args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = measure(Path(tmp))
    Console().print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
