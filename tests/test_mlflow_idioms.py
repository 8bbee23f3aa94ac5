"""MLflow as its users expect it (issue 14): experiments that open on the runs table, run names that tell trials
and studies apart, the splits as dataset inputs, source and user tags, the model as an MLflow model that
predicts like `sa2vp predict`, readable tuning figures, a store that can be copied, and `sa2vp ui` printing its
address only once the server answers.

One project is trained and tuned once for the module (real commands, a real SQLite store); the rest is cheap."""

from __future__ import annotations

import getpass
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from matplotlib.contour import ContourSet
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from sa2vp.data import read_manifest, split_dir
from sa2vp.engine import load_artifact, predict
from sa2vp.engine.mlflow_model import MODEL_NAME, PROBABILITY_PREFIX
from sa2vp.figures import tuning_figures
from sa2vp.models import search_space
from sa2vp.settings import TrackingSettings, load_settings
from sa2vp.tracking import source_tags, start_run, trial_run_name
from tests.train_fixtures import SA2VP, TINY_PARAMS, digits_root, experiment_id, invoke_sa2vp  # noqa: F401  (fixtures)


@dataclass
class Store:
    project: Path
    client: MlflowClient
    experiment: Any
    train: Any  # the training's run
    parent: Any  # the study's run
    trials: list[Any]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> Store:
    """`sa2vp train` (1 epoch, with its MLflow model) and `sa2vp tune` (1 trial of 1 epoch) in one project
    folder, with the default relative store `sqlite:///mlflow.db`."""
    project = tmp_path_factory.mktemp("mlflow-project")
    params = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    params["data"]["root"] = str(digits_root)
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    invoke_sa2vp(project, "train", "--epochs", "1", "--set", "tracking.log_model=true")
    invoke_sa2vp(
        project,
        "tune",
        "--n-trials",
        "1",
        "--set",
        "tune.epochs=1",
        "--study-name",
        "s",
        "--storage",
        "runs/study.journal",
    )
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment(experiment_id(client))
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    (parent,) = [run for run in runs if run.info.run_name == "tune-s"]
    trials = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    (train,) = [run for run in runs if run.info.run_id not in {parent.info.run_id, *(t.info.run_id for t in trials)}]
    return Store(project, client, experiment, train, parent, trials)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty store named by its absolute path, made once (MLflow takes seconds to make a database); each
    test logs to an experiment of its own."""
    folder = tmp_path_factory.mktemp("scratch-store")
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder


def _settings(folder: Path, experiment: str) -> TrackingSettings:
    return TrackingSettings(uri=f"sqlite:///{folder / 'mlflow.db'}", experiment=experiment)


# --- 7: the experiment, run names, dataset inputs, source tags ----------------------------------------------


def test_experiments_sa2vp_logs_to_are_model_training_experiments(store: Store, scratch: Path) -> None:
    assert store.experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment made before (by MLflow, or an older sa2vp) is marked when sa2vp logs to it ...
    client = MlflowClient(_settings(scratch, "old").uri)
    old = client.create_experiment("old")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("old", "chosen"):
        start_run(_settings(scratch, name), "r").finish()
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    # ... unless a person chose its kind
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_trial_and_study_runs_are_named_by_what_they_try(store: Store) -> None:
    assert store.parent.info.run_name == "tune-s" and len(store.trials) == 1
    study = optuna.load_study(
        study_name="s",
        storage=optuna.storages.JournalStorage(JournalFileBackend(str(store.project / "runs/study.journal"))),
    )
    names = {run.info.run_id: run.info.run_name for run in store.trials}
    for trial in study.trials:
        expected = trial_run_name(trial.number, trial.params)
        assert names[trial.user_attrs["mlflow_run_id"]] == expected
        assert expected.startswith(f"trial-{trial.number} γ=") and " λ=" in expected
    tried = {"model.sa2vp.gamma": 0.2134, "model.sa2vp.window": 5, "train.lr": 0.003}
    assert trial_run_name(3, tried) == "trial-3 γ=0.21 c=5 lr=3e-3"
    assert (
        trial_run_name(0, {"model.sa2vp.lam": 0.8, "train.lr": 2.5e-4, "model.vpt.tokens": 10})
        == "trial-0 λ=0.8 lr=2.5e-4 tokens=10"
    )


def test_the_splits_a_run_reads_are_its_dataset_inputs(store: Store, digits_root: Path) -> None:
    folder = split_dir(load_settings(store.project / "params.yaml").data)
    manifest = read_manifest(folder)
    digest = manifest.data["content_hash"].removeprefix("sha256:")[:36]

    def inputs(run: Any) -> dict[str, tuple[str, str, str, int]]:
        found = {}
        for item in run.inputs.dataset_inputs:
            (context,) = [tag.value for tag in item.tags if tag.key == "mlflow.data.context"]
            dataset = item.dataset
            found[context] = (
                dataset.name,
                dataset.digest,
                json.loads(dataset.source)["uri"],
                json.loads(dataset.profile)["num_rows"],
            )
        return found

    counts = {split: entry["count"] for split, entry in manifest.data["splits"].items()}
    assert inputs(store.train) == {
        role: (f"digits/{role}", digest, str(folder.resolve()), counts[role]) for role in ("train", "val", "test")
    }
    assert all(set(inputs(trial)) == {"train", "val"} for trial in store.trials)  # trials skip the test split


def test_runs_say_which_command_and_user_made_them(
    store: Store, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for run in (store.train, store.parent, *store.trials):
        tags = run.data.tags
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"] == getpass.getuser()
        assert tags["mlflow.source.name"]
    monkeypatch.setattr("sys.argv", ["/venv/bin/sa2vp", "suite", "run", "digits", "--set", "x=1"])
    assert source_tags()["mlflow.source.name"] == "sa2vp suite run digits"
    # from inside a git checkout (the tests run in this repository), the commit
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        run = start_run(_settings(scratch, "git"), "r")
        run.finish()
        assert MlflowClient(run.uri).get_run(run.run_id).data.tags["mlflow.source.git.commit"] == head.stdout.strip()


# --- 8: the model as an MLflow model -----------------------------------------------------------------------


def test_the_model_is_an_mlflow_model_that_predicts_like_sa2vp_predict(
    store: Store,
    digits_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_id = store.train.info.run_id
    (logged,) = store.client.search_logged_models([store.experiment.experiment_id])
    assert logged.name == MODEL_NAME and logged.source_run_id == run_id and logged.status == LoggedModelStatus.READY
    images = sorted(digits_root.rglob("*.png"))[:5]
    # The store's artifact paths are relative to its folder: read it from there, as a user in the project does.
    monkeypatch.chdir(store.project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store.project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/{MODEL_NAME}")
    frame = model.predict(pd.DataFrame({"image": [path.read_bytes() for path in images]}))

    loaded = load_artifact(store.project / "runs/train/model")
    expected = predict(loaded, images, top_k=len(loaded.classes))
    assert list(frame["label"]) == [prediction.top[0][0] for prediction in expected]
    for row, prediction in zip(frame.to_dict("records"), expected, strict=True):
        assert {name: row[PROBABILITY_PREFIX + name] for name in loaded.classes} == pytest.approx(
            dict(prediction.top), abs=1e-7
        )

    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{MODEL_NAME}"))
    assert not list(local.rglob("*.pkl"))  # a model from code: nothing unpickled, weights from safetensors
    assert (local / "artifacts/model/model.safetensors").is_file() and (local / "code/sa2vp/__init__.py").is_file()
    requirements = (local / "requirements.txt").read_text().split()
    assert {f"{name}=={version(name)}" for name in ("torch", "timm", "safetensors", "pillow", "mlflow")} <= set(
        requirements
    )
    info = mlflow.models.get_model_info(f"runs:/{run_id}/{MODEL_NAME}")
    assert info.signature.inputs.input_names() == ["image"] and info.saved_input_example_info
    assert TrackingSettings().log_model  # on by default; trials (their model is not kept) log none
    assert all(not trial.outputs.model_outputs for trial in store.trials)


# --- 9: the tuning figures ---------------------------------------------------------------------------------


def _study() -> optuna.Study:
    """Twelve trials over SA²VP's space (two pruned); windows 1, 3 and 7 tried, never 5."""
    distributions = {
        "model.sa2vp.gamma": FloatDistribution(0.01, 2.0, log=True),
        "model.sa2vp.lam": FloatDistribution(0.5, 1.0),
        "model.sa2vp.window": CategoricalDistribution([1, 3, 5, 7]),
        "train.lr": FloatDistribution(1e-4, 2e-2, log=True),
    }
    study = optuna.create_study(direction="maximize", study_name="a-study-name-long-enough-to-need-room")
    rng = np.random.default_rng(0)
    for number in range(12):
        params = {
            "model.sa2vp.gamma": float(10 ** rng.uniform(-2, 0.3)),
            "model.sa2vp.lam": float(rng.uniform(0.5, 1)),
            "model.sa2vp.window": [1, 3, 7][number % 3],
            "train.lr": float(10 ** rng.uniform(-4, -1.7)),
        }
        value = 0.5 + 0.1 * (params["model.sa2vp.window"] == 3) + float(rng.uniform(0, 0.05))
        state = TrialState.PRUNED if number in (4, 9) else TrialState.COMPLETE
        study.add_trial(
            create_trial(
                params=params,
                distributions=distributions,
                state=state,
                value=value if state == TrialState.COMPLETE else None,
                intermediate_values={1: value},
            )
        )
    return study


