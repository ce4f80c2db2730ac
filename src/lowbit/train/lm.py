"""Language-model pieces of training and evaluation: the loss, bits per byte, sampling.

A text model maps token ids ``(B, T)`` to next-token logits ``(B, T, V)``; its loss is the mean
cross-entropy over every position (nats per token). With byte-level tokens one token is one
byte, so

* bits per byte ``bpb = loss / ln 2``,
* perplexity ``ppl = exp(loss)`` (per byte).

The trainer's accuracy for such a model is the next-token accuracy (argmax over the
vocabulary), and its best checkpoint the one with the best validation accuracy, as for images.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

from ..models import KVCache

LN2 = math.log(2.0)
PHASES = ("fp", "qat")


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``(..., V)`` logits against ``(...)`` token ids."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def task_loss(task: str) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The training loss of a model task: :func:`lm_loss` for ``text``, None (the trainer's
    cross-entropy) for ``image``."""
    return lm_loss if task == "text" else None


def lm_metrics(loss: float) -> dict[str, float]:
    """``{"bpb": loss / ln 2, "ppl": exp(loss)}`` for a mean loss in nats per byte token."""
    return {"bpb": loss / LN2, "ppl": math.exp(min(loss, 700.0))}


def add_lm_metrics(results: dict[str, Any]) -> None:
    """Add bits per byte and perplexity to an experiment's results (in place).

    Each phase's ``test`` gets ``bpb``/``ppl``, the phase ``final_val_bpb``; the top level gets
    ``test_bpb``/``test_ppl`` of the last phase and, where there was a float phase before it,
    ``fp_test_bpb``.
    """
    last = None
    for phase in PHASES:
        r = results.get(phase)
        if not isinstance(r, dict):
            continue
        r["test"].update(lm_metrics(r["test"]["loss"]))
        if r.get("final_val_loss") is not None:
            r["final_val_bpb"] = r["final_val_loss"] / LN2
        last = r
    if last is not None:
        results["test_bpb"], results["test_ppl"] = last["test"]["bpb"], last["test"]["ppl"]


def fully_shard_lm(model: nn.Module, mesh: Any = None) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over a (quantised) language model.

    Each ``nn.ModuleList`` entry of the model's ``layers`` (the decoder blocks of the LLaMA
    family) becomes one FSDP unit, then the root (embedding, final norm, head). Quantisers need
    nothing special: the forward all-gathers each block's full weights, so per-tensor scales
    such as BitNet's ``mean|W|`` see the whole tensor. Call after ``quantize`` and before
    building the optimizer; ``mesh`` defaults to all ranks of the default process group.
    """
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList):
            for layer in layers:
                fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _takes_cache(model: nn.Module) -> bool:
    return "cache" in inspect.signature(model.forward).parameters


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: str,
    max_new_tokens: int = 200,
    *,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
    context: int | None = None,
) -> str:
    """Sample a continuation of ``prompt`` from a byte-level LM; returns the new text.

    Tokens are drawn from ``softmax(logits / temperature)`` restricted to the ``top_k`` most
    likely (``temperature`` 0: greedy), by a ``torch.Generator`` seeded with ``seed``. A model
    whose ``forward`` takes a ``cache`` (:class:`~lowbit.models.KVCache`) decodes one token per
    step; others re-read the window. ``context`` (default: the model's ``config.max_seq_len``
    if it has one) bounds the window: when it is full, the last half of it is read afresh.
    Per-token activation quantisation makes cached decoding equal the full forward.
    Bytes that do not form UTF-8 are shown as U+FFFD.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    model.eval()
    device = next(model.parameters()).device
    if context is None:
        context = getattr(getattr(model, "config", None), "max_seq_len", 256)
    tokens = list(prompt.encode("utf-8")) or [ord("\n")]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    cached = _takes_cache(model)
    cache: KVCache | None = None
    new: list[int] = []
    pending = tokens[-context:]
    for _ in range(max_new_tokens):
        if cached:
            if cache is None or cache.length + len(pending) > context:
                cache, pending = KVCache(), (tokens + new)[-(context // 2) :]
            logits = model(torch.tensor([pending], device=device), cache)[0, -1]
        else:
            window = (tokens + new)[-context:]
            logits = model(torch.tensor([window], device=device))[0, -1]
        token = _sample(logits.float().cpu(), temperature, top_k, generator)
        new.append(token)
        pending = [token]
    return bytes(new).decode("utf-8", errors="replace")


def _sample(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator
) -> int:
    if temperature == 0:
        return int(logits.argmax())
    if top_k is not None and top_k < logits.numel():
        cutoff = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, -math.inf)
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
