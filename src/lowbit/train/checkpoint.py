"""Checkpoints as a safetensors payload plus a JSON sidecar; no pickle anywhere.

``save_checkpoint(path, tensors, meta)`` writes two files next to each other:

* ``<path>.safetensors`` -- every tensor (model, optimizer moments, RNG byte states);
* ``<path>.json`` -- everything else (epoch, counters, optimizer hyper-parameters, scheduler
  state, RNG states of ``random``/numpy) plus the payload's ``sha256`` and byte size.

Each file is written to ``<file>.tmp`` in the same directory, flushed, ``fsync``-ed and moved into
place with :func:`os.replace` (atomic on POSIX); the JSON goes last, so it is the commit record.
A crash while writing leaves the previous pair untouched. A crash between the two renames leaves
a new payload beside the old JSON; :func:`load_checkpoint` detects that (and any corruption) by
the recorded hash and size and raises :class:`CheckpointError` naming the file -- it never reads
or changes any other file. :func:`load_newest_checkpoint` (what ``--resume`` uses) then falls
back to the newest *consistent* pair of a checkpoint folder (``last``, else ``best``) and says
which one it skipped and why.

The helpers :func:`capture_training_state` / :func:`restore_training_state` turn a full training
state (model, optimizer, scheduler, grad scaler, counters, every RNG) into ``(tensors, meta)`` and
back. Tensors nested in a state dict are replaced in the JSON by ``{"__tensor__": key}`` references
to the payload.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

FORMAT = "lowbit-checkpoint"
VERSION = 1
_TENSOR_REF = "__tensor__"


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, torn, corrupt or of an unknown format."""


def payload_path(path: Path) -> Path:
    """``<path>.safetensors``."""
    return Path(f"{path}.safetensors")


def meta_path(path: Path) -> Path:
    """``<path>.json``."""
    return Path(f"{path}.json")


def _write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target.tmp``, fsync it, and rename it over ``target``.

    On any error the temporary file is removed and ``target`` is left as it was.
    """
    tmp = Path(f"{target}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_cpu(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies that share no storage (safetensors refuses shared ones)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(path: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Atomically write ``<path>.safetensors`` (``tensors``) and ``<path>.json`` (``meta``).

    ``meta`` must be JSON-serialisable; the JSON also records the payload's sha256 and size.
    """
    path = Path(path)
    payload = safetensors.torch.save(_to_cpu(tensors))
    record = {
        "format": FORMAT,
        "version": VERSION,
        "payload": {
            "file": payload_path(path).name,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "bytes": len(payload),
        },
        "meta": dict(meta),
    }
    text = json.dumps(record, indent=1).encode()  # serialise before touching any file
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(payload_path(path), payload)
    _write_atomic(meta_path(path), text)
    _fsync_dir(path.parent)


