"""The declarative pipeline for real: `dvc repro` in a temporary copy of the repository (tiny budget), then
the MLflow store it filled, DVC's metrics, and a second `dvc repro` that has nothing to do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "backbone.model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "backbone.pretrain": {"images_per_class": 20, "eval_images_per_class": 5, "epochs": 1, "classes": 8},
    "train.epochs": 1,
    "tune.n_trials": 2,
    "tune.epochs": 1,
}


def _copy_repository(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def _set(params: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=project, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = _copy_repository(tmp_path_factory.mktemp("repo"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in TINY.items():
        _set(params, key, value)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc(project, "repro")
    return project


def test_dvc_repro_fills_mlflow_with_the_tuning_study_its_trials_and_the_final_run(reproduced: Path) -> None:
    client = MlflowClient(f"sqlite:///{reproduced / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sa2vp")
    runs = client.search_runs([experiment.experiment_id])
    by_name = {run.info.run_name: run for run in runs}
    (parent,) = [run for name, run in by_name.items() if name.startswith("tune-")]
    trials = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2
    assert "best_val_top1" in parent.data.metrics and "best.model.gamma" in parent.data.params
    assert {"tuning/optimization_history.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id, "tuning")}
    finals = [run for run in runs if run.data.params.get("train.train_split") == "trainval"
              and run.data.params.get("model.method") == "sa2vp"]
    assert len(finals) == 1 and "test/top1" in finals[0].data.metrics
    assert {a.path for a in client.list_artifacts(finals[0].info.run_id, "model")} == {
        "model/model.json", "model/model.safetensors"}
    best = yaml.safe_load((reproduced / "runs/tune/best.yaml").read_text())["settings"]
    assert float(finals[0].data.params["model.gamma"]) == pytest.approx(best["model.gamma"])


def test_dvc_metrics_and_a_second_repro_that_does_nothing(reproduced: Path) -> None:
    metrics = json.loads((reproduced / "metrics/sa2vp.json").read_text())
    assert 0.0 <= metrics["test"]["top1"] <= 1.0
    assert json.loads((reproduced / "metrics/linear.json").read_text())["test"]["top1"] >= 0.0
    shown = _dvc(reproduced, "metrics", "show", "--json")
    assert "metrics/sa2vp.json" in shown.stdout
    again = _dvc(reproduced, "repro")
    assert "Running stage" not in again.stdout, again.stdout
    status = _dvc(reproduced, "status")
    assert "up to date" in status.stdout.lower()
