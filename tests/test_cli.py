"""The lowbit CLI and experiments: FP -> QAT pipeline, eval/summary/compare, kill and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console

import lowbit
import lowbit.cli
import lowbit.data
import lowbit.nn
from lowbit.cli import main
from lowbit.models import create_model, list_models
from lowbit.train.checkpoint import load_checkpoint, model_state
from lowbit.train.experiment import Experiment, ExperimentError, final_checkpoint, load_run

TINY = {
    "name": "tiny",
    "seed": 3,
    "device": "cpu",
    "model": {"name": "mlp", "hidden": [32]},
    "data": {"name": "digits"},
    "pretrain": {"epochs": 2, "optimizer": "adam", "lr": 0.01, "batch_size": 64},
    "quant": {"method": "lsq", "bits": 4},
    "train": {"epochs": 2, "optimizer": "adam", "lr": 0.002, "batch_size": 64},
}


def write_experiment(tmp_path: Path, **changes) -> Path:
    exp = {**TINY, **changes}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


@pytest.mark.parametrize("model_name", list_models("image"))
def test_every_model_runs_under_every_method(model_name: str) -> None:
    in_shape = (3, 32, 32) if model_name.startswith(("resnet", "vgg")) else (1, 28, 28)
    for method in lowbit.methods():
        model = lowbit.quantize(create_model(model_name, 10, in_shape, seed=0), method)
        model.train()
        out = model(torch.randn(2, *in_shape))
        assert out.shape == (2, 10), (model_name, method)
        assert torch.isfinite(out).all(), (model_name, method)
        out.sum().backward()


def test_pipeline_then_eval_summary_compare(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(lowbit.cli, "console", Console(width=300))  # no wrapped table cells
    exp = write_experiment(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(exp), "--run-dir", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["qat"]["test"]["acc"] > 0.8
    assert results["fp"]["test"]["acc"] > 0.8
    for phase in ("fp", "qat"):
        assert (run / phase / "metrics.csv").is_file()
        assert list((run / phase / "tb").iterdir())  # TensorBoard event files
        assert (run / phase / "checkpoints" / "last.safetensors").is_file()
    resolved = yaml.safe_load((run / "experiment.yaml").read_text())
    assert resolved["quant"]["weights"] == {"method": "lsq", "bits": 4}
    capsys.readouterr()

    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{results['qat']['test']['acc']:.2%}" in out
    assert main(["summary", str(run)]) == 0
    assert "lsq" in capsys.readouterr().out
    assert main(["compare", str(run), str(run)]) == 0
    assert capsys.readouterr().out.count("tiny") == 2

    # Deployment: the .lowbit file runs without torch and agrees with the trained model.
    assert main(["export", str(run), "-o", str(tmp_path / "m.lowbit")]) == 0
    assert main(["summary", str(tmp_path / "m.lowbit")]) == 0
    assert "lsq" in capsys.readouterr().out
    data = lowbit.data.load_dataset("digits", seed=3)
    x = torch.stack([data.test[i][0] for i in range(32)])
    np.save(tmp_path / "x.npy", x.numpy())
    assert (
        main(
            [
                "run",
                str(tmp_path / "m.lowbit"),
                str(tmp_path / "x.npy"),
                "--top-k",
                "2",
                "--engine",
                "integer",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "integer engine" in out
    _, torch_model, _ = load_run(run)
    with torch.no_grad():
        expected = torch_model(x).argmax(1).tolist()
    for i, label in enumerate(expected):
        assert re.search(rf"x\.npy\[{i}\]\s*│\s*{label} \(", out), (i, label)
    assert main(["export", str(run), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0

    # The QAT phase started from the FP phase's best weights, which load_run rebuilds.
    _, model, _ = load_run(run)
    layers = [m for m in model.modules() if isinstance(m, lowbit.nn.QuantLinear)]
    assert len(layers) == 2
    saved, _ = load_checkpoint(final_checkpoint(run / "qat"))
    assert all(torch.equal(v, model_state(saved)[k]) for k, v in model.state_dict().items())


def test_invalid_experiment_fails_before_any_work(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    cases = [
        ({"train": {"epochs": 1, "lr": -1}}, "train.lr"),
        ({"pretrain": {"epoch": 1}}, "pretrain.epoch"),
        ({"quant": {"method": "lsq", "bits": 12}}, "bits"),
        ({"model": {"name": "resnet7"}}, "resnet7"),
        ({"data": {"name": "digits", "colour": 1}}, "data.colour"),
        ({"optimiser": "sgd"}, "optimiser"),
    ]
    for change, needle in cases:
        exp = write_experiment(tmp_path, **change)
        assert main(["train", str(exp), "--run-dir", str(run)]) == 2
        assert needle in capsys.readouterr().err
        assert not run.exists()


def test_set_overrides_and_packaged_default() -> None:
    exp = Experiment.load(None)
    assert exp.quant.name == "ttq"
    assert exp.model["name"] == "lenet5"
    assert exp.data["name"] == "mnist5k"
    with pytest.raises(ExperimentError, match="no experiment file"):
        Experiment.load("no-such-experiment")


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run / "qat" / "checkpoints" / "last")
    return model_state(tensors)


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    slow = {"pretrain": {**TINY["pretrain"], "epochs": 2}, "train": {**TINY["train"], "epochs": 8}}
    exp = write_experiment(tmp_path, **slow)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "train", str(exp), "--run-dir", str(straight)],
        check=True,
        env=env,
        capture_output=True,
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowbit.cli", "train", str(exp), "--run-dir", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = killed / "qat" / "checkpoints" / "last.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never reached its first QAT checkpoint"
    assert not (killed / "results.json").exists(), "killed too late: the run had finished"

    # Resumed in a process like the first (bitwise equality needs the same thread count).
    subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "train", "--resume", str(killed)],
        check=True,
        env=env,
        capture_output=True,
    )
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_experiment_files_are_valid(path: Path) -> None:
    exp = Experiment.load(path)
    assert exp.name == path.stem
