"""MLflow tracking: one run per training, nested trial runs under a tuning run, params, curves, figures, tags.

Everything goes through an explicit `MlflowClient` and run id (no global "active run"), so tuning can keep a
parent run open while its trials log their own nested runs. `tracking.enabled: false` gives a disabled
`Run` whose methods do nothing.

A run is tagged with the process that owns it (pid, host) and, for a training, its output folder: a run whose
process was killed before it could close it is found by the next run of the same output and marked KILLED
instead of staying RUNNING forever. `check_store` fails in a moment when the store cannot be used, before
a command prepares data or trains. Runs carry MLflow's source tags (command, user, git commit) and, for a
training, its dataset splits as dataset inputs.

The experiments sa2vp logs to are tagged as model-training experiments (`mlflow.experimentKind`); MLflow
3.17's UI ignores that tag and opens every experiment in its GenAI view unless the page address says
`workflowType=machine_learning`, which the addresses sa2vp prints do (`experiment_page`).

A local SQLite store keeps its artifacts beside itself, in `mlruns/<experiment id>` next to the database file
(MLflow's default is `./mlruns` of whatever folder a process runs in). When tracking.uri names the database by
a relative path (the default `sqlite:///mlflow.db`), the experiments sa2vp creates record that location as the
relative path `mlruns/<id>`, so the project folder can be copied or moved and still open its artifacts. MLflow
resolves a relative location against the current folder, so such a store is read from its own folder:
`sa2vp ui` runs the server there, `Run` writes artifacts from there, and so must `mlflow ui` or a notebook.

A tracking server (`http://…`, e.g. `mlflow server` with a PostgreSQL store and `--artifacts-destination`) decides
where artifacts go itself; with served artifacts the runs' locations are `mlflow-artifacts:/…` and every file
goes through the server. It serves its own UI, whose address sa2vp prints (`browse_address`, `server_page`).
A model artifact can be named by its MLflow URI (`runs:/<run id>/model`, …): `local_artifact` downloads it
through the store into a temporary folder, to be loaded like any other.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sa2vp.errors import ArtifactError, BackboneError, TrackingError, one_line
from sa2vp.folders import process_alive, writable_problem
from sa2vp.settings import SettingsError, TrackingSettings
from sa2vp.stores import one_at_a_time, sqlite_database

log = logging.getLogger("sa2vp.tracking")

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch call
# Who owns a run: the process that has to close it, and (for a training) the folder it writes.
PID_TAG, HOST_TAG, OUTPUT_TAG = "sa2vp.pid", "sa2vp.host", "sa2vp.output"
PROBE_TIMEOUT = 5.0  # seconds a tracking server gets to answer the up-front check
STOP_GRACE = 10.0  # seconds the UI's processes get to end after SIGTERM before they are killed
READY_TIMEOUT = 120.0  # seconds `sa2vp ui` waits for the server to answer
PROGRESS_EVERY = 10.0  # seconds between the lines that say the UI is still starting
# MLflow 3's experiment types: sa2vp's experiments train models (not GenAI); the UI inferred or left the others.
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
REPLACEABLE_KINDS = ("", "no_inferred_type", "genai_development_inferred", "custom_model_development_inferred")
MACHINE_LEARNING_VIEW = "workflowType=machine_learning"  # MLflow 3.17's UI: the runs table, not GenAI traces
ARTIFACTS_FOLDER = "mlruns"  # beside a local store's database
MAX_DIGEST = 36  # MLflow's limit on a dataset digest


def _logged(method: Any) -> Any:
    """A logging method that does nothing on a disabled run (tracking.enabled=false)."""

    @functools.wraps(method)
    def wrapper(self: Run, *args: Any, **kwargs: Any) -> Any:
        return None if self.client is None else method(self, *args, **kwargs)

    return wrapper


class Run:
    """An MLflow run, open until `finish`; with `client=None`, a disabled run whose methods do nothing."""

    def __init__(self, client: Any, run_id: str, uri: str, folder: Path | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.folder = folder  # the store's folder, when the run's artifact location is relative to it

    def _in_store_folder(self) -> contextlib.AbstractContextManager[Any]:
        """Where MLflow must run to find a relative artifact location: the store's folder (a process may have
        changed folder since the store was opened, and a test or a notebook may run elsewhere)."""
        if self.folder is None or Path.cwd() == self.folder:
            return contextlib.nullcontext()
        return contextlib.chdir(self.folder)

    @_logged
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, _param_value(value)) for key, value in params.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + BATCH])

    @_logged
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + BATCH])

    @_logged
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])

    @_logged
    def log_figure(self, figure: Any, artifact_file: str) -> None:
        with self._in_store_folder():
            self.client.log_figure(self.run_id, figure, artifact_file)

    @_logged
    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        columns = {key: [row[key] for row in rows] for key in (rows[0] if rows else {})}
        with self._in_store_folder():
            self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    @_logged
    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        local = str(Path(folder).resolve())  # before a change of folder
        with self._in_store_folder():
            self.client.log_artifacts(self.run_id, local, artifact_path)

    @_logged
    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        local = str(Path(path).resolve())
        with self._in_store_folder():
            self.client.log_artifact(self.run_id, local, artifact_path)

    @_logged
    def log_model(self, artifact: Path) -> None:
        """The sa2vp artifact folder as the run's MLflow model (`sa2vp.engine.mlflow_model`)."""
        from mlflow.exceptions import MlflowException

        from sa2vp.engine.mlflow_model import MODEL_NAME, log_model

        local = Path(artifact).resolve()
        try:
            with self._in_store_folder():
                log_model(self.client, self.run_id, local, {**source_tags(), **git_tags()})
        except (MlflowException, OSError) as exc:
            raise TrackingError(
                f"tracking.uri={self.uri!r}: cannot log the MLflow model {MODEL_NAME!r} of run "
                f"{self.run_id} ({one_line(exc)}); the artifact itself is in {local}; set "
                "tracking.log_model=false to train without it"
            ) from exc

    @_logged
    def log_inputs(self, manifest: Any, splits: Mapping[str, str | None]) -> None:
        """The dataset splits the run reads, as MLflow dataset inputs: `splits` maps a role (train, val, test:
        the input's context) to a split of the split folder whose `manifest` (`sa2vp.data.Manifest`) is given."""
        roles: dict[str, list[str]] = {}
        for role, split in splits.items():
            if split is not None:
                roles.setdefault(split, []).append(role)  # one input per split, even if it has two roles
        datasets = [_dataset_input(manifest, split, ",".join(names)) for split, names in roles.items()]
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, datasets=datasets)
                return
            except Exception as exc:
                # Two runs logging one new dataset at once: the server's insert of the shared dataset row loses
                # the race (a unique-constraint violation); the row exists now, and a retry links to it.
                if attempt == 2 or "dataset_pk" not in str(exc):
                    raise
                time.sleep(0.5)

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric `key` is already logged (none on a disabled run)."""
        if self.client is None:
            return set()
        return {metric.step for metric in self.client.get_metric_history(self.run_id, key)}

    @_logged
    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def _dataset_input(manifest: Any, split: str, context: str) -> Any:
    """A split as an MLflow dataset: `<dataset>/<split>`, digest = the manifest's content hash (the first 36 hex
    digits, MLflow's limit), source = the split folder, profile = images and classes."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    data = manifest.data
    digest = str(data.get("content_hash", "")).removeprefix("sha256:")[:MAX_DIGEST]
    count = data.get("splits", {}).get(split, {}).get("count")
    dataset = Dataset(
        name=f"{data.get('dataset')}/{split}",
        digest=digest,
        source_type="local",
        source=json.dumps({"uri": str(Path(manifest.folder).resolve())}),
        profile=json.dumps({"num_rows": count, "num_classes": len(manifest.classes)}),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


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
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    uri = absolute_uri(settings.uri)
    owner = owner_tags(output)
    try:
        client = store_client(uri)
        if resume_run_id is not None:
            run_id = resume_run_id
            info = client.get_run(run_id).info
            experiment_id = info.experiment_id
            mark_training_experiment(client, client.get_experiment(experiment_id))
            client.update_run(run_id, status="RUNNING")
            client.log_batch(run_id, tags=[RunTag(key, value) for key, value in owner.items()])
        else:
            experiment_id = _experiment_id(client, settings.experiment, settings.uri)
            all_tags = {
                **source_tags(),
                **git_tags(),
                **{k: str(v) for k, v in (tags or {}).items() if v is not None},
                **owner,
            }
            if parent_run_id is not None:
                all_tags["mlflow.parentRunId"] = parent_run_id
            info = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info
            run_id = info.run_id
        if output is not None:
            end_stale_runs(client, experiment_id, output, keep=run_id)
    except (MlflowException, OSError) as exc:
        raise TrackingError(
            f"tracking.uri={settings.uri!r}: cannot log to MLflow ({one_line(exc)}); check the URI "
            "or the server, or set tracking.enabled=false"
        ) from exc
    return Run(client, run_id, uri, _relative_store_folder(uri, info.artifact_uri))


def existing_run(uri: str, run_id: str) -> Run:
    """The recorded run `run_id` in the store at `uri`, as it is (status untouched), to add to it afterwards.
    MLflow's errors propagate; a local database that does not exist is refused (FileNotFoundError) rather than
    created empty by MLflow."""
    uri = absolute_uri(uri)
    database = _sqlite_database(uri)
    if database is not None and not database.is_file():
        raise FileNotFoundError(2, "no MLflow database here", str(database))
    client = store_client(uri)
    info = client.get_run(run_id).info
    return Run(client, run_id, uri, _relative_store_folder(uri, info.artifact_uri))


def _experiment_id(client: Any, name: str, given_uri: str) -> str:
    """The experiment `name`, created if needed: tagged as a model-training experiment, with its artifacts
    beside a local store (see the module's docstring)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        mark_training_experiment(client, experiment)
        return experiment.experiment_id
    try:
        experiment_id = client.create_experiment(name, tags={KIND_TAG: TRAINING_KIND})
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id  # another process made it meanwhile
    given = _sqlite_database(given_uri)
    if given is not None:
        folder = given.parent / ARTIFACTS_FOLDER if given.is_absolute() else Path(ARTIFACTS_FOLDER)
        _set_artifact_location(
            _sqlite_database(absolute_uri(given_uri)), experiment_id, (folder / experiment_id).as_posix()
        )
    return experiment_id


def mark_training_experiment(client: Any, experiment: Any) -> None:
    """Tag `experiment` as a model-training one, unless it says it is of another kind on purpose."""
    if experiment.tags.get(KIND_TAG, "") in REPLACEABLE_KINDS:
        client.set_experiment_tag(experiment.experiment_id, KIND_TAG, TRAINING_KIND)


def _set_artifact_location(database: Path | None, experiment_id: str, location: str) -> None:
    """Record where a new experiment's artifacts go. MLflow's API makes every local location absolute against
    the current folder (`create_experiment(artifact_location=...)`, `--default-artifact-root` alike), so the
    row is written directly, right after it was created and before it has runs."""
    import sqlite3

    assert database is not None
    with contextlib.closing(sqlite3.connect(database, timeout=30)) as connection, connection:
        connection.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (location, int(experiment_id))
        )


def _sqlite_database(uri: str) -> Path | None:
    """The database file of a local SQLite store's URI (relative as given), else None."""
    return sqlite_database(uri)


_OPENED: set[str] = set()  # the stores this process has opened (and made, if they were new)


def store_client(uri: str) -> Any:
    """An MlflowClient on the store at `uri`, its database opened — and made if new — exclusive of the other
    processes opening it (`sa2vp.stores.one_at_a_time`): two commands started together on a new store would
    otherwise race through MLflow's table creation and migrations, and one would fail. A database that cannot
    be opened raises MlflowException."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    if uri in _OPENED or is_server(uri):
        return MlflowClient(tracking_uri=uri)
    try:
        client = one_at_a_time(uri, lambda: MlflowClient(tracking_uri=uri))  # (it opens the store at once)
    except SQLAlchemyError as exc:  # the database's own errors (refused, unknown database, …)
        raise MlflowException(one_line(exc)) from exc
    _OPENED.add(uri)
    return client


def _relative_store_folder(uri: str, artifact_uri: str) -> Path | None:
    """The store's folder when a run's artifact location is a relative path (resolved against it), else None."""
    from urllib.parse import urlparse

    database = _sqlite_database(uri)
    if database is None or urlparse(artifact_uri).scheme or Path(artifact_uri).is_absolute():
        return None
    return database.parent


def source_tags() -> dict[str, str]:
    """MLflow's source tags: the command that logs (`sa2vp train …`, or the program), local, and the user."""
    import getpass

    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py":  # python -m <package>
        program = Path(sys.argv[0]).parent.name
    if program == "sa2vp":
        words = []
        for word in sys.argv[1:]:
            if word.startswith("-"):
                break
            words.append(word)
        program = " ".join([program, *words])
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no USER variable and no passwd entry (some containers)
        user = "unknown"
    return {"mlflow.source.name": program[:500], "mlflow.source.type": "LOCAL", "mlflow.user": user}


# Settings by the names the method file gives them (SA²VP's γ, λ and window c), in run names and figures.
SHORT_NAMES = {
    "model.sa2vp.gamma": "γ",
    "model.sa2vp.window": "c",
    "model.sa2vp.lam": "λ",
    "train.lr": "lr",
    "train.weight_decay": "wd",
}


def trial_run_name(number: int, values: Mapping[str, Any]) -> str:
    """A tuning trial's run name: its number and the values it tries, `trial-3 γ=0.21 c=5 lr=3e-3`."""
    tried = " ".join(
        f"{SHORT_NAMES.get(key, key.rsplit('.', 1)[-1])}={_compact(value)}" for key, value in values.items()
    )
    return f"trial-{number} {tried}".strip()


def _compact(value: Any) -> str:
    """A value as short as a run name wants it: 0.21, 5, 3e-3, 2.5e-4."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value != 0 and abs(value) < 0.01:
        mantissa, _, exponent = f"{value:.1e}".partition("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.2g}"


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
        raise TrackingError(
            f"tracking.uri={uri!r}: {problem}; fix tracking.uri (or the store), or set "
            "tracking.enabled=false to run without MLflow"
        )


def _store_problem(uri: str) -> str | None:
    from urllib.parse import urlparse

    if uri.startswith(("http://", "https://")):
        return _server_problem(uri)
    if uri.startswith("sqlite:///"):
        return _sqlite_problem(uri[len("sqlite:///") :].partition("?")[0])
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


def serve_ui(
    uri: str,
    port: int,
    experiment: str | None = None,
    on_ready: Callable[[str], None] | None = None,
    on_waiting: Callable[[float], None] | None = None,
    ready_timeout: float = READY_TIMEOUT,
) -> int:
    """Run `mlflow ui` on the store at `uri` (bound to 127.0.0.1) until it ends or this process is asked to
    stop; returns its exit code (0 when stopped on request).

    The server takes tens of seconds to answer: `on_waiting(seconds)` is called at once and then every
    PROGRESS_EVERY seconds until it does, `on_ready(address)` when it answers, with the page of `experiment`
    (in MLflow's model-training view) or the experiments list. A server that does not answer within
    `ready_timeout` seconds is stopped (TrackingError), and so is a busy port refused before anything starts:
    another server there would answer in its place. A local store's server runs in the store's folder (relative
    artifact locations resolve there), with one worker and without MLflow's GenAI job runner, which a local UI
    does not use and which takes most of the start-up.

    The server and its workers run in a session of their own; SIGTERM, SIGINT and SIGHUP sent to this process
    are passed to that whole process group, so no worker outlives the command (`mlflow ui` itself, stopped
    alone, leaves its workers running)."""
    import shutil

    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow")
    if mlflow is None:
        raise TrackingError("the mlflow command is not installed in this environment")
    _check_port_free(port)
    uri = absolute_uri(uri)
    database = _sqlite_database(uri)
    command = [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    environment = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}  # the user's setting wins
    server: subprocess.Popen[bytes] | None = None
    stopped: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        stopped.append(signum)
        if server is not None:
            _signal_group(server.pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    # Handlers first: a stop that arrives while the server starts must not leave it running.
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        server = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=environment,
            cwd=None if database is None else database.parent,
        )
        if stopped:
            _signal_group(server.pid, signal.SIGTERM)
        address = _wait_until_answering(server, port, stopped, ready_timeout, on_waiting)
        if address is not None and on_ready is not None:
            on_ready(experiment_page(address, experiment))
        code = server.wait()
    finally:
        if server is not None:
            _stop_group(server.pid)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if stopped else code


def _check_port_free(port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no owner
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise TrackingError(
                f"--port {port}: 127.0.0.1:{port} is in use ({exc.strerror or exc}), perhaps by "
                "another MLflow UI; choose a free port"
            ) from None


def _wait_until_answering(
    server: subprocess.Popen[bytes],
    port: int,
    stopped: list[int],
    timeout: float,
    on_waiting: Callable[[float], None] | None,
) -> str | None:
    """The server's address once it answers; None when it ended or was stopped first. Raises TrackingError
    after `timeout` seconds without an answer (the caller stops the server)."""
    import urllib.request

    address = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    shown = -PROGRESS_EVERY
    while server.poll() is None and not stopped:
        waited = time.monotonic() - start
        if waited - shown >= PROGRESS_EVERY:
            shown = waited
            if on_waiting is not None:
                on_waiting(waited)
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=1) as response:
                if response.status == 200:
                    return address
        except OSError:  # not listening yet, or not answering yet
            pass
        if waited > timeout:
            raise TrackingError(
                f"the MLflow UI did not answer on {address} within {timeout:.0f} s; see its output above"
            )
        time.sleep(0.25)
    return None


def experiment_page(address: str, experiment: str | None) -> str:
    """The UI's page of `experiment` (asked of the server at `address`) in the model-training view; the
    experiments list when there is no such experiment (yet)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    if experiment is not None:
        query = urllib.parse.urlencode({"experiment_name": experiment})
        try:
            with urllib.request.urlopen(
                f"{address}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=PROBE_TIMEOUT
            ) as response:
                found = json.load(response)["experiment"]["experiment_id"]
            return f"{address}/#/experiments/{found}?{MACHINE_LEARNING_VIEW}"
        except (urllib.error.URLError, OSError, ValueError, KeyError):  # no such experiment: the list
            pass
    return f"{address}/#/experiments?{MACHINE_LEARNING_VIEW}"


def is_server(uri: str) -> bool:
    """Whether tracking URI `uri` is a tracking server (which serves its own UI), not a local store."""
    return uri.startswith(("http://", "https://"))


def browse_address(uri: str, experiment: str) -> str:
    """Where to browse the runs of the store at `uri`: a tracking server's own page of `experiment`, or for a
    local store the command that opens a UI on it (`sa2vp ui`, which refuses a server)."""
    return experiment_page(uri.rstrip("/"), experiment) if is_server(uri) else "sa2vp ui"


def server_page(uri: str, experiment: str | None) -> str:
    """The UI page of `experiment` on the tracking server at `uri`, which must answer (TrackingError if not)."""
    problem = _server_problem(uri)
    if problem is not None:
        raise TrackingError(f"tracking.uri={uri!r}: {problem}")
    return experiment_page(uri.rstrip("/"), experiment)


# --- a model artifact from the store ------------------------------------------------------------------------

# A URI's scheme: two characters at least, so that a Windows drive (C:/…) stays a path.
_URI_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")
STORE_SCHEMES = ("runs", "models", "mlflow-artifacts")  # MLflow reads these through the tracking store
MLMODEL = "MLmodel"  # an MLflow model's description, at its root


def is_artifact_uri(argument: str) -> bool:
    """Whether an artifact argument is an MLflow artifact URI (`runs:/<run id>/model`, `mlflow-artifacts:/…`,
    `models:/<model id>`, `s3://…`) rather than a local path: it starts with a scheme, and no such file exists."""
    return _URI_SCHEME.match(argument) is not None and not Path(argument).exists()


@contextlib.contextmanager
def local_artifact(argument: str | Path, tracking_uri: str | Callable[[], str]) -> Iterator[Path]:
    """An artifact argument as a local path (the artifact folder or its model.json): a path as it is; an MLflow
    artifact URI downloaded (`download_artifact`) into a temporary folder, removed when the block ends.
    `tracking_uri`: the store a `runs:/`, `models:/` or `mlflow-artifacts:/` URI is read through, or a function
    giving it (called only for a URI). The block's ArtifactError, SettingsError and BackboneError (say from
    `load_artifact`) name the URI instead of the temporary folder."""
    text = str(argument)
    if not is_artifact_uri(text):
        yield Path(text)
        return
    store = tracking_uri if isinstance(tracking_uri, str) else tracking_uri()
    with tempfile.TemporaryDirectory(prefix="sa2vp-artifact-") as folder:
        downloaded, local = download_artifact(text, store, Path(folder))
        try:
            yield local
        except (ArtifactError, SettingsError, BackboneError) as exc:
            raise type(exc)(str(exc).replace(str(downloaded), _folder_uri(text))) from None


def download_artifact(uri: str, tracking_uri: str, folder: Path) -> tuple[Path, Path]:
    """Download the sa2vp artifact at MLflow artifact URI `uri` into `folder`, through the tracking store at
    `tracking_uri` for `runs:/`, `models:/` and `mlflow-artifacts:/` URIs (a server is asked once, briefly,
    before MLflow's minutes of retries; a local database must exist). Returns (what was downloaded, the sa2vp
    artifact folder in it): the URI may name the artifact folder (`runs:/<run id>/model`), its model.json, or
    the run's MLflow model (`runs:/<run id>/classifier`, `models:/<model id>`), which holds the folder. Nothing
    is unpickled: the folder is loaded like any other (`load_artifact`). ArtifactError or TrackingError, in
    one line naming the URI, otherwise."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from sa2vp.engine.mlflow_model import _global_tracking_uri

    store = _store_for(uri, absolute_uri(tracking_uri))
    database = _sqlite_database(store)
    # A local store's relative artifact locations resolve against its folder (see the module's docstring).
    in_store = contextlib.chdir(database.parent) if database is not None else contextlib.nullcontext()
    try:
        # MLflow resolves `models:/` through its global tracking URI, whatever it is given.
        with _global_tracking_uri(store), in_store:
            downloaded = Path(
                download_artifacts(artifact_uri=_folder_uri(uri), dst_path=str(folder), tracking_uri=store)
            )
    except (MlflowException, OSError) as exc:
        raise ArtifactError(f"{uri}: cannot download it through the tracking store {store} ({one_line(exc)})") from None
    return downloaded, _artifact_in(downloaded, uri)


def _folder_uri(uri: str) -> str:
    """The URI of the artifact folder, given it or its model.json (which alone would not load)."""
    from sa2vp.engine.artifact import CONFIG_NAME

    return uri.removesuffix(f"/{CONFIG_NAME}")


def _store_for(uri: str, tracking_uri: str) -> str:
    """The tracking store to read `uri` through, checked: a server must answer, a local database must exist
    (MLflow would make an empty one). `mlflow-artifacts://host:port/…` names its server itself."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in STORE_SCHEMES:
        return tracking_uri  # s3://, gs://, file:// …: read directly
    if parsed.scheme == "mlflow-artifacts" and parsed.netloc:
        tracking_uri = f"http://{parsed.netloc}"
    elif parsed.scheme == "mlflow-artifacts" and not is_server(tracking_uri):
        raise ArtifactError(
            f"{uri}: a tracking server's artifact, but the tracking store is {tracking_uri}; give the server's "
            "address (--tracking-uri http://HOST:PORT, or tracking.uri)"
        )
    database = _sqlite_database(tracking_uri)
    if database is not None and not database.is_file():
        raise TrackingError(f"tracking store {tracking_uri}: no MLflow database {database} to read {uri} from")
    problem = _server_problem(tracking_uri) if is_server(tracking_uri) else None
    if problem is not None:
        raise TrackingError(f"tracking store {tracking_uri}: {problem}; cannot read {uri}")
    return tracking_uri


def _artifact_in(downloaded: Path, uri: str) -> Path:
    """The sa2vp artifact folder in what `uri` downloaded: itself, or the one an MLflow model holds."""
    import yaml

    from sa2vp.engine.artifact import CONFIG_NAME
    from sa2vp.engine.mlflow_model import ARTIFACT_KEY

    if (downloaded / CONFIG_NAME).is_file():
        return downloaded
    if (downloaded / MLMODEL).is_file():
        try:
            flavors = yaml.safe_load((downloaded / MLMODEL).read_text(encoding="utf-8"))["flavors"]
            inner = downloaded / flavors["python_function"]["artifacts"][ARTIFACT_KEY]["path"]
        except (yaml.YAMLError, OSError, TypeError, KeyError) as exc:
            raise ArtifactError(f"{uri}: an MLflow model, but not one sa2vp logged ({one_line(exc)})") from None
        if (inner / CONFIG_NAME).is_file():
            return inner
    raise ArtifactError(
        f"{uri}: not an sa2vp artifact (no {CONFIG_NAME} in it); a training's artifact is runs:/<run id>/model, "
        "its MLflow model runs:/<run id>/classifier"
    )


def _signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to process group `pgid`; False when no process is left in it."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def _stop_group(pgid: int) -> None:
    """End every process left in group `pgid`: SIGTERM, STOP_GRACE seconds to go, then SIGKILL."""
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
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/") and uri != f"{prefix}:memory:":
        return prefix + str(Path.cwd() / uri[len(prefix) :])
    return uri


def git_tags(cwd: Path | None = None) -> dict[str, str]:
    """The commit the code ran from (and whether the tree had changes), as MLflow's own source tags."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        # dvc.lock is DVC's record of what the pipeline produced, rewritten by `dvc repro` while it runs: a change
        # there is the run's own output, not a change to the code or settings it ran from.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude,glob)**/dvc.lock"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if commit.returncode != 0:
        return {}
    return {"mlflow.source.git.commit": commit.stdout.strip(), "git_dirty": str(bool(dirty.stdout.strip())).lower()}


def _param_value(value: Any) -> str:
    """Settings as params: lists, mappings and null as JSON (readable and parseable), the rest as str."""
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, type(None))) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 1] + "…"
