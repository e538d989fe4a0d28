"""The re-entry claim on real SQLite and PostgreSQL: once per window, once ever, idempotent;
and the journey's entry (``enter_journey``): one touchpoint, promoted winners, retries."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import select
from temporalio.testing import ActivityEnvironment

from activities.entries import EntryActivities
from activities.types import EntryClaim, JourneyEntryInput, JourneyEntryResult
from kaeru.db import session
from kaeru.models import ExperimentPromotion, Touchpoint
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


def entry(key: str, arms: dict[str, str], held_out: bool = False) -> JourneyEntryInput:
    return JourneyEntryInput(
        key=key,
        journey_id="cart-abandonment-c1",
        kind="cart-abandonment",
        customer_id="c1",
        version="3",
        held_out=held_out,
        arms=arms,
        variants={name: ["plain", "question"] for name in arms},
        at=T0,
    )


async def enter(url: str, wanted: JourneyEntryInput) -> JourneyEntryResult:
    activities = EntryActivities(make_settings(url))
    result: JourneyEntryResult = await ActivityEnvironment().run(activities.enter_journey, wanted)
    return result


def promote(url: str, experiment: str, variant: str) -> None:
    with session(url) as s:
        s.add(
            ExperimentPromotion(
                journey_kind="cart-abandonment", experiment=experiment, variant=variant, reason="t"
            )
        )


async def test_an_entry_is_one_touchpoint_and_a_retry_answers_as_the_first(
    database_url: str,
) -> None:
    first = await enter(database_url, entry("j/r1/entered", {"subject": "plain"}))
    assert first == JourneyEntryResult(arms={"subject": "plain"}, variant="plain")
    promote(database_url, "subject", "question")
    # A retry after the promotion: the entry was recorded, its arm stands.
    assert await enter(database_url, entry("j/r1/entered", {"subject": "plain"})) == first
    with session(database_url) as s:
        [row] = s.exec(select(Touchpoint)).all()
    assert (row.kind, row.key, row.journey_kind, row.variant) == (
        "journey_entered",
        "j/r1/entered",
        "cart-abandonment",
        "plain",
    )
    assert row.detail == {"version": "3", "arms": {"subject": "plain"}}
    assert row.occurred_at == datetime.fromtimestamp(T0, UTC)


async def test_a_promoted_winner_replaces_the_hashs_arm_if_the_journey_declares_it(
    database_url: str,
) -> None:
    promote(database_url, "subject", "question")
    promote(database_url, "cta", "since_removed")
    arms = {"subject": "plain", "cta": "plain"}
    result = await enter(database_url, entry("j/r2/entered", arms))
    assert result.arms == {"subject": "question", "cta": "plain"}
    assert result.variant is None  # two experiments: the arms are in the detail
    with session(database_url) as s:
        row = s.exec(select(Touchpoint).where(Touchpoint.key == "j/r2/entered")).one()
    # The promoted arm is marked, so experiment results leave it out (no longer randomised).
    assert row.detail["promoted"] == ["subject"]


async def test_a_held_out_entry_is_variant_holdout_with_no_arms(database_url: str) -> None:
    result = await enter(database_url, entry("j/r3/entered", {}, held_out=True))
    assert result == JourneyEntryResult(arms={}, variant="holdout")
