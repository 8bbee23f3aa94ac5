"""Many `sa2vp tune` workers on one Optuna study (issue 17, item 2): tune.n_trials is the study's budget,
whatever the number of workers; workers never propose the same settings, and a rerun proposes the same again; a
worker killed mid-trial leaves neither its trial nor its MLflow run RUNNING; a new store made by two processes at
the same moment works for both. The multi-process tests run real `sa2vp tune` processes against a real
PostgreSQL server on loopback (Optuna's storage and MLflow's store, one database each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from sa2vp import studies
from sa2vp.data import prepare
from sa2vp.settings import load_settings
from tests.data_fixtures import make_image_folder
from tests.postgres_server import PostgresServer, postgres  # noqa: F401  (fixture)
from tests.train_fixtures import SA2VP, TINY_PARAMS, experiment_id, invoke_sa2vp

FAST = ["--set", "tune.epochs=1", "--set", "tune.pruner=none"]
# Heartbeats every second, a trial dead after 3 s without one (the defaults, 60 s and 180 s, suit real trainings).
QUICK_HEARTBEATS = ["--set", "tune.heartbeat_interval=1", "--set", "tune.grace_period=3"]
WORKER_TIMEOUT = 240  # seconds: a worker that runs longer is stuck


@pytest.fixture(scope="module")
def small_params(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """TINY_PARAMS on a folder of 3 × 12 images, prepared once (a trial's epoch is a few batches), logged to the
    project's sqlite store."""
    root = tmp_path_factory.mktemp("workers-data")
    images = make_image_folder(root / "images", {"a": 12, "b": 12, "c": 12})
    params = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    params["data"] = {"dataset": f"folder:{images}", "root": str(root / "data")}
    params["train"].update(batch_size=8, eval_batch_size=8, cpu_threads=1)
    prepare(load_settings(None, {"data.dataset": f"folder:{images}", "data.root": str(root / "data")}).data)
    return params


@pytest.fixture()
def project(tmp_path: Path, small_params: dict[str, Any]) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_params), encoding="utf-8")
    return tmp_path


def _journal_study(project: Path, name: str) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(project / "runs/study.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def _tune(project: Path, name: str, n_trials: int, *args: str, check: bool = True) -> Any:
    return invoke_sa2vp(
        project,
        "tune",
        "--study-name",
        name,
        "--storage",
        "runs/study.journal",
        "--n-trials",
        str(n_trials),
        *FAST,
        *args,
        check=check,
    )


def _runs(uri: str, parent_name: str) -> tuple[Any, list[Any], list[Any]]:
    """The parent runs named `parent_name` (there must be one), its child runs, and every run of the store."""
    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id(client, "tests")])
    (parent,) = [run for run in runs if run.info.run_name == parent_name]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children, runs


def _params(trial: optuna.trial.FrozenTrial) -> str:
    return json.dumps(trial.params, sort_keys=True)


# --- one worker: the budget, reruns, reproducible proposals (journal file) ------------------------------------


def test_the_budget_is_the_studys_a_rerun_adds_nothing_and_proposals_repeat(project: Path) -> None:
    _tune(project, "a", 2)
    best = project / "runs/tune/best.yaml"
    written = (best.read_bytes(), best.stat().st_mtime_ns)
    _tune(project, "a", 2)  # the study has its 2 trials: nothing to add, nothing rewritten
    assert len(_journal_study(project, "a").trials) == 2
    assert (best.read_bytes(), best.stat().st_mtime_ns) == written
    _tune(project, "a", 3)  # a larger budget adds the difference
    _tune(project, "b", 3, "--set", "tracking.enabled=false")  # the same in one go, in another study
    a, b = _journal_study(project, "a").trials, _journal_study(project, "b").trials
    assert [t.state for t in a] == [TrialState.COMPLETE] * 3
    # trial k samples with a seed drawn from (tune.sampler_seed, k): the same proposals however the budget came
    assert [_params(t) for t in a] == [_params(t) for t in b]
    assert len({_params(t) for t in a}) == 3
    # one parent run for the study, across its three runs; every trial's run under it, tagged with its number
    parent, children, _ = _runs(f"sqlite:///{project / 'mlflow.db'}", "tune-a")
    assert sorted(run.data.tags["sa2vp.trial"] for run in children) == ["0", "1", "2"]
    assert {run.data.tags["sa2vp.study"] for run in children} == {"a"}
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 3
    best_trial = _journal_study(project, "a").best_trial
    assert parent.data.tags["best_trial"] == str(best_trial.number)
    assert _journal_study(project, "a").user_attrs["mlflow_parent_run_id"] == parent.info.run_id


