"""lowbit bench accuracy: the --quick table is complete and well-formed (CI), and its parts --
configuration checks, aggregation over seeds, goals, post-training quantisation -- against
references computed by hand."""

from __future__ import annotations

import copy
import csv
import io
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from torch import nn

from lowbit.bench import BenchConfigError, load_bench, ptq_int8, ptq_uniform, run_accuracy_bench
from lowbit.bench.accuracy import check_resumable
from lowbit.bench.ptq import mse_step
from lowbit.bench.table import aggregate, check_goals, markdown_table
from lowbit.bench.timing import median_step_ms
from lowbit.models import create_model
from lowbit.quant.affine import AffineActivation
from lowbit.quant.lsq import LSQ
from lowbit.runs import load_run
from lowbit.runs.results import bits_w_a
from lowbit.train import TrainConfig

BENCH_FILE = resources.files("lowbit") / "recipes" / "bench" / "mnist5k.yaml"
ISSUE_ROWS = {  # the rows issue 6 asks for, with their inner-layer bits w/a
    "float32": (32, 32),
    "bnn": (1, 1),
    "xnor": (1, 1),
    "twn": (1.6, 32),  # ternary as stored: five trits a byte
    "ttq": (1.6, 32),
    "lsq-2": (2, 2),
    "lsq-3": (3, 3),
    "lsq-4": (4, 4),
    "lsq-8": (8, 8),
    "dorefa-2": (2, 2),
    "dorefa-4": (4, 4),
    "pact-2": (2, 2),
    "pact-4": (4, 4),
    "affine-int8": (8, 8),
    "ptq-int8": (8, 8),
    "ptq-4bit": (4, 4),
}


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


# -- the CI check: --quick produces every row ----------------------------------------------------
@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench-quick")
    return out, run_accuracy_bench("mnist5k", quick=True, out=out, console=quiet())


QUICK_WARNINGS = "ignore::lowbit.train.health.QuantHealthWarning"  # 2 training steps: expected


@pytest.mark.filterwarnings(QUICK_WARNINGS)
def test_quick_table_has_every_row_in_file_order(quick_bench) -> None:
    _, results = quick_bench
    names = [r["method"] for r in results["rows"]]
    assert names == list(yaml.safe_load(BENCH_FILE.read_text())["methods"])
    assert set(ISSUE_ROWS) <= set(names)
    assert results["quick"] is True and results["seeds"] == 1
    assert {(r["method"], r["seed"]) for r in results["runs"]} == {(n, 0) for n in names}


@pytest.mark.filterwarnings(QUICK_WARNINGS)
def test_quick_rows_are_well_formed(quick_bench) -> None:
    out, results = quick_bench
    rows = {r["method"]: r for r in results["rows"]}
    fp = rows["float32"]
    for name, (w, a) in ISSUE_ROWS.items():
        r = rows[name]
        assert (r["bits_w"], r["bits_a"]) == (w, a), name
        assert 0.0 <= r["top1_mean"] <= 100.0 and r["top1_std"] is None  # one seed: no spread
        assert r["size_bytes"] > 0
        assert r["size_ratio"] == pytest.approx(fp["size_bytes"] / r["size_bytes"])
        if r["kind"] == "float":
            assert r["delta_mean"] == 0.0 and r["sparsity"] is None
        else:
            assert r["delta_mean"] == pytest.approx(r["top1_mean"] - fp["top1_mean"])
            assert 0.0 <= r["sparsity"] <= 1.0
        if r["kind"] == "ptq":
            assert r["step_overhead"] is None
        else:
            assert r["step_overhead"] > 0
        if r["size_source"] == "export":  # the measured file is there, with that size
            assert (out / "seed0" / name / "model.lowbit").stat().st_size == r["size_bytes"]
    assert rows["ttq"]["size_ratio"] > rows["lsq-8"]["size_ratio"] > 1.0  # 2-bit < 8-bit < fp32


@pytest.mark.filterwarnings(QUICK_WARNINGS)
def test_quick_files_csv_markdown_and_run_folders(quick_bench) -> None:
    out, results = quick_bench
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == [r["method"] for r in results["rows"]]
    assert all(float(r["top1_mean"]) >= 0 for r in table)
    md = (out / "results.md").read_text().splitlines()
    body = [line for line in md if line.startswith("| ") and not line.startswith("| method")]
    assert [line.split("|")[1].strip() for line in body] == [r["method"] for r in table]
    assert all(line.count("|") == 9 for line in body)  # 8 columns, no empty cell
    assert all("|  |" not in line for line in body)
    for row in results["rows"]:  # every row is a lowbit run folder that rebuilds its model
        _, model, _ = load_run(out / "seed0" / row["method"])
        assert bits_w_a(model) == (row["bits_w"], row["bits_a"])


