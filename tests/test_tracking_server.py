"""One tracking server for everyone (issue 17): `mlflow server` with a PostgreSQL backend store and served
artifacts (`--artifacts-destination`, proxied as `mlflow-artifacts:/`), started on loopback once for the module;
two `sa2vp train` processes log to it at the same time; the model artifact comes back through the server and
`sa2vp evaluate runs:/<run id>/model` reproduces the recorded test metrics. And, without a server, an artifact
URI that cannot be read is one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from sa2vp.settings import TrackingSettings
from sa2vp.tracking import MACHINE_LEARNING_VIEW, start_run
from tests.postgres_server import PostgresServer, postgres  # noqa: F401  (fixture)
from tests.train_fixtures import SA2VP, TINY_PARAMS, digits_root, invoke_sa2vp  # noqa: F401  (fixtures)

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
SERVER_START = 120.0  # seconds the server gets to answer (about 10 s on an idle 2-core machine)
EXPERIMENT = "tests"


@dataclass
class TrackingServer:
    address: str
    artifacts: Path  # --artifacts-destination: where the server (never the client) writes artifacts


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/health", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def tracking_server(
    postgres: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TrackingServer]:
    """`mlflow server` as a team would run it: PostgreSQL backend, artifacts served from a folder of its own.
    One worker and no GenAI job runner: the tests need neither, and they are most of the start-up."""
    artifacts = tmp_path_factory.mktemp("served-artifacts")
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    port = _free_port()
    address = f"http://127.0.0.1:{port}"
    command = [
        MLFLOW,
        "server",
        "--backend-store-uri",
        postgres.create_database("mlflow"),
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("wb") as output:
        server = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=environment
        )
    try:
        deadline = time.monotonic() + SERVER_START
        while not _answers(address):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer on {address}:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield TrackingServer(address, artifacts)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its worker
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@dataclass
class Trained:
    project: Path
    client: MlflowClient
    experiment_id: str
    outputs: dict[str, str]  # each training's stdout, by its output folder
    run_ids: dict[str, str]  # each training's run id, by its output folder


@pytest.fixture(scope="module")
def trained(tracking_server: TrackingServer, tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> Trained:
    """Two `sa2vp train` processes, started together, logging to the server (one also logs its MLflow model)."""
    project = tmp_path_factory.mktemp("server-project")
    params = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    params["data"]["root"] = str(digits_root)
    params["tracking"] = {"uri": tracking_server.address, "experiment": EXPERIMENT, "log_model": False}
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    extra = {"runs/a": ["--set", "tracking.log_model=true"], "runs/b": []}
    workers = {
        output: subprocess.Popen(
            [SA2VP, "train", "--epochs", "1", "--output", output, *more],
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        for output, more in extra.items()
    }
    outputs, errors = {}, {}
    try:
        for output, worker in workers.items():
            outputs[output], errors[output] = worker.communicate(timeout=300)
    finally:
        for worker in workers.values():
            if worker.poll() is None:  # the other failed or took too long
                worker.kill()
                worker.wait()
    for output, worker in workers.items():
        assert worker.returncode == 0, f"sa2vp train --output {output} exited {worker.returncode}:\n{errors[output]}"
    client = MlflowClient(tracking_server.address)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    run_ids = {output: _printed_run_id(text) for output, text in outputs.items()}
    return Trained(project, client, experiment.experiment_id, outputs, run_ids)


def _printed_run_id(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("MLflow: run ")]
    assert len(lines) == 1, stdout
    return lines[0].split()[2]


@pytest.mark.slow
def test_two_trainings_log_to_the_server_and_their_artifacts_go_through_it(
    tracking_server: TrackingServer, trained: Trained
) -> None:
    client = trained.client
    runs = {run.info.run_id: run for run in client.search_runs([trained.experiment_id])}
    assert set(runs) == set(trained.run_ids.values())  # both, in one experiment (they raced to create it)
    for output, run_id in trained.run_ids.items():
        run = runs[run_id]
        assert run.info.status == "FINISHED" and "test/top1" in run.data.metrics
        assert run.data.tags["sa2vp.output"].endswith(output)
        # Proxied: the client sent the files to the server, which wrote them under its destination.
        assert run.info.artifact_uri == f"mlflow-artifacts:/{trained.experiment_id}/{run_id}/artifacts"
        served = tracking_server.artifacts / trained.experiment_id / run_id / "artifacts" / "model"
        for name in ("model.json", "model.safetensors"):
            assert (served / name).read_bytes() == (trained.project / output / "model" / name).read_bytes()
    # The page the UI lists the runs on, in its model-training view; not `sa2vp ui`, which a server needs not.
    page = f"{tracking_server.address}/#/experiments/{trained.experiment_id}?{MACHINE_LEARNING_VIEW}"
    for stdout in trained.outputs.values():
        assert f"(browse: {page})" in stdout and "sa2vp ui" not in stdout, stdout
        assert "View run" not in stdout, stdout  # MLflow's own links, to its GenAI view: not printed as well
    with urllib.request.urlopen(tracking_server.address, timeout=10) as response:
        assert response.status == 200 and b"<html" in response.read().lower()  # the UI itself


@pytest.mark.slow
@pytest.mark.parametrize("what", ["model", "classifier", "served"])
def test_evaluate_an_artifact_uri_reproduces_the_recorded_test_metrics(
    tracking_server: TrackingServer, trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """The sa2vp folder (`runs:/<id>/model`), the MLflow model holding it (`runs:/<id>/classifier`), or its
    served address (`mlflow-artifacts:/…`): downloaded through the server, loaded without pickle, and the
    recorded test metrics come back exactly."""
    run_id = trained.run_ids["runs/a"]  # the one with its MLflow model
    uri = {
        "model": f"runs:/{run_id}/model",
        "classifier": f"runs:/{run_id}/classifier",
        "served": f"mlflow-artifacts:/{trained.experiment_id}/{run_id}/artifacts/model",
    }[what]
    metrics = tmp_path / "metrics.json"
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    # In the project, the server is its tracking.uri; elsewhere it is named on the command line.
    where = ["--tracking-uri", tracking_server.address] if what != "model" else []
    folder = trained.project if what == "model" else tmp_path
    done = invoke_sa2vp(folder, "evaluate", uri, *where, "--metrics-file", str(metrics))
    recorded = trained.client.get_run(run_id).data.metrics
    assert json.loads(metrics.read_text()) == {
        "test": {"top1": recorded["test/top1"], "mean_class": recorded["test/mean_class"]}
    }, done.output
    assert not list(downloads.glob("sa2vp-artifact-*"))  # the download is gone


@pytest.mark.slow
def test_ui_on_a_server_prints_the_servers_own_page(tracking_server: TrackingServer, trained: Trained) -> None:
    done = invoke_sa2vp(trained.project, "ui")
    page = f"{tracking_server.address}/#/experiments/{trained.experiment_id}?{MACHINE_LEARNING_VIEW}"
    assert done.stdout.strip().endswith(page) and len(done.stdout.strip().splitlines()) == 1, done.stdout


def _one_line_exit_2(folder: Path, *args: str) -> str:
    done = invoke_sa2vp(folder, *args, check=False)
    assert done.exit_code == 2, done.output
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr.strip()


def test_an_artifact_uri_that_cannot_be_read_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a local store (no server needed): its artifacts are found from any folder, and what is wrong
    is said in one line naming the URI, never the temporary folder it was downloaded to."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "not-a-model").mkdir()
    (project / "not-a-model" / "model.json").write_text("{}", encoding="utf-8")
    monkeypatch.chdir(project)  # the default relative store: artifact locations relative to its folder
    run = start_run(TrackingSettings(uri="sqlite:///mlflow.db", experiment=EXPERIMENT), "fake")
    run.log_artifacts(project / "not-a-model", "model")
    run.finish()
    store = f"sqlite:///{project / 'mlflow.db'}"

    line = _one_line_exit_2(elsewhere, "evaluate", f"runs:/{run.run_id}/model", "--tracking-uri", store)
    assert line.startswith(f"error: runs:/{run.run_id}/model/model.json: format None"), line  # read, refused
    assert "sa2vp-artifact-" not in line

    missing = "0123456789abcdef0123456789abcdef"
    line = _one_line_exit_2(elsewhere, "evaluate", f"runs:/{missing}/model", "--tracking-uri", store)
    assert line.startswith(f"error: runs:/{missing}/model: cannot download it") and "not found" in line, line

    line = _one_line_exit_2(elsewhere, "predict", f"runs:/{run.run_id}/nothing", "x.png", "--tracking-uri", store)
    assert line.startswith(f"error: runs:/{run.run_id}/nothing: cannot download it"), line

    line = _one_line_exit_2(elsewhere, "evaluate", "mlflow-artifacts:/1/x/model", "--tracking-uri", store)
    assert "a tracking server's artifact" in line and "--tracking-uri http://" in line, line

    line = _one_line_exit_2(elsewhere, "evaluate", f"runs:/{missing}/model", "--tracking-uri", "sqlite:///none.db")
    assert "no MLflow database" in line and not (elsewhere / "none.db").exists(), line  # not made empty

    closed = f"http://127.0.0.1:{_free_port()}"
    line = _one_line_exit_2(elsewhere, "evaluate", f"runs:/{missing}/model", "--tracking-uri", closed)
    assert f"no tracking server answers at {closed}" in line, line
