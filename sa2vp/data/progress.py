"""Progress reports from long operations, without the library printing on its own.

A `Progress` is called with a description, a total (None when unknown) and a unit, and returns a context
manager that yields an `advance(n)` callable. The CLI passes `BarProgress` on a terminal and `LineProgress`
otherwise (logs, CI, `dvc repro`); library callers get `NO_PROGRESS` unless they ask. `labelled` prefixes the
descriptions of another Progress (`trial 3 · epoch 1/2`), for steps that run inside a larger one.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, TextIO

Advance = Callable[[int], None]

# Seconds between two lines of a step in a log: often enough that a log never looks stalled (a reader, or a CI
# job watching for output, gives up after minutes), rarely enough that a long run's log stays readable.
LOG_EVERY = 20.0


class Progress(Protocol):
    def __call__(
        self, description: str, total: int | None = None, unit: str = "it"
    ) -> AbstractContextManager[Advance]: ...


def _ignore(n: int) -> None:
    pass


@contextmanager
def _silent(description: str, total: int | None = None, unit: str = "it") -> Iterator[Advance]:
    yield _ignore


NO_PROGRESS: Progress = _silent


class BarProgress:
    """tqdm bars on stderr (for terminals)."""

    @contextmanager
    def __call__(self, description: str, total: int | None = None, unit: str = "it") -> Iterator[Advance]:
        from tqdm import tqdm

        scale = unit == "B"  # bytes read best as MB/GB
        with tqdm(
            total=total,
            desc=description,
            unit=unit,
            unit_scale=scale,
            unit_divisor=1024 if scale else 1000,
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            yield bar.update


class LineProgress:
    """Plain lines for logs and pipes: `<description>: <done>/<total> <unit> (<pct>%, <rate>, eta <time>)`
    every `every` seconds while a step runs, and one line when it ends (`done in <time>` instead of the eta).

    The periodic lines come from a timer, not from `advance`: a step whose units are slow (a pretraining step
    on a busy CPU, a download that stalls) still shows a line every `every` seconds. `clock` is the time source
    of the rates and durations shown."""

    def __init__(
        self, stream: TextIO | None = None, every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if every <= 0:
            raise ValueError(f"every must be > 0 seconds, got {every}")
        self._stream = stream
        self._every = every
        self._clock = clock
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, description: str, total: int | None = None, unit: str = "it") -> Iterator[Advance]:
        state = _Step(description, total, unit, self._clock())
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self._every):
                self._print(state.line(self._clock(), finished=False))

        timer = threading.Thread(target=tick, name=f"progress: {description}", daemon=True)
        timer.start()
        try:
            yield state.advance
        finally:
            stop.set()
            timer.join()
        self._print(state.line(self._clock(), finished=True))  # only when the step succeeded: no "100 %" on error

    def _print(self, line: str) -> None:
        with self._lock:  # the timer threads of nested steps and the main thread write whole lines
            print(line, file=self._stream or sys.stderr, flush=True)


class _Step:
    """What a LineProgress line says about one running step."""

    def __init__(self, description: str, total: int | None, unit: str, started: float) -> None:
        self.description, self.total, self.unit, self.started = description, total, unit, started
        self.done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n

    def line(self, now: float, finished: bool) -> str:
        elapsed = max(now - self.started, 0.0)
        done, total = self.done, self.total
        rate = done / elapsed if elapsed > 0 else 0.0
        speed = f"{_amount(rate, self.unit)}/s"
        if total:
            # bytes keep their own prefix on both sides (500.0 kB/1.2 GB); counts read 12/40 batches
            count = f"{_amount(done, self.unit, bare=self.unit != 'B')}/{_amount(total, self.unit)}"
            if finished:
                timing = f"{done / total:.0%}, {speed}, done in {_duration(elapsed)}"
            else:
                eta = _duration((total - done) / rate) if rate > 0 else "unknown"
                timing = f"{done / total:.0%}, {speed}, eta {eta}"
        else:
            count = _amount(done, self.unit)
            timing = f"{speed}, {'done in ' if finished else ''}{_duration(elapsed)}{'' if finished else ' so far'}"
        return f"{self.description}: {count} ({timing})"


def _amount(value: float, unit: str, bare: bool = False) -> str:
    """`1,234 images`, `3.1 steps` (rates), `12.3 MB` (bytes); `bare`: the number alone."""
    if unit == "B":
        for prefix in ("", "k", "M", "G", "T"):
            if abs(value) < 1024 or prefix == "T":
                number = f"{value:.0f}" if prefix == "" else f"{value:.1f}"
                return number if bare else f"{number} {prefix}B"
            value /= 1024
    number = f"{value:,.0f}" if value == int(value) or abs(value) >= 100 else f"{value:.3g}"
    return number if bare else f"{number} {unit}"


def _duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `2 h 07 min`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def labelled(progress: Progress, label: str) -> Progress:
    """`progress` with `label` before every description: `trial 3 · epoch 1/2`, so that the lines of a step
    inside a larger one (an epoch of a tuning trial) say which one they belong to."""

    def report(description: str, total: int | None = None, unit: str = "it") -> AbstractContextManager[Advance]:
        return progress(f"{label} · {description}", total, unit)

    return report