@pytest.mark.filterwarnings(QUICK_WARNINGS)
def test_quick_bench_resumes_from_its_finished_parts(quick_bench) -> None:
    out, results = quick_bench
    assert results["compute_time_s"] > 0 and all(r["wall_time_s"] > 0 for r in results["runs"])
    again = run_accuracy_bench("mnist5k", quick=True, out=out, console=quiet())
    assert again["rows"] == results["rows"]  # nothing retrained: the same figures
    assert again["compute_time_s"] == pytest.approx(results["compute_time_s"])
    assert again["session_time_s"] < results["compute_time_s"]


# -- configuration -------------------------------------------------------------------------------
def base_config() -> dict:
    return {
        "name": "t",
        "model": {"name": "lenet5", "channels": [4, 8], "hidden": 16},
        "data": {"name": "digits", "val_fraction": 0.2},
        "train": {"epochs": 1, "optimizer": "adam", "lr": 0.001, "batch_size": 32},
        "methods": {"float32": {}, "ttq": {"quant": "ttq"}, "ptq-4bit": {"ptq": "4bit"}},
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "bench.colour"),
        ({"methods": {"ttq": {"quant": "ttq"}}}, "float32"),
        ({"methods": {"float32": {}, "x": {}}}, "methods.x"),
        ({"methods": {"float32": {}, "x": {"ptq": "int4"}}}, "methods.x.ptq"),
        (
            {"methods": {"float32": {}, "x": {"quant": "ttq", "train": {"epochs": 9}}}},
            "methods.x.train.epochs",
        ),
        (
            {"methods": {"float32": {}, "x": {"quant": "ttq", "train": {"lrr": 1}}}},
            "methods.x.train.lrr",
        ),
        ({"methods": {"float32": {}, "x": {"quant": "nosuch"}}}, "methods.x.quant"),
        ({"goals": [{"max_drop": 0.3, "methods": ["nope"]}]}, r"goals\[0\].methods"),
        ({"seeds": 0}, "seeds"),
        ({"quick": {"epochs": 0}}, "quick.epochs"),
        ({"train": {"lr": -1}}, "train.lr"),
    ],
)
def test_bad_bench_files_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(BenchConfigError, match=message):
        load_bench({**base_config(), **change})


def test_quick_mode_and_selection_keep_the_shared_budget() -> None:
    bench = load_bench({**base_config(), "train": {"epochs": 5, "warmup_epochs": 1}})
    quick = bench.as_quick()
    assert (quick.seeds, quick.train.epochs, quick.train.warmup_epochs, quick.quick) == (
        1,
        1,
        0,
        True,
    )
    assert [m.name for m in bench.select(["ttq"]).methods] == ["float32", "ttq"]
    with pytest.raises(BenchConfigError, match="unknown bench method 'nope'"):
        bench.select(["nope"])
    bench = load_bench(
        {**base_config(), "methods": {"float32": {}, "b": {"quant": "bnn", "train": {"lr": 0.1}}}}
    )
    cfg = bench.train_config(bench.method("b"), seed=4)
    assert (cfg.lr, cfg.seed, cfg.epochs, cfg.batch_size) == (0.1, 4, 1, 32)


def test_a_folder_of_another_configuration_is_not_resumed(tmp_path: Path) -> None:
    first = load_bench(base_config())
    previous = tmp_path / "bench.yaml"
    previous.write_text(yaml.safe_dump(first.to_dict()))
    more = {**base_config(), "seeds": 5}
    more["methods"] = {**more["methods"], "twn": {"quant": "twn"}}
    check_resumable(previous, load_bench(more))  # more seeds and rows: fine
    with pytest.raises(BenchConfigError, match=r"train"):
        check_resumable(previous, load_bench({**base_config(), "train": {"lr": 0.5}}))
    changed = {**base_config(), "methods": {"float32": {}, "ttq": {"quant": "twn"}}}
    with pytest.raises(BenchConfigError, match=r"methods\.ttq"):
        check_resumable(previous, load_bench(changed))


def test_unknown_dataset_lists_the_benches() -> None:
    with pytest.raises(BenchConfigError, match="mnist5k"):
        load_bench("imagenet")


# -- aggregation and goals -----------------------------------------------------------------------
def fake_run(method: str, kind: str, seed: int, acc: float, size: int) -> dict:
    return {
        "method": method,
        "kind": kind,
        "seed": seed,
        "bits_w": 4,
        "bits_a": 4,
        "val_acc": acc,
        "test_acc": acc,
        "size_bytes": size,
        "size_source": "export",
        "sparsity": None if kind == "float" else 0.25,
        "health": [],
    }


