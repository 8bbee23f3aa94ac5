"""Progress reports from long data operations, without the library printing on its own.

A `Progress` is called with a description, a total (None when unknown) and a unit, and returns a context
manager that yields an `advance(n)` callable. The CLI passes `BarProgress` on a terminal and `LineProgress`
otherwise (logs, CI); library callers get `NO_PROGRESS` unless they ask.
"""

from __future__ import annotations

import sys
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
    """One plain line when a step starts and one when it ends (for logs and pipes)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    @contextmanager
    def __call__(self, description: str, total: int | None = None, unit: str = "it") -> Iterator[Advance]:
        stream = self._stream or sys.stderr
        done = 0

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n

        size = f" ({total:,} {unit})" if total else ""
        print(f"{description}{size} …", file=stream, flush=True)
        yield advance
        print(f"{description}: done ({done:,} {unit})", file=stream, flush=True)
