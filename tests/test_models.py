"""Model registry and zoo: shapes, fx traceability, layer order, structure counted by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lowbit.models import ShortcutA, create_model, list_models, model_options

NAMES = ("lenet5", "mlp", "resnet20", "resnet32", "resnet44", "resnet56", "vgg_small")
SHAPES = ((1, 28, 28), (1, 8, 8), (3, 32, 32))
ALLOWED_LEAVES = (
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Identity,
    ShortcutA,
)


def quantisable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_registry_lists_all_models() -> None:
    assert set(NAMES) <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_fx_trace(name: str, shape: tuple[int, int, int]) -> None:
    model = create_model(name, num_classes=7, in_shape=shape, seed=0)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    out = model(x)  # train mode: BatchNorm uses batch statistics
    assert out.shape == (3, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())

    model.eval()
    graph = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)

    # Only modules for the nonlinearities: no functional relu in the traced graph, and every ReLU
    # module instance is called exactly once (so conv+BN+ReLU chains can be fused by name).
    functions = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert not {F.relu, torch.relu, torch.relu_} & set(functions)
    relu_calls = [
        n.target
        for n in graph.graph.nodes
        if n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.ReLU)
    ]
    assert relu_calls and len(relu_calls) == len(set(relu_calls))
    relus = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    assert sorted(relu_calls) == sorted(relus)

    # First and last quantisable layer in module order are the first and last ones executed.
    executed = [
        n.target
        for n in graph.graph.nodes
        if n.op == "call_module"
        and isinstance(model.get_submodule(n.target), (nn.Conv2d, nn.Linear))
    ]
    layers = quantisable(model)
    assert executed == [n for n, _ in layers]
    assert layers[0][1].weight.shape[1] in (shape[0], math.prod(shape))
    assert isinstance(layers[-1][1], nn.Linear) and layers[-1][1].out_features == 7

    leaves = [m for m in model.modules() if not list(m.children())]
    assert all(isinstance(m, ALLOWED_LEAVES) for m in leaves)


def resnet_param_count(depth: int, channels: int, classes: int) -> int:
    """Parameters of a CIFAR ResNet counted by hand: convs, BN (gamma, beta), final linear."""
    n = (depth - 2) // 6
    convs = [(channels, 16)] + [(16, 16)] * (2 * n)
    convs += [(16, 32)] + [(32, 32)] * (2 * n - 1)
    convs += [(32, 64)] + [(64, 64)] * (2 * n - 1)
    return sum(9 * a * b + 2 * b for a, b in convs) + 64 * classes + classes


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_resnet_structure(depth: int) -> None:
    model = create_model(f"resnet{depth}", num_classes=10, in_shape=(3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == resnet_param_count(depth, 3, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth - 1
    assert all(m.kernel_size == (3, 3) and m.bias is None for m in convs)
    # Two option-A shortcuts (at the two stage transitions), parameter-free.
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2 and not any(list(s.parameters()) for s in shortcuts)
    widths = [m.out_channels for m in convs]
    assert sorted(set(widths)) == [16, 32, 64]


def test_resnet20_is_the_paper_size() -> None:
    count = sum(p.numel() for p in create_model("resnet20", in_shape=(3, 32, 32)).parameters())
    assert round(count / 1e6, 2) == 0.27  # He et al. (2016), Table 6


@pytest.mark.parametrize("stride, c_in, c_out", [(2, 16, 32), (2, 3, 5), (1, 8, 8), (1, 4, 6)])
def test_shortcut_a_against_numpy(stride: int, c_in: int, c_out: int) -> None:
    x = np.random.default_rng(0).standard_normal((2, c_in, 7, 6)).astype(np.float32)
    sub = x[:, :, ::stride, ::stride]
    zeros = np.zeros((2, c_out - c_in, *sub.shape[2:]), np.float32)
    expected = np.concatenate([sub, zeros], axis=1)
    got = ShortcutA(c_in, c_out, stride)(torch.from_numpy(x))
    np.testing.assert_array_equal(got.numpy(), expected)


def test_shortcut_a_rejects_fewer_channels() -> None:
    with pytest.raises(ValueError, match="out_channels"):
        ShortcutA(8, 4, 2)


@pytest.mark.parametrize("shape", SHAPES)
def test_vgg_small_structure(shape: tuple[int, int, int]) -> None:
    model = create_model("vgg_small", num_classes=10, in_shape=shape)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [128, 128, 256, 256, 512, 512]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1
    assert linears[0].in_features == 512 * (shape[1] // 8) * (shape[2] // 8)


def test_lenet5_options_and_flatten_size() -> None:
    model = create_model("lenet5", in_shape=(1, 28, 28), channels=(6, 16), hidden=84)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in convs] == [
        (1, 6, (5, 5)),
        (6, 16, (5, 5)),
    ]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16 * 7 * 7, 84), (84, 10)]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_mlp_hidden_option() -> None:
    model = create_model("mlp", num_classes=3, in_shape=(1, 8, 8), hidden=[32, 16, 8])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (64, 32),
        (32, 16),
        (16, 8),
        (8, 3),
    ]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 3


def test_model_options() -> None:
    assert model_options("mlp") == ["hidden"]
    assert model_options("lenet5") == ["channels", "hidden"]
    assert model_options("resnet20") == []


def test_unknown_model_lists_registered() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet18'.*resnet20.*vgg_small"):
        create_model("resnet18")


def test_unknown_option_is_named() -> None:
    with pytest.raises(ValueError, match=r"'width'.*valid options: hidden"):
        create_model("mlp", width=3)
    with pytest.raises(ValueError, match=r"'hidden'.*valid options: none"):
        create_model("resnet20", hidden=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_shape": (28, 28)}, "in_shape"),
        ({"in_shape": (1, 0, 28)}, "in_shape"),
        ({"in_shape": (1, 28.0, 28)}, "in_shape"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_common_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model("mlp", **kwargs)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("vgg_small", {"in_shape": (3, 4, 4)}, "too small"),
        ("lenet5", {"in_shape": (1, 2, 8)}, "too small"),
        ("mlp", {"hidden": ()}, "hidden"),
        ("mlp", {"hidden": (8, -1)}, "hidden"),
        ("lenet5", {"channels": (8,)}, "channels"),
        ("lenet5", {"hidden": 0}, "hidden"),
    ],
)
def test_bad_model_options(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model(name, **kwargs)


def test_seed_is_reproducible_and_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    a = create_model("resnet20", seed=3).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    b = create_model("resnet20", seed=3).state_dict()
    c = create_model("resnet20", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_kaiming_init_statistics() -> None:
    model = create_model("vgg_small", in_shape=(3, 32, 32), seed=0)
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]  # 512 -> 512, 3x3
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    assert conv.weight.mean().abs().item() < 1e-3
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(model.classifier.bias) == 0
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
