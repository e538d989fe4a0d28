"""Journey entries, experiment arms and holdouts on the cart journey (time-skipping server,
real activities, real SQLite and a real SMTP server that shows what the shopper received)."""

from __future__ import annotations

import uuid

from sqlmodel import select

from activities.types import EntryPlan
from kaeru.db import session
from kaeru.models import EmailMessage, ExperimentPromotion
from kaeru.variants import assign
from tests.workflows.conftest import DAY, SETTINGS, SHOE, SOCK, Shopper, worker_with
from workflows.cart_abandonment import CartAbandonment, CartJourneySettings

EXPERIMENT = "cart_subject"
SUBJECTS = {
    "names_the_item": "Still thinking about Trail Shoe?",
    "asks_a_question": "Did you forget Trail Shoe?",
}


def hashed_arm(shopper: Shopper) -> str:
    return assign(
        shopper.customer_id,
        CartAbandonment.kind,
        EXPERIMENT,
        CartAbandonment.experiments[EXPERIMENT],
    )


def promote(shopper: Shopper, variant: str) -> None:
    with session(shopper.db) as s:
        s.add(
            ExperimentPromotion(
                journey_kind=CartAbandonment.kind,
                experiment=EXPERIMENT,
                variant=variant,
                reason="test",
            )
        )


async def test_a_journey_records_one_entry_and_its_arm_reaches_every_touch(
    shopper: Shopper,
) -> None:
    shopper.entry = EntryPlan(experiments=[EXPERIMENT])
    arm = hashed_arm(shopper)
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    [mail] = await shopper.wait_for_emails(1)
    assert mail["Subject"] == SUBJECTS[arm]
    [entered] = shopper.touchpoints("journey_entered")
    assert (entered.journey_kind, entered.journey_id) == ("cart-abandonment", shopper.journey_id)
    assert entered.variant == arm
    assert entered.detail == {"version": "1", "arms": {EXPERIMENT: arm}}
    [sent] = shopper.touchpoints("email_sent")
    assert (sent.step, sent.variant, sent.detail["experiment"]) == ("cart_email", arm, EXPERIMENT)
    with session(shopper.db) as s:
        row = s.exec(select(EmailMessage).where(EmailMessage.customer_id == shopper.customer_id))
        assert row.one().variant == arm  # its opens and clicks read it (test_opens_and_clicks)
    status = await shopper.status()
    assert any(f"variants {EXPERIMENT}: {arm}" in line for line in status.story)


async def test_a_promoted_winner_goes_to_everyone_who_enters_after(shopper: Shopper) -> None:
    shopper.entry = EntryPlan(experiments=[EXPERIMENT])
    promote(shopper, "asks_a_question")
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    [mail] = await shopper.wait_for_emails(1)
    assert mail["Subject"] == SUBJECTS["asks_a_question"]
    [entered] = shopper.touchpoints("journey_entered")
    assert entered.variant == "asks_a_question"
    [sent] = shopper.touchpoints("email_sent")
    assert sent.variant == "asks_a_question"


async def test_the_arm_and_the_entry_are_carried_across_continue_as_new(shopper: Shopper) -> None:
    """A winner promoted after the journey entered does not change its arm when the busy cart
    continues as new: the arm travels in the input, and no second entry is recorded."""
    shopper.settings = CartJourneySettings(**{**SETTINGS.__dict__, "history_limit": 40})
    shopper.entry = EntryPlan(experiments=[EXPERIMENT])
    arm = hashed_arm(shopper)
    other = next(a for a in SUBJECTS if a != arm)
    await shopper.cart("Product Added", **SHOE)
    run_id = (await shopper.handle.describe()).run_id
    await shopper.wait_for_step("cart_quiet")
    promote(shopper, other)
    for _ in range(30):
        await shopper.cart("Product Added", **SOCK)
        await shopper.skip(60)
    assert (await shopper.handle.describe()).run_id != run_id
    await shopper.skip(DAY + 60)
    [mail] = await shopper.wait_for_emails(1)
    two_items = {
        "names_the_item": "You left 2 items in your cart",
        "asks_a_question": "Did you forget something in your cart?",
    }
    assert mail["Subject"] == two_items[arm]
    [entered] = shopper.touchpoints("journey_entered")
    assert entered.variant == arm
    [sent] = shopper.touchpoints("email_sent")
    assert sent.variant == arm


async def test_a_held_out_customer_is_recorded_and_gets_nothing(shopper: Shopper) -> None:
    shopper.entry = EntryPlan(holdout_percent=100, experiments=[EXPERIMENT])
    await shopper.cart("Product Added", **SHOE)
    assert await shopper.outcome() == "holdout"
    await shopper.skip(2 * DAY)
    assert shopper.emails() == []
    assert shopper.smtp.messages == []
    assert shopper.audience() == []
    [entered] = shopper.touchpoints("journey_entered")
    assert entered.variant == "holdout"
    assert entered.detail == {"version": "1", "arms": {}}
    assert shopper.touchpoints("email_sent") == []
    assert shopper.touchpoints("coupon_issued") == []
    with session(shopper.db) as s:
        assert s.exec(select(EmailMessage)).all() == []
    status = await shopper.status()
    assert any("held out (KAERU_CART_HOLDOUT_PERCENT)" in line for line in status.story)


async def test_a_holdout_of_zero_sends_as_always(shopper: Shopper) -> None:
    shopper.entry = EntryPlan(holdout_percent=0)
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    [mail] = await shopper.wait_for_emails(1)
    assert mail["Subject"] == SUBJECTS["names_the_item"]  # no experiment runs: the default
    [entered] = shopper.touchpoints("journey_entered")
    assert (entered.variant, entered.detail) == (None, {"version": "1", "arms": {}})
    [sent] = shopper.touchpoints("email_sent")
    assert sent.variant is None


async def test_a_journey_started_without_an_entry_plan_records_none(shopper: Shopper) -> None:
    """As journeys started before entries existed (and the stored histories) run."""
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_emails(1)
    assert shopper.touchpoints("journey_entered") == []


async def test_the_next_generation_records_its_own_entry_in_the_same_arm(shopper: Shopper) -> None:
    """A cart that comes as the journey ends (its purchase in the same workflow task) starts
    the next generation, which enters again: a second entry, its own key, the same arm."""
    shopper.entry = EntryPlan(experiments=[EXPERIMENT])
    arm = hashed_arm(shopper)
    queue = f"generations-{uuid.uuid4().hex[:8]}"
    shopper.task_queue = queue  # nothing polls it yet: the three events meet in one task
    await shopper.cart("Product Added", **SHOE)
    await shopper.purchase("o-1")
    await shopper.cart("Product Added", **SOCK)
    async with worker_with(shopper, task_queue=queue):
        await shopper.skip(DAY + 60)
        [mail] = await shopper.wait_for_emails(1)
    assert "Wool Socks" in str(mail["Subject"])
    first, second = sorted(shopper.touchpoints("journey_entered"), key=lambda t: t.key or "")
    assert (first.variant, second.variant) == (arm, arm)
    assert second.key == (first.key or "").replace("/entered", "/g1/entered")
