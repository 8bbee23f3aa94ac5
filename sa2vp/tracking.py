"""MLflow tracking: one run per training, nested trial runs under a tuning run, params, curves, figures, tags.

Everything goes through an explicit `MlflowClient` and run id (no global "active run"), so tuning can keep a
parent run open while its trials log their own nested runs. `tracking.enabled: false` gives a disabled
`Run` whose methods do nothing.
"""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sa2vp.errors import TrackingError
from sa2vp.settings import TrackingSettings

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch call


def _logged(method: Any) -> Any:
    """A logging method that does nothing on a disabled run (tracking.enabled=false)."""

    @functools.wraps(method)
    def wrapper(self: Run, *args: Any, **kwargs: Any) -> Any:
        return None if self.client is None else method(self, *args, **kwargs)

    return wrapper


class Run:
    """An MLflow run, open until `finish`; with `client=None`, a disabled run whose methods do nothing."""

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client = client
        self.run_id = run_id
        self.uri = uri

    @_logged
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, _param_value(value)) for key, value in params.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + BATCH])

    @_logged
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, metrics=items[start:start + BATCH])

    @_logged
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])

    @_logged
    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    @_logged
    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        columns = {key: [row[key] for row in rows] for key in (rows[0] if rows else {})}
        self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    @_logged
    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    @_logged
    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_logged
    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    @_logged
    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    @property
    def url(self) -> str:
        """Where to look at the run: the server's page, or the `sa2vp ui` hint for a local store."""
        if self.client is None:
            return "(tracking disabled)"
        run = self.client.get_run(self.run_id)
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{self.run_id}"
        return f"run {self.run_id} in {self.uri} (browse with `sa2vp ui`)"


def disabled_run() -> Run:
    """tracking.enabled=false: the same interface, nothing logged."""
    return Run(None, "", "")


def start_run(
    settings: TrackingSettings,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Run:
    """A new run in `settings.experiment` (created if needed), nested under `parent_run_id` if given; or the
    existing run `resume_run_id`, reopened (a resumed training continues its own run)."""
    if not settings.enabled:
        return disabled_run()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = absolute_uri(settings.uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        if resume_run_id is not None:
            client.update_run(resume_run_id, status="RUNNING")
            return Run(client, resume_run_id, uri)
        experiment = client.get_experiment_by_name(settings.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(settings.experiment)
        all_tags = {**git_tags(), **{k: str(v) for k, v in (tags or {}).items() if v is not None}}
        if parent_run_id is not None:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"tracking.uri={settings.uri!r}: cannot log to MLflow ({exc}); check the URI or the "
                            "server, or set tracking.enabled=false") from exc
    return Run(client, run.info.run_id, uri)


def absolute_uri(uri: str) -> str:
    """A local store's URI with its path made absolute against the current folder. MLflow caches stores by
    URI for the life of the process, so a relative `sqlite:///mlflow.db` would keep pointing at the folder
    of its first use after a chdir (notebooks, tests running commands in-process)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/") and uri != f"{prefix}:memory:":
        return prefix + str(Path.cwd() / uri[len(prefix):])
    return uri


def git_tags(cwd: Path | None = None) -> dict[str, str]:
    """The commit the code ran from (and whether the tree had changes), as MLflow's own source tags."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    if commit.returncode != 0:
        return {}
    return {"mlflow.source.git.commit": commit.stdout.strip(), "git_dirty": str(bool(dirty.stdout.strip())).lower()}


def _param_value(value: Any) -> str:
    """Settings as params: lists, mappings and null as JSON (readable and parseable), the rest as str."""
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, type(None))) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 1] + "…"
