"""MLflow tracking: one run per training, nested trial runs under a tuning run, params, curves, figures, tags.

Everything goes through an explicit `MlflowClient` and run id (no global "active run"), so tuning can keep a
parent run open while its trials log their own nested runs. `tracking.enabled: false` gives a disabled
`Run` whose methods do nothing.

A run is tagged with the process that owns it (pid, host) and, for a training, its output folder: a run whose
process was killed before it could close it is found by the next run of the same output and marked KILLED
instead of staying RUNNING forever. `check_store` fails in a moment when the store cannot be used, before
a command prepares data or trains.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sa2vp.errors import TrackingError, one_line
from sa2vp.folders import process_alive, writable_problem
from sa2vp.settings import TrackingSettings

log = logging.getLogger("sa2vp.tracking")

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch call
# Who owns a run: the process that has to close it, and (for a training) the folder it writes.
PID_TAG, HOST_TAG, OUTPUT_TAG = "sa2vp.pid", "sa2vp.host", "sa2vp.output"
PROBE_TIMEOUT = 5.0  # seconds a tracking server gets to answer the up-front check
STOP_GRACE = 10.0  # seconds the UI's processes get to end after SIGTERM before they are killed


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

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric `key` is already logged (none on a disabled run)."""
        if self.client is None:
            return set()
        return {metric.step for metric in self.client.get_metric_history(self.run_id, key)}

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
    output: Path | None = None,
) -> Run:
    """A new run in `settings.experiment` (created if needed), nested under `parent_run_id` if given; or the
    existing run `resume_run_id`, reopened (a resumed training continues its own run). Either way the run is
    tagged with this process; with `output` (a training's folder) also with the folder, and the runs of that
    folder left RUNNING by a process that is gone are marked KILLED."""
    if not settings.enabled:
        return disabled_run()
    from mlflow import MlflowClient
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    uri = absolute_uri(settings.uri)
    owner = owner_tags(output)
    try:
        client = MlflowClient(tracking_uri=uri)
        if resume_run_id is not None:
            run_id = resume_run_id
            experiment_id = client.get_run(run_id).info.experiment_id
            client.update_run(run_id, status="RUNNING")
            client.log_batch(run_id, tags=[RunTag(key, value) for key, value in owner.items()])
        else:
            experiment = client.get_experiment_by_name(settings.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(settings.experiment)
            all_tags = {**git_tags(), **{k: str(v) for k, v in (tags or {}).items() if v is not None}, **owner}
            if parent_run_id is not None:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        if output is not None:
            end_stale_runs(client, experiment_id, output, keep=run_id)
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"tracking.uri={settings.uri!r}: cannot log to MLflow ({one_line(exc)}); check the URI "
                            "or the server, or set tracking.enabled=false") from exc
    return Run(client, run_id, uri)


def owner_tags(output: Path | None = None) -> dict[str, str]:
    """The tags that say which process owns a run (and which folder it writes, if given)."""
    tags = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    if output is not None:
        tags[OUTPUT_TAG] = str(output)
    return tags


def end_stale_runs(client: Any, experiment_id: str, output: Path, keep: str | None = None) -> list[str]:
    """Mark KILLED the runs of `output` that are still RUNNING although their process on this machine is gone
    (killed before it could close its run); returns their ids. Runs of other machines are left alone: whether
    their process lives cannot be told from here."""
    host = socket.gethostname()
    ended = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        tags, run_id = run.data.tags, run.info.run_id
        pid = tags.get(PID_TAG, "")
        if run_id == keep or tags.get(OUTPUT_TAG) != str(output) or tags.get(HOST_TAG) != host:
            continue
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        client.set_tag(run_id, "error", f"process {pid} on {host} ended without closing the run (killed)")
        client.set_terminated(run_id, "KILLED")
        log.info("run %s of %s was left RUNNING by process %s, which is gone: marked KILLED", run_id, output, pid)
        ended.append(run_id)
    return ended


