"""Optuna tuning of a method's settings on the validation split; every trial a nested MLflow run.

    study = open_study(settings)                 # persistent: journal file or database URL; resumes
    result = tune(settings)                      # adds tune.n_trials trials, writes best.yaml, logs figures

Each trial trains with `sa2vp.engine.fit` on the train split and scores the best validation top-1 over its
epochs; the pruner stops unpromising trials from their per-epoch validation accuracy. A new study's first
trial is each searched setting's start, so tuning never ends below the settings as given. A trial that fails
(an invalid combination, a diverging loss) is recorded as failed and the study goes on.

What is searched (`plan_search`): the method's own space, changed by tune.space, less the settings that were
given a value — those are pinned, used as given — unless tune.space gives them a range. A study records the
settings its trials train with (`study_identity`) and is resumed only with the same ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from sa2vp.atomic import write_atomic
from sa2vp.data import NO_PROGRESS, Progress, prepare, split_dir
from sa2vp.data.progress import labelled
from sa2vp.engine import EpochReport, fit
from sa2vp.engine.trainer import RESUMABLE_CHANGES
from sa2vp.errors import TrainingDiverged
from sa2vp.models import search_space
from sa2vp.settings import (
    Choice,
    FloatRange,
    IntRange,
    SearchDimension,
    Settings,
    SettingsError,
    describe_validation_error,
    did_you_mean,
    environment_settings,
    flatten_settings,
    load_settings,
    settings_from_dump,
    space_entries,
)
from sa2vp.tracking import Run, start_run, trial_run_name

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


@dataclass(frozen=True)
class SearchPlan:
    """What a study searches, where its first trial starts, and what it leaves as given.

    space: dotted setting → its dimension; start: the first trial's value of each searched setting; pinned:
    dotted setting → where its value was given (`params.yaml`, `--set`, …), for each setting of the method's
    space (or of tune.space) that is not searched; values: the pinned settings' values."""

    space: dict[str, SearchDimension]
    start: dict[str, Any] = field(default_factory=dict)
    pinned: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """One line: `searching model.sa2vp.lam 0.5…1 from 0.8, …; pinned model.sa2vp.gamma=0.5 (params.yaml)`."""
        searched = (
            ", ".join(f"{key} {_range(dim)} from {_short(self.start.get(key))}" for key, dim in self.space.items())
            or "nothing"
        )
        pinned = ", ".join(f"{key}={_short(self.values.get(key))} ({why})" for key, why in self.pinned.items())
        return f"searching {searched}" + (f"; pinned {pinned}" if pinned else "")

    def record(self) -> dict[str, Any]:
        """The plan as data (best.yaml, the MLflow parent run): tuned → dimension, pinned → value and source."""
        return {
            "tuned": {
                key: {**dim.model_dump(mode="json"), "start": self.start.get(key)} for key, dim in self.space.items()
            },
            "pinned": {key: {"value": self.values.get(key), "from": why} for key, why in self.pinned.items()},
        }


def plan_search(
    settings: Settings, given: Mapping[str, str] | None = None, pinned: Mapping[str, str] | None = None
) -> SearchPlan:
    """The method's space changed by tune.space, less what is pinned.

    `given`: settings given a value → where (`given_settings`); a searched one is pinned, unless its tune.space
    entry gives it a range or choices — then its value is where the search starts. `pinned`: settings pinned
    whatever tune.space says (a suite's ablation) → why. Raises SettingsError for an entry that makes no
    dimension."""
    method = settings.model.method
    default = search_space(method)
    edits = space_entries(settings.tune.space)
    # The order the sampler draws in: the dimensions tune.space shapes, then the method's others in its order —
    # so a seeded study draws as it did when tune.space replaced the method's space, or was not given.
    shaped = [key for key, entry in edits.items() if entry and set(entry) - {"start"}]
    space = {key: default[key] for key in [*shaped, *default] if key in default}
    starts: dict[str, Any] = {}
    ranged: set[str] = set()  # settings whose tune.space entry shapes their dimension
    for key, entry in edits.items():
        if entry is None:
            space.pop(key, None)
            continue
        fields = dict(entry)
        if "start" in fields:
            starts[key] = fields.pop("start")
        if fields:
            space[key] = _dimension(key, default.get(key), fields, method)
            ranged.add(key)
        elif key not in space:
            raise SettingsError(
                f"tune.space.{key}: method {method!r} does not search {key}; give its dimension "
                "(type: float or int with low and high, or choices)"
            )
    current = flatten_settings(settings)
    why = {key: reason for key, reason in (given or {}).items() if key in space and key not in ranged}
    why.update({key: reason for key, reason in (pinned or {}).items() if key in space})
    return SearchPlan(
        space={key: dim for key, dim in space.items() if key not in why},
        start={key: starts.get(key, current[key]) for key in space if key not in why},
        pinned={key: why[key] for key in space if key in why},
        values={key: current[key] for key in space if key in why},
    )


