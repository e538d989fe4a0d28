"""The send gate on real SQLite and PostgreSQL: caps across journeys (also when two processes
ask at the same moment), priority, quiet hours in the customer's time zone, stale messages,
consent and suppression."""

from __future__ import annotations

import multiprocessing
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import select

from activities.send_gate import SendGateActivities
from activities.types import DROP, REFUSED, SEND, WAIT, ReserveSendInput, ReserveSendResult
from kaeru.consent import set_consent
from kaeru.db import session
from kaeru.models import Customer, SendSlot, Suppression
from tests.conftest import make_settings

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
#: A Wednesday, 10:00 UTC: outside quiet hours in UTC.
T0 = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
#: Quiet hours off, so the cap tests are about caps.
NO_QUIET = {"quiet_start": "00:00", "quiet_end": "00:00"}


def gate(url: str, **overrides: Any) -> SendGateActivities:
    values: dict[str, Any] = {
        "unknown_consent_is_yes": False,
        "cap_per_day": 1,
        "cap_per_week": 3,
        **NO_QUIET,
    }
    values.update(overrides)
    return SendGateActivities(make_settings(url, **values))


def customer(url: str, timezone: str | None = None, *, consent: bool | None = True) -> str:
    """A customer with an address; ``consent``: subscribed, unsubscribed, or None (unknown)."""
    customer_id = f"c-{uuid.uuid4().hex[:8]}"
    with session(url) as s:
        s.add(Customer(customer_id=customer_id, email=f"{customer_id}@x.test", timezone=timezone))
        if consent is not None:
            set_consent(s, customer_id, "email", consent, "api", at=T0 - DAY)
    return customer_id


def ask(
    customer_id: str,
    key: str,
    at: datetime,
    *,
    kind: str = "welcome",
    priority: int = 30,
    wanted_at: datetime | None = None,
    stale_after: timedelta | None = None,
    held_until: datetime | None = None,
) -> ReserveSendInput:
    return ReserveSendInput(
        key=key,
        journey_id=f"{kind}-{customer_id}",
        kind=kind,
        step=key.rpartition("/")[2],
        customer_id=customer_id,
        priority=priority,
        wanted_at=wanted_at or at,
        stale_after_seconds=stale_after.total_seconds() if stale_after else None,
        asked_at=at,
        held_until=held_until,
    )


def row(url: str, key: str) -> SendSlot:
    with session(url) as s:
        found = s.get(SendSlot, key)
        assert found is not None
        return found


def test_a_second_message_the_same_day_waits_for_the_next_free_slot(database_url: str) -> None:
    g = gate(database_url)
    c = customer(database_url)
    assert g.reserve(ask(c, "welcome-x/r/welcome_email", T0)).verdict == SEND
    later = g.reserve(ask(c, "win-back-x/r/miss_you", T0 + 2 * HOUR, kind="win-back"))
    assert (later.verdict, later.until) == (WAIT, T0 + DAY)
    assert "KAERU_CAP_PER_DAY" in later.reason
    assert row(database_url, "win-back-x/r/miss_you").state == "waiting"
    again = g.reserve(ask(c, "win-back-x/r/miss_you", T0 + DAY, kind="win-back"))
    assert again.verdict == SEND  # woke at the slot: sent, not dropped
    assert row(database_url, "win-back-x/r/miss_you").granted_at == T0 + DAY


def test_a_granted_slot_stays_granted_and_another_customer_is_not_capped(
    database_url: str,
) -> None:
    g = gate(database_url)
    c, other = customer(database_url), customer(database_url)
    assert g.reserve(ask(c, "a/r/one", T0)).verdict == SEND
    assert g.reserve(ask(c, "a/r/one", T0 + HOUR)).verdict == SEND  # a retry: the same slot
    assert g.reserve(ask(c, "b/r/two", T0 + HOUR)).verdict == WAIT
    assert g.reserve(ask(other, "c/r/one", T0 + HOUR)).verdict == SEND


