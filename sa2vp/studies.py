"""An Optuna study that many worker processes (on one machine or many) run together, with a budget of trials.

    storage = open_storage("postgresql://…/optuna", heartbeat=(60, 180), on_dead=callback)
    study, made = join_study(storage, "s", pruner, budget=20, set_up=record)   # one process makes it
    while (trial := claim(study, storage, sampler_for)) is not None:
        with beating(storage, trial): ...                                     # then study.tell(trial, …)

The budget: the process that makes the study (exactly one wins `create_study`; the others get
DuplicatedStudyError) enqueues all its trials as WAITING, then records the budget — the sign that the study is
ready, which the others wait for. Workers take WAITING trials with Optuna's atomic WAITING → RUNNING transition
(`claim`) and never create one, so the study ends with its budget however many workers run it. A larger budget
later (`top_up`) is added by the one process that makes the marker study `<name>@budget-<n>`.

A worker that dies mid-trial: in a database storage every running trial records a heartbeat (`beating`); a
trial whose heartbeats stopped for the grace period is failed by whichever worker looks next (`fail_dead`,
Optuna's `fail_stale_trials`), and `on_dead` is called with it. A journal file (one machine) has no heartbeats:
its running trials carry their process id and host instead, and a trial whose process is gone is failed the same
way. A trial is retried (`retry`) as a new WAITING trial with the same parameters; retries are not part of the
budget.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from sa2vp.errors import one_line
from sa2vp.folders import process_alive
from sa2vp.settings import SettingsError
from sa2vp.stores import one_at_a_time

log = logging.getLogger("sa2vp.tune")

BUDGET_ATTR = "sa2vp_budget"  # the study's trials in all, retries aside; recorded last, when the study is ready
TOP_UP = "@budget-"  # a marker study `<name>@budget-<n>`: made by the one process that raises the budget to n
PID_ATTR, HOST_ATTR = "sa2vp.pid", "sa2vp.host"  # a running trial's process (journal storages: no heartbeats)
RETRY_ATTR = "failed_trial"  # a retry's system attribute: the trial it repeats (Optuna's RetryHeartbeatStale…)
SET_UP_WAIT = 120.0  # seconds a worker waits for the study's maker to set it up
POLL = 0.5  # seconds between looks at a study that is being set up
OWNERLESS_GRACE = 60.0  # seconds after which a running journal trial without a process recorded counts as dead

DeadTrialCallback = Callable[[optuna.Study, FrozenTrial], None]


def open_storage(where: str, heartbeat: tuple[int, int], on_dead: DeadTrialCallback) -> optuna.storages.BaseStorage:
    """Optuna's storage at `where`: a database URL (RDB storage, heartbeats every heartbeat[0] s, a trial dead
    after heartbeat[1] s without one) or a journal file. A new database is made safely when other processes
    make it at the same moment. SettingsError, in one line, when it cannot be opened."""
    if "://" not in where:
        from optuna.storages.journal import JournalFileBackend

        path = Path(where)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    interval, grace = heartbeat

    def open_rdb() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(
            where, heartbeat_interval=interval, grace_period=grace, heartbeat_stale_trial_callback=on_dead
        )

    try:
        return one_at_a_time(where, open_rdb)
    except Exception as exc:
        import sqlalchemy.exc

        # an unknown driver (ImportError), a malformed URL (ValueError), a refusing or missing database
        if isinstance(exc, (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError)):
            raise SettingsError(f"tune.storage {where}: cannot open it ({one_line(exc)})") from exc
        raise


def is_new_journal(where: str) -> bool:
    """Whether `where` names a journal file that does not exist yet (opening it would make it)."""
    return "://" not in where and not Path(where).is_file()


def load_study(
    storage: optuna.storages.BaseStorage, name: str, pruner: optuna.pruners.BasePruner
) -> optuna.Study | None:
    """Study `name` in `storage`, read without writing; None when there is none."""
    try:
        return optuna.load_study(study_name=name, storage=storage, pruner=pruner)
    except KeyError:
        return None


def join_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    pruner: optuna.pruners.BasePruner,
    budget: int,
    set_up: Callable[[optuna.Study], None],
    where: str,
) -> tuple[optuna.Study, bool]:
    """Study `name`, ready to be worked on, and whether this process made it. The one process that makes it
    calls `set_up(study)` (which may enqueue the first trials), enqueues the rest of `budget` and records it;
    should any of that fail, it deletes the study again. The others wait until it is ready (SettingsError after
    SET_UP_WAIT seconds: its maker stopped half-way)."""
    for _ in range(3):  # a maker that failed deleted the study: make it here
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction="maximize", pruner=pruner)
        except optuna.exceptions.DuplicatedStudyError:
            stalled = (
                f"tune.storage {where}: study {name!r} was left half made (its maker stopped while setting it up; "
                f"still not ready after {SET_UP_WAIT:.0f} s); delete it (optuna.delete_study(study_name={name!r}, "
                "storage=…)), or --set tune.study_name=<new name>"
            )
            found = _when_ready(storage, name, pruner, _ready, stalled)
            if found is not None:
                return found, False
            continue
        try:
            set_up(study)
            add_trials(study, budget - len(originals(study)))
            study.set_user_attr(BUDGET_ATTR, budget)  # last: the study is ready
        except BaseException:
            with contextlib.suppress(Exception):
                optuna.delete_study(study_name=name, storage=storage)
            raise
        return study, True
    raise SettingsError(f"tune.storage {where}: study {name!r} was made and deleted again three times; see the log")


def _ready(study: optuna.Study) -> bool:
    """Whether a study is set up: its budget recorded, or made by an older sa2vp (it has finished trials)."""
    return BUDGET_ATTR in study.user_attrs or any(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def _when_ready(
    storage: optuna.storages.BaseStorage,
    name: str,
    pruner: optuna.pruners.BasePruner,
    ready: Callable[[optuna.Study], bool],
    stalled: str,
) -> optuna.Study | None:
    """Study `name` once `ready(study)` says so; None if it is deleted meanwhile. SettingsError(`stalled`) when
    it is not ready after SET_UP_WAIT seconds."""
    deadline = time.monotonic() + SET_UP_WAIT
    while True:
        study = load_study(storage, name, pruner)
        if study is None:
            return None
        if ready(study):
            return study
        if time.monotonic() > deadline:
            raise SettingsError(stalled)
        time.sleep(POLL)


def budget_of(study: optuna.Study) -> int:
    """The study's budget: recorded when it was made or raised; a study of an older sa2vp: its trials so far."""
    recorded = study.user_attrs.get(BUDGET_ATTR)
    return int(recorded) if recorded is not None else len(originals(study))


