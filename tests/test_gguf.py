"""GGUF export for llama.cpp, checked with the independent ``gguf`` package (reader, quants).

Models are small LLaMAs with rows of 256 or 512 weights so that TQ blocks apply. Besides the
byte-level checks, a numpy transcription of llama.cpp's ``llama`` graph (adjacent-pair RoPE,
GQA broadcast) runs the file's dequantised tensors and must give lowbit's logits: that catches
a wrong q/k permutation, name or metadata value.
"""

from __future__ import annotations

import gguf  # the dev extra installs it
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

import lowbit
from lowbit.export.gguf import (
    GGUFExportError,
    byte_tokens,
    write_llama_gguf,
)
from lowbit.export.gguf_format import BLOCK, TQ1_0, TQ2_0, encode_ternary
from lowbit.export.gguf_model import export_gguf
from lowbit.models.llama import llama

BITNET_A8 = {  # BitNet weights, 8-bit per-token activations without the in-layer norm
    "weights": {"method": "bitnet"},
    "activations": {"method": "bitnet", "bits": 8, "norm": False},
    "last_layer": "float",
}
QTYPES = {TQ2_0: QT.TQ2_0, TQ1_0: QT.TQ1_0}


def small_llama(seed: int = 0, **kw: object) -> torch.nn.Module:
    shape = {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden": 512} | kw
    model = llama(256, (32,), **shape)
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # norms away from 1, so that a misplaced norm shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
                assert "norm" in name
    return model


def read(path):
    return gguf.GGUFReader(path)


def tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def field(reader, key):
    return reader.fields[key].contents()


def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k permutation (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("ggml_type", [TQ2_0, TQ1_0])
@pytest.mark.parametrize("per_row", [False, True])
def test_ternary_blocks_equal_gguf_quantize(ggml_type: int, per_row: bool) -> None:
    rng = np.random.default_rng(ggml_type + per_row)
    codes = rng.integers(-1, 2, size=(6, 3 * BLOCK)).astype(np.int8)
    codes[2, BLOCK : 2 * BLOCK] = 0  # an all-zero block: scale 0 there
    codes[4] = 0
    scale = rng.uniform(0.01, 2.0, size=(6, 1) if per_row else ()).astype(np.float32)
    blocks = np.broadcast_to(scale.reshape(-1, 1), (6, 3)).astype(np.float32)
    ours = encode_ternary(codes, blocks, ggml_type)
    values = codes.astype(np.float32) * scale
    ref = quantize(values, QTYPES[ggml_type])
    assert ours == ref.tobytes()
    back = dequantize(np.frombuffer(ours, np.uint8).reshape(ref.shape), QTYPES[ggml_type])
    np.testing.assert_array_equal(back, codes * scale.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize(
    "recipe", [BITNET_A8, {"weights": {"method": "twn"}, "last_layer": "float"}]
)
def test_every_ternary_tensor_is_byte_exact_and_dequantises_to_lowbit(tmp_path, recipe) -> None:
    model = small_llama()
    lowbit.quantize(model, recipe)
    path = export_gguf(model, tmp_path / "m.gguf")
    found = tensors(read(path))
    n_ternary = 0
    cfg = model.config
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quant", None)
        if quantizer is None:
            continue
        codes, spec = quantizer.codes(module.weight)
        values = (codes.float() * spec.scale).numpy()  # lowbit's ternary * scale
        codes_np = codes.numpy()
        if name.endswith(("q_proj", "k_proj")):
            heads = cfg.n_heads if name.endswith("q_proj") else cfg.n_kv_heads
            values, codes_np = hf_permute(values, heads), hf_permute(codes_np, heads)
        layer = int(name.split(".")[2])
        suffix = {
            "q_proj": "attn_q",
            "k_proj": "attn_k",
            "v_proj": "attn_v",
            "o_proj": "attn_output",
            "gate_proj": "ffn_gate",
            "up_proj": "ffn_up",
            "down_proj": "ffn_down",
        }[name.rsplit(".", 1)[1]]
        t = found[f"blk.{layer}.{suffix}.weight"]
        assert t.tensor_type == QT.TQ2_0
        np.testing.assert_array_equal(t.data, quantize(values, QT.TQ2_0))
        back = dequantize(t.data, QT.TQ2_0)
        np.testing.assert_array_equal(back, codes_np * np.float32(np.float16(spec.scale.item())))
        np.testing.assert_allclose(back, values, rtol=2**-11, atol=0)
        n_ternary += 1
    assert n_ternary == 7 * cfg.n_layers  # every projection, 100% of the ternary tensors
    assert sum(t.tensor_type == QT.TQ2_0 for t in found.values()) == n_ternary


def test_metadata_and_tokenizer_read_back(tmp_path) -> None:
    model = small_llama(rope_theta=5e5, norm_eps=1e-6)
    lowbit.quantize(model, BITNET_A8)
    reader = read(export_gguf(model, tmp_path / "m.gguf", ternary_type="tq1_0"))
    c = model.config
    expected = {
        "general.architecture": "llama",
        "llama.context_length": c.max_seq_len,
        "llama.embedding_length": c.dim,
        "llama.block_count": c.n_layers,
        "llama.feed_forward_length": c.hidden,
        "llama.attention.head_count": c.n_heads,
        "llama.attention.head_count_kv": c.n_kv_heads,
        "llama.rope.dimension_count": c.dim // c.n_heads,
        "llama.vocab_size": c.vocab_size,
        "general.file_type": 36,  # MOSTLY_TQ1_0
        "tokenizer.ggml.model": "gpt2",
    }
    for key, value in expected.items():
        assert field(reader, key) == value, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(c.rope_theta, rel=1e-7)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(
        c.norm_eps, rel=1e-7
    )
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(set(tokens)) == c.vocab_size
    assert field(reader, "tokenizer.ggml.merges") == []
    assert {t.tensor_type for t in reader.tensors} == {QT.TQ1_0, QT.F16, QT.F32}
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= names
    assert len(names) == 3 + 9 * c.n_layers


def test_byte_tokens_are_gpt2_byte_level() -> None:
    tokens = byte_tokens()
    assert tokens[ord("a")] == "a" and tokens[ord("~")] == "~"
    assert tokens[0x20] == "\u0120" and tokens[0x0A] == "\u010a"  # GPT-2's 'Ġ' and 'Ċ'
    assert tokens[0xAD] == "\u0143" and tokens[0x7F] == "\u0121"
    assert sorted(map(ord, tokens))[:1] == [0x21] and len(set(tokens)) == 256


def llamacpp_logits(path, ids: np.ndarray) -> np.ndarray:
    """llama.cpp's ``llama`` graph in numpy on the file's dequantised tensors."""
    reader = read(path)
    w = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}
    n_head = int(field(reader, "llama.attention.head_count"))
    n_kv = int(field(reader, "llama.attention.head_count_kv"))
    eps = float(field(reader, "llama.attention.layer_norm_rms_epsilon"))
    base = float(field(reader, "llama.rope.freq_base"))
    n_rot = int(field(reader, "llama.rope.dimension_count"))

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x):  # (T, H, d): rotate adjacent pairs (2i, 2i+1) by p * base^(-2i/n_rot)
        pos = np.arange(x.shape[0])[:, None, None]
        theta = pos * base ** (-np.arange(0, n_rot, 2) / n_rot)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * np.cos(theta) - b * np.sin(theta)
        out[..., 1::2] = a * np.sin(theta) + b * np.cos(theta)
        return out

    x = w["token_embd.weight"][ids]
    t = len(ids)
    for i in range(int(field(reader, "llama.block_count"))):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "attn_q.weight"].T).reshape(t, n_head, -1))
        k = rope((h @ w[p + "attn_k.weight"].T).reshape(t, n_kv, -1))
        v = (h @ w[p + "attn_v.weight"].T).reshape(t, n_kv, -1)
        kv_of = np.arange(n_head) // (n_head // n_kv)
        s = np.einsum("thd,shd->hts", q, k[:, kv_of]) / np.sqrt(q.shape[-1])
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", a, v[:, kv_of]).reshape(t, -1)
        x = x + o @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        g = h @ w[p + "ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    out = w.get("output.weight", w["token_embd.weight"])
    return norm(x, w["output_norm.weight"]) @ out.T


def float_activation_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    """lowbit's reference: the exported weights, activations in float."""
    for m in model.modules():
        if getattr(m, "input_quant", None) is not None:
            m.input_quant = None
    with torch.no_grad():
        return model(torch.as_tensor(ids)[None]).double()[0].numpy()


@pytest.mark.parametrize("tie", [False, True])
def test_llamacpp_graph_on_the_file_gives_lowbit_logits(tmp_path, tie: bool) -> None:
    model = small_llama(seed=1, tie_embeddings=tie)
    lowbit.quantize(model, BITNET_A8)
    path = export_gguf(model, tmp_path / "m.gguf", float_type="f32")
    names = {t.name for t in read(path).tensors}
    assert ("output.weight" in names) is not tie  # tied, float head: llama.cpp reuses token_embd
    ids = np.random.default_rng(0).integers(0, 256, size=24)
    ours = llamacpp_logits(path, ids)
    ref = float_activation_logits(model, ids)
    # only the fp16 rounding of the ternary scales separates the two
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3 * np.abs(ref).max())
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_float_model_and_export_entry_point(tmp_path) -> None:
    model = small_llama(seed=2)
    path = lowbit.export(model, tmp_path / "f.gguf", format="gguf", float_type="f32")
    found = tensors(read(path))
    assert {t.tensor_type for t in found.values()} == {QT.F32}
    ids = np.arange(0, 200, 9)
    np.testing.assert_allclose(
        llamacpp_logits(path, ids), float_activation_logits(model, ids), rtol=1e-4, atol=1e-4
    )


