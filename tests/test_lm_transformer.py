"""Transformers in ``quantize`` and the LLaMA-shaped model family."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.convert import PartialQuantizationWarning
from lowbit.models import KVCache, create_model, list_models, model_task
from lowbit.models.llama import apply_rotary, rotary_tables
from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.quant.bitnet import BitNetActivation, BitNetWeight
from lowbit.quant.lsq import LSQ

TINY = {"dim": 32, "n_layers": 2, "n_heads": 4}


def tiny_llama(**options) -> nn.Module:
    return create_model("llama", 256, (64,), seed=0, **{**TINY, **options})


def ids(b: int = 2, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the model
def test_hugging_face_parameter_names_and_sizes() -> None:
    model = tiny_llama()
    names = {n for n, _ in model.named_parameters()}
    layer = "model.layers.1."
    expected = {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        *(f"{layer}self_attn.{p}_proj.weight" for p in "qkvo"),
        *(f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        f"{layer}input_layernorm.weight",
        f"{layer}post_attention_layernorm.weight",
    }
    assert expected <= names
    assert not any(n.endswith("bias") for n in names)
    assert model(ids()).shape == (2, 12, 256)
    assert set(list_models("text")) >= {"llama", "llama-1m", "llama-8m", "llama-30m"}
    assert model_task("llama-1m") == "text" and model_task("lenet5") == "image"
    sizes = {
        n: sum(p.numel() for p in create_model(n, 256, (128,)).parameters())
        for n in ("llama-1m", "llama-30m")
    }
    assert 0.8e6 < sizes["llama-1m"] < 1.2e6 and 25e6 < sizes["llama-30m"] < 32e6


def test_seeded_construction_is_reproducible() -> None:
    a, b = tiny_llama(), tiny_llama()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert float(a.model.embed_tokens.weight.detach().std()) == pytest.approx(0.02, rel=0.1)


def test_attention_is_causal() -> None:
    model = tiny_llama().eval()
    x = ids()
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("options", [{}, {"n_kv_heads": 2, "act": "relu2"}])
def test_kv_cache_decoding_equals_the_full_forward(options: dict) -> None:
    model = tiny_llama(**options).eval()
    x = ids(t=10)
    cache = KVCache()
    with torch.no_grad():
        full = model(x)
        parts = [model(x[:, :6], cache)] + [model(x[:, i : i + 1], cache) for i in range(6, 8)]
        parts.append(model(x[:, 8:], cache))  # a chunk after the cache: explicit mask
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 10


def test_rotary_scores_depend_only_on_the_position_difference() -> None:
    """<R(m) q, R(n) k> = <R(m + s) q, R(n + s) k>: the defining property of RoPE."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)

    def score(m: int, n: int) -> float:
        cos, sin = rotary_tables(8, torch.tensor([m, n]), 10000.0)
        return float((apply_rotary(q, cos[:1], sin[:1]) * apply_rotary(k, cos[1:], sin[1:])).sum())

    assert score(3, 1) == pytest.approx(score(40, 38), rel=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
    cos, sin = rotary_tables(8, torch.tensor([0]), 10000.0)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q)  # position 0: no rotation


def test_tied_embeddings_share_one_parameter() -> None:
    model = tiny_llama(tie_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = sum(p.numel() for p in tiny_llama().parameters())
    assert sum(p.numel() for p in model.parameters()) == untied - 256 * 32


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dim": 30}, "n_heads"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"act": "gelu"}, "act"),
        ({"n_layers": 0}, "n_layers"),
    ],
)
def test_bad_shapes_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_llama(**options)


# ----------------------------------------------------------------------------- quantize
def test_bitnet_quantises_every_projection_and_keeps_embedding_and_head_float() -> None:
    model = lowbit.quantize(tiny_llama(), "bitnet")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 2 * 7 + 1
    for name, m in linears.items():
        if name == "lm_head":
            assert type(m) is nn.Linear
        else:
            assert isinstance(m, QuantLinear), name
            assert isinstance(m.weight_quant, BitNetWeight)
            assert isinstance(m.input_quant, BitNetActivation)
    assert type(model.model.embed_tokens) is nn.Embedding
    rows = {r.name: r for r in lowbit.summary(model, show=False).layers}
    assert rows["model.embed_tokens"].weight_method == "float"
    assert rows["model.layers.0.mlp.up_proj"].weight_bits == 1.6
    out = model(ids())
    out.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_overrides_by_glob_and_embedding_quantisation() -> None:
    recipe = {
        "method": "bitnet",
        "overrides": {
            "*.mlp.*": {"weights": {"method": "lsq", "bits": 4}},
            "model.embed_tokens": {"weights": {"method": "bitnet"}},
        },
    }
    model = lowbit.quantize(tiny_llama(), recipe)
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.gate_proj.weight_quant, LSQ)
    assert isinstance(layer.self_attn.k_proj.weight_quant, BitNetWeight)
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and isinstance(emb.weight_quant, BitNetWeight)
    x = ids()
    with torch.no_grad():
        looked_up = emb(x)
    codes, spec = emb.weight_quant.codes(emb.weight)
    torch.testing.assert_close(looked_up, spec.dequantize(codes)[x], rtol=0, atol=0)
    row = {r.name: r for r in lowbit.summary(model, show=False).layers}["model.embed_tokens"]
    assert row.weight_bits == 1.6


def test_an_embedding_an_override_names_is_not_reported_float() -> None:
    recipe = {"method": "bitnet", "overrides": {"model.embed_tokens": {"weights": "bitnet"}}}
    report = lowbit.check(tiny_llama(), recipe)
    assert "model.embed_tokens" not in report.float_layers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.quantize(tiny_llama(), recipe)
    assert not any("model.embed_tokens" in str(w.message) for w in caught)
    # without the override it stays float, and both say so
    assert "model.embed_tokens" in lowbit.check(tiny_llama(), "bitnet").float_layers


def test_embedding_rules_are_checked() -> None:
    both = {"weights": "bitnet", "activations": "bitnet"}
    with pytest.raises(lowbit.RecipeError, match="only its weights"):
        lowbit.quantize(tiny_llama(), {"method": "bitnet", "overrides": {"model.embed_*": both}})
    with pytest.raises(lowbit.RecipeError, match="matches no layer"):
        lowbit.quantize(tiny_llama(), {"method": "bitnet", "overrides": {"*.ffn.*": "float"}})


def test_multihead_attention_stays_float_with_a_warning() -> None:
    block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
    model = nn.Sequential(block, nn.Linear(16, 4))
    with pytest.warns(PartialQuantizationWarning, match=r"0\.self_attn \(MultiheadAttention\)"):
        lowbit.quantize(model, "bitnet")
    assert type(block.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(block.linear1, QuantLinear) and isinstance(block.linear2, QuantLinear)
    assert model(torch.randn(2, 5, 16)).shape == (2, 5, 4)


def test_export_of_per_token_activations_is_a_clear_error(tmp_path: Path) -> None:
    model = lowbit.quantize(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), "bitnet")
    with (
        warnings.catch_warnings(),
        pytest.raises(ValueError, match=r"module '0'.*BitNetActivation.*no runtime"),
    ):
        warnings.simplefilter("ignore")
        lowbit.export(model.eval(), tmp_path / "m.lowbit", example_input=(8,))


def test_quantised_llama_learns_a_repeating_text() -> None:
    torch.manual_seed(0)
    model = lowbit.quantize(tiny_llama(), "bitnet")
    text = torch.tensor(list(b"abcdefgh" * 8))[None, :]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits = model(text[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 256), text[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]