def _dimension(key: str, default: SearchDimension | None, fields: dict[str, Any], method: str) -> SearchDimension:
    """A tune.space entry's fields over the method's dimension of the same type; a new type (or a setting the
    method does not search) needs the whole dimension."""
    kind = fields.get("type") or ("choice" if "choices" in fields else None)
    if default is not None and kind in (None, default.type):
        extra = sorted(set(fields) - set(type(default).model_fields))
        if extra:
            raise SettingsError(
                f"tune.space.{key}: a {default.type} dimension has no {', '.join(extra)} (its fields: "
                f"{', '.join(type(default).model_fields)}); to change its kind, give type too"
            )
        merged = {**default.model_dump(), **fields}
    elif kind is not None:
        merged = {**fields, "type": kind}
    else:
        raise SettingsError(
            f"tune.space.{key}: method {method!r} does not search {key}; give its type (float, int "
            "or choice) with the rest of its dimension"
        )
    try:
        return TypeAdapter(SearchDimension).validate_python(merged)
    except ValidationError as exc:
        raise SettingsError(f"tune.space.{key}: {describe_validation_error(exc)}") from None


def given_settings(
    settings: Settings, origins: Mapping[str, str] | None = None, params: Path | str | None = None
) -> dict[str, str]:
    """Every setting given a value rather than left at the schema's default → where it was given.

    Given-ness is pydantic's `model_fields_set` of each section, which every source (params file, SA2VP_*
    environment, overrides) fills. `origins`: the overrides' sources as the command knows them (dotted key →
    `--set`, a --set-file's path, `command line`); what no override and no SA2VP_* variable gave came from
    `params`."""
    environment = environment_settings()
    found: dict[str, str] = {}

    def walk(model: BaseModel, prefix: str) -> None:
        for name in sorted(model.model_fields_set):
            key, value = f"{prefix}{name}", getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, key + ".")
            else:
                found[key] = _source(key, origins or {}, environment, params)

    walk(settings, "")
    return found


def _source(key: str, origins: Mapping[str, str], environment: Mapping[str, str], params: Path | str | None) -> str:
    # The precedence of the sources: overrides, then the environment, then the params file.
    parents = [".".join(key.split(".")[:depth]) for depth in range(key.count(".") + 1, 0, -1)]
    for candidate in parents:
        if candidate in origins:
            return origins[candidate]
    for candidate in parents:
        if candidate in environment:
            return f"environment {environment[candidate]}"
    return str(params) if params is not None else "given"


# Settings every trial sets itself (`_objective`): searching them would be silently undone.
FIXED_BY_TUNING = {
    "train.epochs": "tune.epochs sets a trial's epochs",
    "train.train_split": "trials train on train",
    "train.val_split": "trials are scored on val",
    "train.test_split": "trials skip the test split",
    "train.output": "trials write to tune.output",
}
# An integer range with more values than this is checked at its ends only.
MAX_CHECKED_INTS = 256


def check_space(
    settings: Settings, space: Mapping[str, SearchDimension], start: Mapping[str, Any] | None = None
) -> None:
    """Refuse a search space that names something other than a setting, a setting the trials fix, or a value
    the settings refuse (each choice, each integer of a range, a float range's ends, the start) — with one line."""
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
        if start is not None and key in start and start[key] != known[key]:
            try:
                settings_from_dump(dump, {key: start[key]})
            except SettingsError as exc:
                raise SettingsError(f"tune.space.{key}.start: the value {start[key]!r} is not allowed: {exc}") from None


