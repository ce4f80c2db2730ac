"""Text corpora as byte-level token streams for language models (vocabulary 256).

* ``pydoc`` -- the English text of Python's reference documentation, shipped with every CPython
  as ``pydoc_data.topics`` (79 documents, 466,117 bytes of UTF-8 under Python 3.11): no
  download. The corpus is that of the running Python, so figures are comparable within one
  Python minor version.
* ``text`` -- a user's own UTF-8 text: ``path`` is a file or a folder; in a folder every
  ``*.txt`` / ``*.md`` / ``*.rst`` file (recursively) is one document; a single file is cut into
  64 equal documents.

Split (document level, fixed): documents are ordered by the SHA-256 of their name and each goes
to the split (train / val / test, target shares ``1 - 2f``, ``f``, ``f`` with ``f =
val_fraction``, default 0.1) whose byte count is furthest below its target, so the split does
not depend on any seed and the shares are met to within one document. A split's documents are
joined with a blank line into one stream of UTF-8 bytes, the tokens.

Items are windows of ``seq_len + 1`` tokens: input ``x = w[:-1]``, target ``y = w[1:]``
(next-byte prediction). Evaluation windows tile the stream without overlap from its start;
training windows are shifted each epoch by an offset drawn from ``(seed, epoch)`` (via
``set_epoch``), so every epoch sees different window boundaries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .datasets import mix_seed
from .registry import DatasetSplits, register_text_dataset

VOCAB_SIZE = 256
DEFAULT_SEQ_LEN = 128
SEPARATOR = b"\n\n"
TEXT_SUFFIXES = (".txt", ".md", ".rst")
FILE_PIECES = 64


class TokenWindows(Dataset[tuple[Tensor, Tensor]]):
    """``(x, y)`` int64 windows of a token stream: ``y`` is ``x`` shifted by one token.

    ``shuffle_offsets``: :meth:`set_epoch` moves the window grid by a seeded offset in
    ``[0, seq_len)`` (training); otherwise the grid starts at token 0 (evaluation).
    """

    def __init__(
        self, tokens: Tensor, seq_len: int, *, seed: int = 0, shuffle_offsets: bool = False
    ) -> None:
        if tokens.dim() != 1 or tokens.numel() < seq_len + 1:
            raise ValueError(
                f"a token stream of {tokens.numel()} tokens is too short for windows of "
                f"seq_len {seq_len} (needs at least {seq_len + 1})"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle_offsets = shuffle_offsets
        self.offset = 0

    def set_epoch(self, epoch: int) -> None:
        """Shift the windows of a training stream by an offset drawn from ``(seed, epoch)``."""
        if self.shuffle_offsets:
            self.offset = int(
                np.random.default_rng(mix_seed(self.seed, epoch)).integers(self.seq_len)
            )

    def __len__(self) -> int:
        return (self.tokens.numel() - 1 - self.offset) // self.seq_len

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range ({len(self)} windows)")
        start = self.offset + index * self.seq_len
        w = self.tokens[start : start + self.seq_len + 1].to(torch.int64)
        return w[:-1], w[1:]


def split_documents(
    documents: Iterable[tuple[str, bytes]], val_fraction: float
) -> tuple[bytes, bytes, bytes]:
    """The fixed document-level split (module docstring): joined train, val and test bytes."""
    targets = (1.0 - 2 * val_fraction, val_fraction, val_fraction)
    ordered = sorted(documents, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    parts: tuple[list[bytes], list[bytes], list[bytes]] = ([], [], [])
    sizes = [0, 0, 0]
    for _, text in ordered:
        total = sum(sizes) + len(text)
        deficit = [t * total - s for t, s in zip(targets, sizes, strict=True)]
        pick = max(range(3), key=lambda i: (deficit[i], -i))
        parts[pick].append(text)
        sizes[pick] += len(text)
    return tuple(SEPARATOR.join(p) for p in parts)  # type: ignore[return-value]


@lru_cache(maxsize=1)
def pydoc_documents() -> tuple[tuple[str, bytes], ...]:
    """``(topic, UTF-8 text)`` of every entry of ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    return tuple((k, topics[k].encode("utf-8")) for k in sorted(topics))


def file_documents(path: str | Path) -> list[tuple[str, bytes]]:
    """The documents of a user's text file or folder (module docstring); clear errors."""
    root = Path(path).expanduser()
    if root.is_file():
        data = root.read_bytes()
        step = -(-len(data) // FILE_PIECES)
        docs = [(f"{i:03d}", data[i * step : (i + 1) * step]) for i in range(FILE_PIECES)]
        docs = [d for d in docs if d[1]]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        docs = [(str(p.relative_to(root)), p.read_bytes()) for p in files]
    else:
        raise ValueError(f"data.path: {str(root)!r} is neither a file nor a folder")
    if not docs:
        raise ValueError(f"data.path: {str(root)!r} holds no text ({', '.join(TEXT_SUFFIXES)})")
    for name, text in docs:
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as err:
            if root.is_dir():  # a piece of one file may cut a character in two: fine
                raise ValueError(f"data.path: {name!r} is not UTF-8 text ({err})") from None
    return docs


def text_splits(
    documents: Iterable[tuple[str, bytes]],
    name: str,
    *,
    seq_len: int,
    val_fraction: float,
    seed: int,
) -> DatasetSplits:
    """Windows of the train/val/test token streams of ``documents``."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"data.seq_len must be a positive integer, got {seq_len!r}")
    if not 0 < val_fraction < 0.5:
        raise ValueError(f"data.val_fraction must be in (0, 0.5) for text, got {val_fraction!r}")
    streams = [
        torch.from_numpy(np.frombuffer(part, dtype=np.uint8).copy())
        for part in split_documents(documents, val_fraction)
    ]
    for split, stream in zip(("train", "val", "test"), streams, strict=True):
        if stream.numel() < seq_len + 1:
            raise ValueError(
                f"data: the {split} split of {name!r} has {stream.numel()} bytes, too few for "
                f"one window of seq_len {seq_len}: give more text or a shorter seq_len"
            )
    train, val, test = streams
    return DatasetSplits(
        train=TokenWindows(train, seq_len, seed=seed, shuffle_offsets=True),
        val=TokenWindows(val, seq_len),
        test=TokenWindows(test, seq_len),
        num_classes=VOCAB_SIZE,
        in_shape=(seq_len,),  # type: ignore[arg-type]
        name=name,
    )


@register_text_dataset("pydoc")
def load_pydoc(
    *, seq_len: int = DEFAULT_SEQ_LEN, val_fraction: float = 0.1, seed: int = 0
) -> DatasetSplits:
    """Python's reference documentation (``pydoc_data.topics``) as byte tokens."""
    return text_splits(
        pydoc_documents(), "pydoc", seq_len=seq_len, val_fraction=val_fraction, seed=seed
    )


@register_text_dataset("text")
def load_text(
    *,
    path: str | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DatasetSplits:
    """A user's text file or folder (``data: {name: text, path: ...}``) as byte tokens."""
    if path is None:
        raise ValueError("data.path is required for the 'text' dataset (a file or a folder)")
    docs = file_documents(path)
    return text_splits(docs, "text", seq_len=seq_len, val_fraction=val_fraction, seed=seed)
