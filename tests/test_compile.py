"""Quantised models under torch.compile: one graph, no recompiles, the eager values; AMP.

``torch._dynamo.explain`` traces without running inductor, so the graph-break checks are cheap;
the compiled-vs-eager loss trajectory runs inductor and is marked slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import lowbit
from lowbit.models import create_model
from lowbit.nn import ConvBnAct
from lowbit.quant import initialize

METHODS = lowbit.methods()
SHAPES = {"lenet5": (1, 28, 28), "resnet20": (3, 16, 16)}


def quantised(model_name: str, method: str, batch: int = 4) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    shape = SHAPES[model_name]
    model = lowbit.quantize(create_model(model_name, num_classes=10, in_shape=shape), method)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    initialize(model, x)
    return model, x


def graph_breaks(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    dynamo.reset()
    explained = dynamo.explain(model)(x)
    return explained.graph_break_count, explained.graph_count


def check_one_graph(model_name: str, method: str) -> None:
    model, x = quantised(model_name, method)
    assert graph_breaks(model.train(), x) == (0, 1)
    assert graph_breaks(model.eval(), x) == (0, 1)


@pytest.mark.parametrize("method", METHODS)
def test_lenet5_traces_as_one_graph(method: str) -> None:
    check_one_graph("lenet5", method)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_resnet20_traces_as_one_graph(method: str) -> None:
    check_one_graph("resnet20", method)


def compiled_steps(model: nn.Module, x: torch.Tensor, steps: int, **compile_kw: object) -> list:
    y = torch.arange(x.shape[0]) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run = torch.compile(model, fullgraph=True, **compile_kw) if compile_kw else model
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(run(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("method", METHODS)
def test_training_steps_do_not_recompile(method: str) -> None:
    model, x = quantised("lenet5", method)
    dynamo.reset()
    counters.clear()
    compiled_steps(model.train(), x, 3, backend="eager")
    assert counters["stats"]["unique_graphs"] == 1


def test_conv_bn_block_steps_do_not_recompile() -> None:
    """ConvBnAct counts training steps in a buffer only (no Python int that changes)."""
    torch.manual_seed(0)
    block = ConvBnAct(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        weight_quant=lowbit.quant.create("lsq", "weight"),
        input_quant=lowbit.quant.create("affine", "activation"),
    )
    x = torch.randn(2, 3, 8, 8)
    initialize(block, x)
    dynamo.reset()
    counters.clear()
    run = torch.compile(block.train(), backend="eager", fullgraph=True)
    for _ in range(4):
        run(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert int(block.steps) == 4


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_training_step_is_finite(method: str) -> None:
    model, x = quantised("lenet5", method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model.train()(x), torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), name


def trajectories(method: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses of 20 SGD steps of LeNet-5, eager and compiled with ``backend``, from one state."""
    model, x = quantised("lenet5", method, batch=16)
    twin = copy.deepcopy(model)
    dynamo.reset()
    eager = torch.stack(compiled_steps(model.train(), x, 20))
    compiled = torch.stack(compiled_steps(twin.train(), x, 20, backend=backend))
    assert eager[-1] < eager[0]  # it trains
    return eager, compiled


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lsq", "ttq", "stochastic", "affine"])
def test_compiled_graph_trains_exactly_as_eager(method: str) -> None:
    """The traced graph (fake kernels, registered autograd, random-stream state, counters) runs
    the eager computation: same losses for 20 steps (``aot_eager`` runs the traced ops as is)."""
    eager, compiled = trajectories(method, "aot_eager")
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_inductor_training_follows_eager() -> None:
    """Inductor reorders float sums, and a quantiser's rounding can turn an ulp into a step, so
    the trajectories agree to a few percent, not to the ulp."""
    eager, compiled = trajectories("lsq", "inductor")
    torch.testing.assert_close(compiled, eager, rtol=0.05, atol=1e-5)
