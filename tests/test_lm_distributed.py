"""A BitNet language model trained on 2 gloo ranks: ``lowbit train`` under torchrun (DDP), and
FSDP2 (``fully_shard``) on the quantised model, this file being the torchrun script for the
latter (``__main__`` at the bottom).

GPU commands (see docs/distributed.md): ``torchrun --nproc_per_node N -m lowbit.cli train
pydoc-llama-bitnet --run-dir RUN --device cuda``; FSDP2: :func:`lowbit.train.lm.fully_shard_lm`
after ``quantize`` on a ``cuda`` device mesh, as in :func:`fsdp_worker`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

import lowbit
from lowbit.cli import main
from lowbit.models import create_model
from lowbit.train.lm import fully_shard_lm, lm_loss

EXPERIMENT = {
    "name": "tiny-lm-ddp",
    "seed": 0,
    "device": "cpu",
    "model": {"name": "llama", "dim": 32, "n_layers": 2, "n_heads": 2},
    "quant": "bitnet",
    "train": {
        "epochs": 2,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.01,
        "grad_clip": 1.0,
        "schedule": "constant",
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_bitnet_lm_training_matches_one_process(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x + {i % 7}\n" for i in range(200)))
    exp = tmp_path / "exp.yaml"
    data = {"name": "text", "path": str(corpus), "seq_len": 32}
    exp.write_text(yaml.safe_dump({**EXPERIMENT, "data": data}))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(exp), "--run-dir", str(one)]) == 0
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "lowbit.cli", "train", str(exp),
        "--run-dir", str(two),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    single = json.loads((one / "results.json").read_text())
    double = json.loads((two / "results.json").read_text())
    # the same global batch and steps; the ranks' shuffles differ from one process's
    assert double["qat"]["global_steps"] == single["qat"]["global_steps"]
    for r in (single, double):
        assert r["test_bpb"] < 0.6 * 8  # both learned (uniform bytes: 8 bits)
    assert abs(double["test_bpb"] - single["test_bpb"]) < 0.1 * single["test_bpb"]
    assert math.isfinite(double["qat"]["test"]["acc"])


FSDP_STEPS = 3


def tiny_bitnet_lm() -> torch.nn.Module:
    model = create_model("llama", 256, (16,), seed=0, dim=32, n_layers=2, n_heads=2)
    return lowbit.quantize(model, "bitnet")


def batch() -> torch.Tensor:
    return torch.randint(0, 256, (8, 17), generator=torch.Generator().manual_seed(0))


def train_steps(model: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """A few AdamW steps on ``x``; the mean loss of each step over all ranks."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    losses = []
    for _ in range(FSDP_STEPS):
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        value = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(value)
            value /= dist.get_world_size()
        losses.append(float(value))
    return losses


def fsdp_worker(out: Path) -> None:
    """Each rank trains its half of the batch under FSDP2; rank 0 saves the losses."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = fully_shard_lm(tiny_bitnet_lm())
    losses = train_steps(model, batch()[rank::world])
    if rank == 0:
        out.write_text(json.dumps(losses))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_on_a_bitnet_lm_matches_one_process(tmp_path: Path) -> None:
    out = tmp_path / "losses.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), __file__, "fsdp", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    sharded = json.loads(out.read_text())
    reference = train_steps(tiny_bitnet_lm(), batch())  # one process, the whole batch
    assert sharded == pytest.approx(reference, rel=1e-5)
    assert reference[-1] < reference[0]


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp"]:
    fsdp_worker(Path(sys.argv[2]))
