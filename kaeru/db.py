"""Database engine, sessions and migrations (sqlmodel on SQLite or PostgreSQL)."""

from __future__ import annotations

import fcntl
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def _normalise(url: str) -> str:
    """Use psycopg 3 for ``postgresql://`` URLs, the driver kaeru ships with."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; busy_timeout waits instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine per database URL for the whole process."""
    url = _normalise(url)
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@contextmanager
def session(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(get_engine(url), expire_on_commit=False) as s:
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise


#: One lock per database URL, never evicted (an evicted lock could be held while its successor
#: is handed out).
_WRITE_LOCKS: dict[str, threading.Lock] = {}


def _write_lock(url: str) -> threading.Lock:
    return _WRITE_LOCKS.setdefault(url, threading.Lock())  # setdefault is atomic


@contextmanager
def write_session(url: str) -> Iterator[Session]:
    """A session for a short write transaction that commits on success.

    SQLite has one writer at a time. A writer that finds the database locked sleeps in
    SQLite's busy handler (1, 2, 5... up to 100 ms between tries) and is not woken when the
    lock is freed; and a deferred transaction that read first only asks for the write lock
    half way through. So on SQLite the writers of this process queue on a lock, in turn and
    woken at once, and the transaction takes the write lock at its start (``BEGIN
    IMMEDIATE``). Measured with 32 threads committing small transactions: 1.8x the commits
    of plain :func:`session`. Writers in other processes still meet ``busy_timeout``.

    Keep the transaction short and CPU-light: every SQLite call releases the GIL, and getting
    it back from a busy event loop can take the whole switch interval (5 ms), while the lock
    is held. Never nest two of these in one thread. On PostgreSQL this is :func:`session`.
    """
    engine = get_engine(url)
    if engine.dialect.name != "sqlite":
        with session(url) as s:
            yield s
        return
    with _write_lock(url), Session(engine, expire_on_commit=False) as s:
        try:
            s.connection().exec_driver_sql("BEGIN IMMEDIATE")
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise


#: Alembic's migration context is process-wide: two upgrades at once in one process (the API's
#: start-up and the worker's in ``kaeru dev``) would trample each other.
_MIGRATING = threading.Lock()
#: The PostgreSQL advisory lock that serialises migrations across processes and hosts.
_MIGRATION_LOCK = zlib.crc32(b"kaeru:migrate")


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Hold a lock that other processes migrating the same database wait for.

    Without it, two processes upgrading a fresh database at once (an API and a worker started
    together) both see an empty schema, both create the tables, and one of them crashes.
    PostgreSQL: a session advisory lock on a connection of its own, held for the upgrade.
    SQLite: ``flock`` on a file beside the database (``<name>.migrate-lock``), which the
    kernel releases if the process dies; an in-memory database has no other process.
    """
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
            try:
                yield
            finally:
                connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK}
                )
                connection.commit()
        return
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:" or path.startswith("file:"):
        yield
        return
    with open(f"{path}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def migrate(url: str) -> None:
    """Bring the database schema to the newest migration (idempotent, safe from threads and
    from processes at once)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = get_engine(url)
    config.attributes["engine"] = engine
    with _MIGRATING, _migration_lock(engine):
        command.upgrade(config, "head")
