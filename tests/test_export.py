"""Export to ``.lowbit``: what is stored (codes, specs, packing sizes), round trips, errors.

References are independent of the exporter: the quantisers' own ``weight_codes``/``QuantSpec``
(torch), the storage rules of METHODS.md computed by hand, and ``safetensors.numpy`` reading
the file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
import lowbit.export
from lowbit.export import (
    build_graph,
    build_graph_with_values,
    export,
    export_run,
    graph_to_bytes,
    write_graph,
)
from lowbit.models import create_model, list_models
from lowbit.models.resnet import ShortcutA
from lowbit.nn import layer_weight_bias, weight_codes
from lowbit.quant.base import QuantSpec
from lowbit.runtime import Graph, Model, Node, graph_from_bytes, load, load_graph
from lowbit.runtime.executor import dequantize
from lowbit.train.checkpoint import save_checkpoint

IN_SHAPE = (1, 16, 16)
# Per-token activation scales (BitNet, absmax) have no runtime/ONNX form yet (issue 14); their
# export is a clear error (tests/test_lm_transformer.py).
EXPORTABLE = [m for m in lowbit.methods() if m not in ("absmax", "bitnet")]


class SmallNet(nn.Module):
    """A CNN with every op the exporter maps: padded and strided convs, BatchNorm 2d/1d,
    ReLU, an option-A residual shortcut (slice + pad), average pooling, flatten, linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.shortcut = ShortcutA(8, 16, 2)
        self.relu2 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.bn3 = nn.BatchNorm1d(32)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)) + self.shortcut(x))
        x = self.flatten(self.pool(x))
        return self.fc2(self.relu3(self.bn3(self.fc1(x))))


