"""Opening a database store that other processes may be creating at the same moment.

MLflow's tracking store and Optuna's RDB storage make their tables the first time they open a database —
`create_all`, then alembic's migrations or stamp — and nothing stops a second process doing the same meanwhile:
the loser fails with `table … already exists`, `UNIQUE constraint failed: alembic_version` (SQLite) or
`duplicate key value violates unique constraint "pg_type_typname_nsp_index"` (PostgreSQL). `one_at_a_time`
makes the first opening exclusive, so the second process finds the tables made:

- a local SQLite file: a file lock (`filelock`) named after the file's absolute path, in the temporary folder;
- PostgreSQL: a session-level advisory lock, held by the server, so it serialises processes on any machine;
- other servers (MySQL, …): the opening is retried when it fails on another's tables.

The lock is held only while a process opens the store (seconds for a new one, a moment for a made one).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("sa2vp.stores")

T = TypeVar("T")

LOCK_TIMEOUT = 300.0  # seconds to wait for another process to finish making a store
ADVISORY_KEY = 0x5A2F_5A2F  # PostgreSQL's advisory lock key for "making a store's tables" (any 64-bit number)
ATTEMPTS = 6  # openings of a store on another server, when they fail on another process's tables


def sqlite_database(url: str) -> Path | None:
    """The database file of a SQLite URL (`sqlite:///relative.db`, `sqlite:////absolute.db`), as given; None for
    another URL or an in-memory database."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    path = url[len(prefix) :].partition("?")[0]
    return None if path in ("", ":memory:") else Path(path)


def one_at_a_time(url: str, open_store: Callable[[], T]) -> T:
    """`open_store()` (which opens — and, the first time, makes — the database store at SQLAlchemy URL `url`),
    exclusive of every other process opening the same store through this function. Other URLs (a tracking
    server, a file store) are opened as they are."""
    database = sqlite_database(url)
    if database is not None:
        with _file_lock(database):
            return open_store()
    scheme = url.partition(":")[0].partition("+")[0].lower()
    if scheme in ("postgresql", "postgres"):
        with _advisory_lock(url):
            return open_store()
    if "://" in url and scheme not in ("http", "https", "file", "databricks"):
        return _retried(open_store)
    return open_store()


@contextlib.contextmanager
def _file_lock(database: Path) -> Iterator[None]:
    from filelock import FileLock

    # In the temporary folder rather than beside the database: a lock file stays behind (filelock keeps it), and
    # the project folder should not gain one. SQLite files are local, so one machine's lock is enough.
    key = hashlib.sha256(str(database.resolve()).encode()).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"sa2vp-store-{key}.lock", timeout=LOCK_TIMEOUT):
        yield


@contextlib.contextmanager
def _advisory_lock(url: str) -> Iterator[None]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            # Session-level: held until unlocked or the connection closes (a killed process's lock goes with it).
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_KEY})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_KEY})
    finally:
        engine.dispose()


def _retried(open_store: Callable[[], T]) -> T:
    import sqlalchemy.exc

    for attempt in range(1, ATTEMPTS + 1):
        try:
            return open_store()
        except Exception as exc:
            lost = _caused_by(exc, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError))
            if not lost or attempt == ATTEMPTS:
                raise
            log.info("another process is making the store's tables (%s); opening it again", type(lost).__name__)
            time.sleep(random.uniform(0.5, 1.5) * attempt)
    raise AssertionError("not reached")


def _caused_by(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of `kinds` in `exc`'s chain of causes, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
