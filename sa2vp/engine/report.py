"""What a finished run leaves for people and tools: metrics.json, history.csv, per_class_accuracy.csv and
confusion_matrix.png in the output folder (DVC metrics and plots read these), and the same in MLflow; and the
files `sa2vp evaluate` and `sa2vp predict` write (`write_metrics`, `write_dvc_plots`, `write_predictions`).
This module is the one home of these formats."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sa2vp.atomic import write_atomic
from sa2vp.engine.evaluation import Prediction
from sa2vp.engine.metrics import Metrics
from sa2vp.figures import confusion_figure, save_figure
from sa2vp.tracking import Run

METRICS_NAME = "metrics.json"  # in a run's output folder
PREDICTION_SUFFIXES = (".csv", ".json")
PREDICTION_COLUMNS = ("image", "rank", "class", "probability")


def write_report(
    output: Path,
    classes: Sequence[str],
    history: list[dict[str, Any]],
    val: Metrics | None,
    test: Metrics | None,
    run: Run,
) -> None:
    output.mkdir(parents=True, exist_ok=True)
    if test is not None:
        run.log_metrics(test.as_dict("test/"))
    write_metrics(output / METRICS_NAME, {split: m for split, m in (("val", val), ("test", test)) if m is not None})
    if history:
        write_atomic(output / "history.csv", to_csv(history))
    final, split = (test, "test") if test is not None else (val, "val")
    if final is not None:
        write_split_report(output, classes, final, split, run)


def write_metrics(path: Path, metrics: Mapping[str, Metrics]) -> Path:
    """A metrics file, as DVC's `metrics` read it: `{"<split>": {"top1": …, "mean_class": …}, …}` in the order
    given (a run's metrics.json: val, test; `sa2vp evaluate --metrics-file`: the split it evaluated)."""
    document = {split: values.as_dict() for split, values in metrics.items()}
    return write_atomic(path, json.dumps(document, indent=2) + "\n")


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


def write_predictions(path: Path, predictions: Sequence[Prediction]) -> Path:
    """`sa2vp predict --output`: one row per image and rank (image, rank, class, probability), as CSV or as a
    JSON list of the same rows, by the suffix of `path` (PREDICTION_SUFFIXES)."""
    rows = [
        {"image": str(p.image), "rank": rank, "class": name, "probability": probability}
        for p in predictions
        for rank, (name, probability) in enumerate(p.top, start=1)
    ]
    if path.suffix == ".json":
        return write_atomic(path, json.dumps(rows, indent=2) + "\n")
    if path.suffix == ".csv":
        return write_atomic(path, to_csv(rows, PREDICTION_COLUMNS))
    raise ValueError(f"{path}: predictions are written as {' or '.join(PREDICTION_SUFFIXES)}")


def to_csv(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """`rows` as CSV with a header: `columns`, or the first row's keys."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns or rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
