"""String names for datasets: ``register_dataset``, ``load_dataset``, ``list_datasets``.

A registered loader returns the raw official train and test sets (:class:`RawSplits`, uint8
images); :func:`load_dataset` does the rest the same way for every dataset: it carves the
validation split out of the training set (seeded, stratified; never out of test), computes the
normalisation, and wraps each split in an :class:`~lowbit.data.datasets.ImageDataset` (the
training split in an augmented one when asked).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import AugmentedImageDataset, ImageDataset, channel_stats, stratified_split
from .files import default_data_dir


@dataclass(frozen=True)
class RawSplits:
    """The official train and test sets: uint8 images (N, C, H, W), integer labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`load_dataset` needs to know about a dataset besides its loader.

    ``max_value``: the raw value that maps to 1.0. ``mean``/``std``: fixed per-channel
    normalisation, or None to use the training split's own statistics. ``crop_padding``/``flip``:
    the augmentation of the training split, on when ``augment_default`` or ``augment=True``.
    """

    num_classes: int
    in_shape: tuple[int, int, int]
    max_value: int = 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_padding: int = 0
    flip: bool = False
    augment_default: bool = False


@dataclass
class DatasetSplits:
    """A loaded dataset: ``train``/``val``/``test`` yield ``(float image (C, H, W), int64 label)``.

    ``in_shape`` is ``(C, H, W)``; pass it and ``num_classes`` to ``create_model``.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_shape: tuple[int, int, int]
    name: str


Loader = Callable[[Path, bool], RawSplits]
TextLoader = Callable[..., DatasetSplits]
_REGISTRY: dict[str, tuple[Loader, DatasetInfo]] = {}
_TEXT_REGISTRY: dict[str, TextLoader] = {}


def register_dataset(name: str, info: DatasetInfo) -> Callable[[Loader], Loader]:
    """Decorator: ``loader(data_dir, download) -> RawSplits`` becomes dataset ``name``."""

    def deco(loader: Loader) -> Loader:
        if name in _REGISTRY and _REGISTRY[name][0] is not loader:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[name] = (loader, info)
        return loader

    return deco


def register_text_dataset(name: str) -> Callable[[TextLoader], TextLoader]:
    """Decorator: ``loader(*, seed, val_fraction, **options) -> DatasetSplits`` becomes the text
    dataset ``name`` (token windows; see :mod:`lowbit.data.text`)."""

    def deco(loader: TextLoader) -> TextLoader:
        if name in _REGISTRY or (name in _TEXT_REGISTRY and _TEXT_REGISTRY[name] is not loader):
            raise ValueError(f"dataset {name!r} is already registered")
        _TEXT_REGISTRY[name] = loader
        return loader

    return deco


def list_datasets(task: str | None = None) -> list[str]:
    """Registered dataset names, sorted; only the ``image`` or ``text`` ones if ``task``."""
    names = {"image": list(_REGISTRY), "text": list(_TEXT_REGISTRY)}
    return sorted(names[task] if task is not None else [*_REGISTRY, *_TEXT_REGISTRY])


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    augment: bool | None = None,
    **text_options: object,
) -> DatasetSplits:
    """Load dataset ``name`` with train/val/test splits.

    A text dataset (:mod:`lowbit.data.text`) takes ``val_fraction``, ``seed`` and its own
    ``text_options`` (``seq_len``, ``path``); the image options are errors for it.

    ``val_fraction`` of the official training set (stratified by class, chosen by ``seed``)
    becomes ``val``; ``test`` is the official test set (for the embedded sets, a fixed seeded
    split, the same whatever ``seed``). Images are scaled to [0, 1] and normalised per channel
    with the dataset's standard statistics or, where it has none, the final training split's.
    ``data_dir`` defaults to ``$LOWBIT_DATA/<name>`` (``~/.cache/lowbit/<name>``); missing files
    are fetched only with ``download=True``. ``augment`` (default: the dataset's standard
    choice, on for CIFAR-10) applies random crop/flip to ``train`` only, seeded by ``seed``.
    """
    if name not in _REGISTRY and name not in _TEXT_REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(list_datasets())}")
    _check_arguments(val_fraction, seed, download, augment)
    if name in _TEXT_REGISTRY:
        if data_dir is not None or download or augment is not None:
            raise ValueError(
                f"text dataset {name!r} takes no data_dir, download or augment (files: data.path)"
            )
        return _TEXT_REGISTRY[name](seed=seed, val_fraction=float(val_fraction), **text_options)
    if text_options:
        raise ValueError(f"dataset {name!r} has no option {next(iter(text_options))!r}")
    loader, info = _REGISTRY[name]
    root = default_data_dir(name) if data_dir is None else Path(data_dir).expanduser()
    raw = loader(root, download)
    keep, val = stratified_split(raw.train_labels, float(val_fraction), seed)
    train_images = raw.train_images[keep]
    if info.mean is None or info.std is None:
        mean, std = channel_stats(train_images, 1.0 / info.max_value)
    else:
        mean, std = list(info.mean), list(info.std)
    norm = {"scale": 1.0 / info.max_value, "mean": mean, "std": std}

    def split(images: np.ndarray, labels: np.ndarray, augmented: bool = False) -> ImageDataset:
        x = torch.from_numpy(np.require(images, np.uint8, ["C", "W"]))
        y = torch.from_numpy(labels.astype(np.int64))
        if not augmented:
            return ImageDataset(x, y, **norm)
        return AugmentedImageDataset(
            x, y, **norm, padding=info.crop_padding, flip=info.flip, seed=seed
        )

    return DatasetSplits(
        train=split(
            train_images,
            raw.train_labels[keep],
            augmented=info.augment_default if augment is None else augment,
        ),
        val=split(raw.train_images[val], raw.train_labels[val]),
        test=split(raw.test_images, raw.test_labels),
        num_classes=info.num_classes,
        in_shape=info.in_shape,
        name=name,
    )


def _check_arguments(val_fraction: float, seed: int, download: bool, augment: bool | None) -> None:
    if (
        not isinstance(val_fraction, numbers.Real)
        or isinstance(val_fraction, bool)
        or not 0 <= val_fraction < 1
    ):
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(download, bool):
        raise ValueError(f"download must be True or False, got {download!r}")
    if augment is not None and not isinstance(augment, bool):
        raise ValueError(f"augment must be True, False or None, got {augment!r}")
