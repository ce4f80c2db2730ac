"""The deployment contract (lowbit.contract): typed specs and graph nodes, their one JSON form,
their one validator, and the loader refusing loose values through them.

References: the torch quantisers themselves (``QuantSpec.dequantize`` and the eval forward are
the definition the numpy contract must reproduce bit for bit), and hand-made invalid values.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit
from lowbit.contract import (
    CodeSpec,
    DynamicMaxAbsQuant,
    Graph,
    GraphError,
    InputQuant,
    Methods,
    Node,
    SignMeanAbsQuant,
    SignQuant,
    StaticQuant,
)
from lowbit.export import build_graph, graph_to_bytes
from lowbit.nn import weight_codes
from lowbit.quant import create
from lowbit.quant.base import QuantSpec
from lowbit.runtime import LowbitFileError, compile_integer, load, load_graph, loads
from test_export import IN_SHAPE, quantized_net
from test_fuzz_lowbit_file import edit, set_payload_bytes, split


# ----------------------------------------------------------------------------- torch <-> contract
def _weight_specs() -> dict[str, tuple[torch.Tensor, QuantSpec]]:
    """Codes and torch spec of every weight method's quantised conv (per method)."""
    out = {}
    for method in lowbit.methods():
        model = quantized_net(method)
        found = weight_codes(model.conv2)
        if found is not None:
            out[method] = found
    return out


SPECS = _weight_specs()


@pytest.mark.parametrize("method", sorted(SPECS))
def test_contract_spec_is_the_torch_spec(method: str) -> None:
    """One conversion each way; the numpy dequantisation equals the torch one bit for bit."""
    codes, spec = SPECS[method]
    typed = spec.to_contract()
    assert typed.scheme == spec.scheme and (typed.qmin, typed.qmax) == (spec.qmin, spec.qmax)
    np.testing.assert_array_equal(typed.dequantize(codes.numpy()), spec.dequantize(codes).numpy())
    back = QuantSpec.from_contract(typed)
    torch.testing.assert_close(back.dequantize(codes), spec.dequantize(codes), rtol=0, atol=0)
    assert back.to_contract() == typed


@pytest.mark.parametrize("method", sorted(SPECS))
def test_code_spec_json_round_trip(method: str) -> None:
    typed = SPECS[method][1].to_contract()
    again = CodeSpec.from_json(json.loads(json.dumps(typed.to_json())))
    assert again == typed
    assert again is not typed


INPUT_QUANTS = [
    StaticQuant(CodeSpec("uniform", 4, -8, 7, np.float32(0.25)), 4.0),
    StaticQuant(CodeSpec("affine", 8, 0, 255, np.float32(0.02), np.float32(128)), None),
    SignQuant(),
    SignMeanAbsQuant(per_sample=True),
    DynamicMaxAbsQuant(qmax=7),
]


@pytest.mark.parametrize("iq", INPUT_QUANTS, ids=lambda q: q.kind)
def test_input_quant_json_round_trip(iq: InputQuant) -> None:
    again = InputQuant.from_json(json.loads(json.dumps(iq.to_json())))
    assert again == iq
    assert type(again) is type(iq)


@pytest.mark.parametrize("method", ["bnn", "xnor", "ttq", "lsq", "affine", "stochastic"])
def test_graph_json_round_trip(method: str) -> None:
    """A real model's graph (codes, specs, input quantisers, shapes, methods) through JSON text
    and back is equal, field for field."""
    graph = build_graph(quantized_net(method), IN_SHAPE)
    again = Graph.from_json(json.loads(json.dumps(graph.to_json())))
    assert again == graph
    layers = [n for n in again.nodes if n.op in ("conv2d", "linear")]
    assert all(isinstance(n.methods, Methods) for n in layers)
    assert method in {n.methods.weights for n in layers}
    assert all(n.shape is not None and n.shape[0] is None for n in again.nodes)


def test_equality_sees_every_field() -> None:
    a = CodeSpec("uniform", 4, -8, 7, np.float32(0.25))
    assert a != CodeSpec("uniform", 4, -8, 7, np.float32(0.5))
    assert a != CodeSpec("uniform", 4, -8, 7, np.float32(0.25), axis=None, signed=False)
    node = Node("fc", "linear", ["x"], weight_codes=np.array([[1, -2]]), weight_spec=a)
    other = Node("fc", "linear", ["x"], weight_codes=np.array([[1, -3]]), weight_spec=a)
    assert node != other


# ----------------------------------------------------------------------------- activation kinds
def _observed(q):
    """An activation quantiser after one training batch (EMA range, LSQ step) in eval mode."""
    q.train()
    with torch.no_grad():
        q(torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(11)) * 2)
    return q.eval()


