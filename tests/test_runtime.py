"""The numpy runtime reproduces the fake-quant PyTorch models (the reference) to float tolerance.

* layer by layer (each node fed PyTorch's own inputs): ``LAYER_RTOL`` relative, every method;
* end to end: logits within ``1e-4 max|ref|`` except where a last-ulp difference moved a value
  across a quantiser's rounding boundary (rare; then only that cascade differs), and top-1
  agreement >= 99.9 % on the MNIST-5k test split for a trained model of every method;
* the packed kernels: exact integer results with zero padding handled (binary, XNOR, ternary).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import lowbit
from lowbit.data import load_dataset
from lowbit.export import build_graph, export
from lowbit.models import create_model
from lowbit.nn import QuantConv2d
from lowbit.quant import create
from lowbit.runtime import Model, classify, load, read_input
from test_export import (
    EXPORTABLE,
    IN_SHAPE,
    LAYER_RTOL,
    batch,
    calibrate,
    layerwise_errors,
    quantized_net,
)

END_TO_END_RTOL = 1e-4


def assert_end_to_end_close(out: np.ndarray, ref: np.ndarray, share: float) -> None:
    """At least ``share`` of the logits within ``END_TO_END_RTOL * max|ref|``; the rest can only
    come from a rounding-boundary cascade, so top-1 must still agree where the margin is clear."""
    close = np.abs(out - ref) <= END_TO_END_RTOL * np.abs(ref).max()
    assert close.mean() >= share, close.mean()
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3 * np.abs(ref).max()
    assert (out.argmax(1) == ref.argmax(1))[clear].mean() >= 0.95


# ----------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", EXPORTABLE)
def test_each_layer_matches_torch(method: str) -> None:
    errors = layerwise_errors(quantized_net(method), batch(16, seed=3))
    assert len(errors) >= 10
    assert max(errors.values()) <= LAYER_RTOL, errors


@pytest.mark.parametrize("method", EXPORTABLE)
def test_small_cnn_end_to_end(method: str) -> None:
    model = quantized_net(method)
    x = batch(32, seed=4)
    with torch.no_grad():
        ref = model(x).numpy()
    out = Model(build_graph(model, IN_SHAPE))(x.numpy())
    assert_end_to_end_close(out, ref, 0.97)


@pytest.mark.parametrize("method", EXPORTABLE)
def test_lenet5_end_to_end(method: str) -> None:
    shape = (1, 28, 28)
    model = create_model("lenet5", 10, shape, seed=0, channels=(8, 16), hidden=32)
    calibrate(lowbit.quantize(model, method), shape)
    x = batch(16, shape, seed=6)
    with torch.no_grad():
        ref = model(x).numpy()
    out = Model(build_graph(model, shape))(x.numpy())
    assert_end_to_end_close(out, ref, 0.97)
    assert max(layerwise_errors(model, x).values()) <= LAYER_RTOL


def test_kernel_choice() -> None:
    """Binary and ternary layers run on the packed kernels (the first/last 8-bit layers and
    float-activation layers on float32 GEMMs)."""
    kinds = {
        m: set(Model(build_graph(quantized_net(m), IN_SHAPE)).kernels().values())
        for m in ("bnn", "xnor", "ttq", "lsq")
    }
    assert kinds["bnn"] == {"float", "binary"}
    assert kinds["xnor"] == {"float", "binary"}  # fc1 (beta per sample); conv2 has beta per pixel
    assert kinds["ttq"] == kinds["lsq"] == {"float"}


# ----------------------------------------------------------------------------- packed kernels
CUSTOM = {
    "bnn everywhere": {
        "weights": {"method": "bnn"},
        "activations": {"method": "bnn"},
        "replace_relu": "identity",
    },
    "xnor per sample": {
        "weights": {"method": "xnor"},
        "activations": {"method": "xnor", "per_sample": True},
        "replace_relu": "identity",
    },
    "twn + sign": {
        "weights": {"method": "twn"},
        "activations": {"method": "bnn"},
        "replace_relu": "identity",
    },
    "ttq + sign": {
        "weights": {"method": "ttq"},
        "activations": {"method": "bnn"},
        "replace_relu": "identity",
    },
    "ttq + int8": {
        "weights": {"method": "ttq"},
        "activations": {"method": "lsq", "bits": 8, "signed": True},
    },
    "twn + int4": {
        "weights": {"method": "twn"},
        "activations": {"method": "lsq", "bits": 4, "signed": True},
    },
}
KERNELS = {
    "bnn everywhere": "binary",
    "xnor per sample": "binary",
    "twn + sign": "ternary_sign",
    "ttq + sign": "ternary_sign",
    "ttq + int8": "ternary_int8",
    "twn + int4": "ternary_int8",
}


@pytest.mark.parametrize("name", list(CUSTOM))
def test_packed_kernels_match_torch(name: str) -> None:
    model = quantized_net(CUSTOM[name])
    runtime = Model(build_graph(model, IN_SHAPE))
    assert set(runtime.kernels().values()) == {KERNELS[name]}
    errors = layerwise_errors(model, batch(8, seed=7))
    assert max(errors.values()) <= LAYER_RTOL, errors


@pytest.mark.parametrize(("stride", "padding", "kernel"), [(1, 1, 3), (2, 2, 5), (1, 3, 3)])
def test_binary_conv_zero_padding_is_exact(stride: int, padding: int, kernel: int) -> None:
    """PyTorch pads the binarised input with zeros (not +-1): the packed kernel's correction
    must make the integer outputs equal exactly (BNN scale 1, so outputs are integers)."""
    torch.manual_seed(stride + padding)
    conv = QuantConv2d(
        5,
        7,
        kernel,
        stride=stride,
        padding=padding,
        bias=False,
        weight_quant=create("bnn", "weight"),
        input_quant=create("bnn", "activation"),
    )
    model = nn.Sequential(conv).eval()
    x = torch.randn(3, 5, 9, 11)
    runtime = Model(build_graph(model, x))
    assert list(runtime.kernels().values()) == ["binary"]
    with torch.no_grad():  # an independent reference: sign, zero padding, float conv
        ref = F.conv2d(
            torch.where(x >= 0, 1.0, -1.0),
            torch.where(conv.weight >= 0, 1.0, -1.0),
            stride=stride,
            padding=padding,
        )
    np.testing.assert_array_equal(runtime(x.numpy()), ref.numpy())


# ----------------------------------------------------------------------------- trained models
@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, nn.Module]:
    """MNIST-5k as tensors and a small LeNet-5 trained briefly in float32."""
    data = load_dataset("mnist5k")

    def tensors(ds):  # normalised images as the dataset's __getitem__ gives them, vectorised
        return (ds.images.float() * ds.scale - ds.mean) / ds.std, ds.labels

    x_train, y_train = tensors(data.train)
    x_test, y_test = tensors(data.test)
    model = create_model("lenet5", 10, (1, 28, 28), seed=0, channels=(8, 16), hidden=32)
    train(model, x_train, y_train, steps=100, lr=3e-3)
    return x_train, y_train, x_test, y_test, model


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("method", EXPORTABLE)
def test_trained_model_agrees_on_mnist_test_split(method: str, mnist, tmp_path: Path) -> None:
    x_train, y_train, x_test, _, float_model = mnist
    model = lowbit.quantize(copy.deepcopy(float_model), method)
    train(model, x_train, y_train, steps=40, lr=1e-3)
    with torch.no_grad():
        ref = model(x_test).numpy()
    path = export(model, tmp_path / f"{method}.lowbit", example_input=(1, 28, 28))
    out = load(path)(x_test.numpy())
    assert len(x_test) == 1000
    agreement = (out.argmax(1) == ref.argmax(1)).mean()
    assert agreement >= 0.999, (method, agreement)


# ----------------------------------------------------------------------------- interface
@pytest.fixture(scope="module")
def lowbit_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("files") / "bnn.lowbit"
    model = quantized_net("bnn")
    graph = build_graph(model, IN_SHAPE)
    graph.meta["preprocess"] = {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}
    from lowbit.export import write_graph

    return write_graph(graph, path)


def test_predict_top_k(lowbit_file: Path) -> None:
    runtime = load(lowbit_file)
    x = batch(5, seed=8).numpy()
    logits = runtime(x)
    pred = runtime.predict(x, top_k=3)
    assert pred.indices.shape == pred.probs.shape == (5, 3)
    np.testing.assert_array_equal(pred.indices, np.argsort(-logits, axis=1, kind="stable")[:, :3])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(pred.probs, np.take_along_axis(p, pred.indices, 1), rtol=1e-5)
    assert runtime.predict(x, top_k=50).indices.shape == (5, 10)
    with pytest.raises(ValueError, match="top_k"):
        runtime.predict(x, top_k=0)


def test_bad_inputs_are_refused(lowbit_file: Path) -> None:
    runtime = load(lowbit_file)
    with pytest.raises(ValueError, match=r"shape \[N, 1, 16, 16\]"):
        runtime(np.zeros((2, 1, 16, 15), np.float32))
    with pytest.raises(ValueError, match="shape"):
        runtime(np.zeros((1, 16, 16), np.float32))


def test_classify_images_and_arrays(lowbit_file: Path, tmp_path: Path) -> None:
    runtime = load(lowbit_file)
    pixels = np.random.default_rng(0).integers(0, 256, size=(16, 16), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "digit.png")
    np.save(tmp_path / "raw.npy", pixels[None])  # uint8: raw pixels, preprocessed
    expected = ((pixels.astype(np.float32) / 255 - 0.5) / 0.25)[None, None]
    np.testing.assert_allclose(read_input(tmp_path / "digit.png", runtime), expected, atol=1e-6)
    np.testing.assert_allclose(read_input(tmp_path / "raw.npy", runtime), expected, atol=1e-6)
    floats = batch(2, seed=9).numpy()
    np.save(tmp_path / "floats.npy", floats)  # float: already model inputs
    results = classify(lowbit_file, [tmp_path / "digit.png", tmp_path / "floats.npy"], top_k=2)
    assert [label for label, _ in results] == [
        str(tmp_path / "digit.png"),
        f"{tmp_path / 'floats.npy'}[0]",
        f"{tmp_path / 'floats.npy'}[1]",
    ]
    want = runtime.predict(floats, 2)
    assert [c for c, _ in results[1][1]] == list(want.indices[0])
    assert all(len(pairs) == 2 and pairs[0][1] >= pairs[1][1] for _, pairs in results)
    np.save(tmp_path / "wrong.npy", np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        read_input(tmp_path / "wrong.npy", runtime)


def test_runtime_needs_no_torch(lowbit_file: Path) -> None:
    code = (
        "import sys, numpy as np, lowbit.runtime as rt\n"
        f"m = rt.load({str(lowbit_file)!r})\n"
        "m(np.zeros((1, 1, 16, 16), np.float32))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


CLI_ENV = {**os.environ, "PYTHONPATH": str(Path(lowbit.__file__).parents[1])}
"""The CLI run from another folder imports this lowbit (not an installed copy)."""


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: (d / "folder").mkdir() or "folder", "folder: is a folder"),
        (lambda d: (d / "note.png").write_text("hello") and "note.png", "note.png: not an image"),
        (lambda d: (d / "x.npy").write_text("hello") and "x.npy", "x.npy: not a readable .npy"),
        (lambda d: "gone.png", "gone.png: no such file"),
    ],
)
def test_lowbit_run_refuses_bad_inputs_in_one_line(
    lowbit_file: Path, tmp_path: Path, make, words: str
) -> None:
    """The real CLI (a subprocess): a folder, a non-image, a broken array or a missing file
    given to ``lowbit run`` is one error line and exit status 2, not a traceback."""
    name = make(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "run", str(lowbit_file), name],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=CLI_ENV,
    )
    assert proc.returncode == 2, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines


def test_onnx_files_run_with_their_input_normalisation(lowbit_file: Path, tmp_path: Path) -> None:
    """``lowbit run model.onnx image.png`` applies the normalisation stored in the ONNX file,
    giving the .lowbit file's answer for the same raw pixels."""
    from lowbit.export.onnx import write_onnx
    from lowbit.runtime import OnnxModel, load_graph

    write_onnx(load_graph(lowbit_file), tmp_path / "m.onnx")
    onnx_model = load(tmp_path / "m.onnx")
    assert isinstance(onnx_model, OnnxModel)
    assert onnx_model.meta["preprocess"] == load(lowbit_file).meta["preprocess"]
    pixels = np.random.default_rng(1).integers(0, 256, size=(16, 16), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "digit.png")
    x = read_input(tmp_path / "digit.png", onnx_model)
    np.testing.assert_allclose(x, ((pixels / 255 - 0.5) / 0.25)[None, None], atol=1e-6)
    (_, ours), (_, theirs) = (
        classify(m, [tmp_path / "digit.png"], top_k=3)[0] for m in (lowbit_file, onnx_model)
    )
    assert [c for c, _ in ours] == [c for c, _ in theirs]
    np.testing.assert_allclose([p for _, p in ours], [p for _, p in theirs], atol=1e-3)
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "run", "m.onnx", "digit.png", "--top-k", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=CLI_ENV,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{ours[0][0]} ({ours[0][1]:.3f})" in proc.stdout
    with pytest.raises(ValueError, match="engine 'integer'"):
        load(tmp_path / "m.onnx", engine="integer")
