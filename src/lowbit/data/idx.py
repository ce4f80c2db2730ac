"""MNIST and Fashion-MNIST from their standard IDX files (raw or ``.gz``) in ``data_dir``.

IDX format (LeCun et al.): a big-endian header ``0x00 0x00 <type> <ndim>``, then ``ndim`` uint32
dimensions, then the data in C order. Both datasets use unsigned bytes (type ``0x08``): images
are ``0x00000803`` (N, 28, 28) and labels ``0x00000801`` (N,). A file whose magic number or size
disagrees with its header is a :class:`~lowbit.data.files.DatasetFileError` naming it.
"""

from __future__ import annotations

import struct
from functools import partial
from pathlib import Path

import numpy as np

from .files import DatasetFileError, download_file, locate, missing_files_error, read_bytes
from .registry import DatasetInfo, RawSplits, register_dataset

#: Base URLs tried in order by ``download=True``; each file is fetched as ``<base><file>.gz``.
#: Module-level so that a mirror can be swapped in (``idx.MIRRORS["mnist"] = [...]``).
MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
UNSIGNED_BYTE = 0x08
IMAGE_SIDE = 28
NUM_CLASSES = 10


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array of IDX file ``path``, which must have ``ndim`` dimensions."""

    data = read_bytes(path)
    expected_magic = (UNSIGNED_BYTE << 8) | ndim
    magic = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
    if magic != expected_magic:
        got = "no header" if magic is None else f"0x{magic:08x}"
        raise DatasetFileError(
            f"{path}: bad IDX magic number {got}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimension(s))"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFileError(f"{path}: truncated IDX header ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != size:
        raise DatasetFileError(
            f"{path}: {len(data)} bytes, but its header {dims} needs {size}; "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 28, 28) and labels (N,) int64 from a matching pair of IDX files."""
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DatasetFileError(
            f"{images_path}: images are {images.shape[1:]}, expected {IMAGE_SIDE}x{IMAGE_SIDE}"
        )
    if len(images) != len(labels):
        raise DatasetFileError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DatasetFileError(f"{labels_path}: label {labels.max()} is not in 0..9")
    return images[:, None].copy(), labels.astype(np.int64)


def load_idx_dataset(name: str, data_dir: Path, download: bool) -> RawSplits:
    """The four IDX files of ``name`` in ``data_dir``, downloaded first if missing and asked to."""
    expected = TRAIN_FILES + TEST_FILES
    found, missing = locate(data_dir, expected)
    if missing and not download:
        raise missing_files_error(name, data_dir, expected, missing)
    for file in missing:
        found[file] = download_file(
            [f"{base}{file}.gz" for base in MIRRORS[name]], data_dir / f"{file}.gz"
        )
    train = read_idx_pair(*(found[f] for f in TRAIN_FILES))
    test = read_idx_pair(*(found[f] for f in TEST_FILES))
    return RawSplits(*train, *test)


for _name in ("mnist", "fashion-mnist"):
    register_dataset(
        _name, DatasetInfo(num_classes=NUM_CLASSES, in_shape=(1, 28, 28), crop_padding=2)
    )(partial(load_idx_dataset, _name))
