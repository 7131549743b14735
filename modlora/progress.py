"""A small progress bar on stderr (no tqdm dependency).

On a terminal it redraws one line; otherwise (logs, CI) it prints a line at most every
``interval`` seconds, so a redirected stderr stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, desc: str = "", *, stream: TextIO | None = None, interval: float = 10.0,
                 initial: int = 0) -> None:
        self.total, self.desc, self.n = total, desc, initial
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.1 if self.tty else interval
        self.start = time.perf_counter()
        self.last_draw = -float("inf")
        self.info = ""

    def update(self, n: int = 1, **info: object) -> None:
        self.n += n
        if info:
            self.info = "  ".join(f"{k} {_fmt(v)}" for k, v in info.items())
        now = time.perf_counter()
        if now - self.last_draw >= self.interval or self.n >= self.total:
            self._draw(now)

    def _draw(self, now: float) -> None:
        self.last_draw = now
        elapsed = now - self.start
        frac = self.n / self.total if self.total else 1.0
        bar = "#" * int(20 * frac)
        line = f"{self.desc} [{bar:<20}] {self.n}/{self.total} {elapsed:.0f}s  {self.info}".rstrip()
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
