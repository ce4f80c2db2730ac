"""A BitNet language model trained data-parallel: ``lowbit train`` under torchrun, 2 gloo ranks.

The GPU command is the same with ``device: cuda`` (see docs/distributed.md):
``torchrun --nproc_per_node N -m lowbit.cli train pydoc-llama-bitnet --run-dir RUN``.
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
import yaml

from lowbit.cli import main

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
