"""Optuna tuning of a method's settings on the validation split; every trial a nested MLflow run.

    study = open_study(settings)                 # persistent: journal file or database URL; resumes
    result = tune(settings)                      # adds tune.n_trials trials, writes best.yaml, logs figures

Each trial trains with `sa2vp.engine.fit` on the train split and scores the best validation top-1 over its
epochs; the pruner stops unpromising trials from their per-epoch validation accuracy. A new study's first
trial is the current settings, so tuning never ends below them. A trial that fails (an invalid combination,
a diverging loss) is recorded as failed and the study goes on.
"""

from __future__ import annotations

import logging
import math
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from sa2vp.atomic import write_atomic
from sa2vp.data import NO_PROGRESS, Progress, prepare, split_dir
from sa2vp.engine import EpochReport, fit
from sa2vp.errors import TrainingDiverged
from sa2vp.models import search_space
from sa2vp.settings import (
    Choice, FloatRange, IntRange, SearchDimension, Settings, SettingsError, did_you_mean, flatten_settings,
    load_settings, settings_from_dump,
)
from sa2vp.tracking import Run, start_run

log = logging.getLogger("sa2vp.tune")

BEST_FILE = "best.yaml"


@dataclass
class TuneResult:
    study: optuna.Study
    best_params: dict[str, Any]
    best_value: float
    best_file: Path
    run_id: str


def study_name(settings: Settings) -> str:
    return settings.tune.study_name or f"{settings.data.dataset}-{settings.model.method}-{settings.backbone.name}"


def space_of(settings: Settings) -> dict[str, SearchDimension]:
    """tune.space, or the method's own search space."""
    return dict(settings.tune.space) if settings.tune.space is not None else search_space(settings.model.method)


# Settings every trial sets itself (`_objective`): searching them would be silently undone.
FIXED_BY_TUNING = {"train.epochs": "tune.epochs sets a trial's epochs", "train.train_split": "trials train on train",
                   "train.val_split": "trials are scored on val", "train.test_split": "trials skip the test split",
                   "train.output": "trials write to tune.output"}
# An integer range with more values than this is checked at its ends only.
MAX_CHECKED_INTS = 256


def check_space(settings: Settings, space: Mapping[str, SearchDimension]) -> None:
    """Refuse a search space that names something other than a setting, a setting the trials fix, or a value
    the settings refuse (each choice, each integer of a range, a float range's ends) — with one line."""
    known = flatten_settings(settings)
    dump = settings.model_dump(mode="json")
    for key, dimension in space.items():
        if key not in known:
            raise SettingsError(f"tune.space: {key} is not a setting{did_you_mean(key)}")
        if key in FIXED_BY_TUNING:
            raise SettingsError(f"tune.space: {key} cannot be searched ({FIXED_BY_TUNING[key]})")
        for value in _values_to_check(dimension):
            try:
                settings_from_dump(dump, {key: value})
            except SettingsError as exc:
                raise SettingsError(f"tune.space: {key}: the value {value!r} is not allowed: {exc}") from None


def _values_to_check(dimension: SearchDimension) -> list[Any]:
    if isinstance(dimension, Choice):
        return list(dimension.choices)
    if isinstance(dimension, IntRange):
        values = range(dimension.low, dimension.high + 1, dimension.step)
        return list(values) if len(values) <= MAX_CHECKED_INTS else [dimension.low, values[-1]]
    # The settings' float limits are intervals, so the ends decide; a point inside that is no integer
    # catches a float range over an integer setting, whose every sample but the ends would be refused.
    return [dimension.low, dimension.high, dimension.low + (dimension.high - dimension.low) / math.pi]


def open_study(settings: Settings) -> optuna.Study:
    """The study in tune.storage (created if new): seeded TPE, the configured pruner, maximising val top-1."""
    tune = settings.tune
    pruner: optuna.pruners.BasePruner = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
        "none": optuna.pruners.NopPruner,
    }[tune.pruner]()
    return optuna.create_study(
        storage=_storage(tune.storage), study_name=study_name(settings), direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=tune.sampler_seed), pruner=pruner,
    )


def tune(settings: Settings, progress: Progress = NO_PROGRESS, n_trials: int | None = None,
         timeout: float | None = None) -> TuneResult:
    """Add trials to the study, then write tune.output/best.yaml and log the study to a parent MLflow run."""
    if settings.train.val_split is None:
        raise SettingsError("train.val_split: tuning scores trials on the validation split; it must not be null")
    space = space_of(settings)
    if not space:
        raise SettingsError(f"tune.space: method {settings.model.method!r} has nothing to tune; give tune.space")
    check_space(settings, space)  # before the study exists: a bad space would fail every trial, journal written
    folder = split_dir(settings.data)
    if not (folder / "manifest.json").is_file():
        prepare(settings.data, progress)
    study = open_study(settings)
    earlier = len(study.trials)
    if settings.tune.enqueue_defaults and not study.trials:
        current = flatten_settings(settings)
        inside = {key: current[key] for key, dim in space.items() if _contains(dim, current[key])}
        for key in sorted(set(space) - set(inside)):
            log.info("first trial: %s=%r is outside tune.space, so the sampler chooses it", key, current[key])
        study.enqueue_trial(inside, user_attrs={"defaults": True})
    parent = start_run(settings.tracking, f"tune-{study.study_name}",
                       {"study_name": study.study_name, "storage": settings.tune.storage, "dataset":
                        settings.data.dataset, "method": settings.model.method, "backbone": settings.backbone.name})
    parent.log_params({**flatten_settings(settings), "study_name": study.study_name})
    total = n_trials or settings.tune.n_trials
    log.info("study %s (%d earlier trials): %d trials over %s", study.study_name, earlier, total,
             ", ".join(space))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(_objective(settings, space, parent), n_trials=total,
                           timeout=timeout or settings.tune.timeout, catch=(TrainingDiverged, SettingsError, ValueError),
                           callbacks=[_report(total)])
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not completed:
            raise TrainingDiverged(f"study {study.study_name}: no trial completed (see the failed trials' errors "
                                   "in MLflow); check the settings and tune.space")
        best = study.best_trial
        best_file = _write_best(settings, study, best)
        parent.log_params({f"best.{key}": value for key, value in best.params.items()})
        parent.log_metrics({"best_val_top1": best.value, "trials": len(study.trials), "completed": len(completed)})
        parent.set_tags({"best_trial": best.number})
        parent.log_file(best_file)
        _log_figures(study, space, parent)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return TuneResult(study, dict(best.params), float(best.value), best_file, parent.run_id)


