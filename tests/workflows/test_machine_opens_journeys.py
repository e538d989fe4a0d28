"""Journeys count human opens and clicks only: a machine's (Apple Mail Privacy Protection, a
link scanner) never moves the cart journey on to its audience step, unless
``KAERU_MACHINE_OPENS_COUNT`` says so (the API writes it into each event)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path
from typing import Any

from kaeru.tracking_tokens import OPEN
from starter.opens_and_clicks import load_signing_key, record_hit, verifying_keys
from starter.router import fetch_unrouted
from tests.conftest import make_settings
from tests.workflows.conftest import DAY, SHOE, Shopper
from workflows.kit import EMAIL_LINK_CLICKED, EMAIL_OPENED, EVENT_SIGNAL


async def at_cart_email(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")


async def fetched(
    shopper: Shopper,
    event: str = EMAIL_OPENED,
    *,
    machine: bool,
    reason: str | None = None,
    counts: bool = False,
    links: int = 2,
    **extra: Any,
) -> None:
    """An open or click as the tracking endpoint stores it (starter/opens_and_clicks.py)."""
    key = await shopper.message_key("cart_email")
    await shopper.signal(
        event,
        step="cart_email",
        journey_id=shopper.journey_id,
        message_key=key,
        links=links,
        machine=machine,
        machine_reason=reason,
        machine_counts=counts,
        **extra,
    )


async def story(shopper: Shopper) -> list[str]:
    return list((await shopper.status()).story)


async def test_a_machine_open_does_not_move_the_journey_on(shopper: Shopper) -> None:
    await at_cart_email(shopper)
    await fetched(shopper, machine=True, reason="apple_mpp")
    await fetched(shopper, EMAIL_LINK_CLICKED, machine=True, reason="scanner_ua")
    await shopper.skip(DAY + 60)
    assert await shopper.outcome() == "not_opened"
    assert shopper.touchpoints("audience_joined") == []
    told = await story(shopper)
    assert any("Apple Mail Privacy Protection" in line and "not counted" in line for line in told)
    assert any("link scanner" in line for line in told)


async def test_a_human_open_moves_it_to_the_audience_step(shopper: Shopper) -> None:
    await at_cart_email(shopper)
    await fetched(shopper, machine=False)
    # Counted once no scanner's burst verdict can still come (the message has two links).
    assert not any("opened the cart email" in line for line in await story(shopper))
    await shopper.skip(11)
    assert any("opened the cart email" in line for line in await story(shopper))
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("ad_audience")
    assert shopper.audience() == [shopper.customer_id]


async def test_the_setting_makes_a_machine_open_count(shopper: Shopper) -> None:
    await at_cart_email(shopper)
    await fetched(shopper, machine=True, reason="apple_mpp", counts=True)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("ad_audience")


async def test_the_shoppers_open_after_the_proxys_counts(shopper: Shopper) -> None:
    await at_cart_email(shopper)
    await fetched(shopper, machine=True, reason="apple_mpp")
    await shopper.skip(3600)
    await fetched(shopper, machine=False)
    await shopper.skip(DAY + 60)  # counted 10 s later, then the day's ad delay
    await shopper.wait_for_step("ad_audience")


async def test_a_burst_of_clicks_takes_back_the_open_and_click_told_before_it(
    shopper: Shopper,
) -> None:
    """The first open and click of a scanner's burst reach the journey as human; the verdict
    follows within the second, before the journey counted them."""
    await at_cart_email(shopper)
    await fetched(shopper, machine=False)
    await fetched(shopper, EMAIL_LINK_CLICKED, machine=False, link=0)
    await fetched(
        shopper,
        EMAIL_LINK_CLICKED,
        machine=True,
        reason="all_links_same_second",
        burst_open=True,
    )
    await shopper.skip(DAY + 60)
    assert await shopper.outcome() == "not_opened"
    assert any("every link" in line for line in await story(shopper))


async def test_a_burst_of_clicks_leaves_an_earlier_human_open_counted(shopper: Shopper) -> None:
    await at_cart_email(shopper)
    await fetched(shopper, machine=False)
    await fetched(shopper, EMAIL_LINK_CLICKED, machine=False, link=0)
    await fetched(
        shopper,
        EMAIL_LINK_CLICKED,
        machine=True,
        reason="all_links_same_second",
        burst_open=False,
    )
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("ad_audience")


async def test_the_shoppers_click_after_a_burst_counts(shopper: Shopper) -> None:
    await at_cart_email(shopper)
    await fetched(shopper, EMAIL_LINK_CLICKED, machine=False, link=0)
    await fetched(shopper, EMAIL_LINK_CLICKED, machine=True, reason="all_links_same_second")
    await shopper.skip(3600)
    await fetched(shopper, EMAIL_LINK_CLICKED, machine=False, link=1)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("ad_audience")


async def test_a_message_with_one_link_counts_its_open_at_once(shopper: Shopper) -> None:
    """No burst can be judged in it, so the journey need not wait for one."""
    await at_cart_email(shopper)
    await fetched(shopper, machine=False, links=1)
    assert any("opened the cart email" in line for line in await story(shopper))


# ---- through the tracking endpoint's own recording, delivered as the router delivers -------

APPLE = "172.224.226.5"
SAFARI = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
)


async def fetch_pixel(shopper: Shopper, tmp_path: Path, address: str, agent: str) -> None:
    """The cart email's open pixel fetched from ``address`` with ``agent``: recorded by the
    endpoint's :func:`record_hit`, and what it stored delivered to the journey."""
    ranges = tmp_path / "apple.csv"
    ranges.write_text("172.224.226.0/27,GB,GB-EN,London,\n")
    settings = make_settings(shopper.db, apple_ranges_file=ranges)
    (email,) = shopper.emails()
    body = email.get_body(("html",))
    assert body is not None
    (token,) = re.findall(r"/t/o/([A-Za-z0-9_\-]+)", str(body.get_content()))
    keys = verifying_keys(load_signing_key(settings), settings)
    hit = await asyncio.to_thread(
        record_hit, settings, keys, OPEN, token, address=address, user_agent=agent
    )
    assert hit is not None and hit.new_event
    for stored in fetch_unrouted(settings.resolved_database_url, 100):
        if stored.name == EMAIL_OPENED and stored.customer_id == shopper.customer_id:
            shopper.seq += 1  # the test's own numbering of the events it delivered
            event = dataclasses.replace(stored.journey_event(), seq=shopper.seq)
            await shopper.handle.signal(EVENT_SIGNAL, event)


async def test_an_mpp_open_recorded_by_the_endpoint_does_not_move_the_journey(
    shopper: Shopper, tmp_path: Path
) -> None:
    await at_cart_email(shopper)
    await fetch_pixel(shopper, tmp_path, APPLE, "Mozilla/5.0")
    await shopper.skip(DAY + 60)
    assert await shopper.outcome() == "not_opened"
    (touch,) = shopper.touchpoints("email_opened")
    assert touch.detail["machine_reason"] == "apple_mpp"


async def test_safari_from_the_same_address_moves_it_to_the_audience_step(
    shopper: Shopper, tmp_path: Path
) -> None:
    await at_cart_email(shopper)
    await fetch_pixel(shopper, tmp_path, APPLE, SAFARI)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("ad_audience")
    assert shopper.audience() == [shopper.customer_id]
