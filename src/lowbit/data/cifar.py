"""CIFAR-10 (Krizhevsky, 2009) from the official binary or python batches in ``data_dir``.

Either layout is read: ``cifar-10-batches-bin/`` (``data_batch_{1..5}.bin``, ``test_batch.bin``;
records of 1 label byte + 3,072 pixel bytes) or ``cifar-10-batches-py/`` (``data_batch_{1..5}``,
``test_batch``; pickled dicts with ``b'data'`` uint8 (N, 3072) and ``b'labels'``). Pixels are
the 1,024 red, then green, then blue values of a 32x32 image in row-major order.

The python batches are pickles, and unpickling runs whatever the file names: they are read with
:class:`RestrictedUnpickler`, which only resolves the few numpy and builtin names an array needs.
``download=True`` fetches the binary version (no pickle at all) and extracts it safely.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .files import (
    DatasetFileError,
    download_file,
    extract_tar_safely,
    locate,
    read_bytes,
)
from .registry import DatasetInfo, RawSplits, register_dataset

#: Where ``download=True`` fetches the binary version, tried in order (module-level: overridable).
URLS: list[str] = ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
BIN_DIR, PY_DIR = "cifar-10-batches-bin", "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
IMAGE_SHAPE = (3, 32, 32)
PIXELS = 3 * 32 * 32
NUM_CLASSES = 10
#: Per-channel mean and std of the 50,000 training images, scaled to [0, 1].
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside :data:`RestrictedUnpickler.allowed`."""


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The callables numpy arrays pickle with, under numpy 1.x and 2.x module names."""
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    names: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for core in ("numpy.core", "numpy._core"):
        names[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        names[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return names


_SAFE_BUILTINS = (
    bytearray,
    bytes,
    bool,
    complex,
    dict,
    float,
    frozenset,
    int,
    list,
    set,
    str,
    tuple,
)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only numpy array reconstruction and inert builtins.

    Allowed: ``numpy.ndarray``, ``numpy.dtype``, numpy's ``_reconstruct`` / ``_frombuffer``,
    ``_codecs.encode`` (how protocol-2 pickles store bytes) and builtin container/scalar types
    (also under Python 2's ``__builtin__``: overriding ``find_class`` skips pickle's renaming).
    Any other global (``os.system``, ``builtins.eval``, ...) raises :class:`UnsafePickleError`
    before it is called.
    """

    allowed: ClassVar[dict[tuple[str, str], Any]] = {
        **_numpy_globals(),
        ("_codecs", "encode"): codecs.encode,
        **{(m, t.__name__): t for m in ("builtins", "__builtin__") for t in _SAFE_BUILTINS},
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise UnsafePickleError(
                f"refusing to unpickle global {module}.{name}: a CIFAR-10 batch only needs numpy "
                "arrays, bytes, lists and dicts"
            )
        return self.allowed[(module, name)]


def read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) and labels (N,) from a python-version batch, unpickled safely."""
    try:
        batch = RestrictedUnpickler(io.BytesIO(read_bytes(path)), encoding="bytes").load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise DatasetFileError(f"{path}: not a readable CIFAR-10 batch ({err!r})") from err
    if not isinstance(batch, dict):
        raise DatasetFileError(f"{path}: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetFileError(f"{path}: b'data' must be a uint8 (N, {PIXELS}) array")
    if data.shape[1] != PIXELS or labels is None or len(labels) != len(data):
        raise DatasetFileError(
            f"{path}: b'data' is {data.shape} with {'no' if labels is None else len(labels)} "
            f"labels; expected (N, {PIXELS}) and N labels"
        )
    return _checked(path, data, np.asarray(labels))


def read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) and labels (N,) from a binary-version batch of 3,073-byte records."""
    data = read_bytes(path)
    record = 1 + PIXELS
    if not data or len(data) % record:
        raise DatasetFileError(
            f"{path}: {len(data)} bytes is not a whole number of {record}-byte records "
            "(truncated or not a CIFAR-10 binary batch)"
        )
    rows = np.frombuffer(data, np.uint8).reshape(-1, record)
    return _checked(path, rows[:, 1:], rows[:, 0])


def _checked(path: Path, pixels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DatasetFileError(
            f"{path}: labels must be in 0..9, found {labels.min()}..{labels.max()}"
        )
    return pixels.reshape(-1, *IMAGE_SHAPE).copy(), labels.astype(np.int64)


def download_binary(data_dir: Path) -> None:
    """Fetch the binary tarball from :data:`URLS`; extract ``cifar-10-batches-bin`` atomically."""
    archive = download_file(URLS, data_dir / "cifar-10-binary.tar.gz")
    scratch = Path(tempfile.mkdtemp(dir=data_dir, prefix=".extract-"))
    try:
        extract_tar_safely(archive, scratch)
        if not (scratch / BIN_DIR).is_dir():
            raise DatasetFileError(f"{archive}: has no {BIN_DIR}/ directory")
        try:
            os.replace(scratch / BIN_DIR, data_dir / BIN_DIR)
        except OSError:
            if not (data_dir / BIN_DIR).is_dir():  # else a concurrent download got there first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@register_dataset(
    "cifar10",
    DatasetInfo(
        num_classes=NUM_CLASSES,
        in_shape=IMAGE_SHAPE,
        mean=MEAN,
        std=STD,
        crop_padding=4,
        flip=True,
        augment_default=True,
    ),
)
def load_cifar10(data_dir: Path, download: bool) -> RawSplits:
    """The 50,000/10,000 CIFAR-10 images from whichever layout is complete (binary first)."""
    layouts = (
        (BIN_DIR, tuple(f"{b}.bin" for b in (*TRAIN_BATCHES, TEST_BATCH)), read_binary_batch),
        (PY_DIR, (*TRAIN_BATCHES, TEST_BATCH), read_python_batch),
    )
    problems = []
    for subdir, files, reader in layouts:
        found, missing = locate(data_dir / subdir, files)
        if not missing:
            train = [reader(found[f]) for f in files[:-1]]
            test_images, test_labels = reader(found[files[-1]])
            return RawSplits(
                np.concatenate([x for x, _ in train]),
                np.concatenate([y for _, y in train]),
                test_images,
                test_labels,
            )
        problems.append(f"{data_dir / subdir} lacks {', '.join(missing)}")
    if not download:
        raise FileNotFoundError(
            f"cifar10: no complete copy in {data_dir} ({'; '.join(problems)}); put the official "
            "batches there, or pass download=True to load_dataset to fetch them"
        )
    if (data_dir / BIN_DIR).exists():
        raise FileExistsError(
            f"cifar10: {data_dir / BIN_DIR} exists but is incomplete ({problems[0]}); "
            "complete or remove it before download=True fetches a fresh copy"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    download_binary(data_dir)
    return load_cifar10(data_dir, download=False)
