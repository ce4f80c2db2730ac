"""Dataset files on disk: reading (raw or gzip), clear errors, atomic download, safe untar."""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

DOWNLOAD_SCHEMES = ("https", "http", "file")
CHUNK_BYTES = 1 << 20


class DatasetFileError(ValueError):
    """A dataset file exists but is not what it should be (wrong magic, truncated, corrupt)."""


def default_data_dir(name: str) -> Path:
    """``$LOWBIT_DATA/<name>``, or ``~/.cache/lowbit/<name>`` when the variable is unset."""
    root = os.environ.get("LOWBIT_DATA") or Path.home() / ".cache" / "lowbit"
    return Path(root).expanduser() / name


def read_bytes(path: Path) -> bytes:
    """The content of ``path``, decompressed if its name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as err:
        raise DatasetFileError(f"{path}: cannot decompress ({err}); delete it and retry") from err


def locate(root: Path, names: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
    """Find each of ``names`` in ``root``, as is or ``.gz``: ``({name: path}, missing names)``."""
    found, missing = {}, []
    for name in names:
        path = next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    return found, missing


def missing_files_error(
    dataset: str, root: Path, expected: Sequence[str], missing: Sequence[str]
) -> FileNotFoundError:
    """The error for absent dataset files: names the directory, the files and ``download=True``."""
    return FileNotFoundError(
        f"{dataset}: missing {', '.join(missing)} in {root} (expects {', '.join(expected)}, "
        "each raw or .gz); "
        f"put the files there, or pass download=True to load_dataset to fetch them"
    )


def download_file(urls: Sequence[str], dest: Path) -> Path:
    """Fetch the first of ``urls`` that works into ``dest``, atomically.

    The bytes go to a temporary file next to ``dest`` that is renamed over it only once complete,
    so an interrupted download never leaves a partial ``dest``. Only http(s) and file URLs.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in DOWNLOAD_SCHEMES:
            raise ValueError(
                f"download URL {url!r} has scheme {scheme!r}; allowed: {DOWNLOAD_SCHEMES}"
            )
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as src:
                shutil.copyfileobj(src, out, CHUNK_BYTES)
            os.replace(tmp, dest)
            return dest
        except OSError as err:
            errors.append(f"{url}: {err}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise ConnectionError(f"could not download {dest.name}: " + "; ".join(errors))


def extract_tar_safely(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest``, refusing absolute paths, ``..``, links and devices.

    Every member is checked before anything is written; extraction then also uses tarfile's
    ``data`` filter as a second guard.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                path = PurePosixPath(m.name.replace("\\", "/"))
                if path.is_absolute() or ".." in path.parts or not (m.isfile() or m.isdir()):
                    raise DatasetFileError(
                        f"{archive}: refusing unsafe archive member {m.name!r} "
                        "(absolute path, '..', link or special file)"
                    )
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise DatasetFileError(f"{archive}: not a readable tar archive ({err})") from err
