"""ConvBnAct (BatchNorm folding for fake-quant training, Jacob et al. 2018) and fuse_conv_bn.

References are the unfused float modules (conv -> bn -> act) and the folding formulas written
out by hand with PyTorch's own fake-quant op.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn.fused import ConvBnAct, fuse_conv_bn
from lowbit.quant.affine import AffineActivation, AffineWeight

ATOL = 1e-5


def randomise_bn(bn: nn.BatchNorm2d, g: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics."""
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def make_pair(
    seed: int = 0, bias: bool = False, groups: int = 1
) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias, groups=groups)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
        if bias:
            conv.bias.copy_(torch.randn(6, generator=g))
    bn = nn.BatchNorm2d(6)
    randomise_bn(bn, g)
    return conv, bn


def inputs(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, 7, 7, generator=g) for _ in range(n)]


def reference(conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module | None) -> nn.Module:
    mods = [copy.deepcopy(conv), copy.deepcopy(bn)] + ([] if act is None else [act])
    return nn.Sequential(*mods)


@pytest.mark.parametrize("act", [None, nn.ReLU(), nn.ReLU6()])
@pytest.mark.parametrize("bias", [False, True])
def test_eval_equals_unfused(act: nn.Module | None, bias: bool) -> None:
    conv, bn = make_pair(bias=bias)
    ref = reference(conv, bn, act).eval()
    block = ConvBnAct(conv, bn, act).eval()
    for x in inputs(2):
        torch.testing.assert_close(block(x), ref(x), atol=ATOL, rtol=0)