ACTIVATION_QUANTIZERS = {
    "lsq 4-bit signed": lambda: _observed(create("lsq", "activation", bits=4)),
    "lsq 3-bit unsigned": lambda: _observed(create("lsq", "activation", bits=3, signed=False)),
    "pact 3-bit": lambda: create("pact", "activation", bits=3, alpha_init=1.7),
    "dorefa 2-bit": lambda: create("dorefa", "activation", bits=2),
    "affine 8-bit": lambda: _observed(create("affine", "activation")),
    "stochastic 8-bit": lambda: create("stochastic", "activation").eval(),
    "bnn": lambda: create("bnn", "activation"),
}


@pytest.mark.parametrize("name", list(ACTIVATION_QUANTIZERS))
def test_runtime_spec_reproduces_the_quantiser(name: str) -> None:
    """``q.runtime_spec(x).fake_quantize(x)`` is q's eval forward bit for bit, rounding ties
    and clipped values included."""
    q = ACTIVATION_QUANTIZERS[name]()
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(12)) * 3
    spec = q.runtime_spec(x)
    assert isinstance(spec, InputQuant)
    if isinstance(spec, StaticQuant):  # exact half-steps of the grid
        step = float(spec.scale)
        x[0] = (torch.arange(75).reshape(3, 5, 5) - 30 + 0.5) * step
    with torch.no_grad():
        ref = q(x).numpy()
    np.testing.assert_array_equal(spec.fake_quantize(x.numpy()), ref)


def test_runtime_spec_edge_states() -> None:
    assert create("affine", "activation").runtime_spec(torch.zeros(2, 3)) is None  # passthrough
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="not initialised"):
        create("lsq", "activation").runtime_spec(x)
    with pytest.raises(ValueError, match="no runtime"):
        create("ttq", "weight").runtime_spec(x)
    for per_sample in (False, True):
        q = create("xnor", "activation", per_sample=per_sample)
        with torch.no_grad():
            ref = q(x).numpy()
        spec = q.runtime_spec(x)
        assert spec == SignMeanAbsQuant(per_sample)
        np.testing.assert_allclose(spec.fake_quantize(x.numpy()), ref, rtol=1e-6)


# ----------------------------------------------------------------------------- the validator
F = np.float32


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: CodeSpec("float", 4, -8, 7, F(1)), "unknown scheme"),
        (lambda: CodeSpec("uniform", 4, -8, 7, F(0)), "zero or negative"),
        (lambda: CodeSpec("uniform", 4, -8, 7, F(-0.5)), "zero or negative"),
        (lambda: CodeSpec("pow2", 4, -7, 7, F(np.inf)), "finite"),
        (lambda: CodeSpec("binary", 1, -1, 1, np.array([1, -1], F), axis=0), "negative"),
        (lambda: CodeSpec("ternary", 2, -1, 1, F(1), scale_neg=F(np.nan)), "finite"),
        (lambda: CodeSpec("affine", 8, 0, 255, F(0.1), F(127.5)), "integer"),
        (lambda: CodeSpec("uniform", 4.0, -8, 7, F(1)), "bits"),  # type: ignore[arg-type]
        (lambda: CodeSpec("uniform", 4, 7, -8, F(1)), "qmin/qmax"),
        (lambda: CodeSpec("uniform", 4, -8, 7, np.array([1, 2], F)), "need an axis"),
        (lambda: CodeSpec("binary", 1, -1, 1, F(1), F(0)), "no zero point"),
        (lambda: StaticQuant(CodeSpec("pow2", 4, -7, 7, F(1))), "uniform/affine"),
        (lambda: StaticQuant(CodeSpec("uniform", 4, -8, 7, F(1)), 0.0), "inv_scale"),
        (lambda: SignMeanAbsQuant(per_sample=1), "bool"),  # type: ignore[arg-type]
        (lambda: DynamicMaxAbsQuant(qmax=0), "qmax"),
    ],
)
def test_loose_values_are_refused(make, words: str) -> None:
    with pytest.raises(GraphError, match=words):
        make()


@pytest.mark.parametrize(
    ("scheme", "codes", "words"),
    [
        ("ternary", [[2, 0, -1]], "code 2 is outside the ternary spec"),
        ("binary", [[1, 0, -1]], "code 0 is outside the binary spec"),
        ("uniform", [[9, 0, -1]], "code 9 is outside the uniform spec"),
    ],
)
def test_codes_must_fit_their_scheme(scheme: str, codes: list, words: str) -> None:
    qmin, qmax = (-1, 1) if scheme != "uniform" else (-8, 7)
    spec = CodeSpec(
        scheme, 4, qmin if scheme != "ternary" else -8, qmax if scheme != "ternary" else 7, F(1)
    )
    with pytest.raises(GraphError, match=f"node 'fc': weight {words}"):
        Node("fc", "linear", ["x"], weight_codes=np.array(codes), weight_spec=spec)


def test_nodes_refuse_untyped_specs() -> None:
    """The contract has no dict form: a dict where a typed spec belongs is an error."""
    with pytest.raises(GraphError, match="weight_spec must be a CodeSpec"):
        Node("fc", "linear", ["x"], weight_codes=np.ones((2, 2), int), weight_spec={"scheme": 1})
    with pytest.raises(GraphError, match="input_quant must be an InputQuant"):
        Node("fc", "linear", ["x"], weight_float=np.ones((2, 2), F), input_quant={"kind": "sign"})


