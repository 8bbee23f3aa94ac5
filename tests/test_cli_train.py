"""`sa2vp train | evaluate | predict | ui` as a user runs them: the installed command in a project folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.train_fixtures import SA2VP, digits_root, project, run_sa2vp  # noqa: F401  (fixtures)


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "ui"])
def test_every_command_has_help(command: str, tmp_path: Path) -> None:
    done = run_sa2vp(tmp_path, command, "--help")
    assert "Usage" in done.stdout and "--help" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--set", "model.window=4"], "model.window: must be an odd integer >= 1"),
        (["train", "--set", "train.precision=fp8"], "train.precision: Input should be"),
        (["train", "--device", "tpu"], "train.device: must be auto, cpu, cuda, cuda:N or mps (got 'tpu')"),
        (["train", "--set", "train.lr=0"], "train.lr: Input should be greater than 0"),
        (["train", "--dataset", "no-such-set"], "no-such-set"),
        (["train", "--resume"], "--resume: no checkpoint to resume from"),
        (["evaluate", "missing/model"], "missing/model: not an sa2vp artifact"),
        (["predict", "missing/model", "x.png"], "missing/model: not an sa2vp artifact"),
    ],
)
def test_a_bad_setting_or_path_is_one_line_exit_2_and_nothing_written(project: Path, args: list[str],  # noqa: F811
                                                                       message: str) -> None:
    before = sorted(p.name for p in project.iterdir())
    done = run_sa2vp(project, *args, check=False)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert sorted(p.name for p in project.iterdir()) == before  # no runs/, no mlflow.db


def test_train_evaluate_predict_round_trip(project: Path, digits_root: Path) -> None:  # noqa: F811
    done = run_sa2vp(project, "train", "--epochs", "2")
    assert "epoch 1/2" in done.stderr and "epoch 2/2" in done.stderr  # plain lines when not on a terminal
    metrics = json.loads((project / "runs/train/metrics.json").read_text())
    evaluated = run_sa2vp(project, "evaluate", "runs/train/model", "--split", "test", "--metrics-file", "m.json")
    assert json.loads((project / "m.json").read_text())["test"] == metrics["test"]
    assert f"top-1 {100 * metrics['test']['top1']:.2f} %" in evaluated.stdout
    image = next((digits_root / "digits/images/4").glob("*.png"))
    predicted = run_sa2vp(project, "predict", "runs/train/model", str(image), "-k", "3")
    assert image.name in predicted.stdout and predicted.stdout.count("│") >= 3 * 4
    bad = run_sa2vp(project, "predict", "runs/train/model", "nope.png", check=False)
    assert bad.returncode == 2 and "nope.png: no such image file" in bad.stderr


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["state"]["epoch"])
    except Exception:  # not there yet, or being replaced right now
        return 0


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(project: Path) -> None:  # noqa: F811
    epochs = ["--epochs", "5", "--set", "model.dropout=0.3"]  # dropout: the RNG state must survive too
    run_sa2vp(project, "train", *epochs, "--output", "runs/whole")

    killed = subprocess.Popen([SA2VP, "train", *epochs, "--output", "runs/killed"], cwd=project,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = project / "runs/killed/checkpoint.pt"
    deadline = time.monotonic() + 240
    while _checkpoint_epoch(checkpoint) < 2 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    interrupted_at = _checkpoint_epoch(checkpoint)
    assert 2 <= interrupted_at < 5 and not (project / "runs/killed/model").exists()

    run_sa2vp(project, "train", *epochs, "--output", "runs/killed", "--resume")
    whole, resumed = project / "runs/whole", project / "runs/killed"
    assert (resumed / "metrics.json").read_text() == (whole / "metrics.json").read_text()
    assert (resumed / "model/model.safetensors").read_bytes() == (whole / "model/model.safetensors").read_bytes()
    assert _history_without_timing(resumed) == _history_without_timing(whole)
    # The resumed run continued its own MLflow run: one run, every epoch logged once per step.
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def _history_without_timing(output: Path) -> list[dict[str, str]]:
    import csv

    with (output / "history.csv").open() as file:
        return [{k: v for k, v in row.items() if k != "train/images_per_second"} for row in csv.DictReader(file)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_training_logs_to_a_real_tracking_server_started_by_sa2vp_ui(project: Path) -> None:  # noqa: F811
    port = _free_port()
    server = subprocess.Popen([SA2VP, "ui", "--port", str(port), "--set", "tracking.uri=sqlite:///server.db"],
                              cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"mlflow server did not start:\n{server.stdout.read()}") from None
                time.sleep(0.5)
        done = run_sa2vp(project, "train", "--epochs", "1", "--set", f"tracking.uri={url}")
        assert url in done.stdout or "MLflow" in done.stdout
        client = MlflowClient(url)
        (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
        assert run.info.status == "FINISHED" and "test/top1" in run.data.metrics
        downloaded = Path(client.download_artifacts(run.info.run_id, "model/model.safetensors", str(project)))
        assert downloaded.read_bytes() == (project / "runs/train/model/model.safetensors").read_bytes()
        assert (project / "server.db").is_file() and not (project / "mlflow.db").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
