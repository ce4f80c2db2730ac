"""Console output that survives logs: tables are never cut when the output is not a terminal.

On a terminal ``rich`` fits tables to the window. Written to a file or a CI log, the console is
80 columns wide and ``rich`` would fold or cut cells (``1,60…``); :func:`print_table` prints a
table at the full width it needs there instead.
"""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


def print_table(console: Console, table: Table) -> None:
    """Print ``table``; off a terminal at its natural width, so no cell is cut or folded."""
    if console.is_terminal:
        console.print(table)
        return
    wide = console.options.update_width(100_000)
    needed = Measurement.get(console, wide, table).maximum
    width = console.width
    console.width = max(needed, width)
    try:
        console.print(table, crop=False)
    finally:
        console.width = width