# ----------------------------------------------------------------------------- the loader
@pytest.fixture(scope="module")
def affine_file() -> bytes:
    return graph_to_bytes(build_graph(quantized_net("affine"), IN_SHAPE))


@pytest.fixture(scope="module")
def lsq_file() -> bytes:
    return graph_to_bytes(build_graph(quantized_net("lsq"), IN_SHAPE))


def _layer(header: dict, where: str = "input_quant") -> dict:
    return next(n for n in header["nodes"] if n.get(where))


def _set_float(data: bytes, tensor: str, value: float) -> bytes:
    return set_payload_bytes(data, tensor, np.array([value], np.float32).tobytes())


@pytest.mark.parametrize("value", [10.5, "10", 0, -3, True, 9])
def test_loader_refuses_a_bad_num_classes(affine_file: bytes, value: object) -> None:
    data = edit(affine_file, lambda t, h: h.__setitem__("num_classes", value))
    with pytest.raises(LowbitFileError, match=r"bad\.lowbit: .*num_classes"):
        loads(data, "bad.lowbit")


@pytest.mark.parametrize("value", [0.0, -0.25, float("inf")])
def test_loader_refuses_bad_weight_scales(lsq_file: bytes, value: float) -> None:
    layer = next(n for n in split(lsq_file)[1]["nodes"] if n.get("weight", {}).get("spec"))
    data = _set_float(lsq_file, layer["weight"]["spec"]["scale"], value)
    with pytest.raises(LowbitFileError, match=rf"bad.lowbit: node '{layer['name']}'.*scale"):
        loads(data, "bad.lowbit")


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_loader_refuses_bad_input_scales(affine_file: bytes, value: float) -> None:
    layer = _layer(split(affine_file)[1])
    data = _set_float(affine_file, layer["input_quant"]["spec"]["scale"], value)
    with pytest.raises(LowbitFileError, match=rf"node '{layer['name']}'.*scale"):
        loads(data, "bad.lowbit")


def test_loader_refuses_a_fractional_affine_zero_point(affine_file: bytes) -> None:
    layer = _layer(split(affine_file)[1])
    spec = layer["input_quant"]["spec"]
    assert spec["scheme"] == "affine" and spec["zero_point"] is not None
    data = _set_float(affine_file, spec["zero_point"], 3.5)
    with pytest.raises(LowbitFileError, match=rf"node '{layer['name']}'.*zero point"):
        loads(data, "bad.lowbit")


def test_loader_refuses_codes_that_do_not_match_the_scheme(lsq_file: bytes) -> None:
    """n-bit codes declared ternary: codes outside {-1, 0, 1} name the layer."""
    header = split(lsq_file)[1]
    layer = next(n for n in header["nodes"] if n.get("weight", {}).get("spec"))

    def to_ternary(t: dict, h: dict) -> None:
        spec = next(n for n in h["nodes"] if n["name"] == layer["name"])["weight"]["spec"]
        spec["scheme"] = "ternary"

    with pytest.raises(LowbitFileError, match=rf"node '{layer['name']}'.*outside the ternary"):
        loads(edit(lsq_file, to_ternary), "bad.lowbit")


def test_loader_errors_are_one_line(affine_file: bytes) -> None:
    data = edit(affine_file, lambda t, h: h.__setitem__("num_classes", 2.5))
    with pytest.raises(LowbitFileError) as err:
        loads(data, "bad.lowbit")
    assert "\n" not in str(err.value)


def test_header_unchanged_struct() -> None:
    """The file layout is still version 1 (the header did not change)."""
    data = graph_to_bytes(build_graph(quantized_net("bnn"), IN_SHAPE))
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["lowbit"])
    assert header["version"] == 1


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("method", ["lsq", "ttq", "xnor", "dorefa", "affine"])
def test_version_1_files_load_and_run_identically(method: str) -> None:
    """Files written by the exporter before the contract types existed (tests/data, with the
    logits that code computed) still load, and give the same logits bit for bit on both
    engines."""
    saved = np.load(DATA / f"v1_{method}.npz")
    model = load(DATA / f"v1_{method}.lowbit")
    np.testing.assert_array_equal(model(saved["x"]), saved["logits"])
    # "integer" holds what engine="auto" gave then: the integer engine (then defaulting to
    # gemmlowp requantisation with 8 bits of headroom) for lsq, dorefa and affine, the float
    # engine for ttq and xnor (float activations)
    auto = load(DATA / f"v1_{method}.lowbit", engine="auto")
    if method in ("lsq", "dorefa", "affine"):
        assert auto.engine == "integer"
        integer = compile_integer(load_graph(DATA / f"v1_{method}.lowbit"), min_shift=8)
        np.testing.assert_array_equal(integer.run(saved["x"]), saved["integer"])
    else:
        assert auto.engine == "float"
        np.testing.assert_array_equal(auto(saved["x"]), saved["integer"])
    assert model.meta["preprocess"] == {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}
