"""A LLaMA-shaped decoder-only language model with Hugging Face LLaMA parameter names.

Pre-norm blocks (Touvron et al. 2023): ``h = x + attn(RMSNorm(x))``, ``out = h +
mlp(RMSNorm(h))``; rotary position embeddings (Su et al. 2021) in the ``rotate_half`` layout of
Hugging Face's LLaMA; SwiGLU feed-forward ``down(silu(gate(x)) * up(x))`` or, as BitNet b1.58
2B uses, the squared-ReLU gate ``down(relu(gate(x))^2 * up(x))``; no biases; optional
grouped-query attention and tied input/output embeddings. Every projection is an ``nn.Linear``,
so ``lowbit.quantize`` finds them all. Parameter names follow the HF layout (``model.embed_tokens``,
``model.layers.N.self_attn.q_proj``, ``model.layers.N.mlp.gate_proj``,
``model.layers.N.input_layernorm``, ``model.norm``, ``lm_head``) for the GGUF exporter.

``forward(ids)`` maps ``(B, T)`` token ids to ``(B, T, vocab)`` logits. A :class:`KVCache`
makes decoding incremental: ``forward(ids, cache)`` attends to the cached keys and values and
appends the new ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model

ACTIVATIONS = ("silu", "relu2")


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # the statistic in float32, as HF's LLaMA does
        inv = torch.rsqrt(
            x.to(torch.promote_types(x.dtype, torch.float32)).pow(2).mean(dim=-1, keepdim=True)
            + self.eps
        )
        return x * inv.to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


def rotary_tables(head_dim: int, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of the angles ``p * theta^(-2i / head_dim)``, each ``(T, head_dim)``
    with the frequencies repeated for the two halves (HF's ``rotate_half`` layout)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs ``(x_i, x_{i + d/2})`` of ``x`` (..., T, d) by the tabled angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


@dataclass
class KVCache:
    """Keys and values seen so far, per layer: ``(B, kv_heads, T_past, head_dim)`` tensors."""

    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Number of cached positions."""
        first = self.keys[0] if self.keys else None
        return 0 if first is None else first.shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k``/``v`` of layer ``layer`` and return all its keys and values."""
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None and old_v is not None:
            k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    """Causal multi-head (or grouped-query) self-attention with rotary embeddings."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, theta: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.theta = theta
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: Tensor, layer: int, cache: KVCache | None, past: int) -> Tensor:
        """``x`` (B, T, dim) at positions ``past .. past + T - 1``; keys and values of the
        earlier positions come from ``cache`` (None: there are none, ``past`` is 0)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary_tables(
            self.head_dim, torch.arange(past, past + t, device=x.device), self.theta
        )
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        else:  # query i (position past + i) sees keys 0 .. past + i
            allowed = torch.arange(past + t, device=x.device)[None, :] <= (
                past + torch.arange(t, device=x.device)[:, None]
            )
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """Gated feed-forward: ``down(act(gate(x)) * up(x))``, ``act`` SiLU or squared ReLU."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.act = act
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        gate = F.silu(gate) if self.act == "silu" else F.relu(gate).square()
        return self.down_proj(gate * self.up_proj(x))


class DecoderLayer(nn.Module):
    """``h = x + attn(input_layernorm(x))``; ``h + mlp(post_attention_layernorm(h))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c.dim, c.n_heads, c.n_kv_heads, c.rope_theta)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c.dim, c.hidden, c.act)

    def forward(self, x: Tensor, layer: int, cache: KVCache | None, past: int) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), layer, cache, past)
        return h + self.mlp(self.post_attention_layernorm(h))


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a :class:`LlamaForCausalLM` (the GGUF exporter writes it as metadata)."""

    vocab_size: int
    max_seq_len: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden: int
    act: str = "silu"
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for key in ("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads", "n_kv_heads"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {self.hidden!r}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"dim ({self.dim}) must be n_heads ({self.n_heads}) times an even head size"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ValueError("rope_theta and norm_eps must be positive")


class LlamaModel(nn.Module):
    """The decoder stack: ``embed_tokens``, ``layers``, final ``norm``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        x = self.embed_tokens(ids)
        past = 0 if cache is None else cache.length
        for i, layer in enumerate(self.layers):
            x = layer(x, i, cache, past)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """``model`` (:class:`LlamaModel`) and ``lm_head``: token ids (B, T) to logits (B, T, V)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        return self.lm_head(self.model(ids, cache))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """``N(0, 0.02^2)`` for embeddings and projections, the residual outputs (``o_proj``,
        ``down_proj``) scaled by ``1 / sqrt(2 n_layers)`` (GPT-2); norms at 1."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
                nn.init.normal_(m.weight, 0.0, std, generator=generator)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)


def llama(
    num_classes: int = 256,
    in_shape: tuple[int, ...] = (256,),
    *,
    dim: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    hidden: int | None = None,
    act: str = "silu",
    tie_embeddings: bool = False,
    rope_theta: float = 10000.0,
    norm_eps: float = 1e-5,
) -> LlamaForCausalLM:
    """A LLaMA-shaped LM over ``num_classes`` tokens for contexts up to ``in_shape[-1]``.

    ``hidden`` defaults to ``8/3 dim`` rounded up to a multiple of 32 (LLaMA's SwiGLU width);
    ``n_kv_heads`` to ``n_heads`` (no grouping).
    """
    if hidden is None:
        hidden = 32 * math.ceil(8 * dim / 3 / 32)
    config = LlamaConfig(
        vocab_size=num_classes,
        max_seq_len=in_shape[-1],
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads if n_kv_heads is None else n_kv_heads,
        hidden=hidden,
        act=act,
        tie_embeddings=tie_embeddings,
        rope_theta=rope_theta,
        norm_eps=norm_eps,
    )
    return LlamaForCausalLM(config)


PRESETS = {
    "llama-1m": {"dim": 128, "n_layers": 4, "n_heads": 4},
    "llama-3m": {"dim": 192, "n_layers": 6, "n_heads": 6},
    "llama-8m": {"dim": 288, "n_layers": 8, "n_heads": 6},
    "llama-30m": {"dim": 448, "n_layers": 12, "n_heads": 7},
}
"""Named sizes (parameter counts at vocabulary 256, untied: 0.87M, 2.8M, 8.1M, 29.5M)."""

register_model("llama", task="text")(llama)
for _name, _shape in PRESETS.items():
    register_model(_name, task="text")(partial(llama, **_shape))
