"""GGUF files of lowbit's LLaMA-shaped language models, for llama.cpp (numpy only, no torch).

:func:`write_llama_gguf` takes the model's configuration and a plain mapping from Hugging Face
parameter names to numpy arrays (:data:`WeightEntry`; :func:`lowbit.export.gguf_model.
gguf_weights` builds it from a torch model through each quantiser's ``codes()``) and writes a
GGUF v3 file that llama.cpp loads as ``general.architecture = "llama"``:

* names: ``model.embed_tokens`` -> ``token_embd``, ``model.layers.N.self_attn.{q,k,v,o}_proj``
  -> ``blk.N.attn_{q,k,v,output}``, ``mlp.{gate,up,down}_proj`` -> ``blk.N.ffn_{gate,up,down}``,
  ``input_layernorm`` / ``post_attention_layernorm`` -> ``blk.N.attn_norm`` / ``ffn_norm``,
  ``model.norm`` -> ``output_norm``, ``lm_head`` -> ``output`` (left out when tied to the
  embedding and equal to it: llama.cpp then reuses ``token_embd``).
* rotary layout: lowbit (like Hugging Face) rotates the pairs ``(i, i + d/2)`` of each head,
  llama.cpp's ``llama`` graph the adjacent pairs ``(2i, 2i + 1)``; so the rows of ``attn_q`` and
  ``attn_k`` are permuted within each head (row ``2i`` <- ``i``, ``2i + 1`` <- ``i + d/2``), as
  llama.cpp's own HF converter does. Scores ``q . k`` are unchanged.
* types: ternary weights (symmetric, one scale per tensor or per output row, rows a multiple of
  256 long) as TQ2_0 (default) or TQ1_0, the block scale being the layer's scale (exact up to
  fp16 rounding); norms F32; every other matrix (float layers, embeddings, dequantised
  non-ternary codes) in ``float_type`` (F16 by default). A ternary layer TQ cannot hold (TTQ's
  asymmetric scales, per-column scales, ragged rows) is an error naming it, unless ``fallback``
  (``"f16"`` / ``"f32"``) names the type to store its dequantised weights in.
* tokenizer: lowbit's LMs read UTF-8 bytes (vocabulary 256). The file declares a byte-level BPE
  vocabulary without merges (``tokenizer.ggml.model = "gpt2"``, pre-tokenizer ``default``):
  token ``b`` is byte ``b`` written with GPT-2's byte-to-Unicode table, so llama.cpp's BPE
  tokenizer (which maps input bytes through that table before looking up tokens) turns any text
  into its bytes, one token each, and detokenises back to the same bytes. SentencePiece
  (``llama``) would not do: it replaces spaces with U+2581 before byte fallback. BOS/EOS are set
  to byte 0 (NUL, absent from text) and neither is added to prompts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .gguf_format import BLOCK, F16, F32, TQ1_0, TQ2_0, GGUFTensor, encode_ternary, write_gguf

__all__ = [
    "GGUFExportError",
    "WeightEntry",
    "byte_tokens",
    "gguf_name",
    "llama_metadata",
    "rotary_permutation",
    "write_llama_gguf",
]

WeightEntry = Mapping[str, Any]
"""One parameter: ``values`` (float32, the weight the model computes with: dequantised codes
for quantised layers) and ``scheme`` (``float``, ``ternary``, ``binary``, ``uniform`` ...); for
ternary layers also ``codes`` (int8 in ``{-1, 0, 1}``), ``scale`` (the value of a ``+1``:
a scalar, or one per output row with ``axis`` 0), ``scale_neg`` (TTQ's negative scale, or
None)."""

TERNARY_TYPES = {"tq2_0": TQ2_0, "tq1_0": TQ1_0}
FLOAT_TYPES = {"f16": F16, "f32": F32}
VOCAB_SIZE = 256
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14

_LAYER = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight$")
_NORM = re.compile(r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
_BLOCK_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# llama_ftype (llama.h): what general.file_type says about the bulk of the weights
_FILE_TYPES = {F32: 0, F16: 1, TQ1_0: 36, TQ2_0: 37}


class GGUFExportError(ValueError):
    """The model (or an option) cannot be written as a llama.cpp GGUF file; names the cause."""


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor name of a Hugging Face LLaMA parameter name."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    match = _LAYER.fullmatch(hf_name) or _NORM.fullmatch(hf_name)
    if match is None or match.groups()[-1] not in _BLOCK_NAMES:
        raise GGUFExportError(f"parameter {hf_name!r} has no llama.cpp 'llama' tensor name")
    return f"blk.{match.group(1)}.{_BLOCK_NAMES[match.groups()[-1]]}.weight"


def rotary_permutation(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order taking a q/k projection from the ``rotate_half`` layout to llama.cpp's
    adjacent-pair layout: new row ``h*d + 2i`` is old ``h*d + i``, ``h*d + 2i + 1`` is old
    ``h*d + i + d/2``."""
    half = head_dim // 2
    within = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
    return (np.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def byte_tokens() -> list[str]:
    """Token ``b`` (0..255): byte ``b`` under GPT-2's byte-to-Unicode table (printable Latin-1
    bytes map to themselves, the other 68 to U+0100 onwards in byte order)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(0x100, 0x100 + VOCAB_SIZE - len(keep)))
    kept = set(keep)
    return [chr(b) if b in kept else chr(next(extra)) for b in range(VOCAB_SIZE)]


def _check_config(config: Mapping[str, Any]) -> None:
    if config.get("act", "silu") != "silu":
        raise GGUFExportError(
            f"config act {config['act']!r}: llama.cpp's 'llama' graph has only the SiLU "
            "(SwiGLU) feed-forward"
        )
    if config["vocab_size"] != VOCAB_SIZE:
        raise GGUFExportError(
            f"config vocab_size {config['vocab_size']}: the GGUF exporter writes lowbit's "
            f"byte-level tokenizer, which has {VOCAB_SIZE} tokens"
        )


def llama_metadata(
    config: Mapping[str, Any], file_type: int, name: str = "lowbit"
) -> dict[str, tuple[str, Any]]:
    """The GGUF key/value pairs llama.cpp reads for a ``llama`` model and its tokenizer."""
    _check_config(config)
    head_dim = config["dim"] // config["n_heads"]
    tokens = byte_tokens()
    return {
        "general.architecture": ("str", "llama"),
        "general.name": ("str", name),
        "general.file_type": ("u32", _FILE_TYPES[file_type]),
        "general.quantization_version": ("u32", 2),
        "llama.vocab_size": ("u32", config["vocab_size"]),
        "llama.context_length": ("u32", config["max_seq_len"]),
        "llama.embedding_length": ("u32", config["dim"]),
        "llama.block_count": ("u32", config["n_layers"]),
        "llama.feed_forward_length": ("u32", config["hidden"]),
        "llama.attention.head_count": ("u32", config["n_heads"]),
        "llama.attention.head_count_kv": ("u32", config["n_kv_heads"]),
        "llama.rope.dimension_count": ("u32", head_dim),
        "llama.rope.freq_base": ("f32", float(config["rope_theta"])),
        "llama.attention.layer_norm_rms_epsilon": ("f32", float(config["norm_eps"])),
        "tokenizer.ggml.model": ("str", "gpt2"),
        "tokenizer.ggml.pre": ("str", "default"),
        "tokenizer.ggml.tokens": ("[str]", tokens),
        "tokenizer.ggml.token_type": ("[i32]", [1] * len(tokens)),  # 1: normal
        "tokenizer.ggml.merges": ("[str]", []),
        "tokenizer.ggml.bos_token_id": ("u32", 0),
        "tokenizer.ggml.eos_token_id": ("u32", 0),
        "tokenizer.ggml.add_bos_token": ("bool", False),
        "tokenizer.ggml.add_eos_token": ("bool", False),
    }


def _block_scales(entry: WeightEntry, rows: int, cols: int) -> np.ndarray | str:
    """The per-block scale array ``(rows, cols / 256)``, or why TQ blocks cannot hold it."""
    if cols % BLOCK:
        return f"its rows are {cols} long, not a multiple of {BLOCK}"
    scale = np.asarray(entry["scale"], dtype=np.float32)
    neg = entry.get("scale_neg")
    if neg is not None and not np.array_equal(np.asarray(neg, dtype=np.float32), scale):
        return "it has asymmetric scales (TTQ's Wp/Wn); TQ blocks hold one scale for +1 and -1"
    if scale.size == 1:
        scale = np.full((rows, 1), scale.reshape(()), dtype=np.float32)
    elif entry.get("axis") == 0 and scale.shape in ((rows,), (rows, 1)):
        scale = scale.reshape(rows, 1)
    else:
        return f"its scale has shape {scale.shape}; TQ blocks need one per tensor or per row"
    if not np.all(np.isfinite(scale)) or np.any(scale < 0):
        return "its scale is negative or not finite"
    if np.any(scale > FP16_MAX) or np.any((scale > 0) & (scale < FP16_MIN_NORMAL)):
        return "its scale is outside the normal fp16 range of a TQ block scale"
    return np.repeat(scale, cols // BLOCK, axis=1)


def _encode(
    layer: str,
    entry: WeightEntry,
    rows_order: np.ndarray | None,
    ternary_type: int,
    float_type: int,
    fallback: int | None,
) -> tuple[int, bytes]:
    values = np.asarray(entry["values"], dtype=np.float32)
    if rows_order is not None:
        values = values[rows_order]
    if values.ndim == 1:
        return F32, values.tobytes()
    if entry.get("scheme") != "ternary":
        return float_type, values.astype(np.float16 if float_type == F16 else np.float32).tobytes()
    rows, cols = values.shape
    scales = _block_scales(entry, rows, cols)
    if isinstance(scales, str):
        if fallback is None:
            raise GGUFExportError(
                f"layer {layer}: ternary, but {scales}; pass fallback='f16' or 'f32' (CLI "
                "--gguf-fallback) to store its dequantised weights instead"
            )
        return fallback, values.astype(np.float16 if fallback == F16 else np.float32).tobytes()
    codes = np.asarray(entry["codes"]).astype(np.int8)
    if rows_order is not None:
        codes = codes[rows_order]
        if np.asarray(entry["scale"]).size > 1:
            scales = scales[rows_order]
    return ternary_type, encode_ternary(codes, scales, ternary_type)


def _choice(option: str, value: str, known: Mapping[str, int]) -> int:
    if value not in known:
        raise GGUFExportError(f"{option} must be one of {sorted(known)}, got {value!r}")
    return known[value]


def write_llama_gguf(
    path: str | os.PathLike[str],
    config: Mapping[str, Any],
    weights: Mapping[str, WeightEntry],
    *,
    ternary_type: str = "tq2_0",
    float_type: str = "f16",
    fallback: str | None = None,
    name: str = "lowbit",
) -> Path:
    """Write a LLaMA-shaped model as a llama.cpp GGUF file (see the module doc).

    ``config`` holds :class:`~lowbit.models.llama.LlamaConfig`'s fields; ``weights`` maps
    every Hugging Face parameter name to a :data:`WeightEntry`. ``ternary_type`` ``tq2_0`` or
    ``tq1_0``; ``float_type`` ``f16`` or ``f32`` for non-ternary matrices; ``fallback`` None
    (ternary layers TQ cannot hold are an error) or ``f16`` / ``f32``. Returns the path.
    """
    tq = _choice("ternary_type", ternary_type, TERNARY_TYPES)
    ft = _choice("float_type", float_type, FLOAT_TYPES)
    fb = None if fallback is None else _choice("fallback", fallback, FLOAT_TYPES)
    _check_config(config)
    head_dim = config["dim"] // config["n_heads"]
    orders = {
        "q_proj": rotary_permutation(config["n_heads"], head_dim),
        "k_proj": rotary_permutation(config["n_kv_heads"], head_dim),
    }
    tied = config.get("tie_embeddings", False) and np.array_equal(
        weights["lm_head.weight"]["values"], weights["model.embed_tokens.weight"]["values"]
    )
    tensors, types = [], []
    for hf_name, entry in weights.items():
        if tied and hf_name == "lm_head.weight":
            continue
        match = _LAYER.fullmatch(hf_name)
        order = orders.get(match.group(3)) if match else None
        layer = hf_name.removesuffix(".weight")
        ggml_type, data = _encode(layer, entry, order, tq, ft, fb)
        shape = tuple(int(s) for s in np.shape(entry["values"]))
        tensors.append(GGUFTensor(gguf_name(hf_name), shape, ggml_type, data))
        types.append(ggml_type)
    file_type = tq if tq in types else ft
    return write_gguf(path, llama_metadata(config, file_type, name), tensors)
