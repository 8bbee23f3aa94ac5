"""Figures people would rather look at than read; each returns a matplotlib Figure (Agg, no display)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402

from sa2vp.atomic import atomic_path  # noqa: E402


def confusion_figure(confusion: Any, classes: Iterable[str], title: str) -> Any:
    """A confusion-matrix figure (counts, rows = true class); labels are thinned for many classes."""
    names = list(classes)
    size = min(14.0, 3.0 + 0.35 * len(names))
    figure, axes = plt.subplots(figsize=(size, size * 0.85))
    image = axes.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046)
    step = max(1, len(names) // 30)
    ticks = np.arange(0, len(names), step)
    axes.set_xticks(ticks, [names[i] for i in ticks], rotation=90 if len(names) > 10 else 0)
    axes.set_yticks(ticks, [names[i] for i in ticks])
    if len(names) <= 20:
        for (row, col), value in np.ndenumerate(confusion):
            if value:
                axes.text(col, row, str(value), ha="center", va="center", fontsize=7,
                          color="white" if value > confusion.max() / 2 else "black")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def save_figure(figure: Any, path: Path) -> Path:
    """Save a figure atomically and close it."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(figure)
    return path