def test_a_grant_from_before_a_hold_is_decided_again(database_url: str) -> None:
    """Held (the kill switch, a pause) after its grant, a message asks again: into quiet
    hours it waits for their end, and that new grant stands when the same ask is retried."""
    g = gate(database_url, quiet_start="20:00", quiet_end="08:00")
    c = customer(database_url)
    assert g.reserve(ask(c, "a/r/one", T0, stale_after=2 * DAY)).verdict == SEND
    released = T0 + 12 * HOUR  # 22:00 UTC: quiet
    after = g.reserve(ask(c, "a/r/one", released, wanted_at=T0, held_until=released))
    assert (after.verdict, after.until) == (WAIT, T0 + 22 * HOUR)
    assert "quiet hours" in after.reason
    woke = T0 + 22 * HOUR
    assert g.reserve(ask(c, "a/r/one", woke, wanted_at=T0, held_until=released)).verdict == SEND
    assert row(database_url, "a/r/one").granted_at == woke
    # Retried (the same input): the grant from after the hold stands.
    assert g.reserve(ask(c, "a/r/one", woke, wanted_at=T0, held_until=released)).verdict == SEND
    assert row(database_url, "a/r/one").granted_at == woke
    # Without a hold, a grant stands whenever asked (a retry, the journey waking).
    assert g.reserve(ask(c, "a/r/one", T0 + 23 * HOUR)).verdict == SEND


def test_a_message_held_past_its_stale_limit_is_dropped(database_url: str) -> None:
    g = gate(database_url)
    c = customer(database_url)
    assert g.reserve(ask(c, "a/r/one", T0, stale_after=2 * HOUR)).verdict == SEND
    released = T0 + 3 * HOUR  # the slot is free, but the message is stale
    dropped = g.reserve(ask(c, "a/r/one", released, wanted_at=T0, held_until=released))
    assert dropped.verdict == DROP and "held past the message's stale limit" in dropped.reason
    kept = row(database_url, "a/r/one")
    assert kept.state == "dropped" and kept.granted_at is None
    # The unused grant no longer counts against the cap (one a day).
    assert g.reserve(ask(c, "b/r/two", released)).verdict == SEND


def test_the_weekly_cap_counts_a_rolling_seven_days(database_url: str) -> None:
    g = gate(database_url, cap_per_day=2, cap_per_week=3)
    c = customer(database_url)
    for n, at in enumerate([T0, T0 + HOUR, T0 + DAY]):
        assert g.reserve(ask(c, f"k/r/{n}", at)).verdict == SEND
    fourth = g.reserve(ask(c, "k/r/3", T0 + 2 * DAY))
    assert (fourth.verdict, fourth.until) == (WAIT, T0 + 7 * DAY)  # when the first leaves
    assert "KAERU_CAP_PER_WEEK" in fourth.reason


def test_a_message_that_would_wait_past_its_stale_limit_is_dropped(database_url: str) -> None:
    g = gate(database_url)
    c = customer(database_url)
    assert g.reserve(ask(c, "a/r/one", T0)).verdict == SEND
    late = ask(c, "b/r/two", T0 + HOUR, stale_after=6 * HOUR)
    dropped = g.reserve(late)
    assert dropped.verdict == DROP
    assert "stale limit" in dropped.reason
    kept = row(database_url, "b/r/two")
    assert kept.state == "dropped" and kept.reason == dropped.reason
    assert g.reserve(late).verdict == DROP  # asked again: still dropped
    # The same wait within a limit of two days waits instead.
    waits = g.reserve(ask(c, "c/r/three", T0 + HOUR, stale_after=2 * DAY))
    assert (waits.verdict, waits.until) == (WAIT, T0 + DAY)


def test_a_waiting_higher_priority_message_takes_the_free_slot_first(database_url: str) -> None:
    g = gate(database_url)
    c = customer(database_url)
    assert g.reserve(ask(c, "post-purchase/r/review", T0, kind="post-purchase")).verdict == SEND
    # Both want the one slot of the day: they wait for it.
    cart = ask(c, "cart/r/cart_email", T0 + HOUR, kind="cart-abandonment", priority=10)
    win_back = ask(c, "win-back/r/miss_you", T0 + 2 * HOUR, kind="win-back", priority=40)
    assert g.reserve(cart).until == T0 + DAY
    assert g.reserve(win_back).until == T0 + DAY + DAY  # behind the cart already
    # The win-back asks first when the slot frees: the cart still waits for it, so it waits.
    early = g.reserve(ask(c, win_back.key, T0 + DAY, kind="win-back", priority=40))
    assert (early.verdict, early.until) == (WAIT, T0 + 2 * DAY)
    assert "higher priority (cart-abandonment)" in early.reason
    assert g.reserve(ask(c, cart.key, T0 + DAY, kind="cart-abandonment", priority=10)).verdict == (
        SEND
    )
    final = g.reserve(ask(c, win_back.key, T0 + 2 * DAY, kind="win-back", priority=40))
    assert final.verdict == SEND  # the next free one


