"""The fused integer engine (lowbit.runtime.fused): one C program per forward pass.

Reference: :meth:`IntegerProgram.run`, the integer engine in numpy int64 arithmetic (its GEMMs
forced onto the numpy backend, so no code is shared with the fused engine's C). The fused engine
must equal it bit for bit on every ISA path, forced one at a time (a path this CPU cannot run
is skipped: its instructions would fault).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.contract import Graph
from lowbit.convert import quantize
from lowbit.export import export
from lowbit.models.resnet import ShortcutA
from lowbit.runtime import compile_integer, kernels, load_graph
from lowbit.runtime.fused import ISAS, FusedEngine, Unsupported, available_isas, default_isa, steps

A8 = {"method": "affine", "bits": 8}
RECIPES = {
    "lsq": "lsq",
    "affine": "affine",
    "dorefa": "dorefa",
    "pact": "pact",
    "twn-a8": {
        "method": "twn",
        "activations": A8,
        "first_layer": {"weights": A8, "activations": A8},
        "last_layer": {"weights": A8, "activations": A8},
    },
}
SHAPE = (3, 12, 12)


class Tiny(nn.Module):
    """Every op the engine runs: strided/padded convs with folded BatchNorm, residual adds
    (plain and ResNet's slice + pad shortcut), ReLU, Hardtanh clamps, padded max/avg pooling,
    flatten of a 4-D tensor, linear output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.c3, self.b3 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.short = ShortcutA(8, 16, 2)
        self.h1, self.avg = nn.Hardtanh(0.0, 3.0), nn.AvgPool2d(3, stride=1, padding=1)
        self.c4, self.h2 = nn.Conv2d(16, 8, 1), nn.Hardtanh(-1.0, 2.0)
        self.fc = nn.Linear(8 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(x + self.b2(self.c2(x)))
        x = self.pool(x)
        x = torch.relu(self.b3(self.c3(x)) + self.short(x))
        x = self.h2(self.c4(self.avg(self.h1(x))))
        return self.fc(torch.flatten(x, 1))


def _graph(method: str, folder: Path) -> Graph:
    torch.manual_seed(0)
    q = quantize(copy.deepcopy(Tiny().eval()), RECIPES[method])
    q.train()
    with torch.no_grad():
        for _ in range(3):  # sets the activation ranges and BatchNorm statistics
            q(torch.randn(16, *SHAPE) * 2)
    path = folder / f"{method}.lowbit"
    export(q.eval(), path, example_input=SHAPE)
    return load_graph(path)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Graph]:
    folder = tmp_path_factory.mktemp("fused")
    return {m: _graph(m, folder) for m in RECIPES}


def _reference(graph: Graph, x: np.ndarray) -> np.ndarray:
    program = compile_integer(graph)
    before = kernels.backend()
    kernels.set_backend("numpy")
    try:
        return program.run(x)
    finally:
        kernels.set_backend(None if before != "scalar" else "scalar")


def _isa(name: str) -> str:
    if name not in available_isas():
        pytest.skip(f"this CPU cannot execute the {name} path")
    return name


def _inputs(batch: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, *SHAPE)) * 2).astype(np.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("method", list(RECIPES))
def test_bit_exact_with_the_integer_program(graphs: dict, method: str, isa: str) -> None:
    graph = graphs[method]
    engine = FusedEngine(compile_integer(graph), _isa(isa))
    for batch in (1, 7):  # 7 x 144 first-layer rows: several row blocks, a partial one
        x = _inputs(batch, batch)
        want = _reference(graph, x)
        np.testing.assert_array_equal(engine(x, num_threads=1), want)
    x = _inputs(48, 2)  # enough work that the steps run on both threads
    np.testing.assert_array_equal(engine(x, num_threads=2), _reference(graph, x))


def test_large_steps_split_over_threads(graphs: dict) -> None:
    engine = FusedEngine(compile_integer(graphs["lsq"]))
    engine(_inputs(48), num_threads=2)
    rows = engine._instances[(48, 2)].rows
    assert rows[:, steps.F["threads"]].max() == 2


@pytest.mark.parametrize("isa", ISAS)
def test_variants_outside_the_exporter(graphs: dict, isa: str) -> None:
    """Average pooling without the padding in the count, and a conv as the graph output
    (a 4-D float result in [N, C, H, W])."""
    graph = copy.deepcopy(graphs["affine"])
    for node in graph.nodes:
        if node.op == "avgpool2d":
            node.attrs["count_include_pad"] = False
    x = _inputs(3, 5)
    engine = FusedEngine(compile_integer(graph), _isa(isa))
    np.testing.assert_array_equal(engine(x), _reference(graph, x))
    cut = next(i for i, n in enumerate(graph.nodes) if n.op == "conv2d" and i > 3)
    graph.nodes, graph.outputs = graph.nodes[: cut + 1], [graph.nodes[cut].name]
    y = FusedEngine(compile_integer(graph), _isa(isa))(x)
    assert y.ndim == 4
    np.testing.assert_array_equal(y, _reference(graph, x))


def test_plans_are_kept_per_batch_size(graphs: dict) -> None:
    engine = FusedEngine(compile_integer(graphs["lsq"]))
    x1, x4 = _inputs(1), _inputs(4, 1)
    first = engine(x4)
    arena = engine._instances[next(iter(engine._instances))].arena
    engine(x1)
    np.testing.assert_array_equal(engine(x4), first)  # reused, not disturbed by batch 1
    assert len(engine._instances) == 2
    assert engine._instances[next(iter(engine._instances))].arena is arena
    np.testing.assert_array_equal(np.concatenate([engine(x4[i : i + 1]) for i in range(4)]), first)


def test_calls_from_several_threads(graphs: dict) -> None:
    engine = FusedEngine(compile_integer(graphs["affine"]))
    xs = [_inputs(3, seed) for seed in range(8)]
    want = [engine(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(engine, xs))
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)


def test_isa_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    have = available_isas()
    assert have and have[0] == "scalar"
    monkeypatch.delenv("LOWBIT_ISA", raising=False)
    assert default_isa() == have[-1]
    monkeypatch.setenv("LOWBIT_ISA", "scalar")
    assert default_isa() == "scalar"
    monkeypatch.setenv("LOWBIT_ISA", "avx9000")
    with pytest.raises(ValueError, match="LOWBIT_ISA='avx9000'"):
        default_isa()


def test_lowbit_isa_scalar_also_selects_the_portable_kernels() -> None:
    code = "from lowbit.runtime import kernels; print(kernels.backend())"
    env = {**os.environ, "LOWBIT_ISA": "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "scalar", out.stderr


def test_unsupported_parts_name_the_node(graphs: dict) -> None:
    graph = copy.deepcopy(graphs["lsq"])
    i, conv = next(
        (i, n)
        for i, n in enumerate(graph.nodes)
        if n.op == "conv2d" and n.weight_codes.shape[1] == 8
    )
    half = np.ascontiguousarray(conv.weight_codes[:, :4])
    graph.nodes[i] = dataclasses.replace(conv, attrs={**conv.attrs, "groups": 2}, weight_codes=half)
    with pytest.raises(Unsupported, match=conv.name):
        FusedEngine(compile_integer(graph))


def test_input_shape_is_checked(graphs: dict) -> None:
    engine = FusedEngine(compile_integer(graphs["lsq"]))
    with pytest.raises(ValueError, match="input must have shape"):
        engine(np.zeros((2, 3, 10, 12), np.float32))
    with pytest.raises(ValueError, match="num_threads"):
        engine(np.zeros((2, *SHAPE), np.float32), num_threads=0)
