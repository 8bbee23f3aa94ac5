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

from tests.train_fixtures import SA2VP, digits_root, experiment_id, invoke_sa2vp, project, run_sa2vp  # noqa: F401  (fixtures)


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "ui"])
def test_every_command_has_help(command: str, tmp_path: Path) -> None:
    done = run_sa2vp(tmp_path, command, "--help")
    assert "Usage" in done.stdout and "--help" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--set", "model.sa2vp.window=4"], "model.sa2vp.window: must be an odd integer >= 1"),
        (["train", "--set", "train.precision=fp8"], "train.precision: Input should be"),
        (["train", "--device", "tpu"], "train.device: must be auto, cpu, cuda, cuda:N or mps (got 'tpu')"),
        (["train", "--set", "train.lr=0"], "train.lr: Input should be greater than 0"),
        (["train", "--dataset", "no-such-set"], "no-such-set"),
        (["train", "--resume"], "--resume: no checkpoint to resume from"),
        (["evaluate", "missing/model"], "missing/model: not an sa2vp artifact"),
        (["predict", "missing/model", "x.png"], "missing/model: not an sa2vp artifact"),
    ],
)
def test_a_bad_setting_or_path_is_one_line_exit_2_and_nothing_written(
    project: Path,
    args: list[str],
    message: str,
) -> None:
    # In-process (the same Typer app the `sa2vp` script runs; test_cli_model covers the script itself).
    from typer.testing import CliRunner

    from sa2vp_cli.main import app

    before = sorted(p.name for p in project.iterdir())
    cwd = os.getcwd()
    os.chdir(project)
    try:
        done = CliRunner().invoke(app, args)
    finally:
        os.chdir(cwd)
    assert done.exit_code == 2, done.output
    assert message in done.stderr
    assert done.exception is None or isinstance(done.exception, SystemExit)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert sorted(p.name for p in project.iterdir()) == before  # no runs/, no mlflow.db


def test_train_evaluate_predict_round_trip(project: Path, digits_root: Path) -> None:
    done = run_sa2vp(project, "train", "--epochs", "1")
    assert "epoch 1/1" in done.stderr and "test: top1" in done.stderr  # plain lines when not on a terminal
    metrics = json.loads((project / "runs/train/metrics.json").read_text())
    # the installed script trained; the artifact's use runs in-process (same app, no second start-up)
    evaluated = invoke_sa2vp(project, "evaluate", "runs/train/model", "--split", "test", "--metrics-file", "m.json")
    assert json.loads((project / "m.json").read_text())["test"] == metrics["test"]
    assert f"top-1 {100 * metrics['test']['top1']:.2f} %" in evaluated.stdout
    # The prompt pathway's own accuracy (is it learning?): recorded at the end of training, reproduced alone.
    record = json.loads((project / "runs/train/model/model.json").read_text())
    prompt = record["training"]["test_pathways"]["prompt"]
    assert "test, prompt pathway alone: top1" in done.stderr
    alone = invoke_sa2vp(project, "evaluate", "runs/train/model", "--pathway", "prompt", "--metrics-file", "p.json")
    assert json.loads((project / "p.json").read_text())["test"] == prompt
    assert f"test, prompt pathway: top-1 {100 * prompt['top1']:.2f} %" in alone.stdout
    image = next((digits_root / "digits/images/4").glob("*.png"))
    predicted = invoke_sa2vp(project, "predict", "runs/train/model", str(image), "-k", "3")
    assert image.name in predicted.stdout and predicted.stdout.count("│") >= 3 * 4
    bad = invoke_sa2vp(project, "predict", "runs/train/model", "nope.png", check=False)
    assert bad.exit_code == 2 and "nope.png: no such image file" in bad.stderr