def test_tuning_figures_are_readable(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = tuning_figures(_study(), search_space("sa2vp"))
    assert set(figures) == {"optimization_history.png", "param_importances.png", "pair_gamma_window.png"}
    for figure in figures.values():
        figure.canvas.draw()

    (history,) = figures["optimization_history.png"].axes
    low, high = history.get_xlim()
    ticks = [tick for tick in history.get_xticks() if low <= tick <= high]
    assert ticks and all(float(tick).is_integer() for tick in ticks)  # trial numbers, not 0.5 steps

    importances = figures["param_importances.png"]
    (axes,) = importances.axes
    box = importances.bbox
    for label in axes.get_yticklabels():  # the settings' names inside the picture, not cut off on the left
        extent = label.get_window_extent()
        assert extent.x0 >= box.x0 and extent.x1 <= box.x1, label.get_text()
    assert {label.get_text() for label in axes.get_yticklabels()} >= {"model.sa2vp.gamma (γ)", "model.sa2vp.window (c)"}

    pair = figures["pair_gamma_window.png"]
    axes = pair.axes[0]
    assert [label.get_text() for label in axes.get_yticklabels()] == ["1", "3", "7"]  # tried odd windows only
    assert not any(isinstance(item, ContourSet) for item in axes.get_children())  # no interpolation
    # the real study's figures, logged to its run (γ and λ searched there: window and lr are pinned; one trial
    # is too few for importances)
    monkeypatch.chdir(store.project)  # where its relative artifact paths lead
    logged = {item.path for item in store.client.list_artifacts(store.parent.info.run_id, "tuning")}
    assert logged == {"tuning/optimization_history.png", "tuning/pair_gamma_lam.png"}


# --- 10: a store that can move -----------------------------------------------------------------------------


def test_a_copied_project_still_opens_its_artifacts(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert store.experiment.artifact_location == f"mlruns/{store.experiment.experiment_id}"
    copy = Path(shutil.copytree(store.project, tmp_path / "moved"))
    away = store.project.rename(store.project.with_name(store.project.name + "-away"))  # as if deleted
    try:
        monkeypatch.chdir(copy)
        client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
        run_id = store.train.info.run_id
        downloaded = Path(client.download_artifacts(run_id, "model/model.json", str(tmp_path)))
        assert downloaded.read_bytes() == (copy / "runs/train/model/model.json").read_bytes()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/{MODEL_NAME}", model_config={"device": "cpu"})
        assert model.model_config == {"backbone_weights": None, "device": "cpu"}  # what a user may override
        image = next(iter(sorted(Path(load_settings(copy / "params.yaml").data.root).rglob("*.png"))))
        assert len(model.predict(pd.DataFrame({"image": [image.read_bytes()]}))) == 1
    finally:
        away.rename(store.project)


def test_a_store_given_by_absolute_path_keeps_its_artifacts_beside_it(scratch: Path, tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    note.write_text("hello")
    run = start_run(_settings(scratch, "absolute"), "r")  # the current folder (the repository) is elsewhere
    run.log_file(note)
    run.finish()
    experiment_id = MlflowClient(run.uri).get_run(run.run_id).info.experiment_id
    assert (scratch / "mlruns" / experiment_id / run.run_id / "artifacts/note.txt").read_text() == "hello"


# --- 11: sa2vp ui ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lines(stream: Any) -> Queue[str]:
    lines: Queue[str] = Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_sa2vp_ui_prints_its_address_once_the_server_answers(store: Store) -> None:
    port = _free_port()
    ui = subprocess.Popen(
        [SA2VP, "ui", "--port", str(port)],
        cwd=store.project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = _lines(ui.stdout), _lines(ui.stderr)
        deadline = time.monotonic() + 150
        line = ""
        while "MLflow UI for" not in line:
            assert time.monotonic() < deadline and ui.poll() is None, "sa2vp ui printed no address"
            try:
                line = stdout.get(timeout=1)
            except Empty:
                continue
        # printed only now: the server answers at once
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert response.status == 200
        experiment_id = store.experiment.experiment_id
        assert f"http://127.0.0.1:{port}/#/experiments/{experiment_id}?workflowType=machine_learning" in line
        assert "starting the MLflow UI" in stderr.get(timeout=5)
        # the server runs in the store's folder, where its relative artifact paths lead
        query = f"path=model/model.json&run_uuid={store.train.info.run_id}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/get-artifact?{query}", timeout=30) as response:
            assert response.read() == (store.project / "runs/train/model/model.json").read_bytes()
    finally:
        ui.send_signal(signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ui.kill()
            ui.wait()


def test_sa2vp_ui_on_a_busy_port_is_one_line_at_once(store: Store) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        done = invoke_sa2vp(store.project, "ui", "--port", str(port), check=False)
    assert done.exit_code == 2 and time.monotonic() - start < 15
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and f"127.0.0.1:{port} is in use" in done.stderr