def _values_to_check(dimension: SearchDimension) -> list[Any]:
    if isinstance(dimension, Choice):
        return list(dimension.choices)
    if isinstance(dimension, IntRange):
        values = range(dimension.low, dimension.high + 1, dimension.step)
        return list(values) if len(values) <= MAX_CHECKED_INTS else [dimension.low, values[-1]]
    # The settings' float limits are intervals, so the ends decide; a point inside that is no integer
    # catches a float range over an integer setting, whose every sample but the ends would be refused.
    return [dimension.low, dimension.high, dimension.low + (dimension.high - dimension.low) / math.pi]


# Settings that do not change what a trial scores, so a study resumes across changes of them: the trainer's
# (RESUMABLE_CHANGES: tracking, workers, device, output folders), everything of tune. but what a trial
# trains with (its epochs and the search space, which `study_identity` records as the trials see them), and
# the suite. (which cell a study belongs to is its name).
STUDY_NEUTRAL = (*RESUMABLE_CHANGES, "tune.", "suite.")
IDENTITY_ATTR = "sa2vp_settings"
IDENTITY_HASH_ATTR = "sa2vp_settings_sha256"
SHOWN_DIFFERENCES = 3


def study_identity(settings: Settings, plan: SearchPlan) -> dict[str, Any]:
    """What a study's trials score: the settings every trial trains with (the searched ones aside) and the
    search space, as flat JSON values. A study resumes only with the same."""
    base = _trial_base(settings, settings.tune.output)
    identity = {
        key: value for key, value in base.items() if not key.startswith(STUDY_NEUTRAL) and key not in plan.space
    }
    identity.update({f"tune.space.{key}": dim.model_dump(mode="json") for key, dim in plan.space.items()})
    return json.loads(json.dumps(identity, sort_keys=True))


