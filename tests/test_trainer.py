"""Trainer: config checks, schedule, optimizer groups, logs, resume (also after SIGKILL), NaN."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import TensorDataset

from lowbit.train import CheckpointError, TrainConfig, Trainer, TrainingDiverged, load_checkpoint
from lowbit.train.optim import build_optimizer, build_scheduler

# -- config -------------------------------------------------------------------------------------


def test_config_defaults_and_dict_round_trip() -> None:
    config = TrainConfig()
    assert config.schedule == "cosine" and config.amp is False and config.grad_clip is None
    d = json.loads(json.dumps(TrainConfig(schedule="step", step_milestones=(2, 5)).to_dict()))
    assert TrainConfig.from_dict(d) == TrainConfig(schedule="step", step_milestones=(2, 5))


def test_unknown_key_is_named_with_the_valid_keys() -> None:
    with pytest.raises(ValueError, match=r"train\.lrr") as info:
        TrainConfig.from_dict({"lr": 0.1, "lrr": 0.2})
    for key in ("lr", "batch_size", "checkpoint_every"):
        assert key in str(info.value)
    with pytest.raises(ValueError, match=r"recipe\.train\.nope"):
        TrainConfig.from_dict({"nope": 1}, prefix="recipe.train")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epochs", 0),
        ("epochs", 2.5),
        ("epochs", True),
        ("batch_size", "32"),
        ("optimizer", "rmsprop"),
        ("lr", -0.1),
        ("lr", float("nan")),
        ("momentum", 1.5),
        ("nesterov", 1),
        ("weight_decay", -1e-4),
        ("schedule", "linear"),
        ("warmup_epochs", -1),
        ("step_milestones", [3, 2]),
        ("step_milestones", "3"),
        ("step_gamma", 0.0),
        ("seed", -1),
        ("device", "tpu"),
        ("device", "cuda:x"),
        ("amp", "yes"),
        ("grad_clip", 0),
        ("num_workers", -2),
        ("eval_every", 0),
        ("checkpoint_every", 1.0),
    ],
)
def test_bad_value_is_named_with_key_and_value(key: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict({key: value})
    message = str(info.value)
    assert f"train.{key}" in message and repr(value) in message


@pytest.mark.parametrize(
    ("d", "named"),
    [
        ({"epochs": 3, "warmup_epochs": 3}, "train.warmup_epochs"),
        ({"schedule": "step"}, "train.step_milestones"),
        ({"momentum": 0.0, "nesterov": True}, "train.nesterov"),
        ({"amp": True, "device": "cpu"}, "train.amp"),
    ],
)
def test_inconsistent_combinations_are_named(d: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        TrainConfig.from_dict(d)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal of amp")
def test_amp_without_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match=r"train\.amp"):
        TrainConfig(amp=True).resolve_device()


# -- tiny problems ------------------------------------------------------------------------------


class Clip(nn.Module):
    """PACT-like ``min(relu(x), alpha)`` with an L2 ``regularization()`` on alpha, plus a 0-d
    ``wp`` buffer-free scale so that several scale names are exercised."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(2.0))
        self.wp = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.relu(x), self.alpha) * self.wp

    def regularization(self) -> torch.Tensor:
        return 1e-3 * self.alpha**2