def test_layers_tq_cannot_hold_are_errors_or_a_chosen_fallback(tmp_path) -> None:
    ttq = small_llama()
    lowbit.quantize(ttq, {"weights": {"method": "ttq"}, "last_layer": "float"})
    with pytest.raises(GGUFExportError, match=r"model\.layers\.0\.self_attn\.q_proj.*asymmetric"):
        export_gguf(ttq, tmp_path / "x.gguf")
    path = export_gguf(ttq, tmp_path / "ttq.gguf", fallback="f16")
    assert tensors(read(path))["blk.0.attn_q.weight"].tensor_type == QT.F16

    narrow = small_llama(dim=128, n_heads=2, n_kv_heads=2, hidden=256)
    lowbit.quantize(narrow, BITNET_A8)
    with pytest.raises(GGUFExportError, match=r"q_proj: ternary, but its rows are 128 long"):
        export_gguf(narrow, tmp_path / "y.gguf")
    found = tensors(read(export_gguf(narrow, tmp_path / "n.gguf", fallback="f32")))
    assert found["blk.0.attn_q.weight"].tensor_type == QT.F32  # 128-long rows: fallback
    assert found["blk.0.ffn_down.weight"].tensor_type == QT.TQ2_0  # 256-long rows: TQ2_0


def test_activations_llamacpp_cannot_reproduce_are_errors(tmp_path) -> None:
    model = small_llama()
    lowbit.quantize(model, "bitnet")  # BitLinear's in-layer RMSNorm
    with pytest.raises(GGUFExportError, match=r"layer model\.layers\.0\.self_attn\.q_proj.*norm"):
        export_gguf(model, tmp_path / "x.gguf")
    assert export_gguf(model, tmp_path / "ok.gguf", float_activations=True).is_file()
    lsq = small_llama()
    lowbit.quantize(lsq, {"weights": {"method": "bitnet"}, "activations": {"method": "lsq"}})
    with pytest.raises(GGUFExportError, match=r"no llama\.cpp form"):
        export_gguf(lsq, tmp_path / "y.gguf")


