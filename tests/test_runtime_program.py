"""The float engine's compiled forward pass (lowbit.runtime.program) and the packed layers
(lowbit.runtime.packed) against independent references.

* Binary/ternary chains whose signs are fused into integer thresholds: the whole graph against a
  reference written here -- exact integer convolutions in float64 torch on +-1 inputs (zero
  padding), then the float32 formulas of the float path (``dot * alpha``, BatchNorm, sign) in
  numpy -- bit for bit.
* Every other op (channels-last slice, pad, pools, add, relu, clamp, generic ops): the compiled
  program against node-by-node evaluation with ``run_node``.
* :meth:`PackedGemm.threshold` against brute force over every dot value.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.contract import CodeSpec, SignMeanAbsQuant, SignQuant
from lowbit.runtime import Graph, Model, Node, kernels, layers, packed
from lowbit.runtime.packed import PackedGemm

F32 = np.float32


# ----------------------------------------------------------------------------- graph helpers
def weight_node(name, op, inp, codes, scale, iq, scheme="binary", **attrs) -> Node:
    spec = CodeSpec(scheme, 1 if scheme == "binary" else 2, -1, 1, np.asarray(scale, F32), axis=0)
    if op == "conv2d":
        attrs = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1} | attrs
    return Node(name, op, [inp], attrs, weight_codes=codes, weight_spec=spec, input_quant=iq)


def bn_node(name, inp, scale, shift) -> Node:
    params = {"scale": scale.astype(F32), "shift": shift.astype(F32)}
    return Node(name, "batchnorm", [inp], {"dim": 1}, params=params)


def codes(rng, shape, ternary=False) -> np.ndarray:
    if ternary:
        return rng.integers(-1, 2, size=shape).astype(np.int8)
    return np.where(rng.random(shape) < 0.5, -1, 1).astype(np.int8)


def bn_params(rng, c) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm scale/shift with negative, zero and positive scales."""
    scale = rng.normal(size=c).astype(F32)
    scale[::4] = -np.abs(scale[::4])
    scale[1] = 0.0
    return scale, rng.normal(scale=3.0, size=c).astype(F32)


# ----------------------------------------------------------------------------- references
def ref_conv_dots(x_sign: np.ndarray, w: np.ndarray, stride, padding, dilation) -> np.ndarray:
    """Exact integer dots of a conv on +-1 inputs padded with zeros (float64 torch)."""
    out = F.conv2d(
        torch.from_numpy(x_sign.astype(np.float64)),
        torch.from_numpy(w.astype(np.float64)),
        stride=stride,
        padding=padding,
        dilation=dilation,
    )
    return out.numpy()


def sign(x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, 1.0, -1.0)


