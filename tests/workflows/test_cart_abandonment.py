"""Every branch of the cart-abandonment journey, on Temporal's time-skipping test server.

The activities are the real ones (real SMTP server on loopback, real SQLite, local audience
store and coupon provider): only time is fast-forwarded. The ``Shopper`` helper and fixtures
are in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from sqlmodel import select
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError

from kaeru.db import session
from kaeru.models import Coupon, Customer, EmailMessage, Suppression
from tests.conftest import make_settings
from tests.workflows.conftest import (
    DAY,
    HOUR,
    SETTINGS,
    SHOE,
    SOCK,
    Shopper,
    reach_ad_audience,
    reach_offer,
)
from worker import build_worker
from workflows.cart_abandonment import CartJourneySettings
from workflows.kit import CUSTOMER_ID, EVENT_SIGNAL, OUTCOME, STEP

# ---- the happy path and its exits ---------------------------------------------------------


async def test_offer_redeemed_ends_purchased_with_coupon(shopper: Shopper) -> None:
    coupon = await reach_offer(shopper)
    assert len(shopper.emails()) == 2
    offer = shopper.emails()[1]
    assert coupon in offer.get_body(("plain",)).get_content()
    assert shopper.audience() == [shopper.customer_id]

    await shopper.purchase("o-77", coupon=coupon)

    assert await shopper.outcome() == "purchased"
    assert shopper.audience() == []
    [conversion] = shopper.touchpoints("conversion")
    assert (conversion.order_id, conversion.value_minor, conversion.currency) == (
        "o-77",
        10150,
        "USD",
    )
    assert conversion.coupon_code == coupon
    assert conversion.step == "offer_email"
    with session(shopper.db) as s:
        issued = s.exec(select(Coupon).where(Coupon.code == coupon)).one()
    assert issued.customer_id == shopper.customer_id
    assert issued.amount_minor == 1000


async def test_offer_ignored(shopper: Shopper) -> None:
    await reach_offer(shopper)
    await shopper.skip(3 * DAY + 60)
    assert await shopper.outcome() == "offer_ignored"
    assert shopper.audience() == []
    assert len(shopper.emails()) == 2
    assert shopper.touchpoints("conversion") == []


async def test_not_opened(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    await shopper.skip(DAY + 60)
    assert await shopper.outcome() == "not_opened"
    assert len(shopper.emails()) == 1
    assert shopper.touchpoints("audience_joined") == []


async def test_click_counts_as_open(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    await shopper.opened("cart_email", event="Email Link Clicked")
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("ad_audience")
    assert shopper.audience() == [shopper.customer_id]


async def test_ad_not_clicked_leaves_audience(shopper: Shopper) -> None:
    await reach_ad_audience(shopper)
    assert shopper.audience() == [shopper.customer_id]
    await shopper.skip(3 * DAY + 60)
    assert await shopper.outcome() == "ad_not_clicked"
    assert shopper.audience() == []
    assert len(shopper.touchpoints("audience_left")) == 1


async def test_ad_click_before_joining_does_not_count(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    await shopper.opened()
    await shopper.signal("Ad Clicked")  # an old ad: the shopper is not in our audience yet
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("ad_audience")
    await shopper.skip(3 * DAY + 60)
    assert await shopper.outcome() == "ad_not_clicked"


# ---- a purchase ends the journey at once, whatever the step -------------------------------


async def test_purchase_while_cart_is_quiet(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(HOUR)
    await shopper.purchase()
    assert await shopper.outcome() == "purchased"
    assert shopper.emails() == []
    [conversion] = shopper.touchpoints("conversion")
    assert conversion.step == "started"


async def test_purchase_before_open(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    await shopper.purchase()
    assert await shopper.outcome() == "purchased"
    assert len(shopper.emails()) == 1
    assert shopper.touchpoints("conversion")[0].step == "cart_email"


async def test_purchase_after_open_before_audience(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    await shopper.opened()
    await shopper.skip(HOUR)
    await shopper.purchase()
    assert await shopper.outcome() == "purchased"
    assert shopper.touchpoints("audience_joined") == []


async def test_purchase_in_audience_leaves_it(shopper: Shopper) -> None:
    await reach_ad_audience(shopper)
    await shopper.purchase()
    assert await shopper.outcome() == "purchased"
    assert shopper.audience() == []
    assert shopper.touchpoints("conversion")[0].step == "ad_audience"


async def test_purchase_after_ad_click_before_offer(shopper: Shopper) -> None:
    await reach_ad_audience(shopper)
    await shopper.signal("Ad Clicked")
    await shopper.skip(HOUR)
    await shopper.purchase()
    assert await shopper.outcome() == "purchased"
    assert len(shopper.emails()) == 1
    assert shopper.touchpoints("coupon_issued") == []
    assert shopper.audience() == []


# ---- the cart ------------------------------------------------------------------------------


async def test_cart_change_restarts_the_quiet_period(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(20 * HOUR)
    await shopper.cart("Product Added", **SOCK)
    await shopper.skip(5 * HOUR)  # a day after the first change, 5 hours after the second
    assert (await shopper.status()).step == "cart_quiet"
    assert shopper.emails() == []
    await shopper.skip(20 * HOUR)
    await shopper.wait_for_step("cart_email")
    [email] = shopper.emails()
    text = email.get_body(("plain",)).get_content()
    assert "Trail Shoe" in text and "Wool Socks" in text


async def test_emptied_cart_ends_the_journey(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(HOUR)
    await shopper.cart("Product Removed", product_id="shoe")
    await shopper.skip(SETTINGS.empty_grace + 60)  # no order came after the emptied cart
    assert await shopper.outcome() == "cart_emptied"
    assert shopper.emails() == []


async def test_cart_viewed_replaces_the_cart(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.cart("Cart Viewed", products=[SOCK])
    status = await shopper.status()
    assert status.details["cart"] == "2× Wool Socks"
    await shopper.cart("Checkout Started", products=[])
    await shopper.skip(SETTINGS.empty_grace + 60)
    assert await shopper.outcome() == "cart_emptied"


async def test_duplicate_events_have_one_effect(shopper: Shopper) -> None:
    first = await shopper.cart("Product Added", **SHOE)
    # The router re-delivers an event after a crash: same seq, so the journey ignores it.
    await shopper.handle.signal(EVENT_SIGNAL, first)
    await shopper.handle.signal(EVENT_SIGNAL, first)
    assert (await shopper.status()).details["cart"] == "1× Trail Shoe"
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    await shopper.opened()
    await shopper.opened()  # a second open changes nothing
    await shopper.purchase("o-1")
    await shopper.purchase("o-1")
    assert await shopper.outcome() == "purchased"
    assert len(shopper.emails()) == 1
    assert len(shopper.touchpoints("conversion")) == 1


async def test_a_journey_starting_after_an_earlier_one_sees_the_whole_stored_cart(
    shopper: Shopper,
) -> None:
    """Ingestion stores the cart and puts it in every cart event (``cart``): a journey that
    starts on a sock added to a cart that already held a shoe (an earlier journey ended with
    it) has both in its cart, and its email lists both."""
    shoe = {**SHOE, "currency": "USD", "image_url": None, "url": None}
    sock = {**SOCK, "currency": "USD", "image_url": None, "url": None}
    await shopper.cart("Product Added", **SOCK, cart=[shoe, sock])
    assert (await shopper.status()).details["cart"] == "1× Trail Shoe, 2× Wool Socks"
    await shopper.cart("Product Removed", product_id="sock", cart=[shoe])
    assert (await shopper.status()).details["cart"] == "1× Trail Shoe"
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    [email] = await shopper.wait_for_emails(1)
    assert "Trail Shoe" in str(email) and "Wool Socks" not in str(email)


async def test_an_empty_stored_cart_empties_the_journeys_cart(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE, cart=[{**SHOE, "currency": "USD"}])
    await shopper.cart("Product Removed", product_id="other", cart=[])
    await shopper.skip(DAY)
    assert await shopper.outcome() == "cart_emptied"


async def test_busy_cart_continues_as_new_without_losing_state(shopper: Shopper) -> None:
    shopper.settings = CartJourneySettings(**{**SETTINGS.__dict__, "history_limit": 40})
    first = await shopper.cart("Product Added", **SHOE)
    run_id = (await shopper.handle.describe()).run_id
    for _ in range(30):
        await shopper.cart("Product Added", **SOCK)
        await shopper.skip(60)
    later = (await shopper.handle.describe()).run_id
    assert later != run_id
    # The router re-delivers the first event to the continued run: it carried last_seq, so
    # the shoe is not added twice.
    await shopper.handle.signal(EVENT_SIGNAL, first)
    status = await shopper.status()
    assert status.details["cart"] == "1× Trail Shoe, 60× Wool Socks"
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    assert len(shopper.emails()) == 1


# ---- delivery problems --------------------------------------------------------------------


async def test_bounce_ends_the_journey_undeliverable(shopper: Shopper) -> None:
    shopper.smtp.reject_recipient(shopper.email, 550)
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    assert await shopper.outcome() == "undeliverable"
    assert shopper.emails() == []
    with session(shopper.db) as s:
        assert s.get(Suppression, shopper.email) is not None
        row = s.exec(select(EmailMessage)).one()
    assert row.status == "bounced"
    assert len(shopper.touchpoints("email_bounced")) == 1


async def test_no_email_address_ends_the_journey(shopper: Shopper) -> None:
    with session(shopper.db) as s:
        customer = s.get(Customer, shopper.customer_id)
        assert customer is not None
        customer.email = None
        s.add(customer)
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    assert await shopper.outcome() == "no_email_address"


# ---- what operators see ----------------------------------------------------------------------


async def test_search_attributes_status_and_details(shopper: Shopper) -> None:
    await reach_ad_audience(shopper)
    description = await shopper.handle.describe()
    attributes = description.typed_search_attributes
    assert attributes.get(CUSTOMER_ID) == shopper.customer_id
    assert attributes.get(STEP) == "ad_audience"
    status = await shopper.status()
    assert status.waiting_for == "an ad click"
    assert any("opened the cart email" in line for line in status.story)
    await shopper.purchase()
    await shopper.outcome()
    attributes = (await shopper.handle.describe()).typed_search_attributes
    assert attributes.get(OUTCOME) == "purchased"
    assert attributes.get(STEP) == "ended"


async def test_late_open_of_an_earlier_journeys_email_is_ignored(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    earlier = f"{shopper.journey_id}/an-earlier-run/cart_email"
    await shopper.signal("Email Opened", step="cart_email", message_key=earlier)
    await shopper.signal("Email Opened", step="cart_email")  # forged: no message key
    await shopper.skip(DAY + 60)
    assert await shopper.outcome() == "not_opened"


async def test_malformed_amounts_do_not_wedge_the_journey(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **{**SHOE, "price": "1e999999"})
    await shopper.cart("Product Added", product_id={"not": "an id"})
    assert (await shopper.status()).details["cart"] == "1× Trail Shoe"
    await shopper.signal("Order Completed", order_id="o-big", total=1e300, currency="USD")
    assert await shopper.outcome() == "purchased"
    [conversion] = shopper.touchpoints("conversion")
    assert conversion.order_id == "o-big" and conversion.value_minor == 0


async def test_cancelled_journey_still_leaves_the_audience(shopper: Shopper) -> None:
    await reach_ad_audience(shopper)
    assert shopper.audience() == [shopper.customer_id]
    await shopper.handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await shopper.handle.result()
    assert shopper.audience() == []
    attributes = (await shopper.handle.describe()).typed_search_attributes
    assert attributes.get(OUTCOME) == "cancelled"


async def test_purchase_beats_an_emptied_cart_in_the_same_task(shopper: Shopper) -> None:
    """A shop that empties the cart at checkout: both events reach the journey at once."""
    idle_queue = f"idle-{uuid.uuid4().hex[:6]}"
    shopper.task_queue = idle_queue
    await shopper.cart("Product Added", **SHOE)
    await shopper.cart("Product Removed", product_id="shoe")
    await shopper.purchase("o-checkout")
    settings = make_settings(shopper.db, smtp_port=shopper.smtp.port, task_queue=idle_queue)
    # No worker polls the journey's queue yet: not one workflow task ran, so the worker
    # below takes all three events in its first task.
    history = await shopper.handle.fetch_history()
    assert not [
        e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    ]
    async with httpx.AsyncClient() as http, build_worker(shopper.env.client, settings, http):
        assert await shopper.outcome() == "purchased"
    [conversion] = shopper.touchpoints("conversion")
    assert conversion.order_id == "o-checkout"


async def test_a_huge_cart_stays_small(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    long_name = "N" * 30_000
    for n in range(60):
        await shopper.cart("Product Added", product_id=f"p{n}", name=long_name, quantity=1e300)
    status = await shopper.status()
    assert status.details["cart"].count("×") == 50
    assert "1× " + "N" * 200 + "," in status.details["cart"]
    assert all(len(line) < 250 for line in status.story)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")


async def test_purchase_while_the_email_is_being_sent_stops_it(shopper: Shopper) -> None:
    shopper.smtp.stall("RCPT")  # the SMTP server is slow to accept the recipient
    await shopper.cart("Product Added", **SHOE)
    # The test server cannot skip time past a running activity: skip in the background.
    skipping = asyncio.create_task(shopper.skip(DAY + 60))
    await asyncio.wait_for(shopper.smtp.stalled.wait(), timeout=30)
    await shopper.purchase("o-mid-send")
    assert await asyncio.wait_for(shopper.outcome(), timeout=60) == "purchased"
    shopper.smtp.release()
    await asyncio.sleep(0.5)
    assert shopper.emails() == []
    assert shopper.touchpoints("email_sent") == []
    assert shopper.touchpoints("conversion")[0].order_id == "o-mid-send"
    skipping.cancel()


async def test_a_journey_started_again_on_the_same_cart_sends_no_second_reminder(
    shopper: Shopper,
) -> None:
    """The reminder's topic is the cart: the shopper who looks at the same cart after the last
    journey ended gets no second reminder about it, and that journey ends at once."""
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    await shopper.skip(DAY + 60)
    assert await shopper.outcome() == "not_opened"

    await shopper.cart("Cart Viewed", products=[{**SHOE, "quantity": 2}])
    await shopper.skip(DAY + 60)
    assert await shopper.outcome() == "already_reminded"
    assert len(shopper.emails()) == 1
    with session(shopper.db) as s:
        rows = s.exec(select(EmailMessage).where(EmailMessage.customer_id == shopper.customer_id))
        assert sorted(row.status for row in rows) == ["sent", "skipped"]


async def test_a_journey_on_a_different_cart_reminds_again(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    await shopper.skip(DAY + 60)
    assert await shopper.outcome() == "not_opened"

    await shopper.cart("Cart Viewed", products=[SHOE, SOCK])
    await shopper.skip(DAY + 60)
    await shopper.wait_for_emails(2)
    assert "Wool Socks" in str(shopper.emails()[1])
