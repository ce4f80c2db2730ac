"""The training loop: any ``nn.Module`` (float or quantised) on any map-style dataset.

One :class:`Trainer` owns the model, optimizer, per-step LR schedule, logs and checkpoints of a
run directory::

    run_dir/
      checkpoints/last.{safetensors,json}   every ``checkpoint_every`` epochs (and the last)
      checkpoints/best.{safetensors,json}   whenever the validation accuracy improves
      metrics.csv  scalars.jsonl  tb/  metrics.json      (see :mod:`lowbit.train.runlog`)

Reproducibility: ``fit()`` seeds torch, numpy and ``random`` from ``config.seed``; epoch ``e``
draws its data order from a generator seeded by ``(seed, e)`` alone, and datasets with
``set_epoch(e)`` are told the epoch first. A checkpoint holds every RNG state, so
``fit(resume=True)`` after an interruption ends (on CPU) with bitwise the same weights as an
uninterrupted run.

Under ``torchrun`` (``WORLD_SIZE > 1``) the same code trains data-parallel, see
``docs/distributed.md``: ``batch_size`` stays the global batch (each of the ``W`` ranks loads
``batch_size / W`` samples from a :class:`~torch.utils.data.DistributedSampler` seeded with
``seed`` and told the epoch); the model is wrapped in :class:`DistributedDataParallel` with the
recipe's gradient communication hook (:mod:`lowbit.train.comm`); the running statistics are
reduced across ranks after every step (:func:`lowbit.train.distributed.sync_buffers`); step and
epoch metrics are summed over ranks, and validation is sharded (rank ``r`` evaluates items
``r, r + W, ...``) and reduced, so every rank sees the same numbers as one process would. Only
rank 0 writes logs and checkpoints; every rank reads the checkpoint on resume.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate

from ..data.datasets import mix_seed
from . import distributed
from .checkpoint import (
    capture_training_state,
    load_newest_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from .comm import CommState, register
from .config import TrainConfig
from .distributed import is_main_process
from .optim import build_optimizer, build_scheduler, regularizers
from .progress import EpochProgress, epoch_line
from .runlog import RunLog, quantizer_scalars

DIVERGENCE_FACTOR = 1e6
"""A finite loss above this multiple of the run's first loss counts as diverged."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN, infinite, or :data:`DIVERGENCE_FACTOR` times its first
    value; no checkpoint of that state was written."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step