def test_folded_weight_bias_formula() -> None:
    conv, bn = make_pair(bias=True)
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    mean, var = bn.running_mean.numpy(), bn.running_var.numpy()
    std = np.sqrt(var.astype(np.float64) + bn.eps)
    w_ref = gamma[:, None, None, None] * w / std[:, None, None, None]
    b_ref = beta - gamma * mean / std + gamma * b / std
    w_fold, b_fold = ConvBnAct(conv, bn).folded_weight_bias()
    np.testing.assert_allclose(w_fold.detach().numpy(), w_ref, atol=1e-6)
    np.testing.assert_allclose(b_fold.detach().numpy(), b_ref, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_training_before_freeze_matches_unfused(groups: int) -> None:
    conv, bn = make_pair(bias=True, groups=groups)
    ref = reference(conv, bn, nn.ReLU()).train()
    block = ConvBnAct(conv, bn, nn.ReLU()).train()
    g = torch.Generator().manual_seed(7)
    for x in inputs(3):
        y, y_ref = block(x), ref(x)
        torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
        gout = torch.randn(y.shape, generator=g)
        y.backward(gout)
        y_ref.backward(gout)
    torch.testing.assert_close(block.bn.running_mean, ref[1].running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(block.bn.running_var, ref[1].running_var, atol=1e-6, rtol=1e-6)
    assert int(block.bn.num_batches_tracked) == int(ref[1].num_batches_tracked) == 3
    for mine, theirs in [
        (block.conv.weight, ref[0].weight),
        (block.conv.bias, ref[0].bias),
        (block.bn.weight, ref[1].weight),
        (block.bn.bias, ref[1].bias),
    ]:
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-4, rtol=1e-4)
    assert int(block.steps) == 3 and not bool(block.bn_frozen)


def test_after_freeze_uses_running_stats_and_gradients_flow() -> None:
    conv, bn = make_pair()
    block = ConvBnAct(conv, bn, nn.ReLU()).train()
    block(inputs(1)[0])  # one batch-statistics step moves the running stats
    block.freeze_bn()
    ref = reference(block.conv, block.bn, nn.ReLU()).eval()
    stats = (block.bn.running_mean.clone(), block.bn.running_var.clone())
    x = inputs(1, seed=3)[0]
    y = block(x)  # still in training mode
    torch.testing.assert_close(y, ref(x), atol=ATOL, rtol=0)
    assert torch.equal(block.bn.running_mean, stats[0])
    assert torch.equal(block.bn.running_var, stats[1])
    y.square().sum().backward()
    for p in (block.conv.weight, block.bn.weight, block.bn.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_freeze_bn_after_steps_and_state_dict() -> None:
    conv, bn = make_pair()
    block = ConvBnAct(conv, bn, freeze_bn_after=3).train()
    xs = inputs(5)
    block(xs[0])
    block(xs[1])
    assert int(block.steps) == 2 and not bool(block.bn_frozen)
    # a fresh block resumes the schedule from the state dict: one more batch-stats step, then frozen
    other = ConvBnAct(*make_pair(seed=5), freeze_bn_after=3).train()
    other.load_state_dict(block.state_dict())
    stats = other.bn.running_mean.clone()
    other(xs[2])
    assert not torch.equal(other.bn.running_mean, stats)
    stats = other.bn.running_mean.clone()
    other(xs[3])
    assert torch.equal(other.bn.running_mean, stats)
    assert bool(other.bn_frozen) and int(other.steps) == 4
    # a manual freeze_bn() survives a state-dict round trip too
    manual = ConvBnAct(*make_pair(seed=6)).train()
    manual.freeze_bn()
    fresh = ConvBnAct(*make_pair(seed=6)).train()
    fresh.load_state_dict(manual.state_dict())
    stats = fresh.bn.running_mean.clone()
    fresh(xs[4])
    assert torch.equal(fresh.bn.running_mean, stats)


def test_zero_gamma_channel_gives_no_nan() -> None:
    conv, bn = make_pair()
    with torch.no_grad():
        bn.weight[1] = 0.0
    ref = reference(conv, bn, None).train()
    block = ConvBnAct(conv, bn, weight_quant=AffineWeight()).train()
    x = inputs(1)[0]
    y = block(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 1], ref(x)[:, 1], atol=ATOL, rtol=0)  # beta everywhere
    torch.testing.assert_close(block.bn.running_var, ref[1].running_var, atol=1e-2, rtol=1e-2)


def hand_folded_quant(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel int8 fake-quant of the folded weight, with numpy-computed scales."""
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    w_fold = conv.weight.detach() * s[:, None, None, None]
    amax = np.abs(w_fold.numpy()).reshape(w_fold.shape[0], -1).max(axis=1).astype(np.float32)
    scale = torch.from_numpy(amax / np.float32(127))
    zeros = torch.zeros(len(scale), dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w_fold, scale, zeros, 0, -127, 127), s


def test_affine_weight_quantises_the_folded_weight() -> None:
    conv, bn = make_pair(bias=True)
    block = ConvBnAct(
        copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU(), weight_quant=AffineWeight()
    )
    wq, s = hand_folded_quant(conv, bn)
    x = inputs(1)[0]
    # training, batch statistics: BN_batch(conv(x, fq(w s)) / s + b)
    pre = (
        F.conv2d(x, wq, padding=1) / s[None, :, None, None]
        + conv.bias.detach()[None, :, None, None]
    )
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    want = F.relu(F.batch_norm(pre, mean, var, bn.weight, bn.bias, True, bn.momentum, bn.eps))
    got = block.train()(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(block.bn.running_mean, mean, atol=1e-6, rtol=0)
    # eval: conv(x, fq(w_fold)) + b_fold with the (updated) running statistics
    block.eval()
    wq, s = hand_folded_quant(block.conv, block.bn)
    b_fold = block.bn.bias + (block.conv.bias - block.bn.running_mean) * s
    want = F.relu(F.conv2d(x, wq, b_fold.detach(), padding=1))
    got = block(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    float_block = ConvBnAct(block.conv, block.bn, nn.ReLU()).eval()
    assert not torch.equal(got, float_block(x))  # the quantiser did something


def test_input_quant_is_applied_first() -> None:
    conv, bn = make_pair()
    aq = AffineActivation()
    block = ConvBnAct(conv, bn, input_quant=aq).train()
    ref_aq = AffineActivation().train()
    ref = ConvBnAct(copy.deepcopy(conv), copy.deepcopy(bn)).train()
    x = inputs(1)[0]
    torch.testing.assert_close(block(x), ref(ref_aq(x)), atol=0, rtol=0)
    assert int(aq.steps) == 1


def test_bad_arguments() -> None:
    conv, bn = make_pair()
    with pytest.raises(ValueError, match="act"):
        ConvBnAct(conv, bn, nn.Sigmoid())
    with pytest.raises(ValueError, match="track_running_stats"):
        ConvBnAct(conv, nn.BatchNorm2d(6, track_running_stats=False))
    with pytest.raises(ValueError, match="output channels"):
        ConvBnAct(conv, nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="freeze_bn_after"):
        ConvBnAct(conv, bn, freeze_bn_after=-1)
    with pytest.raises(ValueError, match="conv"):
        ConvBnAct(nn.Linear(3, 6), bn)


# --------------------------------------------------------------------------- fuse_conv_bn


def randomise_all_bns(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomise_bn(m, g)


def test_fuse_sequential() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3),
        nn.BatchNorm2d(4),
    )
    randomise_all_bns(model)
    model.eval()
    x = torch.randn(2, 3, 9, 9)
    before = model(x)
    names = fuse_conv_bn(model)
    assert names == ["0", "3"]
    assert isinstance(model[0], ConvBnAct) and isinstance(model[0].act, nn.ReLU)
    assert isinstance(model[3], ConvBnAct) and model[3].act is None
    assert all(isinstance(model[i], nn.Identity) for i in (1, 2, 4))
    assert not model[0].training
    torch.testing.assert_close(model(x), before, atol=ATOL, rtol=0)


class Functional(nn.Module):
    """Traced by fx: F.relu after bn1, a ReLU module shared by two call sites, and a conv whose
    output also feeds a residual add (not fusable)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv3, self.bn3 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.conv4, self.bn4, self.relu6 = nn.Conv2d(6, 2, 1), nn.BatchNorm2d(2), nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        y = self.conv3(x)
        x = self.relu(self.bn3(y) + y)
        return self.relu6(self.bn4(self.conv4(x)))


def test_fuse_fx_traced_module() -> None:
    torch.manual_seed(1)
    model = Functional()
    randomise_all_bns(model, seed=1)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    names = fuse_conv_bn(model)
    assert names == ["conv1", "conv2", "conv4"]
    assert model.conv1.act is None  # F.relu stays in forward
    assert model.conv2.act is None and isinstance(model.relu, nn.ReLU)  # shared ReLU kept
    assert isinstance(model.conv3, nn.Conv2d) and isinstance(model.bn3, nn.BatchNorm2d)
    assert isinstance(model.conv4.act, nn.ReLU6) and isinstance(model.relu6, nn.Identity)
    torch.testing.assert_close(model(x), before, atol=ATOL, rtol=0)


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so the Sequential fallback applies."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 4, 1)
        )
        self.head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.sum() > 0:
            x = x * 2
        return self.head(x)


def test_fuse_falls_back_to_sequential_children() -> None:
    torch.manual_seed(2)
    model = Untraceable()
    randomise_all_bns(model, seed=2)
    model.eval()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    names = fuse_conv_bn(model)
    assert names == ["features.0", "head.0"]
    assert isinstance(model.features[0].act, nn.ReLU6)
    assert isinstance(model.features[3], nn.Conv2d)
    torch.testing.assert_close(model(x), before, atol=ATOL, rtol=0)


def test_fuse_factories_and_training_mode() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    asked: list[str] = []

    def weights(name: str) -> AffineWeight | None:
        asked.append(name)
        return AffineWeight() if name == "0" else None

    names = fuse_conv_bn(model, weight_quant_factory=weights, input_quant_factory=lambda n: None)
    assert names == asked == ["0", "2"]
    assert isinstance(model[0].weight_quant, AffineWeight) and model[2].weight_quant is None
    assert model[0].input_quant is None and model[0].training
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    assert model[0].conv.weight.grad is not None
