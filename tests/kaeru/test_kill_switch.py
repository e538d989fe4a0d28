"""The kill switch's store (SQLite and PostgreSQL), which switch holds which journey, and the
worker's cached read of them."""

from __future__ import annotations

import asyncio
import time

from kaeru.holds import GLOBAL
from kaeru.kill_switch import SwitchReader, covering, switches, turn_off, turn_on


def test_a_switch_goes_on_once_and_off(database_url: str) -> None:
    first, changed = turn_on(
        database_url, GLOBAL, actor="cli:ann", reason="bad copy", include_transactional=False
    )
    assert changed and first.since.tzinfo is not None
    again, changed = turn_on(database_url, GLOBAL, actor="cli:bob", include_transactional=True)
    assert not changed and (again.actor, again.include_transactional) == ("cli:ann", False)
    turn_on(database_url, "cart-abandonment", actor="cli:bob", include_transactional=False)
    assert [s.scope for s in switches(database_url)] == [GLOBAL, "cart-abandonment"]
    off = turn_off(database_url, GLOBAL)
    assert off is not None and off.reason == "bad copy"
    assert turn_off(database_url, GLOBAL) is None
    assert [s.scope for s in switches(database_url)] == ["cart-abandonment"]


def test_which_switch_holds_which_journey(sqlite_url: str) -> None:
    turn_on(sqlite_url, "welcome", actor="t", include_transactional=False)
    on = switches(sqlite_url)
    assert covering(on, "welcome", transactional=False) is not None
    assert covering(on, "cart-abandonment", transactional=False) is None

    turn_on(sqlite_url, GLOBAL, actor="t", include_transactional=False)
    on = switches(sqlite_url)
    marketing = covering(on, "cart-abandonment", transactional=False)
    assert marketing is not None and marketing.scope == GLOBAL
    # A bad campaign is no reason to stop receipts: the global switch holds them on --all only.
    assert covering(on, "order-confirmation", transactional=True) is None
    turn_on(sqlite_url, "order-confirmation", actor="t", include_transactional=False)
    named = covering(switches(sqlite_url), "order-confirmation", transactional=True)
    assert named is not None and named.scope == "order-confirmation"

    turn_off(sqlite_url, GLOBAL)
    turn_off(sqlite_url, "order-confirmation")
    turn_on(sqlite_url, GLOBAL, actor="t", include_transactional=True)
    assert covering(switches(sqlite_url), "order-confirmation", transactional=True) is not None


async def test_the_worker_reads_the_switches_at_most_once_per_ttl(sqlite_url: str) -> None:
    cached = SwitchReader(sqlite_url, ttl=3600)
    fresh = SwitchReader(sqlite_url, ttl=0)
    assert await cached.current() == [] and await fresh.current() == []
    turn_on(sqlite_url, GLOBAL, actor="t", include_transactional=False)
    assert await cached.current() == []  # within its TTL: what it read before
    assert [s.scope for s in await fresh.current()] == [GLOBAL]
    reads = await asyncio.gather(*(fresh.current() for _ in range(5)))
    assert all(len(r) == 1 for r in reads)


async def test_a_hold_is_decided_on_a_read_from_after_the_step_started(sqlite_url: str) -> None:
    """The cache may say a switch is on that went off since: ``since`` reads again, once for
    every step that asked before the read started."""
    reader = SwitchReader(sqlite_url, ttl=3600)
    turn_on(sqlite_url, GLOBAL, actor="t", include_transactional=False)
    assert [s.scope for s in await reader.current()] == [GLOBAL]
    turn_off(sqlite_url, GLOBAL)
    assert [s.scope for s in await reader.current()] == [GLOBAL]  # cached
    asked = time.monotonic()
    assert await reader.since(asked) == []
    turn_on(sqlite_url, GLOBAL, actor="t", include_transactional=False)
    # A step that asked before that read is served by it: no second read.
    assert await reader.since(asked) == []
    assert [s.scope for s in await reader.since(time.monotonic())] == [GLOBAL]