def test_bad_models_and_options_name_the_problem(tmp_path) -> None:
    with pytest.raises(GGUFExportError, match="act 'relu2'"):
        export_gguf(small_llama(act="relu2"), tmp_path / "a.gguf")
    with pytest.raises(GGUFExportError, match="LLaMA family"):
        export_gguf(torch.nn.Linear(4, 4), tmp_path / "b.gguf")
    with pytest.raises(GGUFExportError, match="ternary_type"):
        export_gguf(small_llama(), tmp_path / "c.gguf", ternary_type="q4_0")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_per_row_scales_fit_blocks_exactly(tmp_path) -> None:
    """A per-row ternary scale (numpy entries, no torch) is each block's absmax: TQ2_0 holds it
    up to fp16 rounding, rows permuted with the q rows."""
    rng = np.random.default_rng(3)
    cfg = {
        "vocab_size": 256,
        "max_seq_len": 8,
        "dim": 256,
        "n_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 1,
        "hidden": 256,
        "act": "silu",
        "tie_embeddings": True,
        "rope_theta": 1e4,
        "norm_eps": 1e-5,
    }
    shapes = {
        "model.embed_tokens.weight": (256, 256),
        "model.layers.0.input_layernorm.weight": (256,),
        "model.layers.0.self_attn.q_proj.weight": (256, 256),
        "model.layers.0.self_attn.k_proj.weight": (128, 256),
        "model.layers.0.self_attn.v_proj.weight": (128, 256),
        "model.layers.0.self_attn.o_proj.weight": (256, 256),
        "model.layers.0.post_attention_layernorm.weight": (256,),
        "model.layers.0.mlp.gate_proj.weight": (256, 256),
        "model.layers.0.mlp.up_proj.weight": (256, 256),
        "model.layers.0.mlp.down_proj.weight": (256, 256),
        "model.norm.weight": (256,),
    }
    weights = {
        k: {"values": rng.standard_normal(s).astype(np.float32), "scheme": "float"}
        for k, s in shapes.items()
    }
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    codes = rng.integers(-1, 2, size=(256, 256)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, size=256).astype(np.float32)
    weights["model.layers.0.self_attn.q_proj.weight"] = {
        "values": codes * scale[:, None],
        "scheme": "ternary",
        "codes": codes,
        "scale": scale,
        "scale_neg": None,
        "axis": 0,
    }
    found = tensors(read(write_llama_gguf(tmp_path / "r.gguf", cfg, weights)))
    assert "output.weight" not in found  # tied and equal
    q = found["blk.0.attn_q.weight"]
    expected = hf_permute(codes * scale[:, None], 2)
    np.testing.assert_array_equal(q.data, quantize(expected, QT.TQ2_0))
    np.testing.assert_allclose(dequantize(q.data, QT.TQ2_0), expected, rtol=2**-11, atol=0)
    weights["model.layers.0.self_attn.q_proj.weight"] = dict(
        weights["model.layers.0.self_attn.q_proj.weight"], axis=1
    )
    with pytest.raises(GGUFExportError, match="per tensor or per row"):
        write_llama_gguf(tmp_path / "c.gguf", cfg, weights)
    weights["model.layers.0.self_attn.q_proj.weight"] = dict(
        weights["model.layers.0.self_attn.q_proj.weight"], axis=0, scale=scale * 1e-3
    )
    with pytest.raises(GGUFExportError, match=r"q_proj: .*normal fp16 range"):
        write_llama_gguf(tmp_path / "d.gguf", cfg, weights)


