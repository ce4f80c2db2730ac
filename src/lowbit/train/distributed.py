"""Process-group helpers for data-parallel training under ``torchrun``.

``torchrun --nproc_per_node N`` starts N copies of the same program and tells each its place in
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`setup` joins that process group once (``gloo`` on CPU, ``nccl`` on CUDA with the device
``cuda:LOCAL_RANK``) and destroys it when the program exits. Before the group exists,
:func:`rank` and :func:`world_size` read the environment, so code that runs first (a CLI check,
the experiment folder) already knows whether it is the main process. Without ``torchrun`` there
is one process, rank 0 of 1, and every helper here is a no-op.

Under DDP every rank trains, but only the main process (rank 0) writes checkpoints and logs.
The state that must agree across ranks besides the parameters (which DDP keeps equal) is kept
equal by :func:`sync_buffers` after every optimizer step, see its docstring.
"""

from __future__ import annotations

import atexit
import gc
import inspect
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..quant.affine import AffineActivation


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def rank() -> int:
    """This process's rank: the default group's, else ``$RANK`` (0 without torchrun)."""
    return dist.get_rank() if _initialized() else _env_int("RANK", 0)


def world_size() -> int:
    """Number of training processes: the default group's, else ``$WORLD_SIZE`` (1)."""
    return dist.get_world_size() if _initialized() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """This process's index on its machine, ``$LOCAL_RANK`` (0 without torchrun)."""
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    """True when more than one process trains (``WORLD_SIZE > 1``)."""
    return world_size() > 1


def is_main_process() -> bool:
    """True on the process that writes files: rank 0, or the only process."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return the device this rank trains on.

    With ``WORLD_SIZE > 1``: a CUDA ``device`` becomes ``cuda:LOCAL_RANK`` (one GPU per process;
    an explicit index in the recipe is overridden) and the backend is ``nccl``; on CPU it is
    ``gloo``. The group is initialised from the environment (``init_method="env://"``) and
    destroyed at interpreter exit. With one process ``device`` is returned unchanged.
    """
    if not is_distributed():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not _initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        atexit.register(teardown)
    return device


def teardown() -> None:
    """Destroy the default process group if this process has one.

    Unreachable DDP wrappers (reference cycles) still hold the group; they are collected first,
    so that the group's worker threads are stopped here and not during interpreter shutdown,
    where destroying a gloo group can abort the process.
    """
    if _initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if _initialized():
        dist.barrier()


def all_reduce_sum(values: Tensor) -> Tensor:
    """``values`` summed over ranks, in place (unchanged with one process)."""
    if _initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def wrap(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` in DistributedDataParallel, without DDP's own buffer broadcast at each forward.

    DDP still broadcasts rank 0's parameters and buffers once here; afterwards the buffers are
    kept equal by :func:`sync_buffers` (a reduction, where DDP's default would copy rank 0's and
    drop the other ranks' statistics).
    """
    options = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **{no_sync: False})


def _initialised_tensors(model: nn.Module) -> Iterator[Tensor]:
    """Parameters and buffers of ``model`` except lazy ones whose shape is not known yet."""
    for t in (*model.parameters(), *model.buffers()):
        if not isinstance(t, nn.parameter.UninitializedTensorMixin):
            yield t


@torch.no_grad()
def broadcast_state(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (no-op with one process)."""
    if not _initialized():
        return
    for t in _initialised_tensors(model):
        dist.broadcast(t.data, src=0)


def _buffer_reductions(model: nn.Module) -> Iterator[tuple[Tensor, dist.ReduceOp]]:
    """Each floating-point buffer with the reduction that makes it a global statistic.

    Affine observers' ``min_val``/``max_val`` take MIN/MAX; every other floating buffer (BatchNorm
    running mean and variance, ...) the mean (SUM, divided later). Integer buffers (step counters,
    ``initialized`` flags, ``num_batches_tracked``) advance identically on every rank and are left.
    """
    extremes = {}
    for module in model.modules():
        if isinstance(module, AffineActivation):
            extremes[id(module.min_val)] = dist.ReduceOp.MIN
            extremes[id(module.max_val)] = dist.ReduceOp.MAX
    for buf in model.buffers():
        if buf.is_floating_point():
            yield buf, extremes.get(id(buf), dist.ReduceOp.SUM)


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Make the running statistics of all ranks equal (call after each optimizer step).

    Each rank's forward updated its buffers from its own shard of the global batch, starting from
    equal values. For an EMA of a batch minimum, ``m' = d m + (1 - d) min_r(x_r)`` is exactly the
    MIN over ranks of the per-rank updates (``d m`` is common and ``1 - d >= 0``), so MIN/MAX give
    the range a single process would track on the whole batch; likewise the mean over ranks of
    BatchNorm's running means is the running mean of the global batch mean. For running
    variances the mean of per-shard variances is used (it omits the spread of the shard means),
    as is usual for data-parallel BatchNorm. One all-reduce per reduction kind.
    """
    if not _initialized():
        return
    groups: dict[dist.ReduceOp, list[Tensor]] = {}
    for buf, op in _buffer_reductions(model):
        groups.setdefault(op, []).append(buf)
    n = world_size()
    for op, bufs in groups.items():
        flat = torch.cat([b.reshape(-1).to(torch.float64) for b in bufs])
        dist.all_reduce(flat, op=op)
        if op == dist.ReduceOp.SUM:
            flat /= n
        for buf, value in zip(bufs, flat.split([b.numel() for b in bufs]), strict=True):
            buf.copy_(value.view_as(buf))
