"""Where a report's PNG files go and how the Markdown links them.

Images are written to ``img/`` beside the Markdown file, named ``<report stem>-<figure>.png``
(``docs/RESULTS.md`` -> ``docs/img/results-accuracy_vs_bits.png``), and linked with paths
relative to the Markdown file, so the folder can be moved or published as it is.
"""

from __future__ import annotations

import os
from pathlib import Path


class FigureFiles:
    """Paths and Markdown links of the figures of the report written to ``output``."""

    def __init__(self, output: Path) -> None:
        self.output = Path(output)
        self.folder = self.output.parent / "img"
        self.prefix = self.output.stem.lower()
        self.written: list[Path] = []

    def path(self, name: str) -> Path:
        """The PNG path for figure ``name`` (recorded as written)."""
        path = self.folder / f"{self.prefix}-{name}.png"
        self.written.append(path)
        return path

    def link(self, path: Path, alt: str) -> str:
        """Markdown image link to ``path``, relative to the report."""
        rel = os.path.relpath(path, self.output.parent)
        return f"![{alt}]({Path(rel).as_posix()})"


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when inside it, else absolute (commands)."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)
