"""Journeys count human opens and clicks only: a machine's (Apple Mail Privacy Protection, a
link scanner) never moves the cart journey on to its audience step, unless
``KAERU_MACHINE_OPENS_COUNT`` says so (the API writes it into each event)."""

from __future__ import annotations

from typing import Any

from tests.workflows.conftest import DAY, SHOE, Shopper
from workflows.kit import EMAIL_LINK_CLICKED, EMAIL_OPENED


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