def batch(n: int, shape: tuple[int, ...] = IN_SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def calibrate(model: nn.Module, shape: tuple[int, ...] = IN_SHAPE) -> nn.Module:
    """Two training-mode batches (BN statistics, activation ranges and steps), then eval."""
    model.train()
    with torch.no_grad():
        for seed in (1, 2):
            model(batch(16, shape, seed))
    return model.eval()


def quantized_net(method: str | dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = SmallNet()
    for m in net.modules():  # non-trivial BatchNorm parameters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return calibrate(lowbit.quantize(net, method))


def expected_nbytes(spec: QuantSpec, n: int, layout: str = "5trit") -> int:
    """METHODS.md storage: binary 8 a byte, ternary 5 a byte (or 4), n-bit dense."""
    if spec.scheme == "binary":
        return math.ceil(n / 8)
    if spec.scheme == "ternary":
        return math.ceil(n / (5 if layout == "5trit" else 4))
    return math.ceil(n * spec.bits / 8)


def lowbit_header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["lowbit"])


LAYER_RTOL = 1e-5
"""Layer-by-layer tolerance: a runtime node fed PyTorch's own inputs reproduces PyTorch's
output to ``LAYER_RTOL * max|output|`` (only the float summation order differs)."""


def layerwise_errors(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per graph node, ``max|runtime - torch| / max|torch|`` with every node's inputs taken from
    the PyTorch model's values (nodes without a PyTorch value chain from the runtime's)."""
    graph, values = build_graph_with_values(model, x)
    runtime = Model(graph)
    local: dict[str, np.ndarray] = {}
    errors = {}
    for node in graph.nodes:
        args = [values[i] if i in values else local[i] for i in node.inputs]
        local[node.name] = runtime.run_node(node, args)
        if node.name in values:
            ref = values[node.name]
            err = np.abs(local[node.name] - ref).max() / max(np.abs(ref).max(), 1e-12)
            errors[node.name] = float(err)
    return errors


def weighted_modules(model: nn.Module, graph: Graph) -> list[tuple[Node, nn.Module]]:
    by_module = {v: k for k, v in graph.meta["modules"].items()}
    nodes = {n.name: n for n in graph.nodes}
    return [
        (nodes[by_module[name]], m)
        for name, m in model.named_modules()
        if name in by_module and nodes[by_module[name]].op in ("conv2d", "linear")
    ]


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("method", EXPORTABLE)
def test_round_trip_stores_codes_not_latent_weights(method: str, tmp_path: Path) -> None:
    model = quantized_net(method)
    path = export(model, tmp_path / "m.lowbit", example_input=IN_SHAPE)
    graph = load_graph(path)
    header = lowbit_header(path)
    stored = safetensors.numpy.load_file(path)  # an ordinary safetensors file
    assert set(stored) == set(header["tensors"])
    pairs = weighted_modules(model, graph)
    assert len(pairs) == 4
    quantised = 0
    for node, module in pairs:
        found = weight_codes(module)
        entry = header["tensors"][f"{node.name}.weight"]
        if found is None:  # a float layer: float32, BatchNorm possibly folded into it
            assert entry["packing"] == "float32"
            continue
        quantised += 1
        codes, spec = found
        np.testing.assert_array_equal(node.weight_codes, codes.numpy())
        assert node.weight_spec["scheme"] == spec.scheme
        assert (node.weight_spec["qmin"], node.weight_spec["qmax"]) == (spec.qmin, spec.qmax)
        np.testing.assert_array_equal(node.weight_spec["scale"], spec.scale.numpy())
        # only packed codes are stored, at the METHODS.md size
        assert entry["packing"] != "float32"
        raw = stored[f"{node.name}.weight"]
        assert raw.dtype == np.uint8
        assert raw.size == expected_nbytes(spec, codes.numel())
        # dequantised codes are exactly the fake-quant weight of the forward pass
        weight, _ = layer_weight_bias(module)
        with torch.no_grad():
            module.weight_quant.eval()
            fake = module.weight_quant(weight).numpy()
        np.testing.assert_array_equal(dequantize(node.weight_codes, node.weight_spec), fake)
    assert quantised >= 1
    assert header["format"] == "lowbit" and header["version"] == 1
    assert header["num_classes"] == 10 and header["input_shape"] == [None, *IN_SHAPE]
    assert graph.meta["recipe"] == model.lowbit_recipe.name


def test_float_layers_and_batchnorm(tmp_path: Path) -> None:
    model = calibrate(SmallNet())
    folded = graph_to_bytes(build_graph(model, IN_SHAPE))
    kept = graph_to_bytes(build_graph(model, IN_SHAPE, fold_bn=False))
    g_folded, g_kept = graph_from_bytes(folded), graph_from_bytes(kept)
    assert [n.op for n in g_kept.nodes].count("batchnorm") == 3
    assert "batchnorm" not in [n.op for n in g_folded.nodes]
    conv1 = next(n for n in g_folded.nodes if n.name == "conv1")
    bn = model.bn1
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    np.testing.assert_allclose(
        conv1.weight_float, (model.conv1.weight * s.reshape(-1, 1, 1, 1)).detach(), rtol=1e-6
    )
    np.testing.assert_allclose(conv1.bias, (bn.bias - bn.running_mean * s).detach(), atol=1e-6)
    x = batch(8).numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for graph in (g_folded, g_kept):
        np.testing.assert_allclose(Model(graph)(x), ref, rtol=1e-5, atol=1e-5)


def test_shortcut_becomes_slice_and_pad() -> None:
    graph = build_graph(quantized_net("lsq"), IN_SHAPE)
    ops = {n.op: n for n in graph.nodes}
    assert ops["slice"].attrs["steps"] == [None, None, 2, 2]
    assert ops["pad"].attrs["pads"] == [[0, 0], [0, 8], [0, 0], [0, 0]]
    assert {"add", "avgpool2d", "flatten", "relu", "batchnorm"} <= set(ops)


def test_conv_bn_act_exports_folded_codes() -> None:
    model = quantized_net("affine")  # fold_bn: every conv + BN (+ ReLU) is a ConvBnAct
    graph = build_graph(model, IN_SHAPE)
    nodes = {n.name: n for n in graph.nodes}
    conv1 = nodes["conv1"]
    codes, _ = weight_codes(model.conv1)
    _, b_fold = model.conv1.folded_weight_bias()
    np.testing.assert_array_equal(conv1.weight_codes, codes.numpy())
    np.testing.assert_array_equal(conv1.bias, b_fold.detach().numpy())
    assert nodes["conv1_act"].op == "relu" and nodes["conv1_act"].inputs == ["conv1"]
    assert "conv2_act" not in nodes  # its BN output feeds the residual add, no ReLU joined


@pytest.mark.parametrize("layout", ["5trit", "2bit"])
def test_ternary_layouts(layout: str, tmp_path: Path) -> None:
    model = quantized_net("twn")
    path = export(model, tmp_path / "t.lowbit", example_input=IN_SHAPE, ternary_layout=layout)
    header = lowbit_header(path)
    stored = safetensors.numpy.load_file(path)
    packing = {"5trit": "ternary5", "2bit": "ternary2"}[layout]
    ternary = [k for k, e in header["tensors"].items() if e["packing"] == packing]
    assert ternary
    for name in ternary:
        n = math.prod(header["tensors"][name]["shape"])
        assert stored[name].size == math.ceil(n / (5 if layout == "5trit" else 4))
    x = batch(4).numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(load(path)(x), ref, rtol=1e-5, atol=1e-5)


schemes = st.sampled_from(["binary", "ternary", "uniform", "affine", "pow2"])


@settings(max_examples=50, deadline=None)
@given(
    scheme=schemes,
    bits=st.integers(2, 8),
    out=st.integers(1, 6),
    k=st.integers(1, 40),
    per_channel=st.booleans(),
    asymmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    layout=st.sampled_from(["5trit", "2bit"]),
)
def test_spec_and_codes_round_trip(scheme, bits, out, k, per_channel, asymmetric, seed, layout):
    """Random specs and codes survive the file bit for bit; sizes follow METHODS.md, and the
    runtime dequantises as torch's QuantSpec does."""
    rng = np.random.default_rng(seed)
    signed = scheme != "uniform" or not asymmetric
    if scheme == "binary":
        bits, qmin, qmax = 1, -1, 1
        codes = rng.choice([-1, 1], size=(out, k))
    elif scheme == "ternary":
        bits, qmin, qmax = 2, -1, 1
        codes = rng.integers(-1, 2, size=(out, k))
    elif scheme == "pow2":
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax
        codes = rng.integers(qmin, qmax + 1, size=(out, k))
    else:
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        codes = rng.integers(qmin, qmax + 1, size=(out, k))
    shape = (out,) if per_channel else ()
    scale = torch.from_numpy(rng.uniform(0.01, 2, size=shape).astype(np.float32))
    zp = None
    if scheme in ("uniform", "affine") and asymmetric:
        zp = torch.from_numpy(rng.integers(qmin, qmax + 1, size=shape).astype(np.float32))
    neg = None
    if scheme == "ternary" and asymmetric:
        neg = torch.from_numpy(rng.uniform(0.01, 2, size=shape).astype(np.float32))
    spec = QuantSpec(scheme, bits, qmin, qmax, scale, zp, neg, 0 if per_channel else None, signed)
    node = Node(
        "fc",
        "linear",
        ["input"],
        weight_codes=codes.astype(np.int32),
        weight_spec=lowbit.export.spec_to_numpy(spec),
        bias=rng.normal(size=out).astype(np.float32),
    )
    graph = Graph(["input"], [None, k], [node], ["fc"], {"shapes": {"fc": [None, out]}})
    data = graph_to_bytes(graph, ternary_layout=layout)
    back = graph_from_bytes(data).nodes[0]
    np.testing.assert_array_equal(back.weight_codes, codes)
    for key in ("scheme", "bits", "qmin", "qmax", "axis", "signed"):
        assert back.weight_spec[key] == getattr(spec, key)
    for key in ("scale", "zero_point", "scale_neg"):
        want = getattr(spec, key)
        got = back.weight_spec[key]
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(back.bias, node.bias)
    torch_values = spec.dequantize(torch.from_numpy(codes)).numpy()
    np.testing.assert_array_equal(dequantize(back.weight_codes, back.weight_spec), torch_values)
    (stored,) = (v for n, v in safetensors.numpy.load(data).items() if n == "fc.weight")
    assert stored.size == expected_nbytes(spec, out * k, layout)


# ----------------------------------------------------------------------------- coverage
@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(list_models("image"))))
def test_every_registry_model_exports(index: int, tmp_path: Path) -> None:
    """Each registry model, with a different method each (all methods are covered)."""
    name = list_models("image")[index]
    method = EXPORTABLE[index % len(EXPORTABLE)]
    shape = (1, 28, 28) if name in ("lenet5", "mlp") else (3, 32, 32)
    model = calibrate(lowbit.quantize(create_model(name, 10, shape, seed=0), method), shape)
    path = export(model, tmp_path / f"{name}.lowbit", example_input=shape)
    x = batch(2, shape, seed=5)
    with torch.no_grad():
        ref = model(x).numpy()
    out = load(path)(x.numpy())
    assert out.shape == ref.shape == (2, 10)
    errors = layerwise_errors(model, x)
    assert len(errors) >= 3
    assert max(errors.values()) <= LAYER_RTOL, (name, method, errors)


