"""Checkpoints: atomic safetensors + JSON pairs, corruption detection, state round trips."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.train import (
    CheckpointError,
    capture_training_state,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from lowbit.train.checkpoint import join_tensors, split_tensors


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g),
        "scalar": torch.tensor(2.5),
        "flags": torch.tensor([True, False, True]),
        "bytes": torch.arange(7, dtype=torch.uint8),
        "steps": torch.tensor(12, dtype=torch.int64),
        "half": torch.randn(5, generator=g).to(torch.bfloat16),
        "strided": torch.randn(4, 6, generator=g).t(),  # non-contiguous view
    }


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# -- save / load ----------------------------------------------------------------------------------


def test_round_trip_keeps_tensors_and_meta(tmp_path: Path) -> None:
    tensors = sample_tensors()
    meta = {"epoch": 3, "best": None, "lr": 0.1, "nested": {"a": [1, 2.5, "x"]}}
    save_checkpoint(tmp_path / "last", tensors, meta)
    assert files_in(tmp_path) == ["last.json", "last.safetensors"]
    loaded, loaded_meta = load_checkpoint(tmp_path / "last")
    assert_same_tensors(loaded, {k: v.contiguous() for k, v in tensors.items()})
    assert loaded_meta == meta
    record = json.loads((tmp_path / "last.json").read_text())
    payload = (tmp_path / "last.safetensors").read_bytes()
    assert record["payload"]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert record["payload"]["bytes"] == len(payload)
    assert not payload.startswith(b"\x80")  # a pickle stream starts with PROTO 0x80


def test_unserialisable_meta_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "last", sample_tensors(), {"bad": object()})
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("fail_on", ["fsync", "write"])
def test_crash_inside_write_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str
) -> None:
    old = sample_tensors()
    save_checkpoint(tmp_path / "last", old, {"epoch": 1})
    before = {name: digest(tmp_path / name) for name in files_in(tmp_path)}

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("simulated crash")

    if fail_on == "fsync":
        monkeypatch.setattr(os, "fsync", crash)
    else:  # the payload file is half written when the crash comes
        real_open = open

        class HalfWriter:
            def __init__(self, f: object) -> None:
                self.f = f

            def __enter__(self) -> HalfWriter:
                return self

            def __exit__(self, *exc: object) -> None:
                self.f.close()  # type: ignore[attr-defined]

            def write(self, data: bytes) -> None:
                self.f.write(data[: len(data) // 2])  # type: ignore[attr-defined]
                raise OSError("simulated crash")

        def half_open(file: object, mode: str = "r", *a: object, **k: object) -> object:
            f = real_open(file, mode, *a, **k)  # type: ignore[call-overload]
            return HalfWriter(f) if "w" in mode else f

        monkeypatch.setattr("builtins.open", half_open)
    new = {k: v + 1 if v.is_floating_point() else v for k, v in old.items()}
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path / "last", new, {"epoch": 2})
    monkeypatch.undo()
    assert files_in(tmp_path) == ["last.json", "last.safetensors"]  # no stray temp files
    assert {name: digest(tmp_path / name) for name in files_in(tmp_path)} == before
    tensors, meta = load_checkpoint(tmp_path / "last")
    assert meta == {"epoch": 1}
    assert torch.equal(tensors["w"], old["w"])


def test_torn_pair_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the two renames: new payload beside the old JSON."""
    save_checkpoint(tmp_path / "last", sample_tensors(), {"epoch": 1})
    real_replace = os.replace
    calls = []

    def replace_then_crash(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace_then_crash)
    changed = {"w": torch.zeros(2, 2)}
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "last", changed, {"epoch": 2})
    monkeypatch.undo()
    assert files_in(tmp_path) == ["last.json", "last.safetensors"]
    with pytest.raises(CheckpointError, match=r"last\.safetensors"):
        load_checkpoint(tmp_path / "last")


