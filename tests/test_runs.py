"""Run folders and the CLI as a user drives it (issues 10 and 16): the real ``lowbit`` command in
a subprocess for the bench options, --resume, override typos, torn checkpoints and unwritable
folders; the results schema, check(), calibrate(), partial quantisation and sizes in-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import lowbit
from conftest import TINY as SHARED
from lowbit.bench.config import bench_names, load_bench
from lowbit.convert import PartialQuantizationWarning
from lowbit.export.onnx import PREPROCESS_KEY
from lowbit.models import create_model
from lowbit.recipe import RecipeError
from lowbit.runs import export_run, load_run, read_results, run_preprocess
from lowbit.runtime import load
from lowbit.yamlio import load_yaml

TINY = {  # one epoch a phase is enough here
    **SHARED,
    "pretrain": {**SHARED["pretrain"], "epochs": 1},
    "train": {**SHARED["train"], "epochs": 1},
}
SRC = str(Path(lowbit.__file__).parents[1])


def lowbit_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    return subprocess.run(
        [sys.executable, "-m", "lowbit.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def write_experiment(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished ``lowbit train`` run folder (a subprocess), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("trained")
    proc = lowbit_cli("train", str(write_experiment(tmp)), "--run-dir", str(tmp / "run"))
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


def one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- item 1: bench options are parsed, not swallowed ---------------------------------------------
def test_bench_options_reach_the_bench(tmp_path: Path) -> None:
    proc = lowbit_cli("bench", "accuracy", "--quick", "--suite", "nonesuch", "--out", "x")
    one_error_line(proc, "no bench 'nonesuch'", "narrow")  # --suite was read, not ignored
    proc = lowbit_cli("bench", "accuracy", "--quick", "--bogus")
    one_error_line(proc, "--bogus")
    proc = lowbit_cli("bench", "accuracy", "--dataset", "mnist5k", "--seeds", "0", "--quick")
    one_error_line(proc, "seeds must be a positive int")


def test_help_is_fast_and_imports_no_torch() -> None:
    code = "import sys; from lowbit.cli import build_parser; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert out.stdout.strip() == "False"
    assert lowbit_cli("--help").returncode == 0


def test_bench_suites_are_package_data() -> None:
    folder = resources.files("lowbit") / "recipes" / "bench"
    assert {"mnist5k", "narrow", "cifar10"} <= set(bench_names())
    for name in bench_names():
        assert (folder / f"{name}.yaml").is_file()
        load_bench(name)
    narrow = load_bench("narrow")
    assert narrow.pretrain is None and narrow.train.epochs == 15 and narrow.seeds == 3
    assert narrow.model == {"name": "lenet5", "channels": [8, 16], "hidden": 32}


@pytest.mark.slow
def test_quick_narrow_suite_runs_every_row(tmp_path: Path) -> None:
    """The capacity-limited suite, quick mode (one seed, 1 epoch, subsets): every row's folder
    is a run folder that compare, summary and export accept."""
    from rich.console import Console

    from lowbit.bench import run_accuracy_bench

    out = tmp_path / "bench"
    results = run_accuracy_bench(
        "narrow", quick=True, out=out, methods=["ttq", "ptq-int8"], console=Console(quiet=True)
    )
    assert [r["method"] for r in results["rows"]] == ["float32", "ttq", "ptq-int8"]
    rows = sorted(p.parent for p in out.glob("seed0/*/results.json"))
    assert [p.name for p in rows] == ["float32", "ptq-int8", "ttq"]
    for row in rows:
        r = read_results(row)
        assert {"test_acc", "size_bits", "bits_w", "compression", "method"} <= set(r)
        info = load_run(row)[2]
        assert info["preprocess"]["scale"] == pytest.approx(1 / 255)
    ttq = read_results(out / "seed0" / "ttq")
    assert ttq["bits_w"] == pytest.approx(1.6) and ttq["size_source"] == "export"


@pytest.mark.slow
def test_bench_quick_from_an_installed_copy(tmp_path: Path) -> None:
    """``lowbit bench accuracy --quick`` outside the repository, from an installed package."""
    root = Path(__file__).parents[1]
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--target",
            str(target),
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "bench", "accuracy", "--quick", "--methods", "ttq"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "bench-mnist5k-quick" / "results.md").is_file()


# -- item 2: --resume applies nothing silently ----------------------------------------------
def test_resume_applies_more_epochs_and_refuses_other_changes(
    trained: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "experiment.yaml").read_text()
    proc = lowbit_cli("train", "--resume", str(run), "--set", "train.lr=5e-4")
    one_error_line(proc, "--resume can change only epochs and device")
    proc = lowbit_cli("train", str(write_experiment(tmp_path)), "--resume", str(run))
    one_error_line(proc, "cannot be given with it")
    proc = lowbit_cli("train", "--resume", str(run), "--set", "pretrain.epochs=0")
    assert proc.returncode == 2
    assert (run / "experiment.yaml").read_text() == before  # records what ran
    proc = lowbit_cli("train", "--resume", str(run), "--set", "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((run / "experiment.yaml").read_text())["train"]["epochs"] == 2
    assert read_results(run)["qat"]["epochs"] == 2  # the finished run trained one more epoch
    assert "fp: finished earlier" in proc.stdout


# -- item 3: YAML 1.2 floats -----------------------------------------------------------------
def test_yaml_reads_5e_minus_4_as_a_float(tmp_path: Path) -> None:
    assert load_yaml("lr: 5e-4\nn: 3\nm: 1E3\ns: abc") == {"lr": 5e-4, "n": 3, "m": 1e3, "s": "abc"}
    from lowbit.train.experiment import Experiment

    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(TINY).replace("lr: 0.002", "lr: 5e-4"))
    assert Experiment.load(path).train.lr == 5e-4


# -- item 4: checks before training; a half-made folder does not block ------------------------
@pytest.mark.slow
def test_override_typo_fails_before_training_and_leaves_no_folder(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path, quant={"method": "lsq", "overrides": {"hiden.*": "float"}})
    run = tmp_path / "run"
    proc = lowbit_cli("train", str(exp), "--run-dir", str(run))
    one_error_line(proc, "overrides.hiden.*", "matches no layer")
    assert "fp phase" not in proc.stdout
    assert not run.exists() or not any(run.iterdir())
    run.mkdir(exist_ok=True)  # what an older lowbit left behind: the two run files only
    (run / "experiment.yaml").write_text("name: half\n")
    (run / "run.json").write_text("{}")
    proc = lowbit_cli("train", str(write_experiment(tmp_path)), "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr
    assert read_results(run)["name"] == "tiny"


def test_check_lists_float_layers_and_export_failures() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 10)
    )
    report = lowbit.check(model, "lsq", example_input=(1, 8, 8))
    assert report.export_error is not None and "AdaptiveAvgPool2d" in report.export_error
    assert not report.ok
    with pytest.raises(RecipeError, match="matches no layer"):
        lowbit.check(model, {"method": "lsq", "overrides": {"9": "float"}})
    ok = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    assert lowbit.check(ok, "lsq", example_input=(1, 8, 8)).ok
    assert all(isinstance(m, nn.Conv2d | nn.ReLU | nn.Flatten | nn.Linear) for m in ok)


# -- item 5: a torn checkpoint pair --------------------------------------------------------
@pytest.mark.slow
def test_resume_falls_back_past_a_torn_checkpoint(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path, train={**TINY["train"], "epochs": 3})
    run = tmp_path / "run"
    assert lowbit_cli("train", str(exp), "--run-dir", str(run)).returncode == 0
    ckpt = run / "qat" / "checkpoints"
    (run / "results.json").unlink()
    (run / "qat" / "metrics.json").unlink()
    # killed between the two renames: a new payload beside the old JSON
    (ckpt / "last.safetensors").write_bytes(
        (ckpt / "last.safetensors").read_bytes()[:-8] + b"x" * 8
    )
    proc = lowbit_cli("train", "--resume", str(run))
    assert proc.returncode == 0, proc.stderr
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "checkpoint last is unusable" in out and "resuming from best" in out


# -- item 8: unwritable folders, quantize twice ---------------------------------------------
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_folder_is_one_line(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        proc = lowbit_cli("train", str(write_experiment(tmp_path)), "--run-dir", str(ro / "run"))
    finally:
        ro.chmod(0o700)
    one_error_line(proc, "not writable")


def test_unwritable_run_folder_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = lowbit_cli("train", str(write_experiment(tmp_path)), "--run-dir", str(blocker / "run"))
    one_error_line(proc, "not writable")
    proc = lowbit_cli("train", str(write_experiment(tmp_path)), "--run-dir", str(blocker))
    one_error_line(proc, "is a file")


def test_quantize_twice_is_a_clear_error() -> None:
    model = lowbit.quantize(create_model("lenet5", 10, (1, 28, 28), seed=0), "ttq")
    with pytest.raises(RecipeError, match="already quantised with recipe 'ttq'"):
        lowbit.quantize(model, "ttq")


# -- item 6: partial quantisation is never silent -------------------------------------------
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(1, 4, 3)
        self.up = nn.ConvTranspose2d(1, 1, 3)
        self.emb = nn.Embedding(10, 8)
        self.lstm = nn.LSTM(8, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)


def test_layers_left_float_are_warned_and_summarised() -> None:
    model = Mixed()
    with pytest.warns(PartialQuantizationWarning, match="conv1d .Conv1d.*attn .MultiheadAttention"):
        lowbit.quantize(model, "lsq")
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    rows = {r.name: r for r in lowbit.summary(model, show=False).layers}
    for name in ("conv1d", "up", "emb", "lstm", "attn"):
        assert rows[name].weight_method == "float" and rows[name].weight_bits == 32
    assert "attn.out_proj" not in rows and rows["fc"].weight_method == "lsq"


def test_bnn_keeps_relus_when_no_layer_gets_binary_activations() -> None:
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.quantize(model, "bnn")
    assert isinstance(model[1], nn.ReLU)
    assert any("ReLUs are kept" in str(w.message) for w in caught)


# -- issue 10 part 4: every command on every kind of run folder ------------------------------
def test_compare_mixes_train_and_bench_row_folders(trained: Path, tmp_path: Path) -> None:
    row = tmp_path / "bench-row"
    shutil.copytree(trained, row)
    old = json.loads((row / "results.json").read_text())  # a bench row of lowbit 0.1
    (row / "results.json").write_text(
        json.dumps(
            {
                "method": "lsq-4",
                "kind": "qat",
                "seed": 0,
                "test_acc": 0.5,
                "val_acc": 0.5,
                "bits_w": 4,
                "bits_a": 4,
                "size_bytes": 1000,
                "size_source": "export",
                "sparsity": 0.1,
                "health": [],
            }
        )
    )
    proc = lowbit_cli("compare", str(trained), str(row))
    assert proc.returncode == 0, proc.stderr
    assert "run " in proc.stdout and "bench-row" in proc.stdout and old["method"] in proc.stdout
    assert "…" not in proc.stdout  # tables are not cut off a terminal
    for command in (("summary", str(row)), ("eval", str(row)), ("report", str(row))):
        assert lowbit_cli(*command).returncode == 0, command


def test_export_reads_preprocess_from_run_json(trained: Path, tmp_path: Path) -> None:
    info = json.loads((trained / "run.json").read_text())
    assert info["lowbit_run"] == 2 and info["preprocess"]["scale"] == pytest.approx(1 / 16)
    path = export_run(trained, tmp_path / "m.lowbit")
    assert load(path).meta["preprocess"] == info["preprocess"]
    _, model, _ = load_run(trained)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = model(x).numpy()
    assert abs(load(path)(x.numpy()) - expected).max() < 1e-4


# -- issue 10 part 5: calibration, ownership, size ------------------------------------------
def test_calibrate_sets_observers_and_leaves_batchnorm_alone() -> None:
    model = lowbit.quantize(create_model("lenet5", 10, (1, 28, 28), seed=0), "affine")
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    lowbit.calibrate(model, [torch.randn(8, 1, 28, 28) for _ in range(2)])
    assert not model.training
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k]), k
    with lowbit.Calibration(model):
        assert torch.is_grad_enabled() is False
        model(torch.randn(2, 1, 28, 28))


def test_optimizer_groups_scales_by_ownership() -> None:
    from lowbit.train.config import TrainConfig
    from lowbit.train.optim import build_optimizer

    model = lowbit.quantize(create_model("lenet5", 10, (1, 28, 28), seed=0), "ttq")
    model.register_parameter("wp", nn.Parameter(torch.ones(())))  # named like a scale, not one
    groups = build_optimizer(model, TrainConfig.from_dict({"weight_decay": 0.1})).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    owned = {id(p) for q in lowbit.quantizers(model).values() for p in q.parameters()}
    assert no_decay == owned and id(model.wp) not in no_decay


def test_summary_size_is_the_files_bit_width() -> None:
    model = lowbit.quantize(create_model("lenet5", 10, (1, 28, 28), seed=0), "twn")
    rows = {r.name: r for r in lowbit.summary(model, show=False).layers}
    ternary = [r for r in rows.values() if r.weight_method == "twn"]
    assert ternary and all(r.weight_bits == pytest.approx(1.6) for r in ternary)


def test_summary_and_file_agree_on_weight_bits(tmp_path: Path) -> None:
    from lowbit.runtime import file_summary

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 33), nn.ReLU(), nn.Linear(33, 10), nn.ReLU(), nn.Linear(10, 3)
    )
    lowbit.quantize(model, "twn")
    path = lowbit.export(model, tmp_path / "m.lowbit", example_input=(64,))
    in_file = {r["params"]: r["bits"] for r in file_summary(path).rows}
    for row in lowbit.summary(model, show=False).layers:
        assert in_file[row.params] == pytest.approx(
            8 * -(-row.weight_bits * row.params // 8) / row.params
        )


# -- item 10: feedback ---------------------------------------------------------------------
def test_progress_lines_when_output_is_not_a_terminal() -> None:
    import io

    from rich.console import Console

    from lowbit.train.progress import EpochProgress

    out = io.StringIO()
    console = Console(file=out, width=80)
    assert not console.is_terminal
    with EpochProgress(console, 1, 2, 4, interval_s=0.0) as progress:
        for step in range(1, 5):
            progress.update(step, 0.5, 0.75, 1e-3)
    lines = out.getvalue().splitlines()
    assert lines == [f"epoch 1/2  step {s}/4  loss 0.5000  acc 0.7500  lr 0.001" for s in (1, 2, 3)]


def test_a_diverging_loss_stops_training(tmp_path: Path) -> None:
    from torch.utils.data import TensorDataset

    from lowbit.train import Trainer, TrainingDiverged

    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    calls = iter(range(10**6))

    def exploding(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # finite, 1e4x per step
        return nn.functional.cross_entropy(out, y) * 1e4 ** next(calls)

    trainer = Trainer(
        nn.Linear(4, 2), data, data, {"epochs": 3, "batch_size": 16}, tmp_path, loss_fn=exploding
    )
    with pytest.raises(TrainingDiverged, match="over 1e\\+06 times the first"):
        trainer.fit()


def test_speed_benches_take_quick_and_get_their_own_options(monkeypatch) -> None:
    import lowbit.bench.kernels
    import lowbit.bench.models
    from lowbit.cli import main

    seen: dict[str, list[str]] = {}
    for module in (lowbit.bench.kernels, lowbit.bench.models):
        name = module.__name__.rsplit(".", 1)[1]
        monkeypatch.setattr(module, "main", lambda argv, n=name: seen.setdefault(n, argv))
    assert main(["bench", "kernels", "--quick", "--rounds", "1"]) == 0
    assert main(["bench", "models", "--threads", "1", "--smoke"]) == 0
    assert seen == {
        "kernels": ["--rounds", "1", "--smoke"],
        "models": ["--threads", "1", "--smoke"],
    }


def test_export_run_writes_onnx_with_the_runs_input_shape(trained: Path, tmp_path: Path) -> None:
    import onnx

    out = export_run(trained, tmp_path / "m.onnx", format="onnx")
    proto = onnx.load(out)
    assert "QuantizeLinear" in {n.op_type for n in proto.graph.node}
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == [1, 8, 8]
    pre = json.loads({p.key: p.value for p in proto.metadata_props}[PREPROCESS_KEY])
    assert pre == json.loads(json.dumps(run_preprocess(trained)))
