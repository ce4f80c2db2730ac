"""ONNX int8 that is exact in ONNX Runtime on every x86 CPU (lowbit.export.ort_saturation).

ORT's u8s8 QGEMM kernels on AVX2-only CPUs (and AVX-512 without VNNI) add pairs of u8 * s8
products into a saturating int16 (``vpmaddubsw``); VNNI/AMX CPUs do not. These tests do not
depend on the CPU they run on: the probes have exact answers that a saturating kernel cannot
produce (a pair ``255 * 127 * 2 = 64770`` saturates to ``32767``), so they fail on a machine
whose ORT saturates unless the export avoids the u8s8 path, and the graph checks are static.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import lowbit
from lowbit.export.onnx import export_onnx
from lowbit.export.ort_saturation import avoid_u8s8_saturation, saturation_risks


def run_default(model: onnx.ModelProto, x: np.ndarray, tmp_path: Path) -> tuple[np.ndarray, list]:
    """Output of an ORT session with default options, and the op types it actually ran."""
    path, optimised = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save(model, path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimised)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    return y, [n.op_type for n in onnx.load(optimised).graph.node]


def probe(
    weight_codes: np.ndarray, zero_points: np.ndarray, act_hi: float = 255.0
) -> onnx.ModelProto:
    """One QDQ ``Gemm``: uint8 input (scale 1, zero point 0, clipped to ``act_hi``) times int8
    weight codes ``[N, K]`` (scale 1, per-row zero points): its exact answer is an integer."""
    n, k = weight_codes.shape
    per_row = zero_points.size > 1
    inits = [
        numpy_helper.from_array(np.float32(0.0), "lo"),
        numpy_helper.from_array(np.float32(act_hi), "hi"),
        numpy_helper.from_array(np.float32(1.0), "one"),
        numpy_helper.from_array(np.uint8(0), "x_zp"),
        numpy_helper.from_array(weight_codes.astype(np.int8), "w_codes"),
        numpy_helper.from_array(np.ones(n, np.float32) if per_row else np.float32(1), "w_scale"),
        numpy_helper.from_array(zero_points.astype(np.int8).reshape(-1 if per_row else ()), "w_zp"),
    ]
    nodes = [
        helper.make_node("Clip", ["x", "lo", "hi"], ["xc"], name="clip"),
        helper.make_node("QuantizeLinear", ["xc", "one", "x_zp"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "one", "x_zp"], ["xd"], name="dq"),
        helper.make_node(
            "DequantizeLinear", ["w_codes", "w_scale", "w_zp"], ["w"], name="w", axis=0
        ),
        helper.make_node("Gemm", ["xd", "w"], ["y"], name="probe", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def exact(x: np.ndarray, codes: np.ndarray, zp: np.ndarray) -> np.ndarray:
    return x.astype(np.int64) @ (codes.astype(np.int64) - zp.reshape(-1, 1)).T


def test_one_node_probe_is_flagged_and_exact_after_the_rewrite(tmp_path: Path) -> None:
    codes = np.full((3, 8), 127, np.int64)
    codes[1] = -128
    zp = np.zeros(1, np.int64)
    model = probe(codes, zp)
    (risk,) = saturation_risks(model.graph)
    assert (risk.layer, risk.act_max, risk.w_min, risk.w_max) == ("probe", 255, -128, 127)
    assert "'probe'" in risk.message() and "vpmaddubsw" in risk.message()
    assert avoid_u8s8_saturation(model.graph) == []  # one zero point: uint8, no warning
    assert saturation_risks(model.graph) == []
    w = next(t for t in model.graph.initializer if t.name == "w_codes")
    assert w.data_type == TensorProto.UINT8
    x = np.full((4, 8), 255, np.float32)
    y, ops = run_default(model, x, tmp_path)
    assert "QGemm" in ops  # ORT ran the integer kernel, not a float Gemm
    # 8 * 255 * 127 = 259080; a saturating u8s8 kernel gives 4 * 32767 = 131068
    np.testing.assert_array_equal(y, exact(x, codes, zp).astype(np.float32))


@pytest.mark.parametrize(
    ("w", "act_hi", "at_risk"),
    [
        (64, 255, False),
        (-64, 255, False),
        (65, 255, True),
        (-65, 255, True),
        (127, 129, False),
        (127, 130, True),
        (-128, 128, False),
        (-128, 129, True),
    ],
)
def test_risk_bound_is_the_int16_pair(w: int, act_hi: float, at_risk: bool) -> None:
    """``2 a w`` against [-32768, 32767]: |w| <= 64 is safe for any uint8 activation, and a
    clipped activation (codes <= 128) is safe for any int8 weight."""
    model = probe(np.full((1, 4), w), np.zeros(1, np.int64), act_hi)
    assert bool(saturation_risks(model.graph)) == at_risk


def test_weight_without_zero_point_input_becomes_uint8(tmp_path: Path) -> None:
    codes = np.full((2, 6), -128)
    model = probe(codes, np.zeros(1, np.int64))
    dq = next(n for n in model.graph.node if n.name == "w")
    del dq.input[2]  # DequantizeLinear's zero point is optional (0)
    assert avoid_u8s8_saturation(model.graph) == [] and saturation_risks(model.graph) == []
    assert len(dq.input) == 3
    x = np.full((1, 6), 255, np.float32)
    y, ops = run_default(model, x, tmp_path)
    assert "QGemm" in ops
    np.testing.assert_array_equal(y, exact(x, codes, np.zeros(1, np.int64)).astype(np.float32))


def test_differing_zero_points_fall_back_to_exact_float_weights(tmp_path: Path) -> None:
    codes = np.array([[127, 127], [100, -120]])
    zp = np.array([0, 3])
    model = probe(codes, zp)
    (message,) = avoid_u8s8_saturation(model.graph)
    assert "layer 'probe'" in message and "float32" in message
    assert saturation_risks(model.graph) == []
    assert "w" in {t.name for t in model.graph.initializer}
    x = np.array([[255, 255], [3, 200]], np.float32)
    y, _ = run_default(model, x, tmp_path)
    np.testing.assert_array_equal(y, exact(x, codes, zp).astype(np.float32))


def test_exported_one_layer_probe_is_exact_in_default_session(tmp_path: Path) -> None:
    """lowbit's own export: input codes 255 times weight codes 127 (affine int8)."""
    model = lowbit.quantize(nn.Sequential(nn.Linear(2, 1, bias=False)), "affine")
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # per-channel scale 1/127: codes 127
        model.train()(torch.tensor([[0.0, 0.0], [2.55, 2.55]]))  # activation scale 0.01, Z = 0
        model.eval()
        x = torch.full((1, 2), 2.55)
        expected = model(x).numpy()
    proto = export_onnx(model, tmp_path / "probe.onnx", x)
    assert saturation_risks(proto.graph) == []
    y, ops = run_default(proto, x.numpy(), tmp_path)
    assert "QGemm" in ops
    np.testing.assert_allclose(y, expected, rtol=1e-6)  # 5.1; saturated: 2.58
    np.testing.assert_allclose(y, [[5.1]], rtol=1e-6)
