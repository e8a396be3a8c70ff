"""The rich Console every command prints its tables with.

On a terminal, rich fits tables to the window. Anywhere else (a log, CI, a pipe) rich would
assume 80 columns and wrap cells mid-word, cutting config keys and paths in two; there the
console is made wide enough that every row stays on one line, and colour codes are left out.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console

#: Width used when the output is not a terminal: wider than any row these tables have.
PLAIN_WIDTH = 10_000


def console(file: TextIO | None = None) -> Console:
    """A Console on ``file`` (stdout by default): terminal-sized on a terminal, unwrapped elsewhere."""
    out = file or sys.stdout
    if out.isatty():
        return Console(file=out)
    return Console(file=out, width=PLAIN_WIDTH, no_color=True, highlight=False, soft_wrap=False)
