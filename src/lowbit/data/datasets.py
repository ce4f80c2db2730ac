"""In-memory image datasets, the seeded stratified split, and the CIFAR crop-and-flip augmentation.

Images are kept as ``uint8`` (N, C, H, W) tensors and turned into normalised float tensors per
item, ``x = (raw * scale - mean) / std`` per channel, so a 50,000-image set costs 150 MB, not 600.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


class ImageDataset(Dataset[tuple[Tensor, Tensor]]):
    """``(image, label)``: image ``(raw * scale - mean) / std`` float32 (C, H, W), label int64.

    ``images`` is a (N, C, H, W) tensor of raw pixel values (``uint8``), ``scale`` maps them to
    [0, 1] (1/255 for bytes), ``mean`` and ``std`` have one entry per channel.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        scale: float,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"images must be (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"mean/std need {channels} entries with std > 0, got {mean}, {std}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.scale = float(scale)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def pixels(self, index: int) -> Tensor:
        """Image ``index`` scaled to [0, 1], before normalisation."""
        return self.images[index].to(torch.float32) * self.scale

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return (self.pixels(index) - self.mean) / self.std, self.labels[index]


class AugmentedImageDataset(ImageDataset):
    """:class:`ImageDataset` with random crop (zero padding) and optional horizontal flip.

    The standard CIFAR augmentation of He et al. (2016): pad ``padding`` zero pixels on each side,
    crop back to H x W at a uniformly drawn offset ``(top, left) in [0, 2 * padding]^2``, flip left
    to right with probability 1/2. The offsets and flips of a whole epoch are drawn at
    :meth:`set_epoch` from the dataset's own ``torch.Generator`` seeded with ``(seed, epoch)``:
    item ``i`` of epoch ``e`` is the same whatever the access order, the number of DataLoader
    workers, or where a resumed run restarts.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        scale: float,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        padding: int,
        flip: bool,
        seed: int = 0,
    ) -> None:
        super().__init__(images, labels, scale, mean, std)
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int, got {padding!r}")
        self.padding = padding
        self.flip = bool(flip)
        self.seed = seed
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the crops and flips of ``epoch`` (call before each epoch, and on resume)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch
        self.generator.manual_seed(mix_seed(self.seed, epoch))
        n = len(self)
        self.offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=self.generator)
        self.flips = torch.rand(n, generator=self.generator) < 0.5
        if not self.flip:
            self.flips.zero_()

    def pixels(self, index: int) -> Tensor:
        top, left = self.offsets[index].tolist()
        image = super().pixels(index)
        return crop_flip(image, self.padding, top, left, bool(self.flips[index]))


def crop_flip(image: Tensor, padding: int, top: int, left: int, flip: bool) -> Tensor:
    """Zero-pad (C, H, W) ``image`` by ``padding``, crop H x W at ``(top, left)``, maybe mirror."""
    _, h, w = image.shape
    padded = F.pad(image, (padding, padding, padding, padding))
    crop = padded[:, top : top + h, left : left + w]
    return crop.flip(-1) if flip else crop


def mix_seed(*values: int) -> int:
    """One 64-bit seed from several ints (numpy ``SeedSequence`` hashing: nearby inputs differ)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0])


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..N-1`` into ``(keep, take)`` with ``len(take) = round(fraction * N)``.

    Every class gives ``floor(fraction * n_c)`` items to ``take``, and the remaining
    ``round(fraction * N) - sum floor(...)`` go one each to the classes with the largest
    remainders (largest-remainder apportionment, ties to the lower class), so class proportions
    match to within one item. Which items go is a seeded permutation per class. Both index arrays
    come back sorted.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = fraction * counts
    sizes = np.floor(quotas).astype(np.int64)
    extra = int(np.floor(fraction * len(labels) + 0.5)) - int(sizes.sum())
    sizes[np.argsort(sizes - quotas, kind="stable")[:extra]] += 1
    rng = np.random.default_rng(seed)
    take = [
        rng.permutation(np.flatnonzero(labels == c))[:k]
        for c, k in zip(classes, sizes, strict=True)
    ]
    taken = np.sort(np.concatenate([np.zeros(0, np.int64), *take]))
    return np.setdiff1d(np.arange(len(labels)), taken), taken


def channel_stats(images: np.ndarray, scale: float) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std of ``images * scale`` for uint8 (N, C, H, W) images.

    Computed exactly from each channel's 256-bin histogram ``h``: ``mean = sum_v h_v v / n`` and
    ``var = sum_v h_v (v - mean)^2 / n`` with ``v = value * scale``; no float copy of the images.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    values = np.arange(256, dtype=np.float64) * scale
    means, stds = [], []
    for channel in range(images.shape[1]):
        hist = np.bincount(images[:, channel].ravel(), minlength=256)
        mean = float(hist @ values) / hist.sum()
        means.append(mean)
        stds.append(float(np.sqrt(hist @ (values - mean) ** 2 / hist.sum())))
    return means, stds
