"""Quantised gradient communication: DDP communication hooks that send fewer bytes.

DistributedDataParallel groups gradients into flat buckets and, by default, all-reduces each in
float32. A communication hook (``ddp.register_comm_hook(state, hook)``) replaces that exchange;
it receives the bucket (``bucket.buffer()``, this rank's gradients) and returns a future of the
gradient averaged over ranks. The hooks here, chosen by :class:`~lowbit.train.config.CommConfig`:

=============  ===============================================================  ==============
method         what each rank sends for a bucket of ``n`` values                vs float32
=============  ===============================================================  ==============
``none``       ``n`` float32 (all-reduce of ``g / W``)                           1x
``fp16``       ``n`` float16 (all-reduce of ``g / W``)                           2x
``int8``       ``n`` codes ``SR(g / u)`` in ``[-127, 127]``, ``u = max|g| / 127``  ~4x
               (8 bits each), and ``u``
``qsgd``       ``n`` codes ``SR(g_c s / ||g_c||_2)`` in ``[-s, s]`` at             ~8x at ``s=7``
               ``ceil(log2(2 s + 1))`` bits, and ``||g_c||_2`` per chunk ``g_c``
               of ``chunk`` values
``sign_ef``    ``n`` sign bits of ``p = g + e``, and ``mean|p|``                  ~32x
=============  ===============================================================  ==============

``SR`` is unbiased stochastic rounding, ``SR(y) = floor(y + u)`` with ``u ~ U[0, 1)`` drawn from
a generator seeded by ``(seed, rank, step, bucket index)``: reproducible, and independent across
ranks. ``int8`` and ``qsgd`` are the same code, ``g ~ u * SR(g / u)``, with the unit from the
bucket's max-abs (8-bit, one scale per bucket) or from the L2 norm of each chunk (QSGD, Alistarh
et al. 2017: ``Q_s(v_i) = ||v|| sign(v_i) xi_i(v, s) / s`` with ``E[Q_s(v)] = v``, applied to
"buckets" of ``d = chunk`` values, whose variance bound ``min(d / s^2, sqrt(d) / s)`` a single
norm for a whole DDP bucket of ~10^5 values would make large). ``sign_ef`` is 1-bit SGD with
error feedback (Seide et al. 2014; Karimireddy et al. 2019, EF-SignSGD): the residual ``e`` left
by the previous step's compression is added first, ``p = g + e``, the rank sends
``C(p) = mean|p| sign(p)`` (``sign(0) = +1``) and keeps ``e <- p - C(p)`` for the next step.
The residual is kept per parameter, so it survives DDP's re-bucketing after its first step; it is
not checkpointed (a resumed run starts it from zero). The noise and the chunks follow the bucket
layout, which DDP rebuilds after its first step, so after a resume the first step's rounding
differs from the uninterrupted run's (``none`` and ``fp16`` resume bitwise).

Compressed buckets cannot be summed on the wire, so each rank all-gathers its packed codes (with
the float32 scales appended) and decodes and averages the ``W`` contributions itself, in rank
order, so every rank gets bitwise the same average. "Bytes sent" is the size of what a rank hands
to the collective (its payload), counted in the hook as the tensors are passed on; an
all-reduce's payload is its input, an all-gather's the rank's own contribution. (On a ring, an
all-reduce moves about ``2 (W-1)/W`` payloads per rank and an all-gather ``W-1``, so the saving
on the wire is the ratio times ``2/W``; with 2 ranks the two are equal.)
"""

# No ``from __future__ import annotations``: DDP's register_comm_hook inspects the hook's
# annotations and accepts only the real ``dist.GradBucket`` / ``Future[Tensor]`` objects.
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from ..data.datasets import mix_seed
from .config import COMM_METHODS, CommConfig

INT8_LEVELS = 127
_SCALE_BYTES = 4  # one float32 scale, appended to a compressed payload

Hook = Callable[["CommState", dist.GradBucket], Future[Tensor]]


# -- codes ----------------------------------------------------------------------------------------


def code_bits(levels: int) -> int:
    """Bits per code for integer codes in ``[-levels, levels]``: ``ceil(log2(2 levels + 1))``."""
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 127:
        raise ValueError(f"levels must be an integer in [1, 127], got {levels!r}")
    return math.ceil(math.log2(2 * levels + 1))


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Dense little-endian packing of unsigned ``codes < 2^bits`` into ``ceil(n bits / 8)`` bytes.

    Bit ``j`` of code ``i`` is bit ``(i bits + j) % 8`` of byte ``(i bits + j) // 8``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.unsqueeze(1) >> shifts) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    weights = torch.arange(8, device=codes.device, dtype=torch.uint8)
    return (stream.view(-1, 8) << weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as ``int64``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    if packed.numel() * 8 < n * bits:
        raise ValueError(f"{packed.numel()} bytes cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return packed[:n].to(torch.int64)
    weights = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.reshape(-1, 1) >> weights) & 1).reshape(-1)[: n * bits]
    shifts = torch.arange(bits, device=packed.device, dtype=torch.int64)
    return (stream.view(n, bits).to(torch.int64) << shifts).sum(dim=1)


