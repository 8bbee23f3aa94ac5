"""Training runs, their MLflow runs and `sa2vp ui` under the failures a drill found: a store or an output folder
that cannot be written, an unreachable tracking server, a run killed mid-way, a UI stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sa2vp.engine import fit
from tests.train_fixtures import SA2VP, digits_root, experiment_id, invoke_sa2vp, project, tiny_settings  # noqa: F401  (fixtures)

ROOT = os.geteuid() == 0  # root writes into a chmod 0o555 folder anyway: that variant means nothing then


def _free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _under_a_file(tmp_path: Path) -> Path:
    """A folder that cannot be created, even by root: its parent is a regular file."""
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path / "a-file" / "sub"


def _one_line_exit_2(project: Path, *args: str) -> str:
    """Run `sa2vp <args>` in-process; it must fail at once, with one line and exit code 2; returns the line."""
    start = time.monotonic()
    done = invoke_sa2vp(project, *args, check=False)
    seconds = time.monotonic() - start
    assert done.exit_code == 2, done.output
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    # Before the data, the model or MLflow's retries: the drill's unreachable server took 276 s.
    assert seconds < 15, f"took {seconds:.0f} s"
    return done.stderr.strip()


@pytest.mark.parametrize(
    "store",
    [
        "under a file",
        pytest.param("read-only folder", marks=pytest.mark.skipif(ROOT, reason="root can write a 0o555 folder")),
        "closed port",
    ],
)
def test_an_unusable_tracking_store_is_one_line_at_once_and_nothing_is_written(
    project: Path,
    tmp_path: Path,
    store: str,
) -> None:
    if store == "closed port":
        uri = f"http://127.0.0.1:{_free_port()}"
    else:
        folder = _under_a_file(tmp_path) if store == "under a file" else _read_only_folder(tmp_path)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
    before = sorted(p.name for p in project.iterdir())
    line = _one_line_exit_2(project, "train", "--epochs", "1", "--set", f"tracking.uri={uri}")
    assert f"tracking.uri={uri!r}" in line and "tracking.enabled=false" in line, line
    assert sorted(p.name for p in project.iterdir()) == before  # no runs/: the check came first


@pytest.mark.parametrize(
    "where",
    [
        "under a file",
        pytest.param("read-only folder", marks=pytest.mark.skipif(ROOT, reason="root can write a 0o555 folder")),
    ],
)
def test_an_unwritable_output_is_refused_before_training_and_tracking(
    project: Path,
    tmp_path: Path,
    where: str,
) -> None:
    output = _under_a_file(tmp_path) if where == "under a file" else _read_only_folder(tmp_path) / "out"
    line = _one_line_exit_2(project, "train", "--epochs", "1", "--output", str(output))
    assert f"train.output={str(output)!r}" in line, line
    assert not (project / "mlflow.db").exists()  # no MLflow run (a FAILED one, before)
    assert not output.exists()


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_killed_runs_leftovers_are_cleaned_up_by_the_next_run_of_its_output(project: Path) -> None:
    """What a SIGKILL in the first epoch, during a checkpoint write, leaves: a RUNNING run whose process is
    gone and `.checkpoint.pt.<pid>.tmp` (fabricated here in a real store; a kill is not needed to make them)."""
    output = (project / "runs" / "train").resolve()
    output.mkdir(parents=True)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment_id = client.create_experiment("tests")
    host, dead = socket.gethostname(), str(_dead_pid())

    def running(**tags: str) -> str:
        return client.create_run(
            experiment_id, tags={"sa2vp.host": host, "sa2vp.pid": dead, "sa2vp.output": str(output), **tags}
        ).info.run_id

    stale = running()
    other_output = running(**{"sa2vp.output": str(project / "runs" / "other")})
    other_host = running(**{"sa2vp.host": f"not-{host}"})
    live = subprocess.Popen(["sleep", "60"])
    try:
        live_run = running(**{"sa2vp.pid": str(live.pid)})
        stray = output / f".checkpoint.pt.{dead}.tmp"
        stray.write_bytes(b"half a checkpoint")
        (output / "model").mkdir()
        stray_in_model = output / "model" / f".model.safetensors.{dead}.tmp"
        stray_in_model.write_bytes(b"half")
        live_tmp = output / f".checkpoint.pt.{live.pid}.tmp"  # a process still writing: not ours to remove
        live_tmp.write_bytes(b"being written")

        invoke_sa2vp(project, "train", "--epochs", "1")

        status = {run_id: client.get_run(run_id).info.status for run_id in (stale, other_output, other_host, live_run)}
        assert status == {stale: "KILLED", other_output: "RUNNING", other_host: "RUNNING", live_run: "RUNNING"}
        assert "killed" in client.get_run(stale).data.tags["error"]
        assert not stray.exists() and not stray_in_model.exists() and live_tmp.exists()
    finally:
        live.kill()
        live.wait()
    (new,) = [r for r in client.search_runs([experiment_id]) if r.info.run_id not in status]
    assert new.info.status == "FINISHED"
    assert new.data.tags["sa2vp.output"] == str(output) and new.data.tags["sa2vp.pid"] == str(os.getpid())
    assert new.data.tags["sa2vp.host"] == host


def test_a_resumed_run_logs_every_epoch_exactly_once(project: Path) -> None:
    """Killed after the epoch's checkpoint was saved but before its metrics reached MLflow: the resumed run
    logs that epoch (from the checkpoint), and nothing twice."""
    settings = tiny_settings(project, **{"train.epochs": 1})

    def interrupt(report) -> bool:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(settings, on_epoch=interrupt)
    client = MlflowClient(settings.tracking.uri)
    (killed,) = client.search_runs([experiment_id(client, "tests")])
    run_id = killed.info.run_id
    # The kill came between the checkpoint and the logging: the epoch is not in the store.
    with sqlite3.connect(project / "mlflow.db") as db:
        db.execute("DELETE FROM metrics WHERE run_uuid = ? AND step = 1", (run_id,))
        db.execute("DELETE FROM latest_metrics WHERE run_uuid = ? AND step = 1", (run_id,))

    result = fit(settings, resume=True)
    assert result.run_id == run_id and client.get_run(run_id).info.status == "FINISHED"
    for key in ("train/loss", "lr", "val/top1", "train/images_per_second"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1], key


def _descendants(pid: int) -> dict[int, str]:
    """pid → start time of every process below `pid` (the start time tells a reused pid apart)."""
    parents: dict[int, int] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                parents[int(entry.name)], started[int(entry.name)] = int(fields[1]), fields[19]
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = started[child]
                frontier.append(child)
    return found


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state, ppid, pgrp, session, …; None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _running(pid: int, started: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc")
def test_sigterm_stops_sa2vp_ui_with_all_its_server_processes(project: Path) -> None:
    port = _free_port()
    ui = subprocess.Popen(
        [SA2VP, "ui", "--port", str(port), "--set", "tracking.uri=sqlite:///ui.db"],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, "the MLflow UI did not start"
                time.sleep(0.5)
        processes = _descendants(ui.pid)
        assert processes  # the server and its workers

        ui.send_signal(signal.SIGTERM)  # to sa2vp alone, as `kill <pid>` or a service manager does
        ui.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(_running(pid, started) for pid, started in processes.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid, started in processes.items() if _running(pid, started)]
        assert not survivors, f"{len(survivors)} of the UI's {len(processes)} processes outlived it"
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.wait()
        for pid, started in processes.items():  # only the processes this test started
            if _running(pid, started):
                os.kill(pid, signal.SIGKILL)