def test_a_higher_priority_message_whose_journey_stopped_asking_blocks_nothing(
    database_url: str,
) -> None:
    g = gate(database_url)
    c = customer(database_url)
    assert g.reserve(ask(c, "x/r/first", T0)).verdict == SEND
    cart = ask(c, "cart/r/cart_email", T0 + HOUR, kind="cart-abandonment", priority=10)
    assert g.reserve(cart).until == T0 + DAY  # then its journey ended (a purchase)
    lower = ask(c, "win-back/r/miss_you", T0 + DAY + 2 * HOUR, kind="win-back", priority=40)
    assert g.reserve(lower).verdict == SEND


def test_the_same_utc_moment_is_quiet_in_tokyo_and_not_in_new_york(database_url: str) -> None:
    g = gate(database_url, quiet_start="21:00", quiet_end="08:00")
    tokyo = customer(database_url, "Asia/Tokyo")
    new_york = customer(database_url, "America/New_York")
    moment = datetime(2026, 12, 2, 13, 0, tzinfo=UTC)  # 22:00 in Tokyo, 08:00 in New York
    waits = g.reserve(ask(tokyo, "t/r/one", moment))
    assert waits.verdict == WAIT
    assert waits.until == datetime(2026, 12, 2, 23, 0, tzinfo=UTC)  # 08:00 the next day, JST
    assert "quiet hours (21:00 to 08:00 Asia/Tokyo)" in waits.reason
    assert g.reserve(ask(new_york, "n/r/one", moment)).verdict == SEND
    # 22:00 in New York waits until 08:00 there: 13:00 UTC the next day.
    evening = datetime(2026, 12, 3, 3, 0, tzinfo=UTC)
    assert g.reserve(ask(new_york, "n/r/two", evening + 7 * DAY)).until == (
        datetime(2026, 12, 10, 13, 0, tzinfo=UTC)
    )


def test_quiet_hours_follow_daylight_saving_time(database_url: str) -> None:
    g = gate(database_url, quiet_start="21:00", quiet_end="08:00")
    new_york = customer(database_url, "America/New_York")
    # 22:00 EDT on 31 October 2026; the clocks go back at 02:00 on 1 November.
    evening = datetime(2026, 11, 1, 2, 0, tzinfo=UTC)
    until = g.reserve(ask(new_york, "n/r/one", evening)).until
    assert until == datetime(2026, 11, 1, 13, 0, tzinfo=UTC)  # 08:00 EST: 11 hours later


def test_quiet_hours_use_the_shop_time_zone_without_the_customers(database_url: str) -> None:
    g = gate(database_url, quiet_start="12:00", quiet_end="14:00", shop_timezone="Europe/Berlin")
    c = customer(database_url)
    noon_berlin = datetime(2026, 12, 2, 11, 30, tzinfo=UTC)  # 12:30 CET: inside the window
    waited = g.reserve(ask(c, "a/r/one", noon_berlin))
    assert (waited.verdict, waited.until) == (WAIT, datetime(2026, 12, 2, 13, 0, tzinfo=UTC))
    assert g.reserve(ask(c, "b/r/one", datetime(2026, 12, 2, 13, 0, tzinfo=UTC))).verdict == SEND


def test_equal_quiet_times_turn_quiet_hours_off(database_url: str) -> None:
    g = gate(database_url, quiet_start="21:00", quiet_end="21:00")
    c = customer(database_url, "Asia/Tokyo")
    assert g.reserve(ask(c, "a/r/one", datetime(2026, 12, 2, 17, 0, tzinfo=UTC))).verdict == SEND


def test_the_next_free_slot_is_under_the_cap_and_outside_quiet_hours(database_url: str) -> None:
    quiet = gate(database_url, quiet_start="21:00", quiet_end="08:00")
    c = customer(database_url, "Asia/Tokyo")
    # A message granted at 23:00 JST (sent while quiet hours were off).
    assert (
        gate(database_url)
        .reserve(ask(c, "a/r/one", datetime(2026, 12, 2, 14, 0, tzinfo=UTC)))
        .verdict
        == SEND
    )
    # Asked at 10:00 JST the next morning: the cap frees at 23:00 JST, inside quiet hours,
    # so the slot is 08:00 JST the day after.
    capped = quiet.reserve(ask(c, "b/r/two", datetime(2026, 12, 3, 1, 0, tzinfo=UTC)))
    assert capped.until == datetime(2026, 12, 3, 23, 0, tzinfo=UTC)
    assert "KAERU_CAP_PER_DAY" in capped.reason and "quiet hours" in capped.reason