def scaled(dots: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The float path's ``float32(dot) * alpha`` per output channel (axis 1)."""
    shape = (1, -1) + (1,) * (dots.ndim - 2)
    return dots.astype(F32) * alpha.astype(F32).reshape(shape)


def bn(x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


def maxpool(x: np.ndarray, k: int) -> np.ndarray:
    return F.max_pool2d(torch.from_numpy(x), k).numpy()


# ----------------------------------------------------------------------------- fused chains
CHAINS = {
    # cin, cout, kernel, stride, padding, dilation, pool after the BN, ternary weights, size
    "odd channels, pad 1": (5, 7, 3, 1, 1, 1, 0, False, 13),
    "stride 2, pad 2, kernel 5, pool": (16, 24, 5, 2, 2, 1, 2, False, 13),
    "dilation 2, one word a pixel": (64, 64, 3, 1, 2, 2, 0, False, 13),
    "9 bytes a pixel, stride 2": (72, 40, 3, 2, 1, 1, 0, False, 13),
    "padding beyond the kernel": (8, 8, 3, 1, 3, 1, 0, False, 13),
    "ternary weights": (12, 20, 3, 1, 1, 1, 2, True, 13),
    "asymmetric stride and padding": (16, 32, 3, (2, 1), (1, 2), 1, 0, False, 13),
    "no interior positions": (16, 16, 3, 1, 1, 1, 0, False, 2),
}


@pytest.mark.parametrize("assemble", [False, True])
@pytest.mark.parametrize("name", list(CHAINS))
def test_fused_sign_chain_is_exact(name: str, assemble: bool, monkeypatch) -> None:
    """conv -> BN -> [maxpool] -> conv -> BN -> conv: the first two layers give the next ones
    packed bits through fused thresholds; outputs equal the float formulas bit for bit. The
    last layer's float border rows are overwritten or assembled (both ways tested)."""
    monkeypatch.setattr(packed, "ASSEMBLE_MIN", -1 if assemble else 10**9)
    cin, cout, k, s, p, d, pool, ternary, h = CHAINS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    scheme = "ternary" if ternary else "binary"
    w1 = codes(rng, (cout, cin, k, k), ternary)
    w2 = codes(rng, (cout, cout, 3, 3), ternary)
    w3 = codes(rng, (6, cout, 3, 3), ternary)
    a1, a2, a3 = (rng.uniform(0.01, 2.0, size=n).astype(F32) for n in (cout, cout, 6))
    s1, h1 = bn_params(rng, cout)
    s2, h2 = bn_params(rng, cout)
    sign_iq = SignQuant()
    geo = {"stride": s, "padding": p, "dilation": d}
    nodes = [
        weight_node("c1", "conv2d", "x", w1, a1, sign_iq, scheme, **geo),
        bn_node("b1", "c1", s1, h1),
    ]
    last = "b1"
    if pool:
        nodes.append(Node("p1", "maxpool2d", ["b1"], {"kernel_size": pool, "stride": pool}))
        last = "p1"
    nodes += [
        weight_node("c2", "conv2d", last, w2, a2, sign_iq, scheme, padding=1),
        bn_node("b2", "c2", s2, h2),
        weight_node("c3", "conv2d", "b2", w3, a3, sign_iq, scheme, padding=1),
    ]
    graph = Graph(["x"], [None, cin, h, h], nodes, ["c3"])
    x = rng.normal(size=(3, cin, h, h)).astype(F32)
    x[0, :, 0, 0] = 0.0  # sign(0) = +1

    model = Model(graph)
    assert sorted(model.program.plans) == ["c1", "c2"]
    assert set(model.kernels().values()) == {"ternary_sign" if ternary else "binary"}
    assert model.layers["c3"].packed.assemble == assemble

    y = bn(scaled(ref_conv_dots(sign(x), w1, s, p, d), a1), s1, h1)
    if pool:
        y = maxpool(y, pool)
    y = bn(scaled(ref_conv_dots(sign(y), w2, 1, 1, 1), a2), s2, h2)
    ref = scaled(ref_conv_dots(sign(y), w3, 1, 1, 1), a3)
    np.testing.assert_array_equal(model(x), ref)


def test_fused_linear_chain_is_exact() -> None:
    """linear -> BN -> linear -> BN -> linear on 2-D sign words (K not a multiple of 64)."""
    rng = np.random.default_rng(5)
    sizes = (100, 70, 130, 10)
    ws = [codes(rng, (o, i)) for i, o in itertools.pairwise(sizes)]
    alphas = [rng.uniform(0.1, 1.0, size=o).astype(F32) for o in sizes[1:]]
    bns = [bn_params(rng, o) for o in sizes[1:3]]
    nodes, inp = [], "x"
    for i, (w, a) in enumerate(zip(ws, alphas, strict=True)):
        nodes.append(weight_node(f"fc{i}", "linear", inp, w, a, SignQuant()))
        inp = f"fc{i}"
        if i < 2:
            nodes.append(bn_node(f"bn{i}", inp, *bns[i]))
            inp = f"bn{i}"
    model = Model(Graph(["x"], [None, sizes[0]], nodes, [inp]))
    assert sorted(model.program.plans) == ["fc0", "fc1"]
    x = rng.normal(size=(4, sizes[0])).astype(F32)
    y = x
    for i, (w, a) in enumerate(zip(ws, alphas, strict=True)):
        y = scaled(sign(y) @ w.T.astype(np.float64), a)
        if i < 2:
            y = bn(y, *bns[i])
    np.testing.assert_array_equal(model(x), y)


def test_value_read_as_float_is_not_fused() -> None:
    """A BN output that a residual add also reads stays float (and still matches)."""
    rng = np.random.default_rng(6)
    w1, w2 = codes(rng, (8, 8, 3, 3)), codes(rng, (8, 8, 3, 3))
    a = np.ones(8, F32)
    s, h = bn_params(rng, 8)
    nodes = [
        weight_node("c1", "conv2d", "x", w1, a, SignQuant(), padding=1),
        bn_node("b1", "c1", s, h),
        weight_node("c2", "conv2d", "b1", w2, a, SignQuant(), padding=1),
        Node("add", "add", ["c2", "b1"]),
    ]
    model = Model(Graph(["x"], [None, 8, 6, 6], nodes, ["add"]))
    assert model.program.plans == {}
    x = rng.normal(size=(2, 8, 6, 6)).astype(F32)
    y1 = bn(scaled(ref_conv_dots(sign(x), w1, 1, 1, 1), a), s, h)
    ref = scaled(ref_conv_dots(sign(y1), w2, 1, 1, 1), a) + y1
    np.testing.assert_array_equal(model(x), ref)


# ----------------------------------------------------------------------------- other ops
def test_channels_last_ops_match_node_by_node() -> None:
    """Slice, pad, pools (with padding), add, relu, clamp, global pool, flatten and float /
    XNOR layers in the compiled program give exactly what run_node gives node by node."""
    rng = np.random.default_rng(7)
    wf = rng.normal(size=(6, 3, 3, 3)).astype(F32)
    wx = codes(rng, (6, 6, 3, 3))
    pool = {"kernel_size": 3, "stride": 2, "padding": 1}
    nodes = [
        Node("c0", "conv2d", ["x"], {"padding": 1}, weight_float=wf, bias=rng.normal(size=6)),
        Node("r0", "relu", ["c0"]),
        weight_node("cx", "conv2d", "r0", wx, np.ones(6), SignMeanAbsQuant(), padding=1),
        Node("cl", "clamp", ["cx"], {"min": -0.5, "max": 2.0}),
        Node("mp", "maxpool2d", ["cl"], pool),
        Node("ap", "avgpool2d", ["c0"], pool),
        Node("add", "add", ["mp", "ap"]),
        Node(
            "sl",
            "slice",
            ["add"],
            {"starts": [None, 1, 0, None], "stops": [None] * 4, "steps": [None, 2, 2, 1]},
        ),
        Node("pd", "pad", ["sl"], {"pads": [[0, 0], [1, 2], [0, 1], [1, 0]]}),
        Node("gp", "global_avgpool2d", ["pd"]),
        Node("fl", "flatten", ["gp"]),
        Node("fc", "linear", ["fl"], weight_float=rng.normal(size=(4, 6)).astype(F32)),
    ]
    graph = Graph(["x"], [None, 3, 9, 11], nodes, ["fc"])
    model = Model(graph)
    x = rng.normal(size=(2, 3, 9, 11)).astype(F32)
    env = {"x": x}
    for node in graph.nodes:
        env[node.name] = model.run_node(node, [env[i] for i in node.inputs])
    np.testing.assert_array_equal(model(x), env["fc"])
    assert model(x).flags.c_contiguous


# ----------------------------------------------------------------------------- thresholds
@settings(max_examples=50, deadline=None)
@given(
    k=st.integers(1, 40),
    alpha=st.floats(-3, 3, width=32),
    bias=st.one_of(st.none(), st.floats(-5, 5, width=32)),
    scale=st.floats(-2, 2, width=32),
    shift=st.floats(-40, 40, width=32),
)
def test_threshold_equals_brute_force(k, alpha, bias, scale, shift) -> None:
    """thr/flip reproduce ``sign(bn(float32(dot) * alpha + bias))`` for every dot in [-K, K],
    whatever the signs of alpha and the BN scale (zero included)."""
    m = np.ones((1, k), np.int8)
    b = None if bias is None else np.array([bias], F32)
    gemm = PackedGemm([(m, np.array([alpha], F32))], True, b)
    post = lambda y: y * F32(scale) + F32(shift)  # noqa: E731
    plan = gemm.threshold(post)
    assert plan is not None
    dots = np.arange(-k, k + 1, dtype=np.int32)[:, None]
    y = dots.astype(F32) * F32(alpha)
    if b is not None:
        y = y + b
    want = y * F32(scale) + F32(shift) >= 0
    np.testing.assert_array_equal(plan.bits(dots), want)


# ----------------------------------------------------------------------------- float convs
@pytest.mark.parametrize(("gather", "chunk"), [(True, False), (False, False), (True, True)])
def test_float_conv_paths_match_torch(gather: bool, chunk: bool, monkeypatch) -> None:
    """A float conv through the im2col gather table, the window im2col (table too large) and
    a few samples at a time (bounded memory) against F.conv2d."""
    monkeypatch.setattr(layers, "MAX_PATCH_INDEX", 2**18 if gather else 0)
    monkeypatch.setattr(layers, "IM2COL_CHUNK_ELEMENTS", 2000 if chunk else 2**22)
    rng = np.random.default_rng(8)
    w = rng.normal(size=(5, 4, 3, 3)).astype(F32)
    attrs = {"stride": [2, 1], "padding": [1, 2], "dilation": [1, 2]}
    node = Node("c", "conv2d", ["x"], attrs, weight_float=w)
    model = Model(Graph(["x"], [None, 4, 9, 10], [node], ["c"]))
    assert (model.layers["c"].patch_index is not None) == gather
    x = rng.normal(size=(5, 4, 9, 10)).astype(F32)
    ref = F.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), stride=(2, 1), padding=(1, 2), dilation=(1, 2)
    )
    np.testing.assert_allclose(model(x), ref.numpy(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- BitGemm
@pytest.mark.parametrize("ternary", [False, True])
def test_bit_gemm_equals_the_validating_kernels(ternary: bool) -> None:
    """The prepared GEMM gives what binary_gemm / ternary_gemm_binary_act give, for int32,
    Threshold and Scale outputs, and refuses activations of the wrong shape or layout."""
    rng = np.random.default_rng(9)
    k, n = 150, 70
    a = kernels.pack_signs(rng.normal(size=(33, k)).astype(F32))
    w = codes(rng, (n, k), ternary)
    pos, neg = kernels.ternary_planes(w)
    neg = neg if ternary else None
    stages = [
        None,
        kernels.Threshold(rng.integers(-20, 20, size=n), rng.integers(0, 2, size=n)),
        kernels.Scale(rng.normal(size=n), rng.normal(size=n)),
    ]
    for stage in stages:
        got = kernels.BitGemm(pos, neg, k, stage)(a)
        if ternary:
            want = kernels.ternary_gemm_binary_act(a, pos, neg, k, stage)
        else:
            want = kernels.binary_gemm(a, pos, k, stage)
        np.testing.assert_array_equal(got, want)
    gemm = kernels.BitGemm(pos, neg, k)
    with pytest.raises(ValueError, match="a_bits must be uint64"):
        gemm(a[:, :2])
    with pytest.raises(ValueError, match="C-contiguous"):
        gemm(a[::2])
    with pytest.raises(ValueError, match="w_neg"):
        kernels.BitGemm(pos, pos, k)