@pytest.mark.slow  # trains a run (about 20 s on 2 loaded cores)
def test_cli_exports_a_run_as_gguf(tmp_path, capsys) -> None:
    import yaml

    from lowbit.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x + {i % 7}\n" for i in range(100)))
    exp = {
        "name": "tiny-gguf",
        "seed": 0,
        "model": {"name": "llama", "dim": 32, "n_layers": 1, "n_heads": 2},
        "data": {"name": "text", "path": str(corpus), "seq_len": 16},
        "quant": "bitnet",
        "train": {"epochs": 1, "batch_size": 8, "optimizer": "adamw", "lr": 0.01, "device": "cpu"},
    }
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(exp))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "e.yaml"), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--format", "gguf", "-o", str(out)]) == 2  # in-layer norm
    said = capsys.readouterr()
    assert "q_proj" in said.err + said.out and "float-activations" in said.err + said.out
    assert (
        main(["export", str(run), "--format", "gguf", "-o", str(out), "--float-activations"]) == 2
    )
    assert (
        main(
            [
                "export",
                str(run),
                "--format",
                "gguf",
                "-o",
                str(out),
                "--float-activations",
                "--gguf-fallback",
                "f16",
            ]
        )
        == 0
    )  # rows of 32: the chosen fallback
    reader = read(out)
    assert field(reader, "llama.embedding_length") == 32
    assert tensors(reader)["blk.0.attn_q.weight"].tensor_type == QT.F16
