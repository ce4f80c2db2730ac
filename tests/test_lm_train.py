"""Text data, language-model training through ``lowbit train``/``eval``/``compare``, sampling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

import lowbit
import lowbit.cli
from lowbit.cli import main
from lowbit.data import TokenWindows, load_dataset
from lowbit.data.text import pydoc_documents, split_documents
from lowbit.models import create_model
from lowbit.train import Trainer
from lowbit.train.checkpoint import load_checkpoint
from lowbit.train.experiment import Experiment, ExperimentError, packaged_experiments
from lowbit.train.lm import generate, lm_loss, lm_metrics

# A small corpus with structure a tiny model learns in a few steps.
LINES = [f"def f{i}(x):\n    return x + {i % 7}\n" for i in range(200)]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for k in range(10):
        (folder / f"doc{k}.txt").write_text("".join(LINES[20 * k : 20 * (k + 1)]))
    return folder


# ----------------------------------------------------------------------------- data
def test_pydoc_split_is_fixed_document_level_and_balanced() -> None:
    a = load_dataset("pydoc", seq_len=64, seed=0)
    b = load_dataset("pydoc", seq_len=64, seed=5)
    streams = [d.tokens for d in (a.train, a.val, a.test)]
    for x, y in zip(streams, (b.train.tokens, b.val.tokens, b.test.tokens), strict=True):
        assert torch.equal(x, y)  # the seed never moves documents between splits
    sizes = [s.numel() for s in streams]
    total = sum(len(t) for _, t in pydoc_documents())
    assert sum(sizes) == total + 2 * (len(pydoc_documents()) - 3)  # blank lines between docs
    assert 0.07 < sizes[1] / total < 0.13 and 0.07 < sizes[2] / total < 0.13
    docs = dict(pydoc_documents())
    val_text = bytes(a.val.tokens.tolist())
    in_val = [k for k, t in docs.items() if t in val_text]
    assert in_val and all(docs[k] not in bytes(a.train.tokens.tolist()) for k in in_val)
    assert a.num_classes == 256 and a.in_shape == (64,)


def test_split_documents_meets_the_shares() -> None:
    docs = [(f"d{i}", bytes([65 + i % 26]) * (10 + i)) for i in range(100)]
    train, val, test = split_documents(docs, 0.1)
    total = sum(len(t) for _, t in docs)
    for part, share in ((train, 0.8), (val, 0.1), (test, 0.1)):
        content = len(part) - 2 * part.count(b"\n\n")
        assert abs(content - share * total) <= 120  # one document at most


def test_windows_shift_targets_and_move_with_the_epoch() -> None:
    tokens = torch.arange(100, dtype=torch.uint8)
    eval_windows = TokenWindows(tokens, 10)
    x, y = eval_windows[3]
    assert x.dtype == torch.int64 and x.tolist() == list(range(30, 40))
    assert y.tolist() == list(range(31, 41)) and len(eval_windows) == 9
    train = TokenWindows(tokens, 10, seed=1, shuffle_offsets=True)
    offsets = set()
    for epoch in range(1, 8):
        train.set_epoch(epoch)
        offsets.add(int(train[0][0][0]))
        assert train[len(train) - 1][1][-1] <= 99
    assert len(offsets) > 1
    train.set_epoch(3)
    again = TokenWindows(tokens, 10, seed=1, shuffle_offsets=True)
    again.set_epoch(3)
    assert torch.equal(train[0][0], again[0][0])


def test_user_text_files_and_their_errors(corpus: Path, tmp_path: Path) -> None:
    data = load_dataset("text", path=str(corpus), seq_len=16)
    assert len(data.train) > len(data.val) > 0
    one_file = tmp_path / "one.txt"
    one_file.write_text("".join(LINES))
    assert len(load_dataset("text", path=str(one_file), seq_len=16).test) > 0
    with pytest.raises(ValueError, match=r"data\.path is required"):
        load_dataset("text")
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        load_dataset("text", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="too few for one window"):
        load_dataset("text", path=str(corpus), seq_len=100000)
    with pytest.raises(ValueError, match="no option 'seq_len'"):
        load_dataset("digits", seq_len=4)


def test_experiment_checks_that_model_and_data_match() -> None:
    base = {"name": "x", "model": {"name": "llama-1m"}, "data": {"name": "digits"}}
    with pytest.raises(ExperimentError, match="text model"):
        Experiment.from_dict(base)
    with pytest.raises(ExperimentError, match="image model"):
        Experiment.from_dict({**base, "model": {"name": "mlp"}, "data": {"name": "pydoc"}})
    assert {"pydoc-llama-bitnet", "pydoc-llama-float"} <= set(packaged_experiments())
    for name in ("pydoc-llama-bitnet", "pydoc-llama-float"):
        assert Experiment.load(name).data["name"] == "pydoc"


# ----------------------------------------------------------------------------- metrics
def test_loss_and_bits_per_byte() -> None:
    logits = torch.zeros(2, 3, 256)  # uniform: log(256) nats = exactly 8 bits a byte
    loss = lm_loss(logits, torch.zeros(2, 3, dtype=torch.int64))
    assert float(loss) == pytest.approx(math.log(256))
    m = lm_metrics(float(loss))
    assert m["bpb"] == pytest.approx(8.0) and m["ppl"] == pytest.approx(256.0)


# ----------------------------------------------------------------------------- end to end
def tiny_experiment(tmp_path: Path, corpus: Path, quant: object) -> Path:
    exp = {
        "name": "tiny-lm",
        "seed": 0,
        "model": {"name": "llama", "dim": 32, "n_layers": 2, "n_heads": 2},
        "data": {"name": "text", "path": str(corpus), "seq_len": 32},
        "quant": quant,
        "train": {
            "epochs": 3,
            "batch_size": 8,
            "optimizer": "adamw",
            "lr": 0.01,
            "warmup_epochs": 1,
            "grad_clip": 1.0,
            "device": "cpu",
        },
    }
    path = tmp_path / f"{quant or 'float'}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_train_eval_compare_generate_and_resume(
    tmp_path: Path, corpus: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(lowbit.cli, "console", Console(width=300))
    runs = {}
    for quant in (None, "bitnet"):
        run = runs[quant] = tmp_path / f"run-{quant}"
        assert (
            main(["train", str(tiny_experiment(tmp_path, corpus, quant)), "--run-dir", str(run)])
            == 0
        )
    float_r = json.loads((runs[None] / "results.json").read_text())
    bitnet_r = json.loads((runs["bitnet"] / "results.json").read_text())
    assert bitnet_r["method"] == "bitnet" and bitnet_r["compression"] > 2
    for r, phase in ((float_r, "fp"), (bitnet_r, "qat")):
        test = r[phase]["test"]
        assert test["bpb"] == pytest.approx(test["loss"] / math.log(2))
        assert test["ppl"] == pytest.approx(math.exp(test["loss"]))
        assert r["test_bpb"] == test["bpb"] < 4.0  # far below 8 bits (uniform) after 3 epochs
        assert 0 < test["acc"] < 1  # next-token accuracy
    capsys.readouterr()
    assert main(["eval", str(runs["bitnet"]), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and f"{bitnet_r['test_bpb']:.4f}" in out
    assert main(["compare", str(runs[None]), str(runs["bitnet"])]) == 0
    out = capsys.readouterr().out
    assert "quantised test bpb" in out and f"{float_r['test_bpb']:.4f}" in out
    assert main(["generate", str(runs["bitnet"]), "--prompt", "def f1", "--tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("def f1")
    assert load_checkpoint(runs["bitnet"] / "qat" / "checkpoints" / "last")[1]["epoch"] == 3


class StopAfter:
    """Simulates an interruption after epoch ``n``'s checkpoint."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        if epoch == self.n:
            raise KeyboardInterrupt


