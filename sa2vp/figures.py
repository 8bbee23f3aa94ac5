"""Figures people would rather look at than read; each returns a matplotlib Figure (Agg, no display): a
confusion matrix, and a tuning study's optimisation history, parameter importances and map of its trials."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from sa2vp.atomic import atomic_path
from sa2vp.tracking import SHORT_NAMES

log = logging.getLogger("sa2vp.figures")


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
                axes.text(
                    col,
                    row,
                    str(value),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > confusion.max() / 2 else "black",
                )
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


# --- tuning -----------------------------------------------------------------------------------------------


def tuning_figures(study: Any, space: Mapping[str, Any]) -> dict[str, Any]:
    """A study's figures by file name: the optimisation history, the parameter importances and a map of the
    trials over two searched settings (γ and the window c where both are searched). A figure the trials
    cannot make yet (too few completed, nothing varies) is left out, with a log line saying why."""
    names = [key for key in ("model.sa2vp.gamma", "model.sa2vp.window") if key in space]
    pair = names if len(names) == 2 else list(space)[:2]
    makers = {
        "optimization_history.png": lambda: history_figure(study),
        "param_importances.png": lambda: importance_figure(study),
    }
    if len(pair) == 2:
        name = "pair_" + "_".join(key.rsplit(".", 1)[-1] for key in pair) + ".png"
        makers[name] = lambda: pair_figure(study, pair[0], pair[1], space)
    figures = {}
    for name, make in makers.items():
        try:
            figures[name] = make()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("tuning figure %s skipped: %s", name, exc)
    return figures


def _short(key: str) -> str:
    return SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])


def _label(key: str) -> str:
    """`model.sa2vp.gamma (γ)`: the setting, and its name in the method file where that differs."""
    return key if _short(key) == key.rsplit(".", 1)[-1] else f"{key} ({_short(key)})"


def _trials(study: Any) -> tuple[list[Any], list[Any]]:
    """(completed trials, pruned trials that reported a value), in trial order."""
    from optuna.trial import TrialState

    completed = [t for t in study.trials if t.state == TrialState.COMPLETE and t.value is not None]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED and t.intermediate_values]
    return completed, pruned


def _pruned_value(trial: Any) -> float:
    return trial.intermediate_values[max(trial.intermediate_values)]  # its last reported epoch


def history_figure(study: Any) -> Any:
    """Each trial's validation top-1 by trial number (integers only) and the best so far."""
    completed, pruned = _trials(study)
    if not completed:
        raise ValueError("no completed trial")
    figure, axes = plt.subplots(figsize=(8, 5))
    numbers = [t.number for t in completed]
    values = [100 * t.value for t in completed]
    axes.plot(numbers, values, "o", color="tab:blue", label="completed trial")
    if pruned:
        axes.plot(
            [t.number for t in pruned],
            [100 * _pruned_value(t) for t in pruned],
            "x",
            color="tab:gray",
            label="pruned (last epoch)",
        )
    axes.step(numbers, np.maximum.accumulate(values), where="post", color="tab:red", label="best so far")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    low, high = min(t.number for t in study.trials), max(t.number for t in study.trials)
    axes.set_xlim(low - 0.5, high + 0.5)
    axes.set_xlabel("trial")
    axes.set_ylabel("validation top-1 (%)")
    axes.set_title(f"optimisation history\n{study.study_name}", fontsize=11)
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    return figure