def originals(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials that are not retries: those the budget counts."""
    return [trial for trial in study.get_trials(deepcopy=False) if RETRY_ATTR not in trial.system_attrs]


def add_trials(study: optuna.Study, count: int) -> None:
    """Enqueue `count` WAITING trials whose parameters the sampler chooses when a worker takes them."""
    for _ in range(max(count, 0)):
        study.enqueue_trial({})


def top_up(storage: optuna.storages.BaseStorage, study: optuna.Study, budget: int, where: str) -> None:
    """Raise the study's budget to `budget` (never lower it): the one process that makes the marker study
    `<name>@budget-<budget>` enqueues the difference; the others wait for the raise to be recorded. Workers
    asking for the same budget at the same moment add it once; two asking for different ones at the same moment
    may both add theirs (up to the larger budget plus the smaller raise)."""
    if budget <= budget_of(study):
        return
    marker = f"{study.study_name}{TOP_UP}{budget}"
    try:
        optuna.create_study(storage=storage, study_name=marker)
    except optuna.exceptions.DuplicatedStudyError:
        stalled = (
            f"tune.storage {where}: the raise of study {study.study_name!r} to {budget} trials was begun by a "
            f"process that stopped; delete the study {marker!r} (optuna.delete_study), and run again"
        )
        raised = _when_ready(storage, study.study_name, study.pruner, lambda s: budget_of(s) >= budget, stalled)
        if raised is None:
            raise SettingsError(f"tune.storage {where}: study {study.study_name!r} was deleted meanwhile") from None
        return
    try:
        add_trials(study, budget - len(originals(study)))
        study.set_user_attr(BUDGET_ATTR, budget)
    except BaseException:
        with contextlib.suppress(Exception):
            optuna.delete_study(study_name=marker, storage=storage)
        raise
    log.info("study %s: raised to %d trials", study.study_name, budget)


def has_heartbeats(storage: optuna.storages.BaseStorage) -> bool:
    return isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None


def claim(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    sampler_for: Callable[[int], optuna.samplers.BaseSampler],
) -> optuna.Trial | None:
    """A WAITING trial of the study, taken by this process (Optuna's atomic WAITING → RUNNING, which exactly
    one process wins), sampling with `sampler_for(its number)`; None when none is left. Never creates a trial."""
    study_id = storage.get_study_id_from_name(study.study_name)
    for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, waiting.number)
        if has_heartbeats(storage):
            # Before taking it: a process killed right after the take still leaves a heartbeat that goes stale.
            storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                continue  # another process took it
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        storage.set_trial_user_attr(trial_id, PID_ATTR, os.getpid())
        storage.set_trial_user_attr(trial_id, HOST_ATTR, socket.gethostname())
        study.sampler = sampler_for(waiting.number)
        return optuna.Trial(study, trial_id)
    return None


@contextlib.contextmanager
def beating(storage: optuna.storages.BaseStorage, trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat every heartbeat interval while the block runs (database storages)."""
    if not has_heartbeats(storage):
        yield
        return
    interval = storage.get_heartbeat_interval()  # type: ignore[attr-defined]
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]
            except Exception as exc:  # a moment without the database: the next beat may get through
                log.warning("trial %d: cannot record its heartbeat (%s)", trial.number, one_line(exc))

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_dead(study: optuna.Study, storage: optuna.storages.BaseStorage, on_dead: DeadTrialCallback) -> None:
    """Fail the study's running trials whose worker is gone, calling `on_dead` for each this process failed:
    heartbeats stopped for the grace period (database storages: Optuna's `fail_stale_trials`, which calls the
    storage's callback, `on_dead`), or, in a journal, the process recorded on the trial ended on this machine."""
    if isinstance(storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)
        return
    host, now = socket.gethostname(), datetime.datetime.now()  # (a journal's times: local, naive)
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in running(study):
        pid, on = trial.user_attrs.get(PID_ATTR), trial.user_attrs.get(HOST_ATTR)
        if pid is None:  # killed between taking it and recording itself, or an older sa2vp's
            started = trial.datetime_start
            if started is None or (now - started).total_seconds() < OWNERLESS_GRACE:
                continue  # just taken: its process is recording itself
        elif on != host or process_alive(int(pid)):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        on_dead(study, storage.get_trial(trial_id))


def running(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def retry(study: optuna.Study, trial: FrozenTrial, retries: int) -> bool:
    """Enqueue failed trial `trial` again with its parameters, unless it (or the trial it repeats) has been
    retried `retries` times; whether it was. Like Optuna's RetryHeartbeatStaleTrialCallback (the same system
    attributes: `failed_trial`, `retry_history`), less the dead process recorded on the trial."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > retries:
        return False
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={key: value for key, value in trial.user_attrs.items() if key not in (PID_ATTR, HOST_ATTR)},
            system_attrs={
                **trial.system_attrs,
                RETRY_ATTR: trial.system_attrs.get(RETRY_ATTR, trial.number),
                "retry_history": history,
            },
        )
    )
    return True
