"""Shared set-up for the training tests: a tiny random ViT on digits rendered at 16 px, a project folder with
its own params.yaml and MLflow store, and a helper to run the installed `sa2vp` command in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sa2vp.data import prepare
from sa2vp.settings import load_settings

SA2VP = str(Path(sys.executable).with_name("sa2vp"))

TINY_PARAMS: dict[str, Any] = {
    "backbone": {
        "name": "vit_tiny_patch16_224",
        "weights": "random",
        "img_size": 16,
        "model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    },
    "model": {"sa2vp": {"window": 3}},
    "data": {"dataset": "digits", "render_size": 16},
    "train": {"epochs": 3, "batch_size": 64, "warmup_epochs": 1, "lr": 0.01, "num_workers": 0, "output": "runs/train"},
    # log_model: about a second per run, which most tests do not need (tests/test_mlflow_idioms.py does)
    "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "tests", "log_model": False},
}


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits rendered at 16 px and split once per test session."""
    root = tmp_path_factory.mktemp("digits-data")
    prepare(load_settings(None, {"data.dataset": "digits", "data.render_size": 16, "data.root": str(root)}).data)
    return root


@pytest.fixture()
def project(tmp_path: Path, digits_root: Path) -> Path:
    """A project folder: params.yaml of the tiny model, data pointing at the shared digits."""
    params = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    params["data"]["root"] = str(digits_root)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return tmp_path


def run_sa2vp(project: Path, *args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([SA2VP, *args], cwd=project, capture_output=True, text=True, env=env, timeout=300, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"sa2vp {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def tiny_settings(project: Path, **overrides: Any):
    """The project's settings with dotted overrides; paths made absolute (tests do not chdir)."""
    base = {"train.output": str(project / "runs" / "train"), "tracking.uri": f"sqlite:///{project / 'mlflow.db'}"}
    return load_settings(project / "params.yaml", {**base, **overrides})


def experiment_id(client: Any, name: str = "tests") -> str:
    """The id of experiment `name` in the store `client` (an MlflowClient) opens, which must hold it."""
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name!r} in {client.tracking_uri}"
    return str(experiment.experiment_id)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def invoke_sa2vp(project: Path, *args: str, check: bool = True) -> Any:
    """The same Typer app the `sa2vp` script runs, in this process (no interpreter start-up, no re-import of
    torch and timm): for tests about what a command does rather than about the installed script. Library log
    lines go to pytest's log capture here, not to the result's stderr."""
    from typer.testing import CliRunner

    from sa2vp_cli.main import app

    cwd = os.getcwd()
    os.chdir(project)
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(cwd)
    if check and result.exit_code != 0:
        raise AssertionError(
            f"sa2vp {' '.join(args)} exited {result.exit_code}:\n{result.output}\n{result.exception!r}"
        )
    return result
