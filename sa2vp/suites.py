"""Benchmark suites: the paper's comparison tables (Tab. 1–5) as cells run by the same engine and tuning.

A suite (the `suite:` section of a pipelines/<suite>/params.yaml) is datasets × variants. A cell is one dataset and
one variant (a method, or an SA²VP ablation given by settings):

    result = run_cell(settings, "vtab-svhn", "sa2vp")   # tune on val → train on train+val per seed → test
    table = write_report(settings)                       # results.md + results.csv, logged to MLflow

Each cell writes <suite.output>/<dataset>/<variant>/result.json; the report reads only those files, so a DVC
`matrix` stage per cell and one `report` stage make the suite's DAG.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sa2vp.atomic import write_atomic
from sa2vp.data import NO_PROGRESS, Progress, lookup
from sa2vp.engine import Metrics, TrainResult, final_settings, fit
from sa2vp.engine.artifact import CONFIG_NAME, TrainableRecord, read_record
from sa2vp.engine.checkpoint import CHECKPOINT_NAME
from sa2vp.errors import ArtifactError
from sa2vp.models import METHODS
from sa2vp.settings import SearchDimension, Settings, SettingsError, flatten_settings, load_settings
from sa2vp.tracking import start_run
from sa2vp.tuning import SearchPlan, plan_search, tune

log = logging.getLogger("sa2vp.suite")

RESULT_FILE = "result.json"


def cell_dir(settings: Settings, dataset: str, variant: str) -> Path:
    """Where a cell writes: one folder per dataset (a folder: dataset by its folder name) and variant."""
    return Path(settings.suite.output) / _slug(dataset) / variant


def cell_settings(settings: Settings, dataset: str, variant: str) -> Settings:
    """The settings of one cell: the file's, then suite.overrides for the dataset's group, the dataset and the
    variant (in that order), the variant's method, and the cell's own output folders and study name."""
    suite = settings.suite
    if variant not in suite.variants:
        raise SettingsError(f"variant {variant!r}: not in suite.variants ({', '.join(suite.variants)})")
    if dataset not in suite.datasets:
        raise SettingsError(f"dataset {dataset!r}: not in suite.datasets ({', '.join(suite.datasets)})")
    group = lookup(dataset).group
    dotted = flatten_settings(settings)
    dotted.update(suite.overrides.get(group, {}))
    dotted.update(suite.overrides.get(dataset, {}))
    if variant in METHODS:
        dotted["model.method"] = variant
    dotted.update(suite.overrides.get(variant, {}))
    folder = cell_dir(settings, dataset, variant)
    dotted.update(
        {
            "data.dataset": dataset,
            "tune.output": str(folder / "tune"),
            "tune.study_name": f"{suite.name}-{_slug(dataset)}-{variant}",
            "train.output": str(folder / "train"),
            "tracking.run_name": None,
        }
    )
    if "://" not in settings.tune.storage:  # a journal file per cell; a database URL is shared, by study name
        dotted["tune.storage"] = str(folder / "tune" / "optuna.journal")
    return load_settings(None, dotted)


def cell_search_plan(settings: Settings, cell: Settings, variant: str) -> SearchPlan:
    """What tuning searches in a cell: the method's space changed by tune.space, less what an ablation pins.

    An ablation's own settings are what it ablates: tuning must not search them away (global window, λ = 1).
    The file's settings, the group's and dataset's overrides and a method variant's (`full: {train.lr: 2e-4}`)
    are where the search starts — the first trial — so that every method is tuned over its whole space (unlike
    `sa2vp tune`, where a setting given a value is pinned: a suite's variants are its pins).
    """
    pinned = {} if variant in METHODS else settings.suite.overrides.get(variant, {})
    return plan_search(cell, pinned={key: f"suite.overrides.{variant}" for key in pinned})


def cell_search_space(settings: Settings, cell: Settings, variant: str) -> dict[str, SearchDimension]:
    """The dimensions of `cell_search_plan`."""
    return cell_search_plan(settings, cell, variant).space


@dataclass
class CellResult:
    dataset: str
    group: str
    variant: str
    method: str
    seeds: list[int]
    test_top1: list[float]
    test_mean_class: list[float]
    trainable_parameters: int
    trainable_percent: float
    tuned: dict[str, Any]
    val_top1: float | None
    # Test top-1 per seed of each auxiliary pathway alone (SA²VP: {"prompt": […]}): is it learning?
    test_pathways_top1: dict[str, list[float]] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test_top1)

    @property
    def std(self) -> float:
        return statistics.stdev(self.test_top1) if len(self.test_top1) > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "test_top1_mean": self.mean, "test_top1_std": self.std}

    @classmethod
    def read(cls, path: Path) -> CellResult:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


def run_cell(settings: Settings, dataset: str, variant: str, progress: Progress = NO_PROGRESS) -> CellResult:
    """Tune the cell on its validation split (suite.tune, if the method has anything to tune), then make its
    final run (`final_settings`: train+val, tested) once per seed in suite.seeds; write the cell's result.json."""
    cell = cell_settings(settings, dataset, variant)
    folder = cell_dir(settings, dataset, variant)
    tuned: dict[str, Any] = {}
    val_top1 = None
    plan = cell_search_plan(settings, cell, variant)
    if settings.suite.tune and plan.space:
        tuning = tune(cell, progress, plan=plan)
        tuned, val_top1 = tuning.best_params, tuning.best_value
    runs = [_final_run(settings, cell, tuned, dataset, variant, seed, progress) for seed in settings.suite.seeds]
    shutil.rmtree(folder / "train", ignore_errors=True)  # tuning trials' leftovers (their runs are in MLflow)
    # The trained parameters are the same for every seed: the last artifact's record says how many.
    trainable = _trainable(runs[-1].artifact)
    pathways: dict[str, list[float]] = {}
    for run in runs:
        for name, metrics in run.test_pathways.items():
            pathways.setdefault(name, []).append(metrics.top1)
    result = CellResult(
        dataset=dataset,
        group=lookup(dataset).group,
        variant=variant,
        method=cell.model.method,
        seeds=list(settings.suite.seeds),
        test_top1=[_tested(run).top1 for run in runs],
        test_mean_class=[_tested(run).mean_class for run in runs],
        trainable_parameters=trainable.parameters,
        trainable_percent=trainable.percent_of_backbone,
        tuned=tuned,
        val_top1=val_top1,
        test_pathways_top1=pathways,
    )
    write_atomic(folder / RESULT_FILE, json.dumps(result.as_dict(), indent=2) + "\n")
    return result


def _final_run(
    settings: Settings,
    cell: Settings,
    tuned: dict[str, Any],
    dataset: str,
    variant: str,
    seed: int,
    progress: Progress,
) -> TrainResult:
    """One seed's final run of a cell with the tuned settings, in <cell>/seed-<seed>; its artifact stays."""
    output = cell_dir(settings, dataset, variant) / f"seed-{seed}"
    chosen = load_settings(None, {**flatten_settings(cell), **tuned, "train.seed": seed, "train.output": str(output)})
    name = f"{settings.suite.name}/{_slug(dataset)}/{variant}/seed-{seed}"
    trained = fit(final_settings(chosen), progress=progress, run_name=name)
    (output / CHECKPOINT_NAME).unlink(missing_ok=True)  # the artifact stays; resume state is not needed
    log.info("%s / %s / seed %d: test top-1 %.2f %%", dataset, variant, seed, 100 * _tested(trained).top1)
    return trained


def _tested(run: TrainResult) -> Metrics:
    # A final run is always tested (FINAL_RUN names the test split).
    assert run.test is not None, "a final run without test metrics"
    return run.test


def _trainable(artifact: Path) -> TrainableRecord:
    _, record = read_record(artifact)
    if record.trainable is None:  # sa2vp train always records it; another writer's artifact may not
        raise ArtifactError(f"{artifact / CONFIG_NAME}: no `trainable` section (the trained parameter counts)")
    return record.trainable


@dataclass
class Report:
    markdown: Path
    csv: Path
    run_id: str


def read_results(settings: Settings) -> list[CellResult]:
    """Every cell's result, in suite order; a missing cell is an error naming its file."""
    results = []
    for variant in settings.suite.variants:
        for dataset in settings.suite.datasets:
            path = cell_dir(settings, dataset, variant) / RESULT_FILE
            if not path.is_file():
                raise SettingsError(
                    f"{path}: no result for {dataset} / {variant}; run `sa2vp suite run {dataset} "
                    f"{variant}` (or `dvc repro`) first"
                )
            results.append(CellResult.read(path))
    return results


def write_report(settings: Settings) -> Report:
    """The suite's table in the paper's layout — one row per variant; per-dataset test top-1 (mean ± std over
    seeds), the mean of each registry group, the mean over all datasets, and the trainable-parameter % —
    as Markdown and CSV, and an MLflow run with the table, per-group metrics and a bar chart."""
    results = read_results(settings)
    suite = settings.suite
    groups = list(dict.fromkeys(r.group for r in results))
    rows = [_row(variant, [r for r in results if r.variant == variant], groups) for variant in suite.variants]
    folder = Path(suite.report)
    markdown = write_atomic(folder / "results.md", _markdown(settings, rows, groups))
    csv = write_atomic(folder / "results.csv", _csv(rows))
    run = start_run(settings.tracking, f"suite-{suite.name}", {"suite": suite.name})
    run.log_params(
        {
            "suite.name": suite.name,
            "suite.datasets": suite.datasets,
            "suite.variants": suite.variants,
            "suite.seeds": suite.seeds,
            "suite.tune": suite.tune,
            "backbone.name": settings.backbone.name,
        }
    )
    for row in rows:
        run.log_metrics(
            {
                f"{row['variant']}/{key}": value
                for key, value in row.items()
                if isinstance(value, float) and key != "params_percent"
            }
        )
    run.log_file(markdown)
    run.log_file(csv)
    run.log_figure(_figure(rows, groups), "suite/group_means.png")
    tsne = _tsne_of_variants(settings, folder)
    if tsne is not None:
        run.log_file(tsne, "suite")
    run.finish()
    return Report(markdown, csv, run.run_id)


def _row(variant: str, cells: list[CellResult], groups: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": variant}
    for cell in cells:
        row[cell.dataset] = cell.mean
        row[f"{cell.dataset} std"] = cell.std
        for pathway, values in cell.test_pathways_top1.items():
            row[f"{cell.dataset} {pathway} pathway"] = statistics.fmean(values)
    for group in groups:
        means = [c.mean for c in cells if c.group == group]
        row[f"{group} mean"] = statistics.fmean(means)
    row["mean"] = statistics.fmean(c.mean for c in cells)
    row["params_percent"] = statistics.fmean(c.trainable_percent for c in cells)
    return row


def _markdown(settings: Settings, rows: list[dict[str, Any]], groups: list[str]) -> str:
    suite = settings.suite
    seeds = len(suite.seeds)
    seed_note = f"mean ± std over seeds {', '.join(map(str, suite.seeds))}" if seeds > 1 else f"seed {suite.seeds[0]}"
    columns = [*suite.datasets, *(f"{g} mean" for g in groups), "mean"]
    header = ["variant", "params %", *columns]
    lines = [
        f"# {suite.name}: test top-1 (%)",
        "",
        f"Backbone `{settings.backbone.name}`; {'tuned on each validation split, then ' if suite.tune else ''}"
        f"trained on train+val; {seed_note}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for row in rows:
        cells = [row["variant"], f"{row['params_percent']:.3f}"]
        for column in columns:
            value = f"{100 * row[column]:.2f}"
            if seeds > 1 and column in suite.datasets:
                value += f" ± {100 * row[f'{column} std']:.2f}"
            cells.append(value)
        lines.append("| " + " | ".join(cells) + " |")
    pathways = [row for row in rows if any(key.endswith(" pathway") for key in row)]
    if pathways:  # SA²VP's prompt pathway through the shared head: is it learning?
        lines += [
            "",
            "Auxiliary pathways alone, test top-1 (%), mean over seeds (the prediction uses the base pathway):",
            "",
            "| variant | " + " | ".join(suite.datasets) + " |",
            "|---|" + "---:|" * len(suite.datasets),
        ]
        for row in pathways:
            names = sorted({key.split(" ", 1)[1] for key in row if key.endswith(" pathway")})
            for name in names:
                values = [f"{100 * row[f'{d} {name}']:.2f}" if f"{d} {name}" in row else "—" for d in suite.datasets]
                lines.append(f"| {row['variant']} ({name}) | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))  # pathway columns: SA²VP rows only
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()


def _figure(rows: list[dict[str, Any]], groups: list[str]) -> Any:
    """Grouped bars: each variant's mean test top-1 per registry group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [*groups, "mean"] if len(groups) > 1 else groups
    figure, axes = plt.subplots(figsize=(max(6, 1.6 * len(labels) * len(rows) / 3), 4.5))
    width = 0.8 / len(rows)
    for index, row in enumerate(rows):
        values = [100 * row[f"{g} mean" if g != "mean" else "mean"] for g in labels]
        positions = [i + (index - (len(rows) - 1) / 2) * width for i in range(len(labels))]
        axes.bar(positions, values, width, label=row["variant"])
    axes.set_xticks(range(len(labels)), labels)
    axes.set_ylabel("test top-1 (%)")
    axes.legend(fontsize="small", ncols=min(len(rows), 4))
    figure.tight_layout()
    return figure


def _tsne_of_variants(settings: Settings, folder: Path) -> Path | None:
    """Fig. 3 for the suite: a t-SNE panel of each variant's model (its first seed's artifact) on the test split
    of the suite's first dataset, written beside the report. Optional: a cell that kept no artifact is left
    out, and None (with a log line) when there is nothing to draw or it cannot be drawn."""
    from sa2vp.data import DataError
    from sa2vp.engine import load_artifact
    from sa2vp.errors import BackboneError, one_line
    from sa2vp.explain import split_features, tsne_figure
    from sa2vp.figures import save_figure

    if not settings.suite.datasets:
        return None
    dataset, seed = settings.suite.datasets[0], settings.suite.seeds[0]
    artifacts = {
        variant: cell_dir(settings, dataset, variant) / f"seed-{seed}" / "model" for variant in settings.suite.variants
    }
    present = {variant: path for variant, path in artifacts.items() if (path / CONFIG_NAME).is_file()}
    if len(present) < len(artifacts):
        log.info(
            "t-SNE of %s: no artifact for %s (left out)", dataset, ", ".join(sorted(artifacts.keys() - present.keys()))
        )
    if not present:
        return None
    try:
        panels = []
        for variant, path in present.items():
            panel = split_features(load_artifact(path), "test")
            title = panel.title if variant == panel.title else f"{variant} ({panel.title})"
            panels.append(replace(panel, title=title))
        figure = tsne_figure(panels, seed)
    except (ArtifactError, BackboneError, DataError, SettingsError) as exc:
        log.warning("t-SNE of the suite's variants on %s skipped: %s", dataset, one_line(exc))
        return None
    return save_figure(figure, folder / f"tsne_{_slug(dataset)}.png")


def _slug(dataset: str) -> str:
    """A dataset's folder, study and run name: the registry's (an image folder's carries a hash of its path,
    so that two folders with one base name never share a cell)."""
    return lookup(dataset).slug
