"""``QuantEmbedding``: an ``nn.Embedding`` whose table passes through a weight quantiser.

A lookup has no input activations to quantise (token ids are integers), so only the weight side
exists. ``quantize`` swaps an embedding only when a recipe override names it (BitNet keeps the
embedding in float).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.base import Quantizer
from .layers import _QuantMixin


class QuantEmbedding(_QuantMixin, nn.Embedding):
    """``nn.Embedding`` looking up rows of the fake-quantised table (``input_quant`` is None)."""

    input_quant = None

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        weight_quant: Quantizer | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.weight_quant = weight_quant

    @classmethod
    def from_float(
        cls, embedding: nn.Embedding, weight_quant: Quantizer | None = None
    ) -> QuantEmbedding:
        """Wrap ``embedding``; its weight Parameter is shared, not copied."""
        q = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            max_norm=embedding.max_norm,
            norm_type=embedding.norm_type,
            scale_grad_by_freq=embedding.scale_grad_by_freq,
            sparse=embedding.sparse,
            weight_quant=weight_quant,
            device=embedding.weight.device,
            dtype=embedding.weight.dtype,
        )
        q.weight = embedding.weight
        return q

    def forward(self, x: Tensor) -> Tensor:
        return F.embedding(
            x,
            self.quantized_weight(),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