def _read_record(file: Path) -> dict[str, Any]:
    """The JSON sidecar, checked for format, version and the payload fields."""
    try:
        record = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint metadata {file} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint metadata {file} is not valid JSON: {e}") from e
    ok = (
        isinstance(record, dict)
        and record.get("format") == FORMAT
        and isinstance(record.get("meta"), dict)
        and isinstance(record.get("payload"), dict)
        and isinstance(record["payload"].get("sha256"), str)
        and isinstance(record["payload"].get("bytes"), int)
    )
    if not ok:
        raise CheckpointError(f"checkpoint metadata {file} is not a {FORMAT} record")
    if record.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint metadata {file} has version {record.get('version')!r}; "
            f"this lowbit reads version {VERSION}"
        )
    return record


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a pair written by :func:`save_checkpoint`, verified; returns ``(tensors, meta)``.

    Raises :class:`CheckpointError` naming the file when either file is missing, the JSON is
    invalid, or the payload's size or sha256 differs from the record (torn or corrupt pair).
    """
    path = Path(path)
    record = _read_record(meta_path(path))
    file = payload_path(path)
    try:
        payload = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint payload {file} cannot be read: {e}") from e
    expected = record["payload"]
    if len(payload) != expected["bytes"]:
        raise CheckpointError(
            f"checkpoint payload {file} has {len(payload)} bytes, its metadata "
            f"{meta_path(path).name} records {expected['bytes']} (torn or truncated write)"
        )
    if hashlib.sha256(payload).hexdigest() != expected["sha256"]:
        raise CheckpointError(
            f"checkpoint payload {file} does not match the sha256 recorded in "
            f"{meta_path(path).name} (corrupt file or torn write)"
        )
    try:
        tensors = safetensors.torch.load(payload)
    except Exception as e:  # the hash matched, so this is a writer bug or a foreign file
        raise CheckpointError(f"checkpoint payload {file} is not valid safetensors: {e}") from e
    return tensors, record["meta"]


CHECKPOINT_NAMES = ("last", "best")


def _recorded_epoch(path: Path) -> int:
    """The epoch a pair's JSON records (-1 when unreadable: tried last)."""
    try:
        epoch = json.loads(meta_path(path).read_text())["meta"]["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return -1
    return epoch if isinstance(epoch, int) else -1


def load_newest_checkpoint(
    folder: Path, names: tuple[str, ...] = CHECKPOINT_NAMES
) -> tuple[Path, dict[str, Tensor], dict[str, Any], list[str]]:
    """The newest consistent checkpoint among ``folder/<name>``: ``(path, tensors, meta,
    skipped)``, ``skipped`` saying why each newer pair was passed over (torn, corrupt).

    Pairs are tried by the epoch their JSON records, newest first (``last`` before ``best`` on
    a tie). FileNotFoundError when the folder holds no pair; CheckpointError when every pair
    fails, naming each.
    """
    folder = Path(folder)
    present = [folder / n for n in names if meta_path(folder / n).exists()]
    if not present:
        raise FileNotFoundError(f"cannot resume: no checkpoint at {meta_path(folder / names[0])}")
    present.sort(key=_recorded_epoch, reverse=True)  # stable: 'last' first on a tie
    skipped: list[str] = []
    for path in present:
        try:
            tensors, meta = load_checkpoint(path)
        except CheckpointError as err:
            skipped.append(f"checkpoint {path.name} is unusable ({err})")
            continue
        return path, tensors, meta, skipped
    raise CheckpointError("cannot resume: " + "; ".join(skipped))


# -- nested state dicts <-> (JSON, tensors) ---------------------------------------------------


def split_tensors(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """A JSON-friendly copy of ``obj`` with each tensor moved into ``tensors``.

    Dicts (string keys), lists and tuples are walked; a tensor found at ``a -> 3 -> b`` is stored
    as ``tensors["<prefix>/a/3/b"]`` and replaced by ``{"__tensor__": "<prefix>/a/3/b"}``.
    Tuples become lists.
    """
    if isinstance(obj, Tensor):
        tensors[prefix] = obj
        return {_TENSOR_REF: prefix}
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"state at {prefix!r} has non-string keys: {list(obj)!r}")
        return {k: split_tensors(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [split_tensors(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def join_tensors(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`split_tensors` (lists stay lists)."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            key = obj[_TENSOR_REF]
            if key not in tensors:
                raise CheckpointError(f"checkpoint payload lacks tensor {key!r}")
            return tensors[key]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def optimizer_to_flat(state: Mapping[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """``optimizer.state_dict()`` as JSON; its tensors go to ``tensors["optimizer/..."]``."""
    by_str = {"state": {str(k): v for k, v in state["state"].items()}}
    by_str["param_groups"] = state["param_groups"]
    return split_tensors(by_str, "optimizer", tensors)


def optimizer_from_flat(flat: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_flat`: a dict for ``optimizer.load_state_dict``."""
    joined = join_tensors(flat, tensors)
    return {
        "state": {int(k): v for k, v in joined["state"].items()},
        "param_groups": joined["param_groups"],
    }


# -- RNG states --------------------------------------------------------------------------------


def rng_state(tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Capture torch CPU/CUDA, numpy and ``random`` generator states.

    Torch byte states go to ``tensors["rng/torch"]`` and ``tensors["rng/cuda/<i>"]``; the
    numpy (MT19937) and ``random`` states are returned in JSON form.
    """
    tensors["rng/torch"] = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, state in enumerate(cuda):
        tensors[f"rng/cuda/{i}"] = state
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "cuda_devices": len(cuda),
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only for devices present)."""
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available():
        for i in range(min(state["cuda_devices"], torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"rng/cuda/{i}"], i)
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- full training state -------------------------------------------------------------------------


def capture_training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
    **counters: Any,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` for :func:`save_checkpoint` from a training state.

    ``tensors`` holds ``model/<name>`` (the state dict), the optimizer's tensors and the torch
    RNG states; ``meta`` holds ``counters`` (epoch, global step, best metric, ... -- JSON
    values), the optimizer's hyper-parameters, the scheduler and grad-scaler states and the
    numpy/``random`` states.
    """
    tensors = {}
    for k, v in model.state_dict().items():
        if not isinstance(v, Tensor):  # e.g. a module's get_extra_state() returning a dict
            raise TypeError(
                f"model state entry {k!r} is a {type(v).__name__}, not a tensor; checkpoints hold "
                "tensors only (a module's get_extra_state() should return a tensor)"
            )
        tensors[f"model/{k}"] = v
    meta = dict(counters)
    meta["optimizer"] = optimizer_to_flat(optimizer.state_dict(), tensors)
    meta["scheduler"] = split_tensors(scheduler.state_dict(), "scheduler", tensors)
    meta["scaler"] = None if scaler is None else scaler.state_dict()  # floats and ints
    meta["rng"] = rng_state(tensors)
    return tensors, meta


def model_state(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's state dict from a checkpoint's tensors (``model/`` prefix removed)."""
    return {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}


def restore_training_state(
    tensors: Mapping[str, Tensor],
    meta: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Load what :func:`capture_training_state` saved; returns the counters.

    Model, optimizer and scheduler must be built as for the saved run (same parameters and
    groups). The RNGs are restored last, so the next random draw continues the saved stream.
    """
    model.load_state_dict(model_state(tensors))
    optimizer.load_state_dict(optimizer_from_flat(meta["optimizer"], tensors))
    scheduler.load_state_dict(join_tensors(meta["scheduler"], tensors))
    if scaler is not None and meta.get("scaler") is not None:
        scaler.load_state_dict(meta["scaler"])
    set_rng_state(meta["rng"], tensors)
    reserved = {"optimizer", "scheduler", "scaler", "rng"}
    return {k: v for k, v in meta.items() if k not in reserved}