def check_store(uri: str) -> None:
    """Fail at once, in one line, when the tracking store at `uri` cannot be used, so that a command finds out
    before it prepares data or trains (not after an epoch, nor after MLflow's minutes of retries): a local
    store's folder must be writable and an existing database openable; a server must answer."""
    problem = _store_problem(absolute_uri(uri))
    if problem is not None:
        raise TrackingError(f"tracking.uri={uri!r}: {problem}; fix tracking.uri (or the store), or set "
                            "tracking.enabled=false to run without MLflow")


def _store_problem(uri: str) -> str | None:
    from urllib.parse import urlparse

    if uri.startswith(("http://", "https://")):
        return _server_problem(uri)
    if uri.startswith("sqlite:///"):
        return _sqlite_problem(uri[len("sqlite:///"):].partition("?")[0])
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):  # MLflow's file store: a folder
        problem = writable_problem(Path(parsed.path if parsed.scheme else uri))
        return None if problem is None else f"cannot write the store's folder ({problem})"
    return None  # other stores (databricks, postgresql, …): MLflow's own errors say what is wrong


def _sqlite_problem(path: str) -> str | None:
    import sqlite3
    from urllib.parse import quote

    if path in ("", ":memory:"):
        return None
    db = Path(path)
    problem = writable_problem(db.parent)  # SQLite writes its journal beside the database
    if problem is not None:
        return f"cannot write the database's folder ({problem})"
    if not db.exists():
        return None  # MLflow creates it
    if not db.is_file() or not os.access(db, os.R_OK | os.W_OK):
        return f"{db} is not a readable and writable file"
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(db))}?mode=rw", uri=True, timeout=5)) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        return f"cannot open {db} as an SQLite database ({one_line(exc)})"
    return None


def _server_problem(uri: str) -> str | None:
    """One request with a short timeout to the REST API (MLflow's client would retry for minutes)."""
    import urllib.error
    import urllib.request

    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT):
            return None
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return f"the server at {uri} has no MLflow REST API (HTTP 404): not an MLflow tracking server"
        if exc.code >= 500:
            return f"the server at {uri} fails (HTTP {exc.code} {exc.reason})"
        return None  # 401, 403…: it answers; credentials are MLflow's business (MLFLOW_TRACKING_TOKEN, …)
    except (urllib.error.URLError, OSError) as exc:  # refused, unknown host, timed out
        return f"no tracking server answers at {uri} ({getattr(exc, 'reason', exc)})"


def serve_ui(uri: str, port: int) -> int:
    """Run `mlflow ui` on the store at `uri` (bound to 127.0.0.1) until it ends or this process is asked to
    stop; returns its exit code (0 when stopped on request).

    The server and its workers run in a session of their own; SIGTERM, SIGINT and SIGHUP sent to this process
    are passed to that whole process group, so no worker outlives the command (`mlflow ui` itself, stopped
    alone, leaves its workers running)."""
    import shutil
    import sys

    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow")
    if mlflow is None:
        raise TrackingError("the mlflow command is not installed in this environment")
    command = [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    server: subprocess.Popen[bytes] | None = None
    stopped: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        stopped.append(signum)
        if server is not None:
            _signal_group(server.pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    # Handlers first: a stop that arrives while the server starts must not leave it running.
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        server = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        if stopped:
            _signal_group(server.pid, signal.SIGTERM)
        code = server.wait()
    finally:
        if server is not None:
            _stop_group(server.pid)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if stopped else code


def _signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to process group `pgid`; False when no process is left in it."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def _stop_group(pgid: int) -> None:
    """End every process left in group `pgid`: SIGTERM, STOP_GRACE seconds to go, then SIGKILL."""
    import time

    deadline = time.monotonic() + STOP_GRACE
    if not _signal_group(pgid, signal.SIGTERM):
        return
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies waiting to be reaped do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return _signal_group(pgid, 0)
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


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
