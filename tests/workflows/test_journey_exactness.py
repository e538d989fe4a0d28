"""Issue 13: what a journey decides when events race its steps, its end and its activities.

Each test reproduces one case on the time-skipping server with the real activities, except
where a test swaps one activity by name to hold it or to script its answer (said in the test).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import select
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError

from activities.audience_sync import AudienceSyncActivities
from activities.email import EmailActivities
from activities.types import (
    ALREADY_PURCHASED,
    AudienceChange,
    AudienceTargets,
    SendEmailInput,
    SendEmailResult,
)
from kaeru.db import session
from kaeru.models import AudienceJoin, EmailMessage, Order
from tests.conftest import make_settings
from tests.workflows.conftest import (
    DAY,
    HOUR,
    SHOE,
    SOCK,
    Shopper,
    reach_ad_audience,
    worker_with,
)
from workflows.cart_abandonment import CartJourneySettings
from workflows.kit import EVENT_SIGNAL, MAX_HELD_EVENTS, Journey

MINUTE = 60.0


def text_of(email: object) -> str:
    return str(email.get_body(("plain",)).get_content())  # type: ignore[attr-defined]


# ---- item 9: a cart event's currency ---------------------------------------------------------


async def test_product_lists_take_the_events_currency(shopper: Shopper) -> None:
    matcha = {"product_id": "matcha", "name": "Matcha", "price": 1200, "quantity": 1}
    cup = {"product_id": "cup", "name": "Cup", "price": 9.5, "currency": "EUR"}
    await shopper.cart("Checkout Started", currency="JPY", products=[matcha, cup])
    await shopper.skip(DAY + MINUTE)
    [email] = await shopper.wait_for_emails(1)
    text = text_of(email)
    assert "1200 JPY" in text  # the event's currency
    assert "9.50 EUR" in text  # an item's own currency wins
    assert "USD" not in text


# ---- items 3 and 4: an emptied cart ----------------------------------------------------------


async def test_cart_emptied_and_refilled_in_one_task_goes_on(shopper: Shopper) -> None:
    idle = f"idle-{uuid.uuid4().hex[:6]}"
    shopper.task_queue = idle
    await shopper.cart("Product Added", **SHOE)
    await shopper.cart("Product Removed", product_id="shoe")
    await shopper.cart("Product Added", **SOCK)
    async with worker_with(shopper, task_queue=idle):
        await shopper.skip(DAY + MINUTE)
        [email] = await shopper.wait_for_emails(1)
        assert "Wool Socks" in text_of(email)
        status = await shopper.status()
        assert status.outcome is None and status.details["cart"] == "2× Wool Socks"


async def test_purchase_just_after_an_emptied_cart_is_a_conversion(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(HOUR)
    await shopper.cart("Product Removed", product_id="shoe")  # checkout empties the cart
    await shopper.skip(30)  # the order arrives a moment later
    await shopper.purchase("o-checkout")
    assert await shopper.outcome() == "purchased"
    [conversion] = shopper.touchpoints("conversion")
    assert conversion.order_id == "o-checkout"
    assert shopper.emails() == []


async def test_an_emptied_cart_ends_the_journey_after_the_grace(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(HOUR)
    await shopper.cart("Product Removed", product_id="shoe")
    await shopper.skip(9 * MINUTE)
    assert (await shopper.status()).outcome is None  # still waiting for a purchase
    await shopper.skip(2 * MINUTE)
    assert await shopper.outcome() == "cart_emptied"
    assert shopper.emails() == [] and shopper.touchpoints("conversion") == []


async def test_a_refill_during_the_grace_keeps_the_journey(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    run_id = (await shopper.handle.describe()).run_id
    await shopper.skip(HOUR)
    await shopper.cart("Product Removed", product_id="shoe")
    await shopper.skip(5 * MINUTE)
    await shopper.cart("Product Added", **SOCK)
    await shopper.skip(DAY + MINUTE)
    [email] = await shopper.wait_for_emails(1)
    assert "Wool Socks" in text_of(email)
    assert (await shopper.handle.describe()).run_id == run_id  # the same journey went on


async def test_a_grace_longer_than_the_quiet_period_is_still_waited_out(
    shopper: Shopper,
) -> None:
    shopper.settings = CartJourneySettings(
        **{**shopper.settings.__dict__, "email_delay": 5 * MINUTE, "empty_grace": 10 * MINUTE}
    )
    await shopper.cart("Product Added", **SHOE)
    await shopper.cart("Product Removed", product_id="shoe")
    await shopper.skip(7 * MINUTE)  # the cart went quiet, empty, two minutes ago
    await shopper.purchase("o-late")
    assert await shopper.outcome() == "purchased"
    assert shopper.touchpoints("conversion")[0].order_id == "o-late"


# ---- item 6: a received purchase always wins ---------------------------------------------------


async def test_purchase_during_data_wins_over_a_refusal(shopper: Shopper) -> None:
    shopper.smtp.stall("DATA")  # the server holds its answer to the whole message...
    shopper.smtp.reject_data(554)  # ...and then refuses it
    await shopper.cart("Product Added", **SHOE)
    # The test server cannot skip time past a running activity: skip in the background.
    skipping = asyncio.create_task(shopper.skip(DAY + MINUTE))
    await asyncio.wait_for(shopper.smtp.stalled.wait(), timeout=30)
    await shopper.purchase("o-during-data")
    await asyncio.sleep(1)  # the journey asks the send to stop; it has handed the message over
    shopper.smtp.release()
    assert await asyncio.wait_for(shopper.outcome(), timeout=60) == "purchased"
    [conversion] = shopper.touchpoints("conversion")
    assert conversion.order_id == "o-during-data"
    assert len(shopper.smtp.refused_messages) == 1
    skipping.cancel()


# ---- item 7 (the journey's half): an order found before sending --------------------------------


async def test_an_order_found_before_sending_ends_purchased(shopper: Shopper) -> None:
    """``send_email`` is swapped for one that answers as the real one does when the customer
    has a stored order since ``ordered_since`` (the email activity's tests test that check)."""
    asked: list[SendEmailInput] = []

    @activity.defn(name="send_email")
    async def already_purchased(email: SendEmailInput) -> SendEmailResult:
        asked.append(email)
        raise ApplicationError(
            "the customer ordered after the cart", type=ALREADY_PURCHASED, non_retryable=True
        )

    async with worker_with(shopper, send_email=already_purchased):
        started = await shopper.cart("Product Added", **SHOE)
        await shopper.skip(HOUR)
        await shopper.cart("Product Added", **SOCK)
        await shopper.skip(DAY + MINUTE)
        assert await shopper.outcome() == "purchased"
        story = (await shopper.status()).story
    [email] = asked
    assert email.ordered_since == started.occurred_at.timestamp()
    assert any("order" in line and "before sending" in line for line in story)
    assert shopper.touchpoints("conversion") == []


async def test_an_order_found_before_sending_is_the_journeys_conversion(shopper: Shopper) -> None:
    """The real ``send_email`` finds the stored order; its event never reaches the journey."""
    await shopper.cart("Product Added", **SHOE)
    with session(shopper.db) as s:
        s.add(
            Order(
                order_id="o-stored",
                customer_id=shopper.customer_id,
                total_minor=4200,
                currency="EUR",
                completed_at=datetime.now(UTC),
            )
        )
    await shopper.skip(DAY + MINUTE)
    result = await shopper.handle.result()
    assert (result.outcome, result.order_id) == ("purchased", "o-stored")
    [conversion] = shopper.touchpoints("conversion")
    assert (conversion.order_id, conversion.value_minor, conversion.currency) == (
        "o-stored",
        4200,
        "EUR",
    )
    assert shopper.emails() == []


@pytest.mark.parametrize("new_cart_first", [False, True], ids=["order", "cart-then-order"])
async def test_an_order_routed_while_ending_is_the_conversion_of_an_order_found(
    shopper: Shopper, new_cart_first: bool
) -> None:
    """An older worker's ``send_email`` says ``AlreadyPurchased`` for the offer without naming
    the order; ``queue_audience_leave`` is held (then runs for real) so the order's event
    arrives while the journey ends. After a new cart, the order may be that cart's: it goes
    to the next journey with it (which converts it), not to the one ending."""
    emails = EmailActivities(make_settings(shopper.db, smtp_port=shopper.smtp.port))
    audiences = AudienceSyncActivities(make_settings(shopper.db), http=None)  # type: ignore[arg-type]
    held, release = asyncio.Event(), asyncio.Event()

    @activity.defn(name="send_email")
    async def older_worker(email: SendEmailInput) -> SendEmailResult:
        if email.step == "offer_email":
            raise ApplicationError("ordered", type=ALREADY_PURCHASED, non_retryable=True)
        return await emails.send_email(email)

    @activity.defn(name="queue_audience_leave")
    async def slow_removal(change: AudienceChange) -> AudienceTargets:
        held.set()
        await release.wait()
        return await audiences.queue_audience_leave(change)

    async with worker_with(shopper, send_email=older_worker, queue_audience_leave=slow_removal):
        await reach_ad_audience(shopper)
        await shopper.signal("Ad Clicked")
        skipping = asyncio.create_task(shopper.skip(DAY + MINUTE))
        await asyncio.wait_for(held.wait(), timeout=30)
        if new_cart_first:
            await shopper.cart("Product Added", **SOCK)
        await shopper.purchase("o-found")  # the order the send found, routed only now
        release.set()
        await asyncio.wait_for(skipping, timeout=60)
        result = await asyncio.wait_for(shopper.handle.result(), timeout=60)
        status = await shopper.status()
    assert (result.outcome, result.order_id) == ("purchased", "o-found")
    assert any("new journey" in line for line in status.story) == new_cart_first
    [conversion] = shopper.touchpoints("conversion")
    assert conversion.order_id == "o-found"
    assert shopper.audience() == []


# ---- item 2: events that arrive while a journey ends start the next one ------------------------


async def test_a_cart_while_the_journey_ends_starts_the_next_journey(shopper: Shopper) -> None:
    """``queue_audience_leave`` is held (then runs for real) to keep ``finish`` busy."""
    held, release = asyncio.Event(), asyncio.Event()
    real = AudienceSyncActivities(make_settings(shopper.db), http=None)  # type: ignore[arg-type]

    @activity.defn(name="queue_audience_leave")
    async def slow_removal(change: AudienceChange) -> AudienceTargets:
        held.set()
        await release.wait()
        return await real.queue_audience_leave(change)

    async with worker_with(shopper, queue_audience_leave=slow_removal):
        await reach_ad_audience(shopper)
        await shopper.purchase("o-1")
        await asyncio.wait_for(held.wait(), timeout=30)
        await shopper.cart("Product Added", **SOCK)  # a new cart, while the first journey ends
        release.set()
        await asyncio.sleep(0.5)
        await shopper.skip(DAY + MINUTE)
        emails = await shopper.wait_for_emails(2)
        assert "Wool Socks" in text_of(emails[1]) and "Trail Shoe" not in text_of(emails[1])
        status = await shopper.status()
        assert status.outcome is None and status.details["cart"] == "2× Wool Socks"
        assert any("journey ended: purchased" in line for line in status.story)
        assert any("new journey" in line for line in status.story)
    [conversion] = shopper.touchpoints("conversion")
    assert conversion.order_id == "o-1"
    assert shopper.audience() == []
    with session(shopper.db) as s:
        keys = [m.key for m in s.exec(select(EmailMessage))]
    assert len(set(keys)) == 2  # the next journey's steps have keys of their own


async def test_many_events_while_the_journey_ends_keep_the_order_and_the_cart(
    shopper: Shopper,
) -> None:
    """``queue_audience_leave`` is held (then runs for real) to keep ``finish`` busy while
    more events than the held-event cap arrive: the cart collapses, the order is kept."""
    held, release = asyncio.Event(), asyncio.Event()
    real = AudienceSyncActivities(make_settings(shopper.db), http=None)  # type: ignore[arg-type]

    @activity.defn(name="queue_audience_leave")
    async def slow_removal(change: AudienceChange) -> AudienceTargets:
        held.set()
        await release.wait()
        return await real.queue_audience_leave(change)

    socks = MAX_HELD_EVENTS + 5
    async with worker_with(shopper, queue_audience_leave=slow_removal):
        await reach_ad_audience(shopper)
        await shopper.purchase("o-1")
        await asyncio.wait_for(held.wait(), timeout=30)
        await shopper.cart("Product Added", **SHOE)  # the next cart, while the first journey ends
        for _ in range(socks):
            await shopper.cart("Product Added", **{**SOCK, "quantity": 1})
        await shopper.purchase("o-2")  # ...and its order, past the cap
        release.set()
        result = await asyncio.wait_for(shopper.handle.result(), timeout=60)
        status = await shopper.status()
    assert (result.outcome, result.order_id) == ("purchased", "o-2")
    assert status.details["cart"] == f"1× Trail Shoe, {socks}× Wool Socks"
    assert sorted(str(c.order_id) for c in shopper.touchpoints("conversion")) == ["o-1", "o-2"]
    assert shopper.audience() == []


async def test_a_failing_removal_is_parked_within_minutes(shopper: Shopper) -> None:
    """``queue_audience_leave`` is swapped for one that always fails as a down platform does
    (retryable): the journey parks it for the sweeper instead of retrying for half a day."""

    @activity.defn(name="queue_audience_leave")
    async def platform_down(change: AudienceChange) -> AudienceTargets:
        raise ApplicationError("Meta answered HTTP 503")

    async with worker_with(shopper, queue_audience_leave=platform_down):
        await reach_ad_audience(shopper)
        await shopper.purchase("o-1")
        await shopper.skip(15 * MINUTE)
        description = await shopper.handle.describe()
        assert description.status == WorkflowExecutionStatus.COMPLETED
    with session(shopper.db) as s:
        [parked] = s.exec(select(AudienceJoin)).all()
    assert parked.left_at is None and "503" in (parked.removal_error or "")
    [conversion] = shopper.touchpoints("conversion")
    assert conversion.order_id == "o-1"


async def test_the_next_journey_does_not_stop_on_the_order_the_last_one_converted(
    shopper: Shopper,
) -> None:
    """A new cart from a browser whose clock is 5 minutes slow reads as placed before the
    order the ended journey converted. ``queue_audience_leave`` is held (then runs for real)
    so the cart comes while the first journey ends; the real ``send_email`` checks orders."""
    held, release = asyncio.Event(), asyncio.Event()
    real = AudienceSyncActivities(make_settings(shopper.db), http=None)  # type: ignore[arg-type]

    @activity.defn(name="queue_audience_leave")
    async def slow_removal(change: AudienceChange) -> AudienceTargets:
        held.set()
        await release.wait()
        return await real.queue_audience_leave(change)

    async with worker_with(shopper, queue_audience_leave=slow_removal):
        await reach_ad_audience(shopper)
        order = shopper.event("Order Completed", order_id="o-1", total=101.5, currency="USD")
        with session(shopper.db) as s:  # stored at ingestion, as every order is
            s.add(
                Order(
                    order_id="o-1",
                    customer_id=shopper.customer_id,
                    total_minor=10150,
                    currency="USD",
                    completed_at=order.occurred_at,
                )
            )
        await shopper.handle.signal(EVENT_SIGNAL, order)
        await asyncio.wait_for(held.wait(), timeout=30)
        cart = shopper.event("Product Added", product_id="sock", name="Wool Socks", quantity=2)
        await shopper.deliver(
            dataclasses.replace(cart, occurred_at=order.occurred_at - timedelta(minutes=5))
        )
        release.set()
        await asyncio.sleep(0.5)
        await shopper.skip(DAY + MINUTE)
        emails = await shopper.wait_for_emails(2)
        status = await shopper.status()
    assert "Wool Socks" in text_of(emails[1])
    assert status.outcome is None and status.step == "cart_email", status.story
    [conversion] = shopper.touchpoints("conversion")
    assert conversion.order_id == "o-1"


async def test_ordered_since_survives_a_busy_cart_continuing_as_new(shopper: Shopper) -> None:
    """``send_email`` is swapped for one that records what it was asked and says "sent"."""
    asked: list[SendEmailInput] = []

    @activity.defn(name="send_email")
    async def recorded(email: SendEmailInput) -> SendEmailResult:
        asked.append(email)
        return SendEmailResult(
            message_id="<m@test>", to_address="c***@shoppers.test", status="sent"
        )

    shopper.settings = CartJourneySettings(**{**shopper.settings.__dict__, "history_limit": 40})
    async with worker_with(shopper, send_email=recorded):
        started = await shopper.cart("Product Added", **SHOE)
        first_run = (await shopper.handle.describe()).run_id
        for _ in range(30):
            await shopper.cart("Product Added", **SOCK)
            await shopper.skip(MINUTE)
        assert (await shopper.handle.describe()).run_id != first_run
        await shopper.skip(DAY + MINUTE)
        await shopper.wait_for_step("cart_email")
        for _ in range(100):
            if asked:
                break
            await asyncio.sleep(0.05)
    [email] = asked
    assert email.ordered_since == started.occurred_at.timestamp()


# ---- item 5 (the conversion half): a redelivered order ---------------------------------------


async def test_events_redelivered_after_the_end_convert_the_order_once(shopper: Shopper) -> None:
    """A router stopped before it marked a round routed: a second router delivers the same
    events again, after the journey ended, so they start a new run."""
    cart = await shopper.cart("Product Added", **SHOE)
    order = shopper.event("Order Completed", order_id="o-1", total=101.5, currency="USD")
    await shopper.handle.signal(EVENT_SIGNAL, order)
    assert await shopper.outcome() == "purchased"
    first_run = (await shopper.handle.describe()).run_id

    await shopper.deliver(cart)  # the same events, seq and all
    await shopper.handle.signal(EVENT_SIGNAL, order)
    assert await shopper.outcome() == "purchased"
    assert (await shopper.handle.describe()).run_id != first_run
    [conversion] = shopper.touchpoints("conversion")
    assert conversion.order_id == "o-1"


# ---- review: an emptied cart's grace that ends during an activity ------------------------------


async def test_a_refill_after_the_grace_ended_during_a_send_keeps_the_journey(
    shopper: Shopper,
) -> None:
    """``send_email`` is held (and then says "sent") so the grace ends while it runs."""
    held, release = asyncio.Event(), asyncio.Event()

    @activity.defn(name="send_email")
    async def slow_send(email: SendEmailInput) -> SendEmailResult:
        held.set()
        await release.wait()
        return SendEmailResult("<m@test>", "c***@shoppers.test", "sent")

    shopper.settings = CartJourneySettings(**{**shopper.settings.__dict__, "empty_grace": 2.0})
    async with worker_with(shopper, send_email=slow_send):
        await shopper.cart("Product Added", **SHOE)
        skipping = asyncio.create_task(shopper.skip(DAY + MINUTE))
        await asyncio.wait_for(held.wait(), timeout=30)
        await shopper.signal("Product Removed", product_id="shoe")
        await asyncio.sleep(4)  # the grace ends while the send runs (a slow or retrying SMTP)
        await shopper.signal("Product Added", **SOCK)  # the shopper refills
        await asyncio.sleep(0.5)
        release.set()
        await asyncio.wait_for(skipping, timeout=60)
        await shopper.wait_for_step("cart_email")
        status = await shopper.status()
        assert status.outcome is None, status.story
        assert status.details["cart"] == "2× Wool Socks"
        await shopper.skip(DAY + MINUTE)
        assert await shopper.outcome() == "not_opened"  # the journey went on with the refill


async def test_a_cart_emptied_again_after_such_a_refill_gets_a_grace_of_its_own(
    shopper: Shopper,
) -> None:
    """As above, but the refilled cart is emptied again before the send ends: the order may
    still follow, so the journey waits a new grace instead of ending as the send returns."""
    held, release = asyncio.Event(), asyncio.Event()

    @activity.defn(name="send_email")
    async def slow_send(email: SendEmailInput) -> SendEmailResult:
        held.set()
        await release.wait()
        return SendEmailResult("<m@test>", "c***@shoppers.test", "sent")

    # In real time throughout: skipping would end the new grace at once.
    shopper.settings = CartJourneySettings(
        **{**shopper.settings.__dict__, "email_delay": 1.0, "empty_grace": 3.0}
    )
    async with worker_with(shopper, send_email=slow_send):
        await shopper.cart("Product Added", **SHOE)
        await asyncio.wait_for(held.wait(), timeout=30)
        await shopper.signal("Product Removed", product_id="shoe")
        await asyncio.sleep(5)  # the first grace ends while the send runs
        await shopper.signal("Product Added", **SOCK)
        await shopper.signal("Product Removed", product_id="sock")  # checkout empties it
        release.set()
        await asyncio.sleep(0.5)
        assert (await shopper.status()).outcome is None  # within the new grace
        await shopper.purchase("o-after-checkout")
        assert await shopper.outcome() == "purchased"
    [conversion] = shopper.touchpoints("conversion")
    assert conversion.order_id == "o-after-checkout"


def test_a_journey_that_starts_on_events_must_say_how_its_next_generation_starts() -> None:
    """Checked when the class is defined: a missing next_journey would otherwise fail every
    workflow task of a journey that reached its end with a new cart held. A journey on the
    kit's own ``JourneyInput`` gets it from the kit."""
    with pytest.raises(TypeError, match="does not define next_journey"):

        class Forgetful(Journey[None]):
            kind = "forgetful"
            starts_on = frozenset({"Product Viewed"})

            def __init__(self, start: Any) -> None:  # its own input: the kit cannot build it
                self._begin(start.customer_id)

    class Listener(Journey[None]):  # starts on nothing: no next generation needed
        kind = "listener"

    class OnTheKitsInput(Journey[None]):  # the kit's JourneyInput: the kit's next_journey
        kind = "kit-input"
        starts_on = frozenset({"Product Viewed"})

    assert Listener.starts_on == frozenset() and OnTheKitsInput.starts_on
