"""What a finished run leaves for people and tools: metrics.json, history.csv, per_class_accuracy.csv and
confusion_matrix.png in the output folder (DVC metrics and plots read these), and the same in MLflow."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sa2vp.atomic import write_atomic
from sa2vp.engine.metrics import Metrics
from sa2vp.figures import confusion_figure, save_figure
from sa2vp.tracking import Run


def write_report(
    output: Path,
    classes: Sequence[str],
    history: list[dict[str, Any]],
    val: Metrics | None,
    test: Metrics | None,
    run: Run,
) -> None:
    output.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {}
    if val is not None:
        metrics["val"] = val.as_dict()
    if test is not None:
        metrics["test"] = test.as_dict()
        run.log_metrics(test.as_dict("test/"))
    write_atomic(output / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if history:
        write_atomic(output / "history.csv", to_csv(history))
    final, split = (test, "test") if test is not None else (val, "val")
    if final is not None:
        write_split_report(output, classes, final, split, run)


def write_split_report(output: Path, classes: Sequence[str], metrics: Metrics, split: str, run: Run) -> None:
    """per_class_accuracy.csv and confusion_matrix.png for one split, in `output` and in the MLflow run."""
    rows = metrics.per_class_rows(classes)
    write_atomic(output / "per_class_accuracy.csv", to_csv(rows))
    title = f"{split}: top-1 {100 * metrics.top1:.2f} %, mean per-class {100 * metrics.mean_class:.2f} %"
    figure = confusion_figure(metrics.confusion, classes, title)
    run.log_figure(figure, f"{split}_confusion_matrix.png")
    save_figure(figure, output / "confusion_matrix.png")
    run.log_table(rows, f"{split}_per_class_accuracy.json")


def write_dvc_plots(folder: Path, classes: Sequence[str], metrics: Metrics) -> None:
    """confusion.csv (one `actual,predicted` row per image, DVC's confusion template) and
    per_class_accuracy.csv (one row per class, for a bar plot)."""
    rows = [
        {"actual": classes[i], "predicted": classes[j]}
        for (i, j), count in np.ndenumerate(metrics.confusion)
        for _ in range(int(count))
    ]
    write_atomic(folder / "confusion.csv", to_csv(rows) if rows else "actual,predicted\n")
    write_atomic(folder / "per_class_accuracy.csv", to_csv(metrics.per_class_rows(classes)))


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