def test_journal_trials_whose_process_died_are_failed_and_retried(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tune(project, "j", 1, "--set", "tracking.enabled=false")
    # A worker that raises the budget to 2 and takes the new trial, then is killed (SIGKILL) while it runs it.
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, optuna\n"
            "from sa2vp import studies\n"
            "storage = studies.open_storage('runs/study.journal', (1, 3), lambda study, trial: None)\n"
            "study = optuna.load_study(study_name='j', storage=storage)\n"
            "studies.top_up(storage, study, 2, 'runs/study.journal')\n"
            "trial = studies.claim(study, storage, lambda number: optuna.samplers.RandomSampler(number))\n"
            "print(trial.number, flush=True)\n"
            "time.sleep(600)\n",
        ],
        cwd=project,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "1"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    # and one taken by a worker killed before it could record itself on the trial (or an older sa2vp's)
    storage = studies.open_storage(str(project / "runs/study.journal"), (1, 3), lambda study, trial: None)
    study = optuna.load_study(study_name="j", storage=storage)
    studies.top_up(storage, study, 3, "runs/study.journal")
    taken = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("j"), 2)
    storage.set_trial_state_values(taken, TrialState.RUNNING)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.RUNNING]
    monkeypatch.setattr(studies, "OWNERLESS_GRACE", 0.0)  # (a minute, for a process that is recording itself)
    _tune(project, "j", 3, "--set", "tracking.enabled=false", "--set", "tune.retries=1")
    trials = _journal_study(project, "j").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] + [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    assert trials[1].user_attrs["sa2vp.pid"] == worker.pid
    # the retries: beyond the budget of 3
    assert sorted(t.system_attrs["failed_trial"] for t in trials[3:]) == [1, 2]
    assert yaml.safe_load((project / "runs/tune/best.yaml").read_text())["trials"] == 5


def test_a_study_left_half_made_is_named_in_one_line(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = project / "runs/study.journal"
    journal.parent.mkdir(parents=True)
    # what a maker killed right after `create_study` leaves: a study with no records and no trials
    optuna.create_study(study_name="h", storage=JournalStorage(JournalFileBackend(str(journal))))
    monkeypatch.setattr(studies, "SET_UP_WAIT", 0.5)
    refused = _tune(project, "h", 1, "--set", "tracking.enabled=false", check=False)
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.strip().startswith(
        "error: tune.storage runs/study.journal: study 'h' was left half made (its maker stopped while setting it up"
    )
    assert len(refused.stderr.strip().splitlines()) == 1


# --- several workers on PostgreSQL ------------------------------------------------------------------------------


def _start_worker(project: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [SA2VP, "tune", *args],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _finished(worker: subprocess.Popen[str]) -> str:
    output, _ = worker.communicate(timeout=WORKER_TIMEOUT)
    assert worker.returncode == 0, output
    return output


def _databases(postgres: PostgresServer, name: str) -> tuple[str, str]:
    return postgres.create_database(f"{name}_optuna"), postgres.create_database(f"{name}_mlflow")


@pytest.mark.slow
def test_two_workers_run_the_studys_budget_together(project: Path, postgres: PostgresServer) -> None:
    storage, tracking = _databases(postgres, "two")
    args = ["--study-name", "s", "--storage", storage, "--n-trials", "8", "--set", f"tracking.uri={tracking}"]
    workers = [_start_worker(project, *args, *FAST, *QUICK_HEARTBEATS) for _ in range(2)]
    outputs = [_finished(worker) for worker in workers]
    assert all("study s: best of 8 trials" in output for output in outputs), outputs
    trials = optuna.load_study(study_name="s", storage=storage).trials
    # exactly the budget, each trial once, all run to the end
    assert [t.number for t in trials] == list(range(8))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    by_worker = {worker.pid: [t for t in trials if t.user_attrs["sa2vp.pid"] == worker.pid] for worker in workers}
    assert all(by_worker.values()), {pid: len(ran) for pid, ran in by_worker.items()}  # both took trials
    # no two trials (of one worker or of the two) try the same settings
    assert len({_params(t) for t in trials}) == 8
    # one parent run; each trial's run under it, tagged with its trial number
    parent, children, runs = _runs(tracking, "tune-s")
    assert len(runs) == 1 + 8
    assert sorted(int(run.data.tags["sa2vp.trial"]) for run in children) == list(range(8))
    assert all(run.info.status == "FINISHED" for run in runs)
    # best.yaml: the study's best trial, once for both workers
    best = yaml.safe_load((project / "runs/tune/best.yaml").read_text())
    study = optuna.load_study(study_name="s", storage=storage)
    assert best["trial"] == study.best_trial.number and best["val_top1"] == study.best_value
    assert {key: best["settings"][key] for key in study.best_trial.params} == study.best_trial.params
    assert parent.data.tags["best_trial"] == str(study.best_trial.number) and parent.data.metrics["trials"] == 8


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_failed_by_heartbeat_and_retried(project: Path, postgres: PostgresServer) -> None:
    storage, tracking = _databases(postgres, "kill")
    args = ["--study-name", "k", "--storage", storage, "--n-trials", "3", "--set", f"tracking.uri={tracking}"]
    three_epochs = ["--set", "tune.epochs=3", "--set", "tune.pruner=none", "--set", "tune.retries=1"]
    workers = {
        worker.pid: worker
        for worker in (_start_worker(project, *args, *three_epochs, *QUICK_HEARTBEATS) for _ in range(2))
    }
    # Read the study as the workers make it (through the race-safe opening: they may be making the tables).
    watched = studies.open_storage(storage, (1, 3), lambda study, trial: None)
    victim = None
    deadline = time.monotonic() + WORKER_TIMEOUT
    while victim is None:  # a trial past its first epoch (its MLflow run made, two epochs to go)
        assert time.monotonic() < deadline, "no trial reached its first epoch"
        study = studies.load_study(watched, "k", optuna.pruners.NopPruner())
        running = [] if study is None else study.get_trials(states=(TrialState.RUNNING,))
        victim = next((trial for trial in running if trial.intermediate_values), None)
        time.sleep(0.05)
    killed = workers.pop(victim.user_attrs["sa2vp.pid"])
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (survivor,) = workers.values()
    _finished(survivor)
    trials = optuna.load_study(study_name="k", storage=storage).trials
    states = {t.number: t.state for t in trials}
    # the killed trial failed (its heartbeats stopped) and counts in the budget; it ran again as one more: 3 + 1
    assert states[victim.number] == TrialState.FAIL and len(trials) == 4, states
    (retried,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retried.state == TrialState.COMPLETE and retried.params == victim.params
    assert sorted(states) == list(range(4)) and sum(s == TrialState.FAIL for s in states.values()) == 1
    assert TrialState.RUNNING not in states.values() and TrialState.WAITING not in states.values()
    # its MLflow run: ended by the survivor, not left RUNNING
    parent, children, runs = _runs(tracking, "tune-k")
    (run,) = [r for r in children if r.data.tags["sa2vp.trial"] == str(victim.number)]
    assert run.info.status == "KILLED" and "stopped" in run.data.tags["error"]
    assert [r.info.status for r in runs].count("RUNNING") == 0 and parent.info.status == "FINISHED"
    assert yaml.safe_load((project / "runs/tune/best.yaml").read_text())["trials"] == 4


@pytest.mark.slow
def test_two_processes_make_a_new_store_at_once(tmp_path: Path, postgres: PostgresServer) -> None:
    """MLflow's tracking store and Optuna's storage, each a new SQLite file and a new PostgreSQL database,
    opened by two processes at the same moment: both succeed (MLflow's migrations and Optuna's alembic stamp
    raced, and one process failed)."""
    stores = {
        "mlflow_sqlite": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "optuna_sqlite": f"sqlite:///{tmp_path / 'optuna.db'}",
        "mlflow_postgres": postgres.create_database("race_mlflow"),
        "optuna_postgres": postgres.create_database("race_optuna"),
    }
    code = (
        "import json, sys\n"
        "from sa2vp.studies import open_storage\n"
        "from sa2vp.tracking import store_client\n"
        "stores = json.loads(sys.argv[1])\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"  # both imported MLflow and Optuna: go
        "store_client(stores['mlflow_sqlite']).search_experiments()\n"
        "open_storage(stores['optuna_sqlite'], (1, 3), lambda study, trial: None).get_all_studies()\n"
        "store_client(stores['mlflow_postgres']).search_experiments()\n"
        "open_storage(stores['optuna_postgres'], (1, 3), lambda study, trial: None).get_all_studies()\n"
        "print('opened')\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(stores)],
            cwd=tmp_path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,  # (MLflow's few lines of table creation: they fit the pipe)
            text=True,
        )
        for _ in range(2)
    ]
    for process in processes:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    for process in processes:
        output, errors = process.communicate(timeout=WORKER_TIMEOUT)
        assert process.returncode == 0 and "opened" in output, errors