def _objective(settings: Settings, space: dict[str, SearchDimension], parent: Run) -> Any:
    base = flatten_settings(settings)

    def objective(trial: optuna.Trial) -> float:
        chosen = {key: _suggest(trial, key, dimension) for key, dimension in space.items()}
        output = settings.tune.output / f"trial-{trial.number}"
        fixed = {"train.epochs": settings.tune.epochs or settings.train.epochs, "train.train_split": "train",
                 "train.test_split": None, "train.output": str(output)}
        trial_settings = load_settings(None, {**base, **chosen, **fixed})

        def on_epoch(report: EpochReport) -> bool:
            trial.report(report.val.top1 if report.val else 0.0, report.epoch)
            return trial.should_prune()

        try:
            result = fit(trial_settings, on_epoch=on_epoch, parent_run_id=parent.run_id or None,
                         run_name=f"{study_name(settings)}-trial-{trial.number}")
        finally:
            shutil.rmtree(output, ignore_errors=True)  # trials keep their results in MLflow, not on disk
        trial.set_user_attr("mlflow_run_id", result.run_id)
        if result.stopped_early:
            raise optuna.TrialPruned(f"pruned after epoch {result.epochs}")
        return float(result.val.top1) if result.val is not None else 0.0

    return objective


def _suggest(trial: optuna.Trial, key: str, dimension: SearchDimension) -> Any:
    if isinstance(dimension, FloatRange):
        return trial.suggest_float(key, dimension.low, dimension.high, log=dimension.log)
    if isinstance(dimension, IntRange):
        return trial.suggest_int(key, dimension.low, dimension.high, step=dimension.step, log=dimension.log)
    assert isinstance(dimension, Choice)
    return trial.suggest_categorical(key, dimension.choices)


def _contains(dimension: SearchDimension, value: Any) -> bool:
    if isinstance(dimension, Choice):
        return value in dimension.choices
    return isinstance(value, (int, float)) and dimension.low <= value <= dimension.high


def _report(total: int) -> Any:
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        params = "  ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in trial.params.items())
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        outcome = f"val top1 {100 * trial.value:.2f}%" if complete else trial.state.name.lower()
        try:
            best = f"best {100 * study.best_value:.2f}% (trial {study.best_trial.number})"
        except ValueError:
            best = "no completed trial yet"
        log.info("trial %d (%d this run): %s  %s  — %s", trial.number, total, outcome, params, best)

    return callback


def _write_best(settings: Settings, study: optuna.Study, best: optuna.trial.FrozenTrial) -> Path:
    document = {
        "study": study.study_name,
        "trial": best.number,
        "val_top1": best.value,
        "trials": len(study.trials),
        "settings": best.params,
    }
    text = ("# Written by `sa2vp tune`: the best trial's settings. Train with them:\n"
            f"#   sa2vp train --set-file {settings.tune.output / BEST_FILE}\n") + yaml.safe_dump(document, sort_keys=False)
    return write_atomic(settings.tune.output / BEST_FILE, text)


def _log_figures(study: optuna.Study, space: dict[str, SearchDimension], run: Run) -> None:
    """Optimisation history, parameter importances and a γ–c contour, as figures of the parent run."""
    from optuna.visualization import matplotlib as plots

    figures = {"optimization_history.png": lambda: plots.plot_optimization_history(study),
               "param_importances.png": lambda: plots.plot_param_importances(study)}
    numeric = [key for key, dim in space.items() if not isinstance(dim, Choice) or len(dim.choices) > 1]
    pair = [k for k in ("model.gamma", "model.window") if k in numeric] or numeric[:2]
    if len(pair) == 2:
        figures["contour.png"] = lambda: plots.plot_contour(study, params=pair)
    for name, plot in figures.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few completed trials for this figure
            log.info("tuning figure %s skipped: %s", name, exc)
            continue
        figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
        figure.set_size_inches(8, 6)
        run.log_figure(figure, f"tuning/{name}")
        import matplotlib.pyplot as plt

        plt.close(figure)


def _storage(storage: str) -> optuna.storages.BaseStorage | str:
    if "://" in storage:
        return storage  # a database URL: Optuna's RDB storage, shared by many machines
    path = Path(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
