"""The re-entry claim on real SQLite and PostgreSQL: once per window, once ever, idempotent."""

from __future__ import annotations

from temporalio.testing import ActivityEnvironment

from activities.entries import EntryActivities
from activities.types import EntryClaim
from tests.conftest import make_settings

DAY = 86400.0
T0 = 1_790_000_000.0


async def claim(url: str, key: str, at: float, every: float | None = 7 * DAY) -> bool:
    activities = EntryActivities(make_settings(url))
    wanted = EntryClaim(key=key, kind="browse", customer_id="c1", every_seconds=every, at=at)
    result = await ActivityEnvironment().run(activities.claim_journey_entry, wanted)
    return result.granted


async def test_at_most_once_per_window(database_url: str) -> None:
    assert await claim(database_url, "j/r1/entry", T0)
    assert not await claim(database_url, "j/r2/entry", T0 + 3 * DAY)
    assert await claim(database_url, "j/r1/entry", T0 + 3 * DAY)  # a retry of the first: same
    assert await claim(database_url, "j/r3/entry", T0 + 8 * DAY)
    assert not await claim(database_url, "j/r4/entry", T0 + 9 * DAY)  # within 7 days of r3


async def test_once_ever_and_per_kind_and_customer(database_url: str) -> None:
    assert await claim(database_url, "j/r1/entry", T0, every=None)
    assert not await claim(database_url, "j/r2/entry", T0 + 400 * DAY, every=None)
    other = EntryActivities(make_settings(database_url))
    wanted = EntryClaim(
        key="k/r1/entry", kind="welcome", customer_id="c1", every_seconds=None, at=T0
    )
    assert (await ActivityEnvironment().run(other.claim_journey_entry, wanted)).granted
