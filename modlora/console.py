"""What modlora writes for people: log lines and progress bars, both on stderr (stdout is for results)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm import tqdm

Log = Callable[[str], object]


def log_stderr(message: str) -> None:
    """The default ``log``: one line on stderr."""
    print(message, file=sys.stderr)


def progress(total: int, desc: str, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr; off a terminal (logs, CI) it redraws at most every 10 s."""
    return tqdm(total=total, desc=desc, initial=initial, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 10.0)
