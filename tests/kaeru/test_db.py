"""The schema: migrations apply on SQLite and PostgreSQL, repeatably, from threads and from
processes at once."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect

from kaeru.db import MIGRATIONS, get_engine, migrate, session
from kaeru.models import Order


def test_migrate_is_idempotent_and_creates_every_table(database_url: str) -> None:
    migrate(database_url)  # a second time: nothing to do
    tables = set(inspect(get_engine(database_url)).get_table_names())
    assert {
        "events",
        "customers",
        "orders",
        "email_messages",
        "touchpoints",
        "tracking_links",
    } <= tables


def test_the_tracking_migration_downgrades_and_upgrades_again(database_url: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = get_engine(database_url)

    command.downgrade(config, "0004")
    assert "tracking_links" not in inspect(get_engine(database_url)).get_table_names()
    migrate(database_url)
    assert "tracking_links" in inspect(get_engine(database_url)).get_table_names()


def test_concurrent_migrations_in_one_process(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(migrate, [url] * 4))
    assert "events" in inspect(get_engine(url)).get_table_names()


# Each process imports kaeru first (slow), then waits for the starting gun, so the upgrades
# themselves run at the same moment.
_MIGRATE_AT_THE_GUN = """
import sys, time
from pathlib import Path
from kaeru.db import migrate
gun = Path(sys.argv[2])
while not gun.exists():
    time.sleep(0.001)
migrate(sys.argv[1])
"""


def _migrate_at_once(url: str, gun: Path, processes: int = 3) -> list[str]:
    """Run ``processes`` migrations of ``url`` in separate processes at once: their errors."""
    root = Path(__file__).resolve().parents[2]
    running = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE_AT_THE_GUN, url, str(gun)],
            cwd=root,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    time.sleep(3)  # every process has imported kaeru and waits
    gun.touch()
    errors = []
    for process in running:
        _, stderr = process.communicate(timeout=120)
        if process.returncode:
            raised = [line for line in stderr.splitlines() if "Error" in line]
            errors.append(raised[-1] if raised else stderr)
    return errors


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_migrating_a_fresh_database_at_once_all_succeed(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The API and the worker of a fresh deployment start together and both migrate."""
    for round_ in range(3):  # one collision is likely, three nearly certain on the old code
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / f'fresh-{round_}.db'}"
        else:
            server: Any = request.getfixturevalue("postgres_server")
            name = f"t_{uuid.uuid4().hex[:12]}"
            server.psql(f"CREATE DATABASE {name};")
            url = server.get_uri(name).replace("postgresql://", "postgresql+psycopg://", 1)

        assert _migrate_at_once(url, tmp_path / f"gun-{round_}") == []

        tables = set(inspect(get_engine(url)).get_table_names())
        assert {"events", "email_messages", "alembic_version"} <= tables


def test_timestamps_come_back_aware_utc_and_money_is_64_bit(database_url: str) -> None:
    tokyo = timezone(timedelta(hours=9))
    with session(database_url) as s:
        s.add(
            Order(
                order_id="big",
                customer_id="c",
                total_minor=2**40,
                currency="USD",
                completed_at=datetime(2026, 11, 23, 18, 0, tzinfo=tokyo),
            )
        )
    with session(database_url) as s:
        order = s.get(Order, "big")
    assert order is not None
    assert order.total_minor == 2**40
    assert order.completed_at == datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    assert order.completed_at.tzinfo is not None


def test_naive_timestamps_are_refused(sqlite_url: str) -> None:
    with pytest.raises(Exception, match="naive datetime"), session(sqlite_url) as s:
        s.add(
            Order(
                order_id="n",
                customer_id="c",
                total_minor=1,
                currency="USD",
                completed_at=datetime(2026, 1, 1),
            )
        )
