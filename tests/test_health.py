"""Training health checks: dead (all-zero) layers and collapsed activations are flagged, and the
default recipe of every method stays healthy on every model of the registry."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import lowbit
from lowbit.models import create_model, list_models
from lowbit.nn import QuantLinear
from lowbit.quant.lsq import LSQ
from lowbit.quant.ternary import TernaryTWN
from lowbit.train import Trainer
from lowbit.train.health import (
    QuantHealthCallback,
    QuantHealthWarning,
    activation_level_shares,
    check_health,
    weight_zero_shares,
)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:64], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return (x - 0.3) / 0.4, torch.tensor(y[:64])


def twn_mlp(delta_factor: float) -> nn.Sequential:
    """Linear -> ReLU -> Linear, the second layer ternary (TWN)."""
    torch.manual_seed(0)
    return lowbit.quantize(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
        {
            "weights": {"method": "twn", "delta_factor": delta_factor},
            "activations": None,
            "first_layer": "float",
        },
    )


def test_zero_share_matches_hand_count() -> None:
    model = twn_mlp(0.7)
    w = model[3].weight.detach().numpy()
    delta = 0.7 * np.abs(w).mean()
    assert weight_zero_shares(model) == {"3": pytest.approx(np.mean(np.abs(w) <= delta))}


def test_dead_ternary_layer_is_flagged_by_name(digits) -> None:
    x, _ = digits
    assert check_health(twn_mlp(0.7), x) == []
    issues = check_health(twn_mlp(1000.0), x)  # delta far above every |w|: all codes 0
    assert [(i.layer, i.kind, i.share) for i in issues] == [("3", "dead_weights", 1.0)]
    assert "'3'" in issues[0].message


def collapsing_model(bias: float) -> nn.Sequential:
    """Linear -> ReLU -> QuantLinear with an unsigned 2-bit LSQ input quantiser."""
    torch.manual_seed(0)
    first = nn.Linear(64, 16)
    with torch.no_grad():
        first.bias.fill_(bias)
    quant = QuantLinear.from_float(nn.Linear(16, 10), input_quant=LSQ("activation", bits=2))
    return nn.Sequential(nn.Flatten(), first, nn.ReLU(), quant)


def test_collapsed_activation_is_flagged_by_name(digits) -> None:
    x, _ = digits
    healthy = collapsing_model(0.0)
    healthy(x)  # LSQ initialises its step (and sign) from a first batch
    shares = activation_level_shares(healthy, x)
    # reference: codes by hand, round(clip(relu(first(x)) / s, 0, 3)), most frequent share
    with torch.no_grad():
        v = torch.relu(healthy[1](x.flatten(1))).numpy()
    s = float(healthy[3].input_quant.step.detach())
    codes = np.clip(np.round(v / s), 0, 3)
    expected = max(np.mean(codes == c) for c in range(4))
    assert shares == {"3": pytest.approx(expected)}
    assert check_health(healthy, x) == []

    dead = collapsing_model(-1000.0)  # ReLU outputs only zeros: one level
    dead(x)
    issues = check_health(dead, x)
    assert [(i.layer, i.kind, i.share) for i in issues] == [("3", "collapsed_activations", 1.0)]


@pytest.mark.parametrize(
    "kwargs", [{"zero_threshold": 0.0}, {"level_threshold": 1.5}, {"zero_threshold": True}]
)
def test_bad_thresholds_are_named(kwargs) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        check_health(twn_mlp(0.7), None, **kwargs)
    with pytest.raises(ValueError, match=name):
        QuantHealthCallback(**kwargs)


def fit_one_epoch(model: nn.Module, data: TensorDataset, run_dir: Path) -> QuantHealthCallback:
    callback = QuantHealthCallback(batch_size=32, console=Console(file=io.StringIO()))
    config = {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 1e-3, "device": "cpu"}
    Trainer(
        model,
        data,
        data,
        config,
        run_dir,
        callbacks=[callback],
        console=Console(file=io.StringIO()),
    ).fit()
    return callback


def test_callback_warns_and_records_dead_layer(digits, tmp_path: Path) -> None:
    data = TensorDataset(*digits)
    with pytest.warns(QuantHealthWarning, match="layer '3'.*zero"):
        callback = fit_one_epoch(twn_mlp(1000.0), data, tmp_path / "dead")
    record = json.loads((tmp_path / "dead" / "health.json").read_text())
    assert record["epochs"] == callback.history
    assert [i["layer"] for i in record["epochs"][0]["issues"]] == ["3"]


def test_callback_is_quiet_on_a_healthy_model(digits, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantHealthWarning)
        fit_one_epoch(twn_mlp(0.7), TensorDataset(*digits), tmp_path / "ok")
    record = json.loads((tmp_path / "ok" / "health.json").read_text())
    assert record == {"epochs": [{"epoch": 1, "issues": []}]}


@pytest.mark.parametrize("method", lowbit.methods())
@pytest.mark.parametrize("model_name", list_models("image"))
def test_default_recipes_stay_healthy_on_every_model(model_name: str, method: str, digits) -> None:
    """A few training steps of each method's default recipe leave no dead layer and no
    collapsed activation. BatchNorm uses a cumulative average (momentum None) so that its
    running statistics after three steps are those of the data seen, as after a real epoch
    (with momentum 0.1 they would still be mostly the initial mean 0 / variance 1)."""
    x, y = digits
    model = create_model(model_name, num_classes=10, in_shape=(1, 8, 8), seed=0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    lowbit.quantize(model, method)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(3):
        xb, yb = x[16 * step : 16 * (step + 1)], y[16 * step : 16 * (step + 1)]
        loss = nn.functional.cross_entropy(model(xb), yb) + lowbit.regularization(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert check_health(model, x) == []


def test_twn_quantiser_really_is_dead_at_large_delta() -> None:
    """Independent of the health code: TWN's codes are all zero when delta > max|w|."""
    w = torch.randn(20, 30)
    codes, _ = TernaryTWN(delta_factor=1000.0).codes(w)
    assert not codes.any()