def test_an_unsubscribed_or_unknown_customer_or_a_suppressed_address_is_refused(
    database_url: str,
) -> None:
    g = gate(database_url)
    said_no = customer(database_url, consent=False)
    refused = g.reserve(ask(said_no, "a/r/one", T0))
    assert (refused.verdict, refused.outcome) == (REFUSED, "unsubscribed")
    assert "unsubscribed from email marketing" in refused.reason
    unknown = customer(database_url, consent=None)
    assert g.reserve(ask(unknown, "b/r/one", T0)).verdict == REFUSED
    assert gate(database_url, unknown_consent_is_yes=True).reserve(
        ask(unknown, "b/r/one", T0)
    ).verdict == (SEND)
    suppressed = customer(database_url)
    with session(database_url) as s:
        s.add(Suppression(email=f"{suppressed}@X.test".upper(), reason="complaint"))
    blocked = g.reserve(ask(suppressed, "c/r/one", T0))
    assert (blocked.verdict, blocked.outcome) == (REFUSED, "undeliverable")
    assert "suppression list (reason: complaint)" in blocked.reason
    assert "@x.test" in blocked.reason and suppressed not in blocked.reason  # masked


def test_a_customer_who_unsubscribes_while_waiting_is_refused_and_frees_the_queue(
    database_url: str,
) -> None:
    g = gate(database_url)
    c = customer(database_url)
    assert g.reserve(ask(c, "a/r/one", T0)).verdict == SEND
    assert g.reserve(ask(c, "b/r/two", T0 + HOUR, priority=10)).verdict == WAIT
    with session(database_url) as s:
        set_consent(s, c, "email", False, "one_click", at=T0 + 2 * HOUR)
    assert g.reserve(ask(c, "b/r/two", T0 + DAY, priority=10)).verdict == REFUSED
    assert row(database_url, "b/r/two").state == "dropped"


def _race(url: str, customers: list[str], side: str, barrier: Any, answers: Any) -> None:
    """One process of the race: ask for each customer's slot when the other process does."""
    g = gate(url)
    for n, customer_id in enumerate(customers):
        barrier.wait()
        key = f"{side}-{customer_id}/r/email"
        result = g.reserve(ask(customer_id, key, T0 + n * timedelta(seconds=1)))
        answers.put((customer_id, side, result.verdict))


def test_two_processes_asking_at_the_same_moment_get_exactly_one_slot(database_url: str) -> None:
    customers = [customer(database_url) for _ in range(12)]
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(2)
    answers = spawn.Queue()
    racers = [
        spawn.Process(target=_race, args=(database_url, customers, side, barrier, answers))
        for side in ("welcome", "win-back")
    ]
    for racer in racers:
        racer.start()
    results = [answers.get(timeout=120) for _ in range(2 * len(customers))]
    for racer in racers:
        racer.join(timeout=30)
        assert racer.exitcode == 0
    for customer_id in customers:
        verdicts = sorted(v for c, _, v in results if c == customer_id)
        assert verdicts == [SEND, WAIT], customer_id
    with session(database_url) as s:
        granted = s.exec(select(SendSlot).where(SendSlot.state == "granted")).all()
    assert len(granted) == len(customers)


def test_a_reservation_result_says_when_and_why(database_url: str) -> None:
    result = gate(database_url).reserve(ask(customer(database_url), "a/r/one", T0))
    assert result == ReserveSendResult(SEND, None, "a send slot was free")


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("KAERU_SHOP_TIMEZONE", "Mars/Olympus", "not an IANA time zone"),
        ("KAERU_QUIET_START", "9pm", "HH:MM"),
        ("KAERU_QUIET_END", "24:00", "HH:MM"),
        ("KAERU_CAP_PER_DAY", "0", "greater than or equal to 1"),
    ],
)
def test_a_bad_gate_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, words: str
) -> None:
    from pydantic import ValidationError

    from kaeru.cli import settings_problem
    from kaeru.settings import Settings

    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None)
    problem = settings_problem(raised.value)
    assert f"{variable}={value!r} is not valid" in problem and words in problem
