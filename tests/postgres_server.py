"""A real PostgreSQL 15 server on loopback for the tests that share a study or a tracking store between processes.

No fixture library: the machine's own server binaries (`initdb`, `pg_ctl`, found on PATH or under
/usr/lib/postgresql/*/bin) make a throw-away cluster in a temporary folder, trust authentication on 127.0.0.1
only, on a free port. PostgreSQL refuses to run as root, so under root the cluster belongs to the `postgres`
(or `nobody`) account and the binaries run as that account through `runuser`.

    server = PostgresServer.start()
    url = server.create_database("optuna")   # postgresql://sa2vp@127.0.0.1:PORT/optuna
    ...
    server.stop()

`postgres` is the pytest fixture (one server per test module); tests skip, saying why, when no PostgreSQL
server binaries are installed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "sa2vp"


def server_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl, or None when PostgreSQL's server is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _owner() -> str | None:
    """The account the server runs as when we are root (PostgreSQL refuses root); None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' account exists")


@dataclass
class PostgresServer:
    folder: Path
    port: int
    binaries: Path
    owner: str | None

    @classmethod
    def start(cls) -> PostgresServer:
        binaries = server_binaries()
        if binaries is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl)")
        owner = _owner()
        # Not under pytest's tmp_path: its parents are private to root, and the server's account must reach it.
        folder = Path(tempfile.mkdtemp(prefix="sa2vp-postgres-"))
        if owner is not None:
            entry = pwd.getpwnam(owner)
            os.chown(folder, entry.pw_uid, entry.pw_gid)
        server = cls(folder, _free_port(), binaries, owner)
        server._run("initdb", "-D", str(folder / "data"), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-h 127.0.0.1 -p {server.port} -k {folder} -c fsync=off -c max_connections=200"
        log = str(folder / "server.log")
        server._run("pg_ctl", "-D", str(folder / "data"), "-l", log, "-o", options, "-w", "start")
        return server

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.binaries / program), *args]
        if self.owner is not None:
            command = ["runuser", "-u", self.owner, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.folder, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database on this server; its SQLAlchemy URL."""
        import psycopg

        connection = psycopg.connect(self.url(), autocommit=True)  # CREATE DATABASE: not in a transaction
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    if server_binaries() is None:
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()