class Noisy(nn.Module):
    """Adds training noise from a generator the module owns (like a stochastic quantiser); its
    state travels in the state dict through ``get_extra_state`` as a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(99)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x + 0.1 * torch.randn(x.shape, generator=self.generator)

    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), Clip(), nn.Dropout(0.2), Noisy(), nn.Linear(16, 3))


def teacher_data(n: int, seed: int = 0) -> TensorDataset:
    """Inputs (drawn from ``seed``) labelled by one fixed random linear teacher."""
    teacher = torch.randn(6, 3, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def config(**kw: object) -> TrainConfig:
    base = {"epochs": 4, "batch_size": 16, "lr": 0.05, "device": "cpu", "weight_decay": 1e-3}
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- schedule and optimizer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        # 3 steps/epoch, 4 epochs = 12 steps; warm-up 1 epoch: (i+1)/3, then cosine over 9 steps
        (
            {"schedule": "cosine", "warmup_epochs": 1},
            [1 / 3, 2 / 3, 1] + [(1 + np.cos(np.pi * t / 9)) / 2 for t in range(9)],
        ),
        ({"schedule": "cosine"}, [(1 + np.cos(np.pi * t / 12)) / 2 for t in range(12)]),
        (
            {"schedule": "step", "step_milestones": (1, 3), "step_gamma": 0.5},
            [1] * 3 + [0.5] * 6 + [0.25] * 3,
        ),
        ({"schedule": "constant", "warmup_epochs": 2}, [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1]),
    ],
)
def test_lr_schedule_per_step(kw: dict, expected: list[float]) -> None:
    cfg = config(**kw)
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=3)
    seen = []
    for _ in expected:
        seen.append(opt.param_groups[0]["lr"] / cfg.lr)
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, expected, rtol=1e-12, atol=1e-15)


def test_quantizer_scales_get_no_weight_decay() -> None:
    model = make_model()
    opt = build_optimizer(model, config(optimizer="adamw", weight_decay=0.3))
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    clip = model[1]
    assert decay[id(clip.alpha)] == 0.0 and decay[id(clip.wp)] == 0.0
    assert decay[id(model[0].weight)] == 0.3 and decay[id(model[4].bias)] == 0.3
    assert len(decay) == len(list(model.parameters()))


class Penalised(nn.Module):
    """``alpha`` appears only in ``regularization() = lam/2 * alpha^2`` (PACT's L2)."""

    def __init__(self, lam: float) -> None:
        super().__init__()
        self.lam = lam
        self.alpha = nn.Parameter(torch.tensor(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def regularization(self) -> torch.Tensor:
        return self.lam / 2 * self.alpha**2


def test_regularization_is_added_and_scales_skip_weight_decay(tmp_path: Path) -> None:
    """With plain SGD, alpha's only gradient is lam * alpha: alpha_T = alpha_0 (1 - lr lam)^T.
    If weight decay reached alpha the factor would be (1 - lr (lam + wd))."""
    lam, lr, wd = 0.2, 0.1, 0.5
    model = nn.Sequential(nn.Linear(6, 3), Penalised(lam))
    cfg = config(epochs=3, lr=lr, momentum=0.0, weight_decay=wd, schedule="constant")
    data = teacher_data(64)
    Trainer(model, data, data, cfg, tmp_path, console=quiet()).fit()
    steps_per_epoch = 4
    lines = (tmp_path / "scalars.jsonl").read_text().splitlines()
    got = [json.loads(line)["1.alpha"] for line in lines]
    expected = [3.0 * (1 - lr * lam) ** (e * steps_per_epoch) for e in (1, 2, 3)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert float(model[1].alpha.detach()) == pytest.approx(expected[-1], rel=1e-5)


# -- fit ------------------------------------------------------------------------------------------


class EpochAwareData(TensorDataset):
    """Records ``set_epoch`` calls and which sample indices each epoch read, in order."""

    def __init__(self, base: TensorDataset) -> None:
        super().__init__(*base.tensors)
        self.epoch = 0
        self.order: dict[int, list[int]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order[epoch] = []

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        self.order[self.epoch].append(i)
        return super().__getitem__(i)


def test_short_fit_learns_and_writes_logs(tmp_path: Path) -> None:
    train, val, test = teacher_data(256, seed=0), teacher_data(128, seed=1), teacher_data(64, 2)
    console = quiet()
    cfg = config(epochs=4, lr=0.1, warmup_epochs=1)
    summary = Trainer(make_model(), train, val, cfg, tmp_path, test_set=test, console=console).fit()
    rows = read_csv(tmp_path / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert list(rows[0]) == [
        "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
        "epoch_time_s", "step_time_ms",
    ]  # fmt: skip
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < 0.7 * losses[0]
    assert float(rows[-1]["val_acc"]) > 0.6  # chance is 1/3
    assert json.loads((tmp_path / "metrics.json").read_text()) == summary
    assert summary["epochs"] == 4 and summary["global_steps"] == 4 * 16
    assert summary["final_val_acc"] == pytest.approx(float(rows[-1]["val_acc"]))
    assert summary["best_val_acc"] == max(float(r["val_acc"]) for r in rows)
    assert 0 <= summary["test_acc"] <= 1 and summary["mean_step_time_ms"] > 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    scalars = [json.loads(s) for s in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert [s["epoch"] for s in scalars] == [1, 2, 3, 4]
    assert set(scalars[0]) == {"epoch", "1.alpha", "1.wp"}
    assert "epoch 4/4" in console.file.getvalue()  # type: ignore[attr-defined]
    best_meta = load_checkpoint(tmp_path / "checkpoints" / "best")[1]
    assert best_meta["epoch"] == summary["best_epoch"]


def test_evaluate_matches_a_direct_computation(tmp_path: Path) -> None:
    data = teacher_data(50)
    model = make_model()
    model.train()
    trainer = Trainer(model, data, data, config(batch_size=16), tmp_path, console=quiet())
    got = trainer.evaluate(data)
    assert model.training  # mode restored
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert got["loss"] == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-5)
    assert got["acc"] == pytest.approx(float((out.argmax(1) == y).double().mean()))


def test_epoch_order_depends_only_on_seed_and_epoch(tmp_path: Path) -> None:
    short, long = EpochAwareData(teacher_data(40)), EpochAwareData(teacher_data(40))
    val = teacher_data(8)
    Trainer(make_model(), short, val, config(epochs=2), tmp_path / "a", console=quiet()).fit()
    # another history (no dropout drawing from the global RNG, other lr and epochs)
    cfg = config(epochs=3, lr=0.3)
    Trainer(nn.Linear(6, 3), long, val, cfg, tmp_path / "b", console=quiet()).fit()
    assert sorted(short.order) == [1, 2] and sorted(long.order) == [1, 2, 3]
    assert short.order[2] == long.order[2] and short.order[1] == long.order[1]
    assert short.order[1] != short.order[2] and sorted(short.order[1]) == list(range(40))


# -- resume ---------------------------------------------------------------------------------------


class StopAfter:
    """Simulates an interruption: raises after epoch ``n``'s checkpoint is written."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        if epoch == self.n:
            raise KeyboardInterrupt


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def logged_numbers(run_dir: Path) -> list[dict[str, str]]:
    drop = ("epoch_time_s", "step_time_ms")
    return [
        {k: v for k, v in r.items() if k not in drop} for r in read_csv(run_dir / "metrics.csv")
    ]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_gives_bitwise_identical_weights(tmp_path: Path, optimizer: str) -> None:
    data = EpochAwareData(teacher_data(96))
    cfg = config(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01, warmup_epochs=1)
    full = make_model()
    Trainer(full, data, data, cfg, tmp_path / "full", console=quiet()).fit()

    first = make_model()
    run = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        Trainer(first, data, data, cfg, run, console=quiet(), callbacks=[StopAfter(2)]).fit()
    assert load_checkpoint(run / "checkpoints" / "last")[1]["epoch"] == 2
    with open(run / "metrics.csv", "a") as f:  # as if killed after logging epoch 3, before its
        f.write("3,9,9,9,9,9,9,9\n")  # checkpoint: resume must drop these lines
    with open(run / "scalars.jsonl", "a") as f:
        f.write('{"epoch": 3, "1.alpha": 9}\n')
    second = make_model(seed=7)  # new objects, other initial weights
    summary = Trainer(second, data, data, cfg, run, console=quiet()).fit(resume=True)

    assert_same_state(full, second)
    assert summary["epochs"] == 4 and summary["global_steps"] == 4 * 6
    assert logged_numbers(run) == logged_numbers(tmp_path / "full")
    scalars = (run / "scalars.jsonl").read_text()
    assert scalars == (tmp_path / "full" / "scalars.jsonl").read_text()


def test_resume_without_checkpoint_is_an_error(tmp_path: Path) -> None:
    data = teacher_data(16)
    trainer = Trainer(make_model(), data, data, config(), tmp_path, console=quiet())
    with pytest.raises(FileNotFoundError, match=r"last\.json"):
        trainer.fit(resume=True)


def test_resume_refuses_a_corrupt_checkpoint(tmp_path: Path) -> None:
    data = teacher_data(16)
    Trainer(make_model(), data, data, config(epochs=1), tmp_path, console=quiet()).fit()
    payload = tmp_path / "checkpoints" / "last.safetensors"
    data_bytes = payload.read_bytes()
    payload.write_bytes(data_bytes[:-1] + bytes([data_bytes[-1] ^ 1]))
    trainer = Trainer(make_model(), data, data, config(epochs=2), tmp_path, console=quiet())
    with pytest.raises(CheckpointError, match=r"last\.safetensors"):
        trainer.fit(resume=True)


KILL_SCRIPT = """
import io, sys, time
from pathlib import Path
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import TensorDataset
from lowbit.train import TrainConfig, Trainer


def build(run_dir, callbacks=()):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    data = TensorDataset(x, (x @ torch.randn(6, 3, generator=g)).argmax(dim=1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    cfg = TrainConfig(epochs=4, batch_size=16, optimizer="adam", lr=1e-2, weight_decay=1e-3,
                      warmup_epochs=1, device="cpu")
    console = Console(file=io.StringIO())
    return Trainer(model, data, data, cfg, Path(run_dir), console=console, callbacks=callbacks)


class Slow:
    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch >= 2:
            time.sleep(60)  # the test kills us here, long before this ends


if __name__ == "__main__":
    build(sys.argv[1], callbacks=[Slow()]).fit()
"""


def checkpoint_epoch(run_dir: Path) -> int:
    meta = run_dir / "checkpoints" / "last.json"
    return json.loads(meta.read_text())["meta"]["epoch"] if meta.exists() else 0


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    script = tmp_path / "train_script.py"
    script.write_text(KILL_SCRIPT)
    run = tmp_path / "killed"
    log = open(tmp_path / "stderr.txt", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, str(script), str(run)], stderr=log, env=os.environ)
    try:
        deadline = time.monotonic() + 120
        while checkpoint_epoch(run) < 2:
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "no epoch-2 checkpoint within 120 s"
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert checkpoint_epoch(run) == 2

    spec = importlib.util.spec_from_file_location("lowbit_kill_script", script)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    resumed = module.build(run)
    resumed.fit(resume=True)
    full = module.build(tmp_path / "full")
    full.fit()
    assert_same_state(full.model, resumed.model)
    assert logged_numbers(run) == logged_numbers(tmp_path / "full")


# -- divergence -----------------------------------------------------------------------------------


class PoisonAfter:
    """After epoch ``n`` (checkpoint already written) puts a NaN into the first layer."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.saved: dict[str, bytes] = {}

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        if epoch == self.n:
            for f in trainer.checkpoint_dir.iterdir():
                self.saved[f.name] = f.read_bytes()
            with torch.no_grad():
                trainer.model[0].weight[0, 0] = math.nan


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    data = teacher_data(64)
    poison = PoisonAfter(1)
    trainer = Trainer(
        make_model(), data, data, config(), tmp_path, console=quiet(), callbacks=[poison]
    )
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 1\b") as info:
        trainer.fit()
    assert (info.value.epoch, info.value.step) == (2, 1)
    ckpt = trainer.checkpoint_dir
    assert {f.name: f.read_bytes() for f in ckpt.iterdir()} == poison.saved
    tensors, meta = load_checkpoint(ckpt / "last")
    assert meta["epoch"] == 1
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model/"))
    assert [r["epoch"] for r in read_csv(tmp_path / "metrics.csv")] == ["1"]
