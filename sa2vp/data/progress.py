"""Progress reports from long data operations, without the library printing on its own.

A `Progress` is called with a description, a total (None when unknown) and a unit, and returns a context
manager that yields an `advance(n)` callable. The CLI passes `BarProgress` on a terminal and `LineProgress`
otherwise (logs, CI); library callers get `NO_PROGRESS` unless they ask.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, TextIO

Advance = Callable[[int], None]


class Progress(Protocol):
    def __call__(self, description: str, total: int | None = None, unit: str = "it") -> AbstractContextManager[
        Advance
    ]: ...


@contextmanager
def _silent(description: str, total: int | None = None, unit: str = "it") -> Iterator[Advance]:
    yield lambda n=1: None


NO_PROGRESS: Progress = _silent


class BarProgress:
    """tqdm bars on stderr (for terminals)."""

    @contextmanager
    def __call__(self, description: str, total: int | None = None, unit: str = "it") -> Iterator[Advance]:
        from tqdm import tqdm

        scale = unit == "B"  # bytes read best as MB/GB
        with tqdm(total=total, desc=description, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                  leave=False, dynamic_ncols=True) as bar:
            yield bar.update


class LineProgress:
    """One plain line when a step starts and one when it ends (for logs and pipes); with `every` (seconds),
    also a line with the count so far at most that often while it runs, so that a long step is never silent."""

    def __init__(self, stream: TextIO | None = None, every: float | None = None) -> None:
        self._stream = stream
        self._every = every

    @contextmanager
    def __call__(self, description: str, total: int | None = None, unit: str = "it") -> Iterator[Advance]:
        stream = self._stream or sys.stderr
        done = 0
        started = last = time.monotonic()

        def advance(n: int = 1) -> None:
            nonlocal done, last
            done += n
            if self._every is None:
                return
            now = time.monotonic()
            if now - last >= self._every:
                last = now
                share = f" ({done / total:.0%})" if total else ""
                print(f"{description}: {done:,}{f' / {total:,}' if total else ''} {unit}{share}, "
                      f"{now - started:.0f} s", file=stream, flush=True)

        size = f" ({total:,} {unit})" if total else ""
        print(f"{description}{size} …", file=stream, flush=True)
        yield advance
        print(f"{description}: done ({done:,} {unit})", file=stream, flush=True)