def importance_figure(study: Any) -> Any:
    """How much each searched setting explains of the validation top-1 (Optuna's fANOVA importances)."""
    import optuna

    completed, _ = _trials(study)
    if len(completed) < 2:
        raise ValueError("fewer than two completed trials")
    importances = optuna.importance.get_param_importances(study)
    if not importances:
        raise ValueError("no searched setting varies")
    keys = list(importances)[::-1]  # the most important on top
    figure, axes = plt.subplots(figsize=(8, 1.5 + 0.5 * len(keys)))
    axes.barh([_label(key) for key in keys], [importances[key] for key in keys], color="tab:blue")
    for row, key in enumerate(keys):
        axes.text(importances[key], row, f" {importances[key]:.2f}", va="center", fontsize=9)
    axes.set_xlim(0, max(1.0, max(importances.values()) * 1.15))
    axes.set_xlabel("importance for validation top-1 (fANOVA; sums to 1)")
    axes.set_title(f"parameter importances ({len(completed)} completed trials)\n{study.study_name}", fontsize=11)
    figure.tight_layout()  # room for the settings' names on the left
    return figure


def pair_figure(study: Any, x: str, y: str, space: Mapping[str, Any]) -> Any:
    """The trials over two settings, coloured by validation top-1: a scatter of what was tried, not an
    interpolated contour. A setting with discrete values (choices, an integer range, e.g. the odd window c)
    is a categorical axis of the values tried, so no value between them is drawn."""
    completed, pruned = _trials(study)
    tried = [t for t in completed + pruned if x in t.params and y in t.params]
    numbers = {t.number for t in completed}
    done = [t for t in tried if t.number in numbers]
    if not done:
        raise ValueError(f"no completed trial tried both {x} and {y}")
    figure, axes = plt.subplots(figsize=(8, 6))
    positions = {
        key: _axis(axes, key, space.get(key), [t.params[key] for t in tried], horizontal=key == x) for key in (x, y)
    }
    points = axes.scatter(
        [positions[x](t.params[x]) for t in done],
        [positions[y](t.params[y]) for t in done],
        c=[100 * t.value for t in done],
        cmap="viridis",
        s=80,
        edgecolors="black",
        zorder=3,
    )
    figure.colorbar(points, ax=axes, label="validation top-1 (%)")
    left = [t for t in tried if t.number not in numbers]
    if left:
        axes.scatter(
            [positions[x](t.params[x]) for t in left],
            [positions[y](t.params[y]) for t in left],
            marker="x",
            color="tab:gray",
            label="pruned",
            zorder=2,
        )
    best = max(done, key=lambda t: t.value)
    axes.scatter(
        [positions[x](best.params[x])],
        [positions[y](best.params[y])],
        marker="*",
        s=400,
        facecolors="none",
        edgecolors="tab:red",
        linewidths=2,
        label=f"best (trial {best.number})",
        zorder=4,
    )
    for trial in tried:
        axes.annotate(
            str(trial.number),
            (positions[x](trial.params[x]), positions[y](trial.params[y])),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=8,
        )
    axes.set_xlabel(_label(x))
    axes.set_ylabel(_label(y))
    axes.set_title(f"trials by {_short(x)} and {_short(y)}\n{study.study_name}", fontsize=11)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return figure


def _axis(axes: Any, key: str, dimension: Any, values: list[Any], horizontal: bool) -> Any:
    """Set up one axis for `key`'s tried `values`; returns value → coordinate. Discrete settings (choices,
    integer ranges, any non-float value) get one tick per tried value and nothing between them."""
    discrete = getattr(dimension, "type", None) in ("choice", "int") or not all(
        isinstance(value, float) for value in values
    )
    if discrete:
        order = sorted(set(values), key=lambda value: (isinstance(value, str), value))
        index = {value: position for position, value in enumerate(order)}
        ticks, labels = list(range(len(order))), [str(value) for value in order]
        if horizontal:
            axes.set_xticks(ticks, labels)
            axes.set_xlim(-0.5, len(order) - 0.5)
        else:
            axes.set_yticks(ticks, labels)
            axes.set_ylim(-0.5, len(order) - 0.5)
        return index.__getitem__
    if getattr(dimension, "log", False):
        axis = axes.xaxis if horizontal else axes.yaxis
        (axes.set_xscale if horizontal else axes.set_yscale)("log")
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.01 0.02 0.05 0.1 …, labelled plainly
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())
    return float