def test_remaining_methods_on_resnet20() -> None:
    model = calibrate(
        lowbit.quantize(create_model("resnet20", 10, (3, 32, 32), seed=1), "bnn"), (3, 32, 32)
    )
    graph = build_graph(model, (3, 32, 32))
    assert [n.op for n in graph.nodes].count("conv2d") == 19
    assert Model(graph).kernels()["layer3_2_conv2"] == "binary"


# ----------------------------------------------------------------------------- errors
class WithGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class WithSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x))


@pytest.mark.parametrize(
    ("model", "words"),
    [(WithGelu(), ["'act'", "GELU"]), (WithSigmoid(), ["'sigmoid'", "not supported"])],
)
def test_unsupported_modules_and_functions_are_named(model, words) -> None:
    with pytest.raises(ValueError) as err:
        build_graph(model, (4,))
    for word in words:
        assert word in str(err.value)


def test_uninitialised_activation_step_is_an_error() -> None:
    model = lowbit.quantize(SmallNet(), "lsq")  # LSQ activation steps need a forward on data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not initialised"):
        build_graph(model.eval(), IN_SHAPE)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_example_input_is_required() -> None:
    with pytest.raises(ValueError, match="example_input"):
        build_graph(SmallNet())
    with pytest.raises(ValueError, match="example_input"):
        build_graph(SmallNet(), (1, -16, 16))