def test_aggregate_means_spreads_deltas_and_goals() -> None:
    bench = load_bench(
        {
            **base_config(),
            "methods": {
                "float32": {},
                "q": {"quant": {"method": "lsq", "bits": 4}},
                "p": {"ptq": "4bit"},
            },
            "goals": [{"max_drop": 0.5, "methods": ["q"]}, {"beats_ptq": True}],
        }
    )
    fp, q, p = [0.98, 0.97, 0.99], [0.97, 0.965, 0.98], [0.95, 0.96, 0.97]
    runs = [fake_run("float32", "float", s, fp[s], 4000) for s in range(3)]
    runs += [fake_run("q", "qat", s, q[s], 500) for s in range(3)]
    runs += [fake_run("p", "ptq", s, p[s], 500) for s in range(3)]
    rows = {r["method"]: r for r in aggregate(bench, runs, {"q": {"overhead": 1.5}})}
    assert rows["q"]["top1_mean"] == pytest.approx(100 * np.mean(q))
    assert rows["q"]["top1_std"] == pytest.approx(100 * np.std(q, ddof=1))
    diffs = 100 * (np.array(q) - np.array(fp))
    assert rows["q"]["delta_mean"] == pytest.approx(diffs.mean())
    assert rows["q"]["delta_std"] == pytest.approx(diffs.std(ddof=1))
    assert rows["q"]["size_ratio"] == 8.0 and rows["q"]["step_overhead"] == 1.5
    assert rows["p"]["step_overhead"] is None
    goals = check_goals(bench, list(rows.values()))
    drop = 100 * (np.mean(fp) - np.mean(q))  # 0.83 points: more than 0.5
    assert [(g["method"], g["met"]) for g in goals] == [("q", False), ("q", True)]
    assert goals[0]["value"] == pytest.approx(drop)
    assert goals[1]["value"] == pytest.approx(100 * (np.mean(q) - np.mean(p)))
    cell = f"{100 * np.mean(q):.2f} ± {100 * np.std(q, ddof=1):.2f}"
    assert f"| q | 4/4 | {cell} | {diffs.mean():+.2f} ± {diffs.std(ddof=1):.2f} |" in (
        markdown_table(list(rows.values()))
    )


# -- post-training quantisation ------------------------------------------------------------------
def test_mse_step_is_the_grid_argmin() -> None:
    v = torch.randn(4000, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails
    quant = LSQ("weight", bits=4)
    chosen = float(mse_step(quant, v, grid=50))
    x = v.numpy().astype(np.float64)
    top = np.abs(x).max() / 7  # QP = 7 for signed 4-bit
    candidates = [top * i / 50 for i in range(1, 51)]
    errors = [np.sum((np.clip(np.round(x / s), -8, 7) * s - x) ** 2) for s in candidates]
    assert chosen == pytest.approx(candidates[int(np.argmin(errors))], rel=1e-5)
    assert chosen < top  # heavy tails: clipping beats the max-based step
    assert float(quant.step.detach()) == pytest.approx(chosen)


def conv_bn_model() -> nn.Module:
    return create_model(
        "lenet5", num_classes=10, in_shape=(1, 8, 8), channels=(4, 8), hidden=16, seed=0
    )


def test_ptq_int8_calibrates_observers_without_training() -> None:
    model = conv_bn_model().eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(3)]
    # quantize() moves the original Parameters and BatchNorm modules, so references stay valid
    tensors = [*model.parameters(), *(b for n, b in model.named_buffers() if "running" in n)]
    before = [t.detach().clone() for t in tensors]
    ptq_int8(model, batches)
    assert not model.training
    assert all(torch.equal(t, b) for t, b in zip(tensors, before, strict=True))
    first = model.features[0][0].input_quant  # sees the raw inputs
    assert isinstance(first, AffineActivation)
    lo = [float(b.min()) for b in batches]
    expected = lo[0]
    for v in lo[1:]:
        expected = 0.99 * expected + 0.01 * v
    assert float(first.min_val) == pytest.approx(expected, rel=1e-6)
    assert int(first.steps) == 3


def test_ptq_uniform_sets_mse_steps_on_weights() -> None:
    model = conv_bn_model().eval()
    weight = model.fc[0].weight.detach().clone()
    batches = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))]
    ptq_uniform(model, batches, bits=4)
    quant = model.fc[0].weight_quant
    assert torch.equal(model.fc[0].weight, weight)
    chosen = float(quant.step.detach())
    probe = copy.deepcopy(quant)
    assert float(mse_step(probe, weight)) == pytest.approx(chosen)
    for name, module in model.named_modules():
        if name.endswith("input_quant"):
            assert bool(module.initialized), name


def test_step_timing_leaves_the_model_alone() -> None:
    model = conv_bn_model()
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    ms = median_step_ms(model, x, y, TrainConfig(device="cpu", optimizer="adam", lr=0.1), 3, 1)
    assert ms > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
