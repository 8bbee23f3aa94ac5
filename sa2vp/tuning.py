"""Optuna tuning of a method's settings on the validation split; every trial a nested MLflow run.

    result = tune(settings)      # runs the study's trials (with any other workers), writes best.yaml, logs figures

Each trial trains with `sa2vp.engine.fit` on the train split and scores the best validation top-1 over its
epochs; the pruner stops unpromising trials from their per-epoch validation accuracy. A new study's first
trial is each searched setting's start, so tuning never ends below the settings as given. A trial that fails
(an invalid combination, a diverging loss) is recorded as failed and the study goes on.

A study is persistent (tune.storage: a journal file, or a database URL that many machines share) and has a
budget of tune.n_trials trials: any number of `sa2vp tune` processes started on it run them together, and each
returns when none is left (`sa2vp.studies`: claims, heartbeats, dead workers). Trial k samples with a seed drawn
from (tune.sampler_seed, k), so a rerun proposes what it proposed and workers never propose the same. One MLflow
parent run per study holds every worker's trial runs; best.yaml and the parent's best are written from the study
alone, so every worker that ends writes the same.

What is searched (`plan_search`): the method's own space, changed by tune.space, less the settings that were
given a value — those are pinned, used as given — unless tune.space gives them a range. A study records the
settings its trials train with (`study_identity`) and is resumed only with the same ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from pydantic import BaseModel, TypeAdapter, ValidationError

from sa2vp.atomic import write_atomic
from sa2vp.data import NO_PROGRESS, Progress, ensure_prepared
from sa2vp.data.progress import labelled
from sa2vp.engine import EpochReport, fit
from sa2vp.engine.trainer import RESUMABLE_CHANGES
from sa2vp.errors import TrackingError, TrainingDiverged, one_line
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
from sa2vp.studies import (
    HOST_ATTR,
    PID_ATTR,
    beating,
    budget_of,
    claim,
    fail_dead,
    is_new_journal,
    join_study,
    load_study,
    open_storage,
    retry,
    running,
    top_up,
)
from sa2vp.tracking import (
    Run,
    absolute_uri,
    check_store,
    disabled_run,
    existing_run,
    start_run,
    store_client,
    trial_run_name,
)

log = logging.getLogger("sa2vp.tune")

BEST_FILE = "best.yaml"
# A study's records (user attributes) besides its identity: the search plan best.yaml shows, its parent run.
PLAN_ATTR, PARENT_ATTR = "sa2vp_plan", "mlflow_parent_run_id"
STUDY_TAG, TRIAL_TAG = "sa2vp.study", "sa2vp.trial"  # MLflow tags: a trial run's study and number
CAUGHT = (TrainingDiverged, SettingsError, ValueError)  # a trial failing so is recorded as failed; the study goes on
WAIT_POLL = 5.0  # at most so many seconds between looks at the trials other workers run


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


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial `number` of a study seeded `seed` (tune.sampler_seed): a rerun draws what it
    drew before, and trials run side by side by several workers draw apart."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{number}".encode()).digest()[:4], "little")


def _samplers(settings: Settings) -> Callable[[int], optuna.samplers.BaseSampler]:
    def sampler(number: int) -> optuna.samplers.BaseSampler:
        # constant_liar: the trials other workers are running count as bad ones meanwhile, so that workers do not
        # all crowd the same promising region (a lone worker has no other running trial: no change).
        return optuna.samplers.TPESampler(seed=trial_seed(settings.tune.sampler_seed, number), constant_liar=True)

    return sampler


def _set_up(study: optuna.Study, settings: Settings, identity: Mapping[str, Any], plan: SearchPlan) -> Run:
    """A new study's records — what its trials train with, the search plan (best.yaml's), its MLflow parent run —
    and its first trial: each searched setting at its start (tune.enqueue_defaults). Returns the parent run."""
    study.set_user_attr(IDENTITY_ATTR, dict(identity))
    study.set_user_attr(IDENTITY_HASH_ATTR, _digest(identity))
    study.set_user_attr(PLAN_ATTR, plan.record())
    parent = _new_parent(settings, study, plan)
    try:
        if settings.tune.enqueue_defaults:
            inside = {key: plan.start[key] for key, dim in plan.space.items() if _contains(dim, plan.start[key])}
            for key in sorted(set(plan.space) - set(inside)):
                log.info(
                    "first trial: %s=%r is outside its search range, so the sampler chooses it", key, plan.start[key]
                )
            study.enqueue_trial(inside, user_attrs={"defaults": True})
    except BaseException:
        parent.finish("FAILED")
        raise
    return parent


def _new_parent(settings: Settings, study: optuna.Study, plan: SearchPlan) -> Run:
    """The study's MLflow parent run, under which every worker logs its trials; its id recorded in the study."""
    parent = start_run(
        settings.tracking,
        f"tune-{study.study_name}",
        {
            "study_name": study.study_name,
            "storage": settings.tune.storage,
            "dataset": settings.data.dataset,
            "method": settings.model.method,
            "backbone": settings.backbone.name,
            STUDY_TAG: study.study_name,
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
    if parent.run_id:
        study.set_user_attr(PARENT_ATTR, parent.run_id)
    return parent


def _parent_run(settings: Settings, study: optuna.Study, plan: SearchPlan) -> Run:
    """The parent run of a study made by another process (or an earlier run), as it is."""
    if not settings.tracking.enabled:
        return disabled_run()
    recorded = study.user_attrs.get(PARENT_ATTR)
    if recorded is None:  # made with tracking.enabled=false, or by an older sa2vp: the parent it lacked
        return _new_parent(settings, study, plan)
    from mlflow.exceptions import MlflowException

    try:
        return existing_run(settings.tracking.uri, str(recorded))
    except (MlflowException, OSError) as exc:
        raise TrackingError(
            f"tracking.uri={settings.tracking.uri!r}: study {study.study_name!r} logs its trials under MLflow run "
            f"{recorded}, which this store cannot give ({one_line(exc)}); every worker of a study must log to the "
            "same tracking store"
        ) from exc


class _DeadTrials:
    """What becomes of a trial whose worker died (no heartbeat for tune.grace_period seconds, or its process
    gone), after Optuna marked it failed: retried if tune.retries allows, and its MLflow run — which its worker
    left RUNNING — marked KILLED. Called by whichever worker notices."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        worker = f"process {trial.user_attrs.get(PID_ATTR, '?')} on {trial.user_attrs.get(HOST_ATTR, '?')}"
        retried = retry(study, trial, self.settings.tune.retries)
        log.warning(
            "trial %d: its worker (%s) stopped without ending it: marked failed%s",
            trial.number,
            worker,
            ", and queued again (tune.retries)" if retried else "",
        )
        self._end_run(study, trial, f"the worker running trial {trial.number} ({worker}) stopped (killed or lost)")

    def _end_run(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, why: str) -> None:
        parent = study.user_attrs.get(PARENT_ATTR)
        if not self.settings.tracking.enabled or parent is None:
            return
        from mlflow.exceptions import MlflowException

        try:
            client = store_client(absolute_uri(self.settings.tracking.uri))
            experiment = client.get_run(parent).info.experiment_id
            found = f"tags.`mlflow.parentRunId` = '{parent}' AND tags.`{TRIAL_TAG}` = '{trial.number}'"
            for run in client.search_runs([experiment], filter_string=f"{found} AND attributes.status = 'RUNNING'"):
                client.set_tag(run.info.run_id, "error", why)
                client.set_terminated(run.info.run_id, "KILLED")
        except (MlflowException, OSError) as exc:  # the trial's state is Optuna's; its run is a record of it
            log.warning("trial %d: cannot mark its MLflow run killed (%s)", trial.number, one_line(exc))


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
    """Run the study's trials, with every other worker sharing it (tune.storage, tune.study_name), until none is
    left — tune.n_trials in all, however many workers run it; this one takes none after tune.timeout seconds —
    then write tune.output/best.yaml and log the study to its MLflow parent run. A study that has its trials adds
    none; a larger tune.n_trials adds the difference.

    `plan`: what to search; default `plan_search` with the settings that were given a value pinned."""
    if settings.train.val_split is None:
        raise SettingsError("train.val_split: tuning scores trials on the validation split; it must not be null")
    plan = plan_search(settings, given_settings(settings)) if plan is None else plan
    if not plan.space:
        pinned = f" (pinned: {', '.join(plan.pinned)})" if plan.pinned else ""
        raise SettingsError(
            f"tune.space: nothing to search for method {settings.model.method!r}{pinned}; give "
            "tune.space, or leave a searched setting unset"
        )
    check_space(settings, plan.space, plan.start)  # before the study exists: a bad space would fail every trial
    identity = study_identity(settings, plan)
    if settings.tracking.enabled:
        check_store(settings.tracking.uri)  # before the study is made: its maker makes the MLflow parent run
    with warnings.catch_warnings():
        # heartbeats, fail_stale_trials and TPE's constant_liar are experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _tune(settings, plan, identity, progress)


def _tune(settings: Settings, plan: SearchPlan, identity: Mapping[str, Any], progress: Progress) -> TuneResult:
    where, name, pruner = settings.tune.storage, study_name(settings), _pruner(settings)
    on_dead = _DeadTrials(settings)
    heartbeat = (settings.tune.heartbeat_interval, settings.tune.grace_period)
    storage = None if is_new_journal(where) else open_storage(where, heartbeat, on_dead)
    earlier = None if storage is None else load_study(storage, name, pruner)
    if earlier is not None:  # before anything is written: the data, the study, the MLflow run
        check_resumable(earlier, settings, identity)
    log.info("%s", plan.line())
    ensure_prepared(settings.data, progress)  # once, however many workers start together
    storage = storage or open_storage(where, heartbeat, on_dead)
    made: list[Run] = []  # the parent run, when this process makes the study
    try:
        study, _ = join_study(
            storage,
            name,
            pruner,
            settings.tune.n_trials,
            lambda s: made.append(_set_up(s, settings, identity, plan)),
            where,
        )
    except BaseException:
        for parent in made:
            parent.finish("FAILED")
        raise
    check_resumable(study, settings, identity)
    top_up(storage, study, settings.tune.n_trials, where)
    parent = made[0] if made else _parent_run(settings, study, plan)
    try:
        parent = _work(study, storage, settings, plan, parent, on_dead, progress)
    except BaseException:
        with contextlib.suppress(Exception):
            if not running(study):  # the last worker: nobody else will end the parent run
                parent.finish("FAILED")
        raise
    return _finish(settings, study, plan, parent)


def _work(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    settings: Settings,
    plan: SearchPlan,
    parent: Run,
    on_dead: _DeadTrials,
    progress: Progress,
) -> Run:
    """Take the study's waiting trials and run them until none is left (or tune.timeout), then wait for the
    trials other workers are running, failing those whose worker died. Returns the parent run (reopened if
    this worker ran a trial)."""
    budget = budget_of(study)
    trials = study.get_trials(deepcopy=False)
    waiting = sum(trial.state == TrialState.WAITING for trial in trials)
    log.info(
        "study %s: %d trials, %d done, %d waiting; over %s",
        study.study_name,
        budget,
        sum(trial.state.is_finished() for trial in trials),
        waiting,
        ", ".join(plan.space),
    )
    objective, report, samplers = _objective(settings, plan.space, progress), _report(budget), _samplers(settings)
    started, reopened, awaited = time.monotonic(), False, ""
    while True:
        fail_dead(study, storage, on_dead)
        if settings.tune.timeout is None or time.monotonic() - started < settings.tune.timeout:
            trial = claim(study, storage, samplers)
            if trial is not None:
                if not reopened and parent.client is not None:
                    parent, reopened = start_run(settings.tracking, parent.run_id, resume_run_id=parent.run_id), True
                _run_trial(study, storage, trial, objective, parent, report)
                continue
        others = running(study)
        if not others:
            return parent
        numbers = ", ".join(str(trial.number) for trial in others)
        if numbers != awaited:
            log.info("study %s: waiting for trial %s, run by another worker", study.study_name, numbers)
            awaited = numbers
        time.sleep(min(settings.tune.heartbeat_interval, WAIT_POLL))


def _run_trial(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    trial: optuna.Trial,
    objective: Callable[[optuna.Trial, Run], float],
    parent: Run,
    report: Callable[[optuna.Study, optuna.trial.FrozenTrial], None],
) -> None:
    """One trial, as `study.optimize` runs it: its heartbeat recorded meanwhile; pruned, or failed by one of
    CAUGHT (the study goes on), or failed and re-raised by anything else."""
    value, state = None, TrialState.COMPLETE
    with beating(storage, trial):
        try:
            value = objective(trial, parent)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except CAUGHT as exc:
            state = TrialState.FAIL
            trial.set_user_attr("fail_reason", one_line(exc))
            log.warning("trial %d failed: %s", trial.number, one_line(exc))
        except BaseException:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
    told = study.tell(trial, value, state=state, skip_if_finished=True)
    if told.state != state:  # failed by another worker that found its heartbeats stopped (a long stall)
        log.warning(
            "trial %d: marked %s by another worker before it ended; its result is dropped", told.number, told.state.name
        )
    report(study, told)


def _finish(settings: Settings, study: optuna.Study, plan: SearchPlan, parent: Run) -> TuneResult:
    """The study's best trial in best.yaml and in the parent run — from the study alone, so that workers ending
    at the same moment write the same, and a rerun that added nothing rewrites nothing."""
    trials = study.trials
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if not completed:
        parent.finish("FAILED")
        raise TrainingDiverged(
            f"study {study.study_name}: no trial completed (see the failed trials' errors "
            "in MLflow); check the settings and tune.space"
        )
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    if waiting:
        log.info("study %s: %d trials still wait (tune.timeout); the next run takes them", study.study_name, waiting)
    best = study.best_trial
    record = study.user_attrs.get(PLAN_ATTR) or plan.record()
    best_file = _write_best(settings, study, best, record)
    _log_best(parent, study, best, plan.space, best_file)
    return TuneResult(study, dict(best.params), float(study.best_value), best_file, parent.run_id)


def _log_best(
    parent: Run, study: optuna.Study, best: optuna.trial.FrozenTrial, space: dict[str, SearchDimension], file: Path
) -> None:
    """The best trial as the parent run's tags (`best_trial`, `best.<setting>`: tags, which a larger budget may
    change, where params may not), metrics at step = finished trials, best.yaml and the figures; the run ended."""
    if parent.client is None:
        return
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    tags = {"best_trial": best.number, **{f"best.{key}": value for key, value in best.params.items()}}
    metrics = {
        "best_val_top1": float(best.value or 0.0),
        "trials": len(finished),
        "completed": sum(t.state == TrialState.COMPLETE for t in finished),
        "budget": budget_of(study),
    }
    run = parent.client.get_run(parent.run_id)
    if (
        run.info.status == "FINISHED"
        and all(run.data.tags.get(key) == str(value) for key, value in tags.items())
        and all(run.data.metrics.get(key) == value for key, value in metrics.items())
    ):
        return  # said already: by a rerun that added nothing, or by a worker that ended at the same moment
    parent.set_tags(tags)
    parent.log_metrics(metrics, step=len(finished))
    parent.log_file(file)
    _log_figures(study, space, parent)
    parent.finish()


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


def _objective(settings: Settings, space: dict[str, SearchDimension], progress: Progress) -> Any:
    def objective(trial: optuna.Trial, parent: Run) -> float:
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
                # how a dead worker's run is found and ended (`_DeadTrials`)
                run_tags={STUDY_TAG: trial.study.study_name, TRIAL_TAG: trial.number},
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


def _report(budget: int) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        params = "  ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in trial.params.items())
        # A pruned trial has a value too (its last report); only a completed one scored its whole training.
        value = trial.value if trial.state == TrialState.COMPLETE else None
        outcome = f"val top1 {100 * value:.2f}%" if value is not None else trial.state.name.lower()
        try:
            best = f"best {100 * study.best_value:.2f}% (trial {study.best_trial.number})"
        except ValueError:
            best = "no completed trial yet"
        done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        log.info("trial %d (%d/%d done): %s  %s  — %s", trial.number, done, budget, outcome, params, best)

    return callback


def _write_best(
    settings: Settings, study: optuna.Study, best: optuna.trial.FrozenTrial, record: Mapping[str, Any]
) -> Path:
    """best.yaml from the study and its recorded plan (`record`: SearchPlan.record()); left as it is when it
    says so already."""
    document = {
        "study": study.study_name,
        "trial": best.number,
        "val_top1": best.value,
        "trials": sum(t.state.is_finished() for t in study.get_trials(deepcopy=False)),
        # The pinned ones too: a `train --set-file` without the tuning's --set must not fall back to defaults.
        "settings": {**best.params, **{key: entry["value"] for key, entry in record["pinned"].items()}},
        "tuned": record["tuned"],
        "pinned": record["pinned"],
    }
    path = settings.tune.output / BEST_FILE
    text = (
        "# Written by `sa2vp tune`: the best trial's settings, and the pinned ones. Train with them:\n"
        f"#   sa2vp train --set-file {path}\n"
    ) + yaml.safe_dump(document, sort_keys=False)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    return write_atomic(path, text)


def _log_figures(study: optuna.Study, space: dict[str, SearchDimension], run: Run) -> None:
    """Optimisation history, parameter importances and the γ–c map (`sa2vp.figures`), as figures of the parent run."""
    import matplotlib.pyplot as plt

    from sa2vp.figures import tuning_figures

    for name, figure in tuning_figures(study, space).items():
        run.log_figure(figure, f"tuning/{name}")
        plt.close(figure)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _range(dimension: SearchDimension) -> str:
    if isinstance(dimension, Choice):
        return "{" + ", ".join(_short(choice) for choice in dimension.choices) + "}"
    scale = " log" if dimension.log else ""
    step = f" step {dimension.step}" if isinstance(dimension, IntRange) and dimension.step != 1 else ""
    return f"{_short(dimension.low)}…{_short(dimension.high)}{scale}{step}"