def test_final_trains_as_the_pipeline_spelled_it_out_and_evaluate_writes_the_same_metrics_file(project: Path) -> None:
    common = ["train", "--epochs", "1", "--set", "tracking.enabled=false"]
    # What the root dvc.yaml spelled out before --final: the same run, to the byte.
    spelled = ["--set", "train.train_split=trainval", "--set", "train.val_split=null"]
    invoke_sa2vp(project, *common, "--output", "runs/spelled", *spelled)
    # --final sets the splits whatever else says (here a --set that would validate every epoch)
    invoke_sa2vp(project, *common, "--output", "runs/final", "--final", "--set", "train.val_split=val")
    final, before = project / "runs/final", project / "runs/spelled"
    assert (final / "model/model.safetensors").read_bytes() == (before / "model/model.safetensors").read_bytes()
    splits = json.loads((final / "model/model.json").read_text())["settings"]["train"]
    assert (splits["train_split"], splits["val_split"], splits["test_split"]) == ("trainval", None, "test")
    metrics = (final / "metrics.json").read_text()
    assert metrics == (before / "metrics.json").read_text() and list(json.loads(metrics)) == ["test"]
    # One metrics format: `evaluate --metrics-file` of the test split writes the run's metrics.json again.
    invoke_sa2vp(project, "evaluate", "runs/final/model", "--metrics-file", "m.json")
    assert (project / "m.json").read_text() == metrics


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["state"]["epoch"])
    except Exception:  # not there yet, or being replaced right now
        return 0


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(project: Path) -> None:
    epochs = ["--epochs", "3", "--set", "model.sa2vp.dropout=0.3"]  # dropout: the RNG state must survive too
    run_sa2vp(project, "train", *epochs, "--output", "runs/whole")

    killed = subprocess.Popen(
        [SA2VP, "train", *epochs, "--output", "runs/killed"],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoint = project / "runs/killed/checkpoint.pt"
    deadline = time.monotonic() + 240
    while _checkpoint_epoch(checkpoint) < 1 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    interrupted_at = _checkpoint_epoch(checkpoint)
    assert 1 <= interrupted_at < 3 and not (project / "runs/killed/model").exists()

    run_sa2vp(project, "train", *epochs, "--output", "runs/killed", "--resume")
    whole, resumed = project / "runs/whole", project / "runs/killed"
    assert (resumed / "metrics.json").read_text() == (whole / "metrics.json").read_text()
    assert (resumed / "model/model.safetensors").read_bytes() == (whole / "model/model.safetensors").read_bytes()
    assert _history_without_timing(resumed) == _history_without_timing(whole)
    # The resumed run continued its own MLflow run: one run, every epoch logged once per step.
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([experiment_id(client, "tests")])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def _history_without_timing(output: Path) -> list[dict[str, str]]:
    import csv

    with (output / "history.csv").open() as file:
        return [{k: v for k, v in row.items() if k != "train/images_per_second"} for row in csv.DictReader(file)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_training_logs_to_a_real_tracking_server_started_by_sa2vp_ui(project: Path) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [SA2VP, "ui", "--port", str(port), "--set", "tracking.uri=sqlite:///server.db"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
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
                    output = server.stdout.read() if server.stdout is not None else ""
                    raise AssertionError(f"mlflow server did not start:\n{output}") from None
                time.sleep(0.5)
        done = invoke_sa2vp(project, "train", "--epochs", "1", "--set", f"tracking.uri={url}")
        client = MlflowClient(url)
        (run,) = client.search_runs([experiment_id(client, "tests")])
        page = f"{url}/#/experiments/{run.info.experiment_id}?workflowType=machine_learning"  # not `sa2vp ui`
        assert f"MLflow: run {run.info.run_id} in {url} (browse: {page})\n" in done.stdout, done.stdout
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


def test_a_swin_backbone_trains_and_evaluates_through_the_same_commands(project: Path) -> None:
    swin = json.dumps(
        {"patch_size": 2, "embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4], "window_size": 2}
    )
    invoke_sa2vp(
        project,
        "train",
        "--epochs",
        "1",
        "--set",
        "backbone.name=swin_tiny_patch4_window7_224",
        "--set",
        f"backbone.model_kwargs={swin}",
        "--set",
        "model.sa2vp.gamma=0.5",
    )
    assert "loss_prompt" in (project / "runs/train/history.csv").read_text().splitlines()[0]  # both pathways
    record = json.loads((project / "runs/train/model/model.json").read_text())
    assert record["backbone"]["name"] == "swin_tiny_patch4_window7_224"
    evaluated = invoke_sa2vp(project, "evaluate", "runs/train/model")
    assert f"top-1 {100 * record['training']['test']['top1']:.2f} %" in evaluated.stdout


def test_tune_records_failed_trials_goes_on_and_resumes_its_study(project: Path) -> None:
    import optuna
    import yaml
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    # The enqueued first trial is the current settings (lr 0.01); a trial the sampler gives lr 1e30 diverges and
    # must not stop the study.
    space = json.dumps(
        {
            "model.sa2vp.gamma": {"type": "float", "low": 0.01, "high": 2.0, "log": True},
            "train.lr": {"type": "choice", "choices": [0.01, 1e30]},
        }
    )
    common = [
        "--set",
        "tune.epochs=1",
        "--set",
        "tune.sampler_seed=6",
        "--set",
        f"tune.space={space}",
        "--storage",
        "runs/study.journal",
        "--study-name",
        "s",
    ]
    done = invoke_sa2vp(project, "tune", "--n-trials", "2", *common)
    assert "model.sa2vp.gamma" in done.stdout and "val top-1" in done.stdout
    best = yaml.safe_load((project / "runs/tune/best.yaml").read_text())
    assert best["trial"] == 0 and best["settings"]["train.lr"] == 0.01 and best["settings"]["model.sa2vp.gamma"] == 0.1
    invoke_sa2vp(project, "tune", "--n-trials", "3", *common)  # resumes: 3 trials in all, one more
    study = optuna.load_study(
        study_name="s", storage=JournalStorage(JournalFileBackend(str(project / "runs/study.journal")))
    )
    states = [(float(t.params["train.lr"]), t.state.name) for t in study.trials]  # YAML reads 1e+30 as text
    assert len(states) == 3 and states[0] == (0.01, "COMPLETE") and ((1e30, "FAIL") in states), states
    assert all(state == ("COMPLETE" if lr == 0.01 else "FAIL") for lr, state in states), states
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([experiment_id(client, "tests")])
    parents = [r for r in runs if r.info.run_name.startswith("tune-")]
    assert len(parents) == 1 and len(runs) == 1 + 3  # one parent run for the study, three nested trial runs
    failed = sum(state == "FAIL" for _, state in states)
    assert sum(r.info.status == "FAILED" for r in runs) == failed


@pytest.mark.parametrize("method", ["linear", "full", "vpt-shallow", "vpt-deep", "lora", "adaptformer"])
def test_every_method_trains_and_evaluates_through_the_commands(project: Path, method: str) -> None:
    invoke_sa2vp(
        project, "train", "--epochs", "1", "--set", f"model.method={method}", "--set", "tracking.enabled=false"
    )
    record = json.loads((project / "runs/train/model/model.json").read_text())
    assert record["trainable"]["parameters"] > 0 or method == "linear"
    evaluated = invoke_sa2vp(project, "evaluate", "runs/train/model", "--metrics-file", "m.json")
    assert json.loads((project / "m.json").read_text())["test"] == record["training"]["test"]
    assert f"top-1 {100 * record['training']['test']['top1']:.2f} %" in evaluated.stdout
    assert record["training"]["test_pathways"] == {}
    other = invoke_sa2vp(project, "evaluate", "runs/train/model", "--pathway", "prompt", check=False)
    assert other.exit_code == 2 and f"a {method} model's auxiliary pathways are: none" in other.stderr
