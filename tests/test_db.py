"""The schema: migrations apply on SQLite and PostgreSQL, repeatably and from threads at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import inspect

from kaeru.db import get_engine, migrate, session
from kaeru.models import Order


def test_migrate_is_idempotent_and_creates_every_table(database_url: str) -> None:
    migrate(database_url)  # a second time: nothing to do
    tables = set(inspect(get_engine(database_url)).get_table_names())
    assert {"events", "customers", "orders", "email_messages", "touchpoints"} <= tables


def test_concurrent_migrations_in_one_process(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(migrate, [url] * 4))
    assert "events" in inspect(get_engine(url)).get_table_names()


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