def seed_everything(seed: int) -> None:
    """Seed the global torch (CPU and CUDA), numpy and ``random`` generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _batch_stats_tensor(out: Tensor, y: Tensor, loss: Tensor, total: Tensor) -> Tensor:
    """``[loss, total, #correct]`` as a float64 tensor on ``out``'s device.

    ``#correct`` counts ``argmax(out) == y`` for class logits ``[N, C]`` and integer targets
    ``[N]``; for next-token logits ``[N, T, V]`` and targets ``[N, T]`` each item counts its
    share of correct tokens; for any other output it is NaN (accuracy is then reported as NaN).
    """
    if out.dim() in (2, 3) and y.dim() == out.dim() - 1 and not y.is_floating_point():
        hits = (out.argmax(dim=-1) == y).to(torch.float64)
        correct = hits.reshape(len(y), -1).mean(dim=1).sum()
    else:
        correct = torch.tensor(math.nan, dtype=torch.float64, device=out.device)
    values = (loss.detach().to(torch.float64), total.detach().to(torch.float64), correct)
    return torch.stack(values)


def _batch_stats(out: Tensor, y: Tensor, loss: Tensor, total: Tensor) -> list[float]:
    """``[loss, total, #correct]`` (see :func:`_batch_stats_tensor`) in one host transfer."""
    return _batch_stats_tensor(out, y, loss, total).tolist()


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` over ``loader`` (eval mode, ``no_grad``; the mode is
    restored after). ``loss_fn`` defaults to cross-entropy."""
    loss_sum, correct, n = _evaluation_sums(model, loader, loss_fn, device)
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1)}


def _evaluation_sums(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
    device: torch.device | str,
) -> tuple[float, float, int]:
    """``(sum of per-item losses, #correct, #items)`` over ``loader``, as :func:`evaluate`."""
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0.0, 0
    try:
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = model(x)
                loss = loss_fn(out, y)
                value, _, right = _batch_stats(out, y, loss, loss)
                loss_sum += value * len(y)
                correct += right
                n += len(y)
    finally:
        model.train(was_training)
    return loss_sum, correct, n


class Trainer:
    """Trains ``model`` on ``train_set``, validating on ``val_set``; see the module docstring.

    Args:
        model: any module; moved to the configured device. Quantised models work unchanged:
            scale parameters get no weight decay (:mod:`lowbit.train.optim`) and modules'
            ``regularization()`` terms are added to the loss.
        train_set, val_set: map-style datasets of ``(input, target)`` pairs.
        config: a :class:`TrainConfig`, or a mapping for :meth:`TrainConfig.from_dict`.
        run_dir: where checkpoints and logs go.
        test_set: evaluated once at the end (final weights) when given.
        loss_fn: ``loss_fn(output, target)``, a batch mean; default cross-entropy.
        console: a ``rich`` console for the progress bar and per-epoch lines (default stderr).
            The bar is shown only on a terminal; the per-epoch line always.
        callbacks: objects with an optional ``on_epoch_end(trainer, epoch, metrics)``, called
            after the epoch's checkpoint is written.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset,
        config: TrainConfig | Mapping[str, Any],
        run_dir: Path,
        *,
        test_set: Dataset | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        console: Console | None = None,
        callbacks: Iterable[Any] = (),
    ) -> None:
        if len(train_set) == 0:  # type: ignore[arg-type]
            raise ValueError("train_set is empty")
        if not isinstance(config, TrainConfig):
            config = TrainConfig.from_dict(config)
        self.config = config
        self.device = distributed.setup(config.resolve_device())
        self.world_size = distributed.world_size()
        if config.batch_size % self.world_size:
            raise ValueError(
                f"batch_size ({config.batch_size}) must be divisible by the number of "
                f"processes ({self.world_size}): it is the global batch, split across ranks"
            )
        self.local_batch_size = config.batch_size // self.world_size
        self.model = model.to(self.device)
        self.train_set, self.val_set, self.test_set = train_set, val_set, test_set
        self.run_dir = Path(run_dir)
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.console = console if console is not None else Console(stderr=True)
        self.callbacks = tuple(callbacks)
        per_rank = math.ceil(len(train_set) / self.world_size)  # type: ignore[arg-type]
        self.steps_per_epoch = math.ceil(per_rank / self.local_batch_size)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if config.amp else None
        self._regularizers = regularizers(self.model)
        self.epoch = 0  # completed epochs
        self.global_step = 0  # optimizer steps taken
        self.best_val_acc: float | None = None
        self.best_epoch: int | None = None
        self.first_loss: float | None = None  # the run's first finite training loss
        self._train_time_s = 0.0  # time inside training loops, all sessions
        self._wall_time_s = 0.0  # wall time of earlier sessions (resume)
        self._last_val: dict[str, float] | None = None
        self._ddp: nn.Module | None = None  # the DistributedDataParallel wrapper during fit
        self.comm: CommState | None = None  # its communication hook's state (byte counters)

    # -- public API --------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train up to ``config.epochs`` and return the summary also written to metrics.json.

        ``resume=True`` continues from ``checkpoints/last`` (FileNotFoundError if there is none).
        Raises :class:`TrainingDiverged` on a NaN/Inf loss, leaving the last checkpoint intact.
        """
        session_start = time.perf_counter()
        if resume:
            self._resume()
        else:
            seed_everything(self.config.seed)
        log = RunLog(self.run_dir, self.epoch, enabled=is_main_process())
        try:
            if distributed.is_distributed():
                self._wrap_ddp()
            for epoch in range(self.epoch + 1, self.config.epochs + 1):
                self._run_epoch(epoch, log, session_start)
            summary = self._summary(time.perf_counter() - session_start)
            log.write_summary(summary)
        finally:
            log.close()
            self._unwrap_ddp()
        distributed.barrier()  # rank 0's files are complete before any rank reads them
        return summary

    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        """Mean loss and accuracy on ``dataset`` (eval mode, ``no_grad``; mode restored after).

        Under DDP every rank must call it: rank ``r`` evaluates items ``r, r + W, ...`` and the
        sums are reduced.
        """
        if distributed.is_distributed():
            items = range(distributed.rank(), len(dataset), self.world_size)  # type: ignore[arg-type]
            dataset = Subset(dataset, items)
        loader = self._loader(dataset, shuffle=False, seed=self.config.seed)
        with self._autocast():
            sums = _evaluation_sums(self.model, loader, self.loss_fn, self.device)
        loss_sum, correct, n = distributed.all_reduce_sum(
            torch.tensor(sums, dtype=torch.float64, device=self.device)
        ).tolist()
        return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1)}

    # -- one epoch -----------------------------------------------------------------------------
    def _run_epoch(self, epoch: int, log: RunLog, session_start: float) -> None:
        """Train, maybe evaluate, log, checkpoint, call back."""
        cfg = self.config
        start = time.perf_counter()
        train = self._train_epoch(epoch)
        val = None
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            val = self._last_val = self.evaluate(self.val_set)
        improved = val is not None and math.isfinite(val["acc"])
        improved = improved and (self.best_val_acc is None or val["acc"] > self.best_val_acc)
        if improved:
            self.best_val_acc, self.best_epoch = val["acc"], epoch
        metrics = {
            "epoch": epoch,
            "train_loss": train["loss"],
            "train_acc": train["acc"],
            "val_loss": None if val is None else val["loss"],
            "val_acc": None if val is None else val["acc"],
            "lr": train["lr"],
            "epoch_time_s": time.perf_counter() - start,
            "step_time_ms": train["step_time_ms"],
        }
        if self.comm is not None:
            metrics["comm_bytes"], metrics["comm_ratio"] = train["comm_bytes"], train["comm_ratio"]
        log.log_epoch(metrics, quantizer_scalars(self.model))
        self.epoch = epoch
        wall = self._wall_time_s + time.perf_counter() - session_start
        if improved:
            self._save("best", wall)
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            self._save("last", wall)
        self._print_epoch(metrics)
        for callback in self.callbacks:
            hook = getattr(callback, "on_epoch_end", None)
            if hook is not None:
                hook(self, epoch, metrics)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        if callable(getattr(self.train_set, "set_epoch", None)):
            self.train_set.set_epoch(epoch)  # type: ignore[attr-defined]
        loader = self._train_loader(epoch)
        loss_sum, correct, n, lr = 0.0, 0.0, 0, math.nan
        sent = (self.comm.bytes_sent, self.comm.fp32_bytes) if self.comm is not None else None
        start = time.perf_counter()
        with self._progress(epoch, len(loader)) as progress:
            for step, (x, y) in enumerate(loader, 1):
                lr = self.optimizer.param_groups[0]["lr"]
                loss, right, size = self._train_step(x, y, epoch, step)
                loss_sum, correct, n = loss_sum + loss * size, correct + right, n + size
                progress.update(step, loss_sum / n, correct / n, lr)
        elapsed = time.perf_counter() - start
        self._train_time_s += elapsed
        step_ms = 1e3 * elapsed / len(loader)
        out = {"loss": loss_sum / n, "acc": correct / n, "lr": lr, "step_time_ms": step_ms}
        if self.comm is not None and sent is not None:
            sent_bytes = self.comm.bytes_sent - sent[0]
            out["comm_bytes"] = sent_bytes / len(loader)
            out["comm_ratio"] = (self.comm.fp32_bytes - sent[1]) / max(sent_bytes, 1)
        return out

    def _train_step(self, x: Tensor, y: Tensor, epoch: int, step: int) -> tuple[float, float, int]:
        """Forward, NaN check, backward, clipping, optimizer and LR step.

        Returns ``(mean loss, #correct, #items)`` of the step, over all ranks under DDP.
        """
        x, y = self._to_device(x, y)
        if self.comm is not None:
            self.comm.step = self.global_step
        with self._autocast():
            out = (self._ddp or self.model)(x)
            loss = self.loss_fn(out, y)
            total = loss + sum(r() for r in self._regularizers)
        loss_value, total_value, right, size = self._step_stats(out, y, loss, total)
        self._check_divergence(total_value, epoch, step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            total.backward()
            self._clip_gradients()
            self.optimizer.step()
        else:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            self._clip_gradients()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        if self._ddp is not None:
            distributed.sync_buffers(self.model)
        return loss_value, right, size

    def _check_divergence(self, loss: float, epoch: int, step: int) -> None:
        """Raise TrainingDiverged on a NaN/Inf loss or one DIVERGENCE_FACTOR x the first."""
        if self.first_loss is None and math.isfinite(loss):
            self.first_loss = loss
        bound = None if not self.first_loss else DIVERGENCE_FACTOR * abs(self.first_loss)
        if math.isfinite(loss) and (bound is None or loss <= bound):
            return
        first = self.first_loss
        why = f"loss is {loss}"
        if math.isfinite(loss):
            why = f"loss {loss:.3g} is over {DIVERGENCE_FACTOR:g} times the first ({first:.3g})"
        raise TrainingDiverged(
            f"training diverged: {why} at epoch {epoch}, step {step} of "
            f"{self.steps_per_epoch} (global step {self.global_step + 1}); the last good "
            f"checkpoint is kept in {self.checkpoint_dir}",
            epoch,
            step,
        )

    def _step_stats(
        self, out: Tensor, y: Tensor, loss: Tensor, total: Tensor
    ) -> tuple[float, float, float, int]:
        """``(mean loss, mean total loss, #correct, #items)`` of the step, summed over ranks."""
        if self._ddp is None:
            loss_value, total_value, right = _batch_stats(out, y, loss, total)
            return loss_value, total_value, right, len(y)
        stats = _batch_stats_tensor(out, y, loss, total)
        size = torch.tensor([len(y)], dtype=torch.float64, device=stats.device)
        sums = distributed.all_reduce_sum(torch.cat([stats[:2] * size, stats[2:], size]))
        loss_sum, total_sum, right, n = sums.tolist()
        return loss_sum / n, total_sum / n, right, int(n)

    def _clip_gradients(self) -> None:
        if self.config.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.config.grad_clip)

    # -- data parallel -------------------------------------------------------------------------
    def _wrap_ddp(self) -> None:
        """Wrap the model in DDP with the recipe's comm hook, every rank starting from rank 0's
        state.

        Rank 0's parameters and buffers are broadcast, then lazily initialised quantiser state
        (LSQ steps set from the first batch, parameters whose shape is known only then) is
        initialised by one forward in eval mode, without gradients, on rank 0's first batch of
        the coming epoch, the same on every rank; eval mode leaves the running statistics and
        counters alone. After a resume this finds nothing left to initialise.
        """
        distributed.broadcast_state(self.model)
        self._initialise_lazy_state(self._first_batch())
        self._ddp = distributed.wrap(self.model, self.device)
        self.comm = register(self._ddp, self.config.comm)

    def _first_batch(self) -> Tensor:
        """The inputs of rank 0's first batch of the next epoch (built alike on every rank)."""
        indices = itertools.islice(self._sampler(self.epoch + 1, 0), self.local_batch_size)
        x, _ = default_collate([self.train_set[i] for i in indices])
        return x

    @torch.no_grad()
    def _initialise_lazy_state(self, x: Tensor) -> None:
        """One eval-mode forward of ``x``: initialises lazy quantiser state, nothing else."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                self.model(x.to(self.device))
        finally:
            self.model.train(was_training)

    def _unwrap_ddp(self) -> None:
        """Drop the DDP wrapper; its gradient hooks go with it (parameters may be reused by a
        later phase's model)."""
        if self._ddp is not None:
            self._ddp = None
            gc.collect()

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self, name: str, wall_time_s: float) -> None:
        """Write ``checkpoints/<name>`` (main process only)."""
        if not is_main_process():
            return
        tensors, meta = capture_training_state(
            self.model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            epoch=self.epoch,
            global_step=self.global_step,
            best_val_acc=self.best_val_acc,
            best_epoch=self.best_epoch,
            first_loss=self.first_loss,
            train_time_s=self._train_time_s,
            wall_time_s=wall_time_s,
            config=self.config.to_dict(),
        )
        save_checkpoint(self.checkpoint_dir / name, tensors, meta)

    def _resume(self) -> None:
        """Continue from the newest consistent checkpoint (``last``, else ``best``, said so)."""
        path, tensors, meta, skipped = load_newest_checkpoint(self.checkpoint_dir)
        if skipped and is_main_process():
            self.console.print(
                f"[yellow]warning:[/] {'; '.join(skipped)}; resuming from {path.name} "
                f"(epoch {meta['epoch']}) instead"
            )
        counters = restore_training_state(
            tensors, meta, self.model, self.optimizer, self.scheduler, self.scaler
        )
        self.epoch = counters["epoch"]
        self.global_step = counters["global_step"]
        self.best_val_acc = counters["best_val_acc"]
        self.best_epoch = counters["best_epoch"]
        self.first_loss = counters.get("first_loss")
        self._train_time_s = counters["train_time_s"]
        self._wall_time_s = counters["wall_time_s"]
        changed = _changed_keys(counters["config"], self.config.to_dict())
        if changed and is_main_process():
            self.console.print(
                f"[yellow]warning:[/] resuming {path} with a different config ({changed}); "
                "the result will differ from an uninterrupted run"
            )

    # -- helpers -----------------------------------------------------------------------------
    def _summary(self, session_s: float) -> dict[str, Any]:
        val = self._last_val if self._last_val is not None else self.evaluate(self.val_set)
        summary: dict[str, Any] = {
            "epochs": self.epoch,
            "global_steps": self.global_step,
            "final_val_loss": val["loss"],
            "final_val_acc": val["acc"],
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "wall_time_s": self._wall_time_s + session_s,
            "mean_step_time_ms": 1e3 * self._train_time_s / max(self.global_step, 1),
        }
        if self.comm is not None:
            summary.update(
                world_size=self.world_size,
                comm_method=self.config.comm.method,
                comm_bytes_per_step=self.comm.bytes_per_step,
                comm_fp32_bytes_per_step=self.comm.fp32_bytes / max(self.comm.steps, 1),
                comm_ratio=self.comm.ratio,
            )
        if self.test_set is not None:
            test = self.evaluate(self.test_set)
            summary["test_loss"], summary["test_acc"] = test["loss"], test["acc"]
        return summary

    def _loader(
        self, dataset: Dataset, *, shuffle: bool, seed: int, sampler: Any = None
    ) -> DataLoader:
        """A DataLoader whose order and worker seeds come from its own generator (or the
        ``sampler``) only; batches of ``batch_size / world_size`` under a sampler."""
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size if sampler is None else self.local_batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),
        )

    def _sampler(self, epoch: int, rank: int) -> DistributedSampler:
        """``rank``'s share of epoch ``epoch``: a permutation seeded by ``(seed, epoch)``."""
        sampler = DistributedSampler(
            self.train_set, self.world_size, rank, shuffle=True, seed=self.config.seed
        )
        sampler.set_epoch(epoch)
        return sampler

    def _train_loader(self, epoch: int) -> DataLoader:
        """Epoch ``epoch``'s batches: a seeded shuffle, or this rank's DistributedSampler share."""
        seed = mix_seed(self.config.seed, epoch)  # depends on (seed, epoch) only
        if not distributed.is_distributed():
            return self._loader(self.train_set, shuffle=True, seed=seed)
        sampler = self._sampler(epoch, distributed.rank())
        return self._loader(self.train_set, shuffle=False, seed=seed, sampler=sampler)

    def _to_device(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """float16 autocast on CUDA when ``config.amp``; otherwise nothing."""
        if not self.config.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=torch.float16)

    def _progress(self, epoch: int, steps: int) -> EpochProgress:
        """The epoch's progress: a bar on a terminal, plain lines in logs; silent off rank 0."""
        return EpochProgress(
            self.console, epoch, self.config.epochs, steps, enabled=is_main_process()
        )

    def _print_epoch(self, m: Mapping[str, Any]) -> None:
        """One line per epoch, also in CI logs."""
        if is_main_process():
            self.console.print(epoch_line(m, self.config.epochs), soft_wrap=True, highlight=False)


def _changed_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Config keys whose values differ between a checkpoint and the current run."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