def _digest(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _pruner(settings: Settings) -> optuna.pruners.BasePruner:
    return {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
        "none": optuna.pruners.NopPruner,
    }[settings.tune.pruner]()


def _existing_study(settings: Settings) -> optuna.Study | None:
    """The study tune.storage holds under this name, read without writing; None when there is none."""
    if "://" not in settings.tune.storage and not Path(settings.tune.storage).is_file():
        return None  # (opening a journal creates its file)
    try:
        return optuna.load_study(
            study_name=study_name(settings),
            storage=_storage(settings.tune.storage),
            sampler=optuna.samplers.TPESampler(seed=settings.tune.sampler_seed),
            pruner=_pruner(settings),
        )
    except KeyError:
        return None


def open_study(settings: Settings, identity: Mapping[str, Any] | None = None) -> optuna.Study:
    """The study in tune.storage: seeded TPE, the configured pruner, maximising val top-1. An existing one must
    have been made with the same `identity` (SettingsError otherwise, nothing written); a new one records it."""
    identity = study_identity(settings, plan_search(settings)) if identity is None else identity
    study = _existing_study(settings)
    if study is None:
        try:
            study = optuna.create_study(
                storage=_storage(settings.tune.storage),
                study_name=study_name(settings),
                direction="maximize",
                sampler=optuna.samplers.TPESampler(seed=settings.tune.sampler_seed),
                pruner=_pruner(settings),
            )
        except optuna.exceptions.DuplicatedStudyError:  # another machine made it meanwhile (a shared database)
            study = _existing_study(settings)
            assert study is not None
    check_resumable(study, settings, identity)
    if IDENTITY_HASH_ATTR not in study.user_attrs:
        study.set_user_attr(IDENTITY_ATTR, dict(identity))
        study.set_user_attr(IDENTITY_HASH_ATTR, _digest(identity))
    return study


def check_resumable(study: optuna.Study, settings: Settings, identity: Mapping[str, Any]) -> None:
    """Refuse, with one line, to add trials to a study made with other settings: its trials would score
    something else, and its best would be written as this study's. A study with neither a record nor trials
    (killed as it was made) is new."""
    recorded = study.user_attrs.get(IDENTITY_HASH_ATTR)
    if recorded == _digest(identity) or (recorded is None and not study.trials):
        return
    where = settings.tune.storage
    remedy = (
        f"--set tune.study_name=<new name> starts another study beside it, or delete {where}"
        if "://" not in where
        else "--set tune.study_name=<new name> starts another study beside it"
    )
    before = study.user_attrs.get(IDENTITY_ATTR)
    if not isinstance(before, dict):
        raise SettingsError(
            f"tune.storage {where}: study {study.study_name!r} has {len(study.trials)} trials but "
            f"no record of the settings they were run with (an older sa2vp); {remedy}"
        )
    changed = [key for key in sorted(set(before) | set(identity)) if before.get(key) != identity.get(key)]
    # a setting pinned on one side and searched on the other: one difference, not two
    changed = [key for key in changed if key.removeprefix("tune.space.") == key or key[11:] not in changed]
    shown = ", ".join(
        f"{key} {_identity_value(key, before)} → {_identity_value(key, identity)}"
        for key in changed[:SHOWN_DIFFERENCES]
    )
    more = f" and {len(changed) - SHOWN_DIFFERENCES} more" if len(changed) > SHOWN_DIFFERENCES else ""
    raise SettingsError(
        f"tune.storage {where}: study {study.study_name!r} was run with other settings "
        f"({shown}{more}); resume it with the same ones, or {remedy}"
    )


def _identity_value(key: str, identity: Mapping[str, Any]) -> str:
    """A setting's value in a study identity, as a line shows it: its value, or `searched <range>`."""
    searched = identity.get(key if key.startswith("tune.space.") else f"tune.space.{key}")
    if key in identity and not key.startswith("tune.space."):
        return _short(identity[key])
    return f"searched {_range(TypeAdapter(SearchDimension).validate_python(searched))}" if searched else "not searched"


def tune(settings: Settings, progress: Progress = NO_PROGRESS, plan: SearchPlan | None = None) -> TuneResult:
    """Add tune.n_trials trials to the study (none starts after tune.timeout seconds), then write
    tune.output/best.yaml and log the study to a parent MLflow run.

    `plan`: what to search; default `plan_search` with the settings that were given a value pinned."""
    if settings.train.val_split is None:
        raise SettingsError("train.val_split: tuning scores trials on the validation split; it must not be null")
    plan = plan_search(settings, given_settings(settings)) if plan is None else plan
    space = plan.space
    if not space:
        pinned = f" (pinned: {', '.join(plan.pinned)})" if plan.pinned else ""
        raise SettingsError(
            f"tune.space: nothing to search for method {settings.model.method!r}{pinned}; give "
            "tune.space, or leave a searched setting unset"
        )
    check_space(settings, space, plan.start)  # before the study exists: a bad space would fail every trial
    identity = study_identity(settings, plan)
    earlier_study = _existing_study(settings)
    if earlier_study is not None:  # before anything is written: the data, the study, the MLflow run
        check_resumable(earlier_study, settings, identity)
    log.info("%s", plan.line())
    folder = split_dir(settings.data)
    if not (folder / "manifest.json").is_file():
        prepare(settings.data, progress)
    study = open_study(settings, identity)
    earlier = len(study.trials)
    if settings.tune.enqueue_defaults and not study.trials:
        inside = {key: plan.start[key] for key, dim in space.items() if _contains(dim, plan.start[key])}
        for key in sorted(set(space) - set(inside)):
            log.info("first trial: %s=%r is outside its search range, so the sampler chooses it", key, plan.start[key])
        study.enqueue_trial(inside, user_attrs={"defaults": True})
    parent = start_run(
        settings.tracking,
        f"tune-{study.study_name}",
        {
            "study_name": study.study_name,
            "storage": settings.tune.storage,
            "dataset": settings.data.dataset,
            "method": settings.model.method,
            "backbone": settings.backbone.name,
        },
    )
    parent.log_params(
        {
            **flatten_settings(settings),
            "study_name": study.study_name,
            "search.tuned": json.dumps(plan.record()["tuned"]),
            "search.pinned": json.dumps(plan.record()["pinned"]),
        }
    )
    total = settings.tune.n_trials
    log.info("study %s (%d earlier trials): %d trials over %s", study.study_name, earlier, total, ", ".join(space))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(
                _objective(settings, space, parent, progress),
                n_trials=total,
                timeout=settings.tune.timeout,
                catch=(TrainingDiverged, SettingsError, ValueError),
                callbacks=[_report(total)],
            )
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not completed:
            raise TrainingDiverged(
                f"study {study.study_name}: no trial completed (see the failed trials' errors "
                "in MLflow); check the settings and tune.space"
            )
        best = study.best_trial
        best_file = _write_best(settings, study, best, plan)
        parent.log_params({f"best.{key}": value for key, value in best.params.items()})
        parent.log_metrics({"best_val_top1": best.value, "trials": len(study.trials), "completed": len(completed)})
        parent.set_tags({"best_trial": best.number})
        parent.log_file(best_file)
        _log_figures(study, space, parent)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return TuneResult(study, dict(best.params), study.best_value, best_file, parent.run_id)


def _trial_base(settings: Settings, output: Path) -> dict[str, Any]:
    """The flat settings a trial trains with, before the searched ones (FIXED_BY_TUNING set as trials set them)."""
    return {
        **flatten_settings(settings),
        "train.epochs": settings.tune.epochs or settings.train.epochs,
        "train.train_split": "train",
        "train.test_split": None,
        "train.output": str(output),
        "tracking.log_model": False,
    }  # a trial's model is not kept: no MLflow model either


def _objective(settings: Settings, space: dict[str, SearchDimension], parent: Run, progress: Progress) -> Any:
    def objective(trial: optuna.Trial) -> float:
        chosen = {key: _suggest(trial, key, dimension) for key, dimension in space.items()}
        output = settings.tune.output / f"trial-{trial.number}"
        trial_settings = load_settings(None, {**_trial_base(settings, output), **chosen})

        def on_epoch(report: EpochReport) -> bool:
            trial.report(report.val.top1 if report.val else 0.0, report.epoch)
            return trial.should_prune()

        try:
            # Each epoch's lines say which trial they belong to (`trial 3 · epoch 1/2: …`).
            result = fit(
                trial_settings,
                on_epoch=on_epoch,
                parent_run_id=parent.run_id or None,
                progress=labelled(progress, f"trial {trial.number}"),
                run_name=trial_run_name(trial.number, chosen),
            )
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
        # A pruned trial has a value too (its last report); only a completed one scored its whole training.
        value = trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None
        outcome = f"val top1 {100 * value:.2f}%" if value is not None else trial.state.name.lower()
        try:
            best = f"best {100 * study.best_value:.2f}% (trial {study.best_trial.number})"
        except ValueError:
            best = "no completed trial yet"
        log.info("trial %d (%d this run): %s  %s  — %s", trial.number, total, outcome, params, best)

    return callback


def _write_best(settings: Settings, study: optuna.Study, best: optuna.trial.FrozenTrial, plan: SearchPlan) -> Path:
    record = plan.record()
    document = {
        "study": study.study_name,
        "trial": best.number,
        "val_top1": best.value,
        "trials": len(study.trials),
        # The pinned ones too: a `train --set-file` without the tuning's --set must not fall back to defaults.
        "settings": {**best.params, **plan.values},
        "tuned": record["tuned"],
        "pinned": record["pinned"],
    }
    text = (
        "# Written by `sa2vp tune`: the best trial's settings, and the pinned ones. Train with them:\n"
        f"#   sa2vp train --set-file {settings.tune.output / BEST_FILE}\n"
    ) + yaml.safe_dump(document, sort_keys=False)
    return write_atomic(settings.tune.output / BEST_FILE, text)


def _log_figures(study: optuna.Study, space: dict[str, SearchDimension], run: Run) -> None:
    """Optimisation history, parameter importances and the γ–c map (`sa2vp.figures`), as figures of the parent run."""
    import matplotlib.pyplot as plt

    from sa2vp.figures import tuning_figures

    for name, figure in tuning_figures(study, space).items():
        run.log_figure(figure, f"tuning/{name}")
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


def _range(dimension: SearchDimension) -> str:
    if isinstance(dimension, Choice):
        return "{" + ", ".join(_short(choice) for choice in dimension.choices) + "}"
    scale = " log" if dimension.log else ""
    step = f" step {dimension.step}" if isinstance(dimension, IntRange) and dimension.step != 1 else ""
    return f"{_short(dimension.low)}…{_short(dimension.high)}{scale}{step}"
