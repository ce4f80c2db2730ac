"""DDP under torchrun: comm hooks' codes and byte counts, identical ranks, consistent quantiser
state, 1- vs 2-process loss, and ``lowbit train`` / ``--resume`` under torchrun.

The multi-process tests launch real processes, ``python -m torch.distributed.run
--nproc_per_node 2`` (gloo on CPU), running this very file as the script (see ``__main__`` at
the bottom): the ``worker`` mode exercises the hooks on a raw DDP model and the Trainer on a
small quantised conv net, each rank saving what it saw; the ``cli`` mode runs ``lowbit train``
with an audit hook that records every file the rank writes. The checks here recompute everything
independently (numpy / plain torch) from what the ranks saved.
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from torch import nn

from lowbit.train import TrainConfig
from lowbit.train.comm import code_bits, pack_bits, stochastic_round, unpack_bits
from lowbit.train.config import CommConfig

METHODS = ("none", "fp16", "int8", "qsgd", "sign_ef")
QSGD = {"levels": 3, "chunk": 512}  # 3-bit codes (not byte aligned), several chunks per bucket
HOOK_STEPS = 3
EMA_DECAY = 0.99
TRAIN = {
    "epochs": 2,
    "batch_size": 64,
    "optimizer": "adam",
    "lr": 0.03,
    "schedule": "constant",
    "device": "cpu",
    "eval_every": 2,
}


# -- in-process: codes, rounding, config --------------------------------------------------------


def numpy_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Reference: bit j of code i is stream bit i * bits + j, little-endian within bytes."""
    stream = ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 70), seed=st.integers(0, 2**31))