def stochastic_round(y: Tensor, generator: torch.Generator) -> Tensor:
    """``floor(y + u)``, ``u ~ U[0, 1)``: rounds down or up with ``E[result] = y``."""
    u = torch.rand(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    return torch.floor(y + u)


# -- per-rank state ---------------------------------------------------------------------------


class CommState:
    """What the hooks of one rank share: options, byte counters, seeds and EF residuals.

    Attributes:
        config: the :class:`CommConfig`.
        step: the optimizer step being taken; the trainer sets it before each backward so the
            rounding noise depends on ``(seed, rank, step, bucket)`` only.
        bytes_sent: bytes this rank handed to collectives, all steps.
        fp32_bytes: bytes a float32 all-reduce of the same buckets would have handed over.
        steps: backward passes communicated (counted at each step's last bucket).
        residuals: sign_ef's error-feedback residual per parameter (keyed by ``data_ptr``).
    """

    def __init__(self, config: CommConfig, group: dist.ProcessGroup | None = None) -> None:
        self.config = config
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.step = 0
        self.bytes_sent = 0
        self.fp32_bytes = 0
        self.steps = 0
        self.residuals: dict[int, Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def bytes_per_step(self) -> float:
        """Mean bytes sent per step (NaN before the first step)."""
        return self.bytes_sent / self.steps if self.steps else math.nan

    @property
    def ratio(self) -> float:
        """float32 bytes / bytes sent (NaN before the first step)."""
        return self.fp32_bytes / self.bytes_sent if self.bytes_sent else math.nan

    def generator(self, device: torch.device, bucket_index: int) -> torch.Generator:
        """The rounding generator on ``device``, seeded by ``(seed, rank, step, bucket_index)``."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(mix_seed(self.config.seed, self.rank, self.step, bucket_index))

    def residual(self, bucket: dist.GradBucket) -> Tensor:
        """The bucket's error-feedback residual, laid out like ``bucket.buffer()`` (0 at first)."""
        buffer, params = bucket.buffer(), bucket.parameters()
        kept = [self.residuals.get(p.data_ptr()) for p in params]
        if all(r is None for r in kept):
            return torch.zeros_like(buffer)
        parts = [
            buffer.new_zeros(p.numel()) if r is None else r
            for p, r in zip(params, kept, strict=True)
        ]
        return torch.cat(parts).to(buffer.dtype)

    def set_residual(self, bucket: dist.GradBucket, residual: Tensor) -> None:
        """Keep ``residual`` (laid out like the bucket) per parameter for the next step."""
        params = bucket.parameters()
        for p, part in zip(params, residual.split([p.numel() for p in params]), strict=True):
            self.residuals[p.data_ptr()] = part

    def _count(self, bucket: dist.GradBucket, sent: Tensor) -> None:
        self.bytes_sent += sent.nbytes
        self.fp32_bytes += 4 * bucket.buffer().numel()
        if bucket.is_last():
            self.steps += 1

    def all_reduce(self, bucket: dist.GradBucket, tensor: Tensor) -> Future[Tensor]:
        """Sum ``tensor`` over ranks (counted as sent); the future holds the sum."""
        self._count(bucket, tensor)
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        return work.get_future().then(lambda _: tensor)

    def all_gather(self, bucket: dist.GradBucket, payload: Tensor) -> Future[list[Tensor]]:
        """Every rank's ``payload`` (this one counted as sent), in rank order."""
        self._count(bucket, payload)
        out = [torch.empty_like(payload) for _ in range(self.world_size)]
        work = dist.all_gather(out, payload, group=self.group, async_op=True)
        return work.get_future().then(lambda _: out)


# -- hooks ---------------------------------------------------------------------------------------


def _allreduce_hook(dtype: torch.dtype | None) -> Hook:
    """Average by an all-reduce of ``g / W`` cast to ``dtype`` (None: the bucket's own)."""

    def hook(state: CommState, bucket: dist.GradBucket) -> Future[Tensor]:
        buffer = bucket.buffer()
        sent = buffer.div(state.world_size).to(dtype or buffer.dtype)
        return state.all_reduce(bucket, sent).then(lambda fut: fut.value().to(buffer.dtype))

    return hook


def _with_scales(codes: Tensor, bits: int, scales: Tensor) -> Tensor:
    """The payload: packed ``codes`` followed by the bytes of the float32 ``scales``."""
    scale_bytes = scales.reshape(-1).to(torch.float32).view(torch.uint8)
    return torch.cat([pack_bits(codes, bits), scale_bytes])


def _split_scales(payload: Tensor, bits: int, n: int, k: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`_with_scales` for ``n`` codes and ``k`` scales: ``(int64, float32)``."""
    cut = payload.numel() - _SCALE_BYTES * k
    scales = payload[cut:].clone().view(torch.float32)
    return unpack_bits(payload[:cut], bits, n), scales


def _gather_average(
    state: CommState,
    bucket: dist.GradBucket,
    payload: Tensor,
    decode: Callable[[Tensor, Tensor], Tensor],
    bits: int,
    k: int,
) -> Future[Tensor]:
    """All-gather ``payload``; decode every rank's ``(codes, scales)``, average in rank order."""
    buffer = bucket.buffer()
    n = buffer.numel()

    def average(fut: Future[list[Tensor]]) -> Tensor:
        total = torch.zeros(n, device=buffer.device, dtype=torch.float32)
        for p in fut.value():
            total += decode(*_split_scales(p, bits, n, k))
        return total.div_(state.world_size).to(buffer.dtype)

    return state.all_gather(bucket, payload).then(average)


def _rows(x: Tensor, chunk: int) -> Tensor:
    """``x`` zero-padded to a multiple of ``chunk`` and viewed as ``[ceil(n / chunk), chunk]``."""
    return torch.nn.functional.pad(x, (0, -x.numel() % chunk)).view(-1, chunk)


def _uniform_hook(levels: int, chunk: int | None, l2: bool) -> Hook:
    """Stochastic uniform codes ``clamp(SR(g / u), -L, L)`` with ``L = levels``, sent offset by
    ``L`` at ``code_bits(L)`` bits, and one unit ``u`` per chunk of ``chunk`` values (None: the
    whole bucket): ``u = ||g_chunk||_2 / L`` (QSGD) or ``max|g_chunk| / L`` (``l2`` False)."""
    bits = code_bits(levels)

    def hook(state: CommState, bucket: dist.GradBucket) -> Future[Tensor]:
        g = bucket.buffer().to(torch.float32)
        size = chunk or max(g.numel(), 1)
        rows = _rows(g, size)
        norms = torch.linalg.vector_norm(rows, dim=1) if l2 else rows.abs().amax(dim=1)
        units = norms / levels
        safe = torch.where(units > 0, units, torch.ones_like(units)).unsqueeze(1)
        gen = state.generator(g.device, bucket.index())
        codes = stochastic_round(rows / safe, gen).clamp_(-levels, levels).add_(levels)
        payload = _with_scales(codes.reshape(-1)[: g.numel()], bits, units)

        def decode(codes: Tensor, units: Tensor) -> Tensor:
            values = _rows((codes - levels).to(torch.float32), size) * units.unsqueeze(1)
            return values.reshape(-1)[: g.numel()]

        return _gather_average(state, bucket, payload, decode, bits, units.numel())

    return hook


def _sign_ef_hook(state: CommState, bucket: dist.GradBucket) -> Future[Tensor]:
    """1-bit SGD with error feedback: send ``sign(p)`` and ``mean|p|`` of ``p = g + e``."""
    p = bucket.buffer().to(torch.float32) + state.residual(bucket).to(torch.float32)
    scale = p.abs().mean()
    positive = p >= 0
    state.set_residual(bucket, p - torch.where(positive, scale, -scale))
    payload = _with_scales(positive, 1, scale)
    return _gather_average(state, bucket, payload, _decode_signs, 1, 1)


def _decode_signs(codes: Tensor, scale: Tensor) -> Tensor:
    return torch.where(codes.bool(), scale, -scale)


_HOOKS: dict[str, Callable[[CommConfig], Hook]] = {
    "none": lambda _: _allreduce_hook(None),
    "fp16": lambda _: _allreduce_hook(torch.float16),
    "int8": lambda _: _uniform_hook(INT8_LEVELS, None, l2=False),
    "qsgd": lambda config: _uniform_hook(config.levels, config.chunk or None, l2=True),
    "sign_ef": lambda _: _sign_ef_hook,
}
assert tuple(_HOOKS) == COMM_METHODS, "every configurable method has a hook"


def make_hook(config: CommConfig) -> Hook:
    """The communication hook for ``config.method`` (see the module docstring)."""
    return _HOOKS[config.method](config)


def register(ddp: Any, config: CommConfig, group: dist.ProcessGroup | None = None) -> CommState:
    """Register ``config``'s hook on a ``DistributedDataParallel`` model; returns its state.

    ``group`` must be the one ``ddp`` was built with (None: the default group). The state keeps
    no reference to the default group, so destroying it at exit really frees it.
    """
    state = CommState(config, group)
    ddp.register_comm_hook(state, make_hook(config))
    return state