def test_bad_ternary_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ternary_layout"):
        export(
            quantized_net("ttq"),
            tmp_path / "x.lowbit",
            example_input=IN_SHAPE,
            ternary_layout="3bit",
        )


# ----------------------------------------------------------------------------- behaviour
def test_export_leaves_the_model_alone() -> None:
    model = quantized_net("lsq").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_graph(model, IN_SHAPE)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "m.lowbit"
    graph = build_graph(quantized_net("bnn"), IN_SHAPE)
    write_graph(graph, path)
    original = path.read_bytes()
    broken = Graph(["input"], [None, 4], [Node("fc", "linear", ["nope"])], ["fc"])
    with pytest.raises(ValueError):
        write_graph(broken, path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["m.lowbit"]


def test_package_is_callable(tmp_path: Path) -> None:
    path = lowbit.export(quantized_net("twn"), tmp_path / "c.lowbit", example_input=IN_SHAPE)
    assert load(path).num_classes == 10


def test_export_run_folder(tmp_path: Path) -> None:
    """``lowbit export RUN``: rebuilds the run's model, records the dataset normalisation."""
    from lowbit.train.experiment import Experiment, load_run

    exp = Experiment.from_dict(
        {
            "name": "tiny",
            "model": {"name": "lenet5", "channels": [4, 8], "hidden": 16},
            "data": {"name": "digits"},
            "quant": "twn",
            "train": {"epochs": 1},
        }
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "experiment.yaml").write_text(yaml.safe_dump(exp.to_dict()))
    (run / "run.json").write_text(
        json.dumps({"num_classes": 10, "in_shape": [1, 8, 8], "dataset": "digits"})
    )
    model = create_model("lenet5", 10, (1, 8, 8), seed=3, channels=[4, 8], hidden=16)
    lowbit.quantize(model, "twn")
    calibrate(model, (1, 8, 8))
    state = {f"model/{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(run / "qat" / "checkpoints" / "last", state, {})
    path = export_run(run, tmp_path / "run.lowbit")
    runtime = load(path)
    pre = runtime.meta["preprocess"]
    assert pre["scale"] == pytest.approx(1 / 16) and len(pre["mean"]) == 1
    _, rebuilt, _ = load_run(run)
    x = batch(4, (1, 8, 8))
    with torch.no_grad():
        ref = rebuilt(x).numpy()
    np.testing.assert_allclose(runtime(x.numpy()), ref, rtol=1e-5, atol=1e-5)