def test_pack_bits_matches_a_numpy_reference_and_round_trips(bits: int, n: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 2**bits, n)
    packed = pack_bits(torch.from_numpy(codes), bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    np.testing.assert_array_equal(packed.numpy(), numpy_pack(codes, bits))
    np.testing.assert_array_equal(unpack_bits(packed, bits, n).numpy(), codes)


def test_code_bits_and_bad_levels() -> None:
    # 2 s + 1 codes: 3 -> 2 bits, 7 -> 3, 15 -> 4, 17 -> 5, 33 -> 6, 255 -> 8
    assert [code_bits(s) for s in (1, 3, 7, 8, 16, 127)] == [2, 3, 4, 5, 6, 8]
    for bad in (0, 128, 2.0, True):
        with pytest.raises(ValueError, match="levels"):
            code_bits(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 3)


def test_stochastic_rounding_is_unbiased_between_neighbours() -> None:
    y = torch.tensor([-2.75, -0.5, 0.0, 0.2, 3.0, 6.9])
    draws = torch.stack(
        [stochastic_round(y, torch.Generator().manual_seed(i)) for i in range(4000)]
    )
    assert bool(((draws == y.floor()) | (draws == y.ceil())).all())
    # mean of 4000 Bernoulli(p) draws: standard error <= 0.008
    np.testing.assert_allclose(draws.mean(0).numpy(), y.numpy(), atol=0.04)
    again = stochastic_round(y, torch.Generator().manual_seed(3))
    assert torch.equal(again, draws[3])  # the generator alone decides


@pytest.mark.parametrize(
    ("comm", "named"),
    [
        ({"method": "qsgd8"}, "train.comm.method"),
        ({"levels": 0}, "train.comm.levels"),
        ({"levels": 128}, "train.comm.levels"),
        ({"chunk": -1}, "train.comm.chunk"),
        ({"seed": 1.5}, "train.comm.seed"),
        ({"bits": 4}, "train.comm.bits"),
        (["qsgd"], "train.comm"),
    ],
)
def test_comm_config_errors_name_the_key(comm: Any, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        TrainConfig.from_dict({"comm": comm})


def test_comm_config_round_trips_and_accepts_a_method_name() -> None:
    config = TrainConfig.from_dict({"comm": {"method": "qsgd", "levels": 16}})
    assert config.comm == CommConfig(method="qsgd", levels=16)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TrainConfig.from_dict({"comm": "sign_ef"}).comm.method == "sign_ef"
    with pytest.raises(ValueError, match=r"pretrain\.comm\.method"):
        TrainConfig.from_dict({"comm": {"method": "x"}}, prefix="pretrain")


# -- launching ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, timeout: float = 120) -> str:
    """Run this file under torchrun with ``args``; its combined output (asserting success)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(free_port()), __file__, *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def tiny_qat_model() -> nn.Module:
    """Conv-BN-ReLU folded for fake-quant, per-channel LSQ weights, an LSQ input quantiser
    (its step and sign are set from the first batch it sees) and an affine EMA observer."""
    from lowbit import quantize

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    recipe = {
        "weights": {"method": "lsq", "bits": 4, "per_channel": True},
        "activations": {"method": "affine", "bits": 8, "ema_decay": EMA_DECAY},
        "first_layer": {"activations": {"method": "lsq", "bits": 8}},
        "fold_bn": True,
    }
    return quantize(model, recipe)


def train_tiny(method: str, run_dir: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Train :func:`tiny_qat_model` on digits with ``method``, recording the state at the start
    of every training forward (= after every step) and the observers' inputs."""
    from lowbit.data import load_dataset
    from lowbit.quant.affine import AffineActivation
    from lowbit.train import Trainer

    data = load_dataset("digits", seed=0)
    model = tiny_qat_model()
    seen: dict[str, Any] = {"states": [], "inputs": {}}

    def snapshot(module: nn.Module, _args: Any) -> None:
        if module.training:
            seen["states"].append({k: v.clone() for k, v in module.state_dict().items()})

    model.register_forward_pre_hook(snapshot)
    for name, module in model.named_modules():
        if isinstance(module, AffineActivation):
            seen["inputs"][name] = []

            def observe(m: nn.Module, args: Any, name: str = name) -> None:
                if m.training:
                    lo, hi = torch.aminmax(args[0].detach())
                    seen["inputs"][name].append((float(lo), float(hi)))

            module.register_forward_pre_hook(observe)
    config = {**TRAIN, "comm": {"method": method, **QSGD}}
    trainer = Trainer(model, data.train, data.val, config, run_dir, console=Console(quiet=True))
    summary = trainer.fit()
    seen["states"].append({k: v.clone() for k, v in model.state_dict().items()})
    return model, summary, seen


# -- the worker: hooks on a raw DDP model, then the Trainer ------------------------------------


def count_collectives(handed: list[int]) -> None:
    """Wrap ``dist.all_gather`` / ``dist.all_reduce`` to add the bytes of the tensor each rank
    hands over to ``handed[0]``."""
    import torch.distributed as dist

    for name, position in (("all_gather", 1), ("all_reduce", 0)):
        original = getattr(dist, name)

        def counting(*args: Any, _original: Any = original, _at: int = position, **kw: Any) -> Any:
            handed[0] += args[_at].nbytes
            return _original(*args, **kw)

        setattr(dist, name, counting)


def recording_hook(hook: Any, names: dict[int, str], handed: list[int], log: list) -> Any:
    """``hook``, recording per call: step, input bucket, parameter order, EF residual before and
    after, bytes the hook counted, bytes handed to collectives, and the averaged output."""

    def recording(state: Any, bucket):
        rec: dict[str, Any] = {
            "step": state.step,
            "grad": bucket.buffer().clone(),
            "names": [names[p.data_ptr()] for p in bucket.parameters()],
            "residual_before": state.residual(bucket).clone(),
        }
        counted, before = state.bytes_sent, handed[0]
        fut = hook(state, bucket)
        rec["counted"], rec["handed"] = state.bytes_sent - counted, handed[0] - before
        rec["residual_after"] = state.residual(bucket).clone()
        log.append(rec)

        def keep(f: Any) -> torch.Tensor:
            rec["out"] = f.value().clone()
            return f.value()

        return fut.then(keep)

    return recording


def hook_worker(out: Path) -> None:
    """Each rank trains a small MLP a few steps under DDP with every hook, and saves the log of
    :func:`recording_hook`."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lowbit.train import comm

    handed = [0]
    count_collectives(handed)
    rank = dist.get_rank()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
    records: dict[str, list[dict[str, Any]]] = {}
    for method in METHODS:
        model = copy.deepcopy(base)
        names = {p.data_ptr(): n for n, p in model.named_parameters()}
        ddp = DistributedDataParallel(model)
        state = comm.CommState(CommConfig(method=method, **QSGD))
        records[method] = []
        hook = recording_hook(comm.make_hook(state.config), names, handed, records[method])
        ddp.register_comm_hook(state, hook)
        for step in range(HOOK_STEPS):
            g = torch.Generator().manual_seed(100 * step + rank)
            x, y = torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)
            state.step = step
            ddp.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
        del ddp, hook
        gc.collect()  # the wrapper holds the process group; free it before exit
    torch.save(records, out / f"hooks{rank}.pt")


def trainer_worker(out: Path) -> None:
    import torch.distributed as dist

    rank = dist.get_rank()
    results = {}
    for method in METHODS:
        model, summary, seen = train_tiny(method, out / f"run-{method}")
        numel = sum(p.numel() for p in model.parameters())
        results[method] = {"summary": summary, "numel": numel, **seen}
    torch.save(results, out / f"trainer{rank}.pt")


_AUDIT: dict[str, Any] = {"installed": False, "root": None, "writes": []}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit(event: str, args: tuple) -> None:
    """Record file writes, directory creations, renames and removals under ``_AUDIT["root"]``."""
    path = args[0] if args else None
    if _AUDIT["root"] is None or not isinstance(path, str | bytes | os.PathLike):
        return
    if not os.path.abspath(os.fsdecode(path)).startswith(_AUDIT["root"] + os.sep):
        return
    opened = event == "open" and (
        any(c in (args[1] or "") for c in "wax+") or (args[2] or 0) & _WRITE_FLAGS
    )
    if opened or event in ("os.mkdir", "os.rename", "os.remove"):
        _AUDIT["writes"].append(f"{event} {os.fsdecode(path)}")


def run_cli(log: Path, run_dir: Path, argv: list[str]) -> int:
    """``lowbit train ARGV`` on this rank; the writes it made in ``run_dir`` go to
    ``<log>.rank<RANK>.json``."""
    from lowbit.cli import main

    if not _AUDIT["installed"]:
        sys.addaudithook(_audit)  # audit hooks cannot be removed: one for the process
        _AUDIT["installed"] = True
    _AUDIT["root"], _AUDIT["writes"] = str(run_dir.resolve()), []
    code = main(["train", *argv])
    _AUDIT["root"] = None
    Path(f"{log}.rank{os.environ['RANK']}.json").write_text(json.dumps(_AUDIT["writes"]))
    return code


def experiment_file(folder: Path) -> Path:
    """A tiny ``lowbit train`` experiment: LSQ MLP on digits, 2 epochs, fp16 gradients."""
    path = folder / "tiny.yaml"
    path.write_text(
        "name: tiny-ddp\n"
        "seed: 0\n"
        "device: cpu\n"
        "model: {name: mlp, hidden: [32]}\n"
        "data: {name: digits}\n"
        "quant: lsq\n"
        "train: {epochs: 2, batch_size: 64, optimizer: adam, lr: 0.005, schedule: constant,\n"
        "        comm: {method: fp16}}\n"
    )
    return path


def cli_worker(out: Path) -> None:
    """``lowbit train`` the tiny experiment twice: in full, and stopped after one epoch."""
    exp = str(out / "tiny.yaml")  # written by the test before the launch, read by every rank
    assert run_cli(out / "full", out / "full", [exp, "--run-dir", str(out / "full")]) == 0
    argv = [exp, "--run-dir", str(out / "cut"), "--set", "train.epochs=1"]
    assert run_cli(out / "cut", out / "cut", argv) == 0


# -- checks on what the ranks saved -------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    experiment_file(out)
    torchrun("worker", str(out))
    return out


@pytest.fixture(scope="module")
def hook_logs(worker_output: Path) -> list[dict[str, list[dict[str, Any]]]]:
    return [torch.load(worker_output / f"hooks{r}.pt") for r in (0, 1)]


@pytest.fixture(scope="module")
def trainer_logs(worker_output: Path) -> list[dict[str, dict[str, Any]]]:
    return [torch.load(worker_output / f"trainer{r}.pt") for r in (0, 1)]


def expected_bytes(method: str, n: int) -> int:
    """What one rank hands over for a bucket of n float32 values, from the format alone."""
    if method == "none":
        return 4 * n
    if method == "fp16":
        return 2 * n
    if method == "int8":  # one byte a value + a float32 scale
        return n + 4
    if method == "qsgd":  # 2 * 3 + 1 = 7 codes -> 3 bits; a float32 norm per 512 values
        return math.ceil(3 * n / 8) + 4 * math.ceil(n / 512)
    return math.ceil(n / 8) + 4  # sign bits + a float32 scale


def rounding_unit(method: str, g: torch.Tensor) -> torch.Tensor:
    """The per-value width of one rounding step of int8 / QSGD for the bucket ``g``."""
    if method == "int8":
        return torch.full_like(g, float(g.abs().max()) / 127)
    padded = torch.cat([g, g.new_zeros(-len(g) % 512)]).view(-1, 512)
    norms = padded.norm(dim=1, keepdim=True) / 3
    return norms.expand_as(padded).reshape(-1)[: len(g)]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_hooks_send_the_bytes_they_claim_and_average_correctly(
    hook_logs: list[dict[str, Any]], method: str
) -> None:
    ranks = [log[method] for log in hook_logs]
    assert len(ranks[0]) == len(ranks[1]) >= HOOK_STEPS
    for rec0, rec1 in zip(*ranks, strict=True):
        n = rec0["grad"].numel()
        for rec in (rec0, rec1):
            assert rec["counted"] == rec["handed"] == expected_bytes(method, n)
        assert torch.equal(rec0["out"], rec1["out"])  # every rank gets the same average
        mean = (rec0["grad"] + rec1["grad"]) / 2
        if method == "none":
            torch.testing.assert_close(rec0["out"], mean, rtol=1e-6, atol=1e-7)
        elif method == "fp16":  # each rank's g / 2 in float16, summed in float16
            halves = (rec0["grad"] / 2).half() + (rec1["grad"] / 2).half()
            torch.testing.assert_close(rec0["out"], halves.float())
        elif method in ("int8", "qsgd"):
            bound = (rounding_unit(method, rec0["grad"]) + rounding_unit(method, rec1["grad"])) / 2
            assert bool(((rec0["out"] - mean).abs() <= bound * (1 + 1e-5) + 1e-9).all())
            assert not torch.equal(rec0["out"], mean)  # it did quantise
        else:
            decoded = []
            for rec in (rec0, rec1):  # EF-SignSGD, recomputed: p = g + e, C(p) = mean|p| sign(p)
                p = rec["grad"].double() + rec["residual_before"].double()
                compressed = p.abs().mean() * (2 * (p >= 0).double() - 1)
                torch.testing.assert_close(rec["residual_after"].double(), p - compressed)
                decoded.append(compressed)
            torch.testing.assert_close(rec0["out"].double(), sum(decoded) / 2)


def per_parameter(rec: dict[str, Any], key: str) -> dict[str, torch.Tensor]:
    sizes = {"0.weight": 64 * 24, "0.bias": 24, "2.weight": 24 * 10, "2.bias": 10}
    parts = rec[key].split([sizes[n] for n in rec["names"]])
    return dict(zip(rec["names"], parts, strict=True))


@pytest.mark.slow
def test_error_feedback_residual_is_carried_between_steps(
    hook_logs: list[dict[str, Any]],
) -> None:
    for log in hook_logs:
        recs = log["sign_ef"]
        assert [r["step"] for r in recs] == list(range(HOOK_STEPS))
        assert not recs[0]["residual_before"].any()  # starts at zero
        # DDP re-orders the bucket after the first step: compare parameter by parameter
        assert recs[0]["names"] != recs[1]["names"]
        for before, after in itertools.pairwise(recs):
            carried, kept = (
                per_parameter(after, "residual_before"),
                per_parameter(before, "residual_after"),
            )
            for name, value in kept.items():
                assert value.abs().sum() > 0
                assert torch.equal(carried[name], value)
        assert not torch.equal(recs[1]["residual_after"], recs[2]["residual_after"])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_ranks_hold_identical_weights_and_statistics_after_every_step(
    trainer_logs: list[dict[str, Any]], method: str
) -> None:
    ranks = [log[method] for log in trainer_logs]
    steps = ranks[0]["summary"]["global_steps"]
    assert steps == 2 * math.ceil(math.ceil(1294 / 2) / 32)  # digits train split, 32 a rank
    assert len(ranks[0]["states"]) == len(ranks[1]["states"]) == steps + 1
    for s0, s1 in zip(ranks[0]["states"], ranks[1]["states"], strict=True):
        assert s0.keys() == s1.keys()
        for key in s0:
            assert torch.equal(s0[key], s1[key]), f"{method}: {key} differs across ranks"
    first, last = ranks[0]["states"][0], ranks[0]["states"][-1]
    assert bool(first["0.input_quant.initialized"])  # lazily set before the first step
    for key in ("0.conv.weight", "0.bn.running_mean", "5.input_quant.max_val"):
        assert not torch.equal(first[key], last[key])  # the state did move
    n = ranks[0]["numel"]  # one DDP bucket holds every gradient of this small model
    summary = ranks[0]["summary"]
    assert summary["comm_bytes_per_step"] == expected_bytes(method, n)
    assert summary["comm_ratio"] == pytest.approx(4 * n / expected_bytes(method, n))


@pytest.mark.slow
def test_observer_ranges_track_the_global_batch(trainer_logs: list[dict[str, Any]]) -> None:
    """EMA min/max after step t = EMA of the minimum (maximum) over both ranks' batches."""
    ranks = [log["none"] for log in trainer_logs]
    for name in ("5.input_quant",):
        lo = np.minimum(*[np.array([a for a, _ in r["inputs"][name]]) for r in ranks])
        hi = np.maximum(*[np.array([b for _, b in r["inputs"][name]]) for r in ranks])
        ema_lo, ema_hi = lo[0], hi[0]
        for t, state in enumerate(ranks[0]["states"][1:]):
            if t > 0:
                ema_lo = EMA_DECAY * ema_lo + (1 - EMA_DECAY) * lo[t]
                ema_hi = EMA_DECAY * ema_hi + (1 - EMA_DECAY) * hi[t]
            for key, ema in (("min_val", ema_lo), ("max_val", ema_hi)):
                assert float(state[f"{name}.{key}"]) == pytest.approx(ema, rel=1e-5, abs=1e-7)
    # the ranks did see different ranges (a mean over ranks would not pass the check above)
    ranges = [np.array(r["inputs"]["5.input_quant"]) for r in ranks]
    assert np.abs(ranges[0][:, 1] - ranges[1][:, 1]).mean() > 0.01


def last_train_loss(run_dir: Path) -> float:
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    return float(rows[-1].split(",")[1])


@pytest.mark.slow
def test_one_and_two_processes_reach_comparable_loss(
    worker_output: Path, trainer_logs: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Same global batch and schedule; the runs differ in data order and per-rank BatchNorm.

    The last epoch's mean training loss (21 batches) is compared tightly; the loss on the 144
    validation images varies by about 20% between seeds of one process, hence the wider margin.
    """
    two = trainer_logs[0]["none"]["summary"]
    _, one, _ = train_tiny("none", tmp_path)
    assert one["global_steps"] == math.ceil(1294 / 64) * 2 == two["global_steps"]
    losses = {
        "val": (one["final_val_loss"], two["final_val_loss"]),
        "train": (last_train_loss(tmp_path), last_train_loss(worker_output / "run-none")),
    }
    for (single, double), margin in zip(losses.values(), (0.3, 0.1), strict=True):
        assert max(single, double) < 0.75 * math.log(10)  # both learned (chance: ln 10)
        assert abs(double - single) < margin * single


# -- lowbit train under torchrun ----------------------------------------------------------------


def writes(log: Path) -> dict[int, list[str]]:
    return {r: json.loads(Path(f"{log}.rank{r}.json").read_text()) for r in (0, 1)}


@pytest.mark.slow
def test_lowbit_train_runs_under_torchrun_and_only_rank_0_writes(worker_output: Path) -> None:
    seen = writes(worker_output / "full")
    assert seen[1] == [] and any("checkpoints" in w for w in seen[0])
    results = json.loads((worker_output / "full" / "results.json").read_text())
    assert results["qat"]["world_size"] == 2 and results["qat"]["comm_method"] == "fp16"
    assert results["qat"]["comm_ratio"] == 2.0
    rows = (worker_output / "full" / "qat" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]  # one row an epoch, not two


@pytest.mark.slow
def test_resume_under_torchrun_matches_the_uninterrupted_run(worker_output: Path) -> None:
    """The run stopped after epoch 1 and resumed by ``lowbit train --resume`` ends with bitwise
    the weights of the uninterrupted run (fp16 all-reduce; seeded sampler order)."""
    from lowbit.train import load_checkpoint

    cut = worker_output / "cut"
    for name in ("results.json", "qat/metrics.json"):
        (cut / name).unlink()  # as if killed after the epoch-1 checkpoint
    log = worker_output / "resume"
    torchrun("cli", str(log), str(cut), "--resume", str(cut), "--set", "train.epochs=2")
    seen = writes(log)
    assert seen[1] == [] and seen[0]
    rows = (cut / "qat" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    ours, meta = load_checkpoint(cut / "qat" / "checkpoints" / "last")
    theirs, _ = load_checkpoint(worker_output / "full" / "qat" / "checkpoints" / "last")
    assert meta["epoch"] == 2
    for key in [k for k in theirs if k.startswith("model/")]:
        assert torch.equal(ours[key], theirs[key]), key


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, target = sys.argv[1], Path(sys.argv[2])
    if mode == "worker":
        from lowbit.train import distributed

        distributed.setup(torch.device("cpu"))
        hook_worker(target)
        trainer_worker(target)
        cli_worker(target)
    else:  # cli LOG RUN_DIR ARGV...
        sys.exit(run_cli(target, Path(sys.argv[3]), sys.argv[4:]))
