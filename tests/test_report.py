"""lowbit report: Markdown with PNG figures for a run folder and for a bench folder; the PNGs
exist, are PNG files that matplotlib decodes, and the Markdown links every one of them."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from rich.console import Console

from lowbit.bench import run_accuracy_bench
from lowbit.report import write_report
from lowbit.report.collect import ttq_trajectories
from lowbit.report.plots import pareto_front
from lowbit.runs import run_experiment
from lowbit.train.experiment import Experiment

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_MODEL = {"name": "lenet5", "channels": [4, 8], "hidden": 16}
TINY_DATA = {"name": "digits", "val_fraction": 0.2}
TINY_TRAIN = {"epochs": 2, "optimizer": "adam", "lr": 0.002, "batch_size": 64, "device": "cpu"}


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def linked_images(markdown: Path) -> list[Path]:
    """The image files a Markdown file links, resolved against its folder."""
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown.read_text())
    return [markdown.parent / link for link in links]


def assert_pngs_linked(markdown: Path, min_count: int) -> list[Path]:
    images = linked_images(markdown)
    assert len(images) >= min_count
    for png in images:
        assert png.suffix == ".png" and png.is_file(), png
        assert png.read_bytes()[:8] == PNG_SIGNATURE, png
        pixels = matplotlib.image.imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert np.ptp(pixels) > 0  # not a blank image
    on_disk = sorted((markdown.parent / "img").glob("*.png"))
    assert sorted(p.resolve() for p in images) == [p.resolve() for p in on_disk]
    return images


@pytest.fixture(scope="module")
def ttq_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ttq-run")
    exp = Experiment.load(
        {
            "name": "tiny-ttq",
            "seed": 0,
            "model": TINY_MODEL,
            "data": TINY_DATA,
            "pretrain": {**TINY_TRAIN, "epochs": 1},
            "quant": "ttq",
            "train": TINY_TRAIN,
        }
    )
    run_experiment(exp, run_dir, console=quiet())
    return run_dir


def test_run_report_has_the_three_figures(ttq_run: Path) -> None:
    report = write_report(ttq_run)
    assert report == ttq_run / "report.md"
    images = assert_pngs_linked(report, 3)
    names = " ".join(p.name for p in images)
    for figure in ("ttq_wp_wn", "weight_histograms", "layer_sparsity"):
        assert figure in names
    text = report.read_text()
    assert "| features.2.0 |" in text  # the TTQ layers' Wp/Wn and sparsity tables


def test_ttq_trajectories_read_from_scalars(ttq_run: Path) -> None:
    lines = (ttq_run / "qat" / "scalars.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    traj = ttq_trajectories(ttq_run / "qat" / "scalars.jsonl")
    assert sorted(traj) == ["fc.0", "features.2.0"]  # first and last layer stay float
    for layer, t in traj.items():
        assert t["epoch"] == [r["epoch"] for r in records]
        assert t["wp"] == [r[f"{layer}.weight_quant.wp"] for r in records]
        assert t["wn"] == [r[f"{layer}.weight_quant.wn"] for r in records]


def test_bench_report_with_table_goals_and_plots(tmp_path: Path) -> None:
    bench = {
        "name": "tiny",
        "description": "tiny LeNet on digits",
        "model": TINY_MODEL,
        "data": TINY_DATA,
        "train": {**TINY_TRAIN, "epochs": 1},
        "timing_steps": 2,
        "calibration_batches": 1,
        "methods": {
            "float32": {},
            "ttq": {"quant": "ttq"},
            "lsq-4": {"quant": {"method": "lsq", "bits": 4}},
            "ptq-4bit": {"ptq": "4bit"},
        },
        "goals": [{"max_drop": 0.0, "methods": ["ttq"]}, {"beats_ptq": True}],
    }
    out = tmp_path / "bench"
    run_accuracy_bench(config=bench, seeds=1, out=out, console=quiet())
    report = write_report(out, tmp_path / "docs" / "RESULTS.md")
    images = assert_pngs_linked(report, 5)
    assert all(p.parent == tmp_path / "docs" / "img" for p in images)
    text = report.read_text()
    head = text.splitlines()[:6]
    assert any(line.strip().startswith("lowbit bench accuracy --suite tiny") for line in head)
    assert "lowbit report" in " ".join(head)
    for method in bench["methods"]:
        assert f"| {method} |" in text
    assert "## Goals" in text and "beats ptq-4bit" in text
    for name in ("accuracy_vs_bits", "accuracy_vs_size", "ttq_wp_wn", "weight_histograms"):
        assert any(name in p.name for p in images)


def test_pareto_front_by_hand() -> None:
    points = [(1, 90.0), (2, 95.0), (2, 94.0), (4, 93.0), (8, 97.0), (32, 97.0)]
    assert pareto_front(points) == [(1, 90.0), (2, 95.0), (8, 97.0)]


def test_report_refuses_other_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run_dir"):
        write_report(tmp_path)
