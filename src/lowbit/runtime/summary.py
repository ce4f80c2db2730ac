"""Per-layer storage of a ``.lowbit`` file (``lowbit summary model.lowbit``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from ..contract import SPEC_TENSORS
from .loader import _parse, _Raw, _read

__all__ = ["FileSummary", "file_summary"]


@dataclass
class FileSummary:
    """Per-layer storage of a ``.lowbit`` file, measured from its tensors.

    ``rows``: one dict per conv/linear node with ``layer``, ``op``, ``weights`` and
    ``activations`` (method names, None for float), ``packing``, ``bits`` (stored bits per
    weight), ``params`` (weights), ``bytes`` (the weight's codes plus its scales; biases are
    not counted) and ``float32_bytes`` (``4 params``). ``file_bytes`` is the whole file;
    ``float32_file_bytes`` estimates the same graph with every weight stored as float32.
    """

    path: str
    rows: list[dict[str, Any]]
    file_bytes: int
    float32_file_bytes: int

    @property
    def weight_bytes(self) -> int:
        return sum(r["bytes"] for r in self.rows)

    @property
    def float32_weight_bytes(self) -> int:
        return sum(r["float32_bytes"] for r in self.rows)

    def table(self) -> Any:
        """A ``rich`` table of the rows and the totals."""
        from rich.table import Table

        t = Table(title=f"{self.path}")
        for col in (
            "layer",
            "op",
            "weights",
            "activations",
            "bits",
            "params",
            "bytes",
            "float32 bytes",
        ):
            t.add_column(col, justify="left" if col in ("layer", "op") else "right")
        for r in self.rows:
            t.add_row(
                r["layer"],
                r["op"],
                r["weights"] or "float",
                r["activations"] or "float",
                f"{r['bits']:.3g}",
                f"{r['params']:,}",
                f"{r['bytes']:,}",
                f"{r['float32_bytes']:,}",
            )
        ratio = self.float32_weight_bytes / max(self.weight_bytes, 1)
        t.add_row(
            "weights",
            "",
            "",
            "",
            "",
            "",
            f"{self.weight_bytes:,}",
            f"{self.float32_weight_bytes:,} ({ratio:.1f}x)",
            end_section=True,
        )
        ratio = self.float32_file_bytes / max(self.file_bytes, 1)
        t.add_row(
            "file",
            "",
            "",
            "",
            "",
            "",
            f"{self.file_bytes:,}",
            f"{self.float32_file_bytes:,} ({ratio:.1f}x)",
        )
        return t


def _stored_bytes(raw: _Raw, name: str | None) -> int:
    if name is None:
        return 0
    begin, end = raw.table[name]["data_offsets"]
    return end - begin


def file_summary(path: str | os.PathLike[str]) -> FileSummary:
    """Per-layer bits and bytes of a ``.lowbit`` file and its size against float32 storage
    (for ``lowbit summary model.lowbit``). The file is fully validated first."""
    data = _read(path)
    raw, header, _ = _parse(data, str(path))
    rows, saved = [], 0
    for d in header["nodes"]:
        weight = d.get("weight")
        if weight is None:
            continue
        entry = header["tensors"][weight["tensor"]]
        n = math.prod(entry["shape"])
        spec = weight.get("spec") or {}
        stored = sum(
            _stored_bytes(raw, k) for k in (weight["tensor"], *(spec.get(k) for k in SPEC_TENSORS))
        )
        saved += 4 * n - stored
        methods = d.get("methods") or {}
        rows.append(
            {
                "layer": d["name"],
                "op": d["op"],
                "weights": methods.get("weights"),
                "activations": methods.get("activations"),
                "packing": entry["packing"],
                "bits": 8 * _stored_bytes(raw, weight["tensor"]) / n,
                "params": n,
                "bytes": stored,
                "float32_bytes": 4 * n,
            }
        )
    return FileSummary(str(path), rows, len(data), len(data) + saved)