def test_interrupted_lm_training_resumes_to_the_same_weights(tmp_path: Path, corpus: Path) -> None:
    data = load_dataset("text", path=str(corpus), seq_len=16)
    cfg = {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.01, "grad_clip": 1.0}

    def model() -> torch.nn.Module:
        net = create_model("llama", 256, (16,), seed=0, dim=16, n_layers=1, n_heads=2)
        return lowbit.quantize(net, "bitnet")

    def trainer(net: torch.nn.Module, run: Path, callbacks=()) -> Trainer:
        return Trainer(
            net,
            data.train,
            data.val,
            cfg,
            run,
            loss_fn=lm_loss,
            console=Console(quiet=True),
            callbacks=callbacks,
        )

    full = model()
    trainer(full, tmp_path / "full").fit()
    with pytest.raises(KeyboardInterrupt):
        trainer(model(), tmp_path / "cut", [StopAfter(1)]).fit()
    resumed = model()
    trainer(resumed, tmp_path / "cut").fit(resume=True)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_generate_is_seeded_and_cache_matches_recompute() -> None:
    model = create_model("llama", 256, (16,), seed=0, dim=32, n_layers=2, n_heads=2)
    a = generate(model, "hello", 40, seed=3)
    assert a == generate(model, "hello", 40, seed=3)
    assert a != generate(model, "hello", 40, seed=4)

    class NoCache(torch.nn.Module):  # the same model without the cache argument
        def __init__(self) -> None:
            super().__init__()
            self.inner = model
            self.config = model.config

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.inner(ids)

    # within the window (16 tokens) cached decoding and re-reading agree token for token
    assert generate(NoCache(), "hello", 10, temperature=0) == generate(
        model, "hello", 10, temperature=0
    )
    with pytest.raises(ValueError, match="temperature"):
        generate(model, "x", 1, temperature=-1)