def corrupt_payload_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: corrupt_payload_byte(d / "last.safetensors", 100), "last.safetensors"),
        (lambda d: (d / "last.safetensors").write_bytes(b"short"), "last.safetensors"),
        (lambda d: (d / "last.safetensors").unlink(), "last.safetensors"),
        (lambda d: (d / "last.json").write_text('{"format": "lowbit-chec'), "last.json"),
        (lambda d: (d / "last.json").write_text("[1, 2]"), "last.json"),
        (lambda d: (d / "last.json").unlink(), "last.json"),
    ],
    ids=["flipped-byte", "truncated", "missing-payload", "torn-json", "foreign-json", "no-json"],
)
def test_damaged_checkpoint_is_refused_and_neighbour_untouched(
    tmp_path: Path, damage: object, named: str
) -> None:
    save_checkpoint(tmp_path / "best", sample_tensors(), {"epoch": 1})
    save_checkpoint(tmp_path / "last", sample_tensors(), {"epoch": 2})
    good = {name: digest(tmp_path / name) for name in ("best.json", "best.safetensors")}
    damage(tmp_path)  # type: ignore[operator]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "last")
    assert str(tmp_path / named) in str(info.value)
    assert {name: digest(tmp_path / name) for name in good} == good
    assert load_checkpoint(tmp_path / "best")[1] == {"epoch": 1}


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "last", sample_tensors(), {})
    record = json.loads((tmp_path / "last.json").read_text())
    record["version"] = 99
    (tmp_path / "last.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"last\.json.*version 99"):
        load_checkpoint(tmp_path / "last")


@settings(max_examples=40, deadline=None)
@given(position=st.integers(min_value=0, max_value=10**6))
def test_any_flipped_payload_byte_is_detected(
    tmp_path_factory: pytest.TempPathFactory, position: int
) -> None:
    d = tmp_path_factory.mktemp("flip")
    save_checkpoint(d / "c", sample_tensors(), {"epoch": 1})
    corrupt_payload_byte(d / "c.safetensors", position)
    with pytest.raises(CheckpointError, match=r"c\.safetensors"):
        load_checkpoint(d / "c")


# -- nested state <-> (JSON, tensors) -------------------------------------------------------------


def test_split_and_join_tensors_round_trip() -> None:
    state = {"a": torch.ones(2), "b": [1, (torch.zeros(()), "x")], "c": {"d": None, "e": 0.5}}
    tensors: dict[str, torch.Tensor] = {}
    flat = split_tensors(state, "root", tensors)
    assert sorted(tensors) == ["root/a", "root/b/1/0"]
    json.dumps(flat)  # JSON-serialisable
    back = join_tensors(json.loads(json.dumps(flat)), tensors)
    assert back["b"][0] == 1 and back["b"][1][1] == "x" and back["c"] == {"d": None, "e": 0.5}
    assert back["a"] is tensors["root/a"] and back["b"][1][0] is tensors["root/b/1/0"]


# -- training state round trips -------------------------------------------------------------------


def make_run(kind: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.3), nn.Linear(7, 2))
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    elif kind == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    return model, opt, sched


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, sched: object, n: int) -> None:
    """Steps that draw from the global torch RNG (data and dropout) and from numpy/random."""
    for _ in range(n):
        x = torch.randn(8, 5) + float(np.random.rand()) + random.random()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_training_state_round_trip_continues_identically(tmp_path: Path, kind: str) -> None:
    model, opt, sched = make_run(kind, seed=0)
    train_steps(model, opt, sched, 3)
    tensors, meta = capture_training_state(model, opt, sched, epoch=4, best=None)
    save_checkpoint(tmp_path / "ck", tensors, meta)
    train_steps(model, opt, sched, 4)  # the uninterrupted run goes on

    other, other_opt, other_sched = make_run(kind, seed=1)  # different initial weights
    torch.manual_seed(123)  # scramble every RNG; the checkpoint must restore them
    np.random.seed(123)
    random.seed(123)
    loaded, loaded_meta = load_checkpoint(tmp_path / "ck")
    counters = restore_training_state(loaded, loaded_meta, other, other_opt, other_sched)
    assert counters == {"epoch": 4, "best": None}
    assert other_sched.last_epoch == 3  # type: ignore[attr-defined]
    train_steps(other, other_opt, other_sched, 4)

    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert other_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other_opt.state[q][key]))


def test_non_tensor_model_state_is_refused_by_name() -> None:
    class DictState(nn.Linear):
        def get_extra_state(self) -> dict:
            return {"calls": 3}

    model = nn.Sequential(nn.Tanh(), DictState(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    with pytest.raises(TypeError, match=r"'1\._extra_state' is a dict"):
        capture_training_state(model, opt, sched)


def test_rng_states_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    torch.randn(3), np.random.randn(2), random.random()  # advance away from a seed point
    model, opt, sched = make_run("sgd", 0)
    save_checkpoint(tmp_path / "ck", *capture_training_state(model, opt, sched))

    def draws() -> tuple[torch.Tensor, np.ndarray, float, float]:
        return torch.randn(4), np.random.randn(4), random.random(), random.gauss(0, 1)

    expected = draws()
    draws()
    restore_training_state(*load_checkpoint(tmp_path / "ck"), model, opt, sched)
    got = draws()
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]
