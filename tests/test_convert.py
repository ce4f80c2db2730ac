"""quantize(): every method on a small CNN trains (loss goes down, learned scales move)."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import lowbit
from lowbit.nn import ConvBnAct, QuantConv2d, QuantLinear, clip_latent_weights
from lowbit.quant.base import Quantizer


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


@pytest.fixture(scope="module")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:128], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return (x - 0.3) / 0.4, torch.tensor(y[:128])


def learned_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that belong to quantisers (TTQ Wp/Wn, LSQ step, PACT alpha)."""
    return {
        f"{qn}.{n}": p.detach().clone()
        for qn, q in model.named_modules()
        if isinstance(q, Quantizer)
        for n, p in q.named_parameters()
    }


@pytest.mark.slow
@pytest.mark.parametrize("method", lowbit.methods())
def test_each_method_trains(method: str, digits_batch) -> None:
    x, y = digits_batch
    # Every layer quantised, so each method's own quantisers (not only the 8-bit rule) are used.
    model = lowbit.quantize(
        small_cnn(), {"method": method, "first_layer": "same", "last_layer": "same"}
    )
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    assert quantizers, method
    assert {q.method for q in quantizers} & {method, "dorefa"}
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    with torch.no_grad():  # lazy initialisation of scales happens on the first batch
        model(x)
    before = learned_params(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y) + lowbit.regularization(model)
        assert torch.isfinite(loss), method
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, (method, losses[:5], losses[-5:])
    after = learned_params(model)
    expected = {"ttq": 6, "lsq": 6, "pact": 3, "absmax": 3}.get(method, 0)
    assert len(before) == expected, (method, sorted(before))
    for name, value in before.items():
        assert not torch.equal(value, after[name]), f"{method}: {name} did not move"
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()


def test_learned_scales_are_parameters_in_state_dict() -> None:
    for method, names in (("ttq", {"wp", "wn"}), ("lsq", {"step"}), ("pact", {"alpha"})):
        model = lowbit.quantize(
            small_cnn(), {"method": method, "first_layer": "same", "last_layer": "same"}
        )
        model(torch.randn(4, 1, 8, 8))
        found = {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters()} & names
        assert found == names, method
        keys = {k.rsplit(".", 1)[-1] for k in model.state_dict()}
        assert names <= keys


def test_bnn_latent_weights_clipped_after_any_optimizer_step() -> None:
    model = lowbit.quantize(small_cnn(), "bnn")
    layer = model[3]
    assert isinstance(layer, QuantConv2d)
    assert layer.weight.abs().max() <= 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=100.0)  # created after quantize
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    optimizer.step()
    assert layer.weight.abs().max() <= 1.0
    assert (layer.weight.abs() == 1.0).any()  # the huge step did hit the bound
    # First/last layers are 8-bit affine: their latent weights are not clipped.
    with torch.no_grad():
        model[0].weight.mul_(10.0)
    clip_latent_weights(model)
    assert model[0].weight.abs().max() > 1.0


def test_bnn_removes_relus_and_keeps_other_modules() -> None:
    model = lowbit.quantize(small_cnn(), "bnn")
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert isinstance(model[6], nn.MaxPool2d)


def test_affine_folds_batchnorm() -> None:
    model = lowbit.quantize(small_cnn(), "affine")
    assert isinstance(model[0], ConvBnAct)
    assert isinstance(model[3], ConvBnAct)
    assert isinstance(model[1], nn.Identity)
    assert isinstance(model[8], QuantLinear)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_summary_sizes_by_hand() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 2))
    lowbit.quantize(model, {"weights": {"method": "twn"}})
    result = lowbit.summary(model, show=False)
    # TWN: 2-bit codes + one float alpha per layer; biases stay float32.
    assert result.size_bits == (40 * 2 + 32 + 4 * 32) + (8 * 2 + 32 + 2 * 32)
    assert result.float32_bits == (40 + 4 + 8 + 2) * 32
    w = model[0].weight.detach()
    delta = 0.7 * w.abs().mean()
    assert result.layers[0].sparsity == pytest.approx(float((w.abs() <= delta).float().mean()))
    assert [r.weight_bits for r in result.layers] == [2, 2]


def test_summary_counts_float_layers_and_batchnorm() -> None:
    model = lowbit.quantize(small_cnn(), "ttq")
    result = lowbit.summary(model, show=False)
    assert [r.weight_method for r in result.layers] == ["float", "ttq", "float"]
    total = sum(p.numel() for p in model.parameters())
    assert result.total_params == total
    stats = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
    assert result.float32_bits == 32 * (total + stats)
    assert 1.0 < result.compression < 32.0
