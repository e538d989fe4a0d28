"""The post-purchase follow-up, every branch, on the time-skipping server with the real
activities (SQLite and PostgreSQL where the shop's orders are read), a real SMTP server, and
events routed by the registry as the router routes them."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from sqlmodel import select
from temporalio import activity
from temporalio.client import WorkflowHandle
from temporalio.common import TypedSearchAttributes
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.types import RecommendInput, RecommendResult
from kaeru.db import session
from kaeru.journeys import JourneyError, deliveries, read_settings, registry
from kaeru.models import Coupon, Customer, Order, OrderLine, Product, Touchpoint
from kaeru.settings import Settings
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import record_histories
from worker import PASSTHROUGH, activities_for, workflows
from workflows.kit import EVENT_SIGNAL, Journey, JourneyEvent, JourneyResult, JourneyStatus
from workflows.post_purchase import PostPurchase

pytestmark = pytest.mark.journeys("post-purchase")

DAY = 86400.0
DRESS = {"product_id": "dress", "name": "Linen Dress", "price": 89.0, "quantity": 1}
BELT = {"product_id": "belt", "name": "Leather Belt", "price": 25.0, "quantity": 1}
SCARF = {"product_id": "scarf", "name": "Silk Scarf", "price": 30.0, "quantity": 1}
HAT = {"product_id": "hat", "name": "Felt Hat", "price": 40.0, "quantity": 1}
CATALOGUE = [DRESS, BELT, SCARF, HAT]


@dataclass
class Buyer:
    """One customer's follow-up under test, fed the way the router feeds it."""

    env: WorkflowEnvironment
    smtp: SMTPTestServer
    settings: Settings
    customer_id: str = field(default_factory=lambda: f"c-{uuid.uuid4().hex[:8]}")
    seq: int = 0

    @property
    def db(self) -> str:
        return self.settings.resolved_database_url

    @property
    def email(self) -> str:
        return f"{self.customer_id}@buyers.test"

    @property
    def journey_id(self) -> str:
        return f"{PostPurchase.kind}-{self.customer_id}"

    @property
    def handle(self) -> WorkflowHandle[Any, JourneyResult]:
        return self.env.client.get_workflow_handle(self.journey_id, result_type=JourneyResult)

    async def route(
        self, name: str, *, seq: int | None = None, at: datetime | None = None, **props: Any
    ) -> int:
        """Deliver an event by the registry's deliveries; returns how many starts it made.

        Only this journey's deliveries: an order also starts other kinds (each has its own
        tests), and a journey left running here would stall every later test's time skipping.
        """
        if seq is None:
            self.seq += 1
        when = at or datetime.now(UTC)
        event = JourneyEvent(seq or self.seq, name, f"m-{uuid.uuid4()}", when, dict(props))
        started = 0
        for target in deliveries(name, self.customer_id, props):
            if target.route.kind != PostPurchase.kind:
                continue
            if target.start:
                started += 1
                await self.env.client.start_workflow(
                    target.route.workflow_name,
                    target.route.make_input(self.customer_id, self.settings),
                    id=target.workflow_id,
                    task_queue=self.settings.task_queue,
                    start_signal=EVENT_SIGNAL,
                    start_signal_args=[event],
                    search_attributes=TypedSearchAttributes(
                        Journey.start_search_attributes(self.customer_id)
                    ),
                )
            else:
                with contextlib.suppress(RPCError):  # none live: nothing to do
                    await self.env.client.get_workflow_handle(target.workflow_id).signal(
                        EVENT_SIGNAL, event
                    )
        return started

    async def order(self, order_id: str, *products: dict[str, Any], seq: int | None = None) -> int:
        """The customer orders: stored first, as ingestion stores it (completed when the event
        happened), then routed."""
        at = datetime.now(UTC)
        store_order(self.db, order_id, self.customer_id, products, at)
        return await self.route(
            "Order Completed",
            seq=seq,
            at=at,
            order_id=order_id,
            total=sum(p["price"] for p in products),
            currency="USD",
            products=list(products),
        )

    async def run_id(self) -> str:
        return str((await self.handle.describe()).run_id)

    async def status(self) -> JourneyStatus:
        return await self.handle.query(PostPurchase.status)

    async def waiting(self, what: str, not_run: str | None = None) -> None:
        """Wait (in real time) until the journey waits for ``what`` (in a run other than
        ``not_run``): skipping time before the timer exists would skip nothing."""
        for _ in range(200):
            if not_run is None or await self.run_id() != not_run:
                with contextlib.suppress(RPCError):
                    if (await self.status()).waiting_for == what:
                        return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the journey never waited for {what!r}")

    async def skip(self, seconds: float) -> None:
        await self.env.sleep(timedelta(seconds=seconds))

    def emails(self) -> list[EmailMessage]:
        return [m.message for m in self.smtp.messages if self.email in m.rcpt_tos]

    async def received(self, count: int) -> list[EmailMessage]:
        """Wait (in real time) until the customer has ``count`` emails."""
        for _ in range(200):
            if len(self.emails()) >= count:
                break
            await asyncio.sleep(0.05)
        assert len(self.emails()) == count, [m["Subject"] for m in self.emails()]
        return self.emails()

    async def outcome(self) -> JourneyResult:
        return await self.handle.result()


def text_of(message: EmailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


def html_of(message: EmailMessage) -> str:
    body = message.get_body(("html",))
    assert body is not None
    return str(body.get_content())


def store_order(
    url: str, order_id: str, customer_id: str, products: Any, at: datetime | None = None
) -> None:
    """An order, its lines and its products, as ingestion stores a server-key order."""
    with session(url) as s:
        total = sum(round(p["price"] * 100) for p in products)
        order = Order(order_id=order_id, customer_id=customer_id, total_minor=total, currency="USD")
        order.completed_at = at or datetime.now(UTC)
        s.add(order)
        for p in products:
            s.add(OrderLine(order_id=order_id, product_id=p["product_id"]))
            if s.get(Product, p["product_id"]) is None:
                s.add(
                    Product(
                        product_id=p["product_id"],
                        name=p["name"],
                        price_minor=round(p["price"] * 100),
                        url=f"https://shop.test/p/{p['product_id']}",
                    )
                )


def shop_history(url: str) -> None:
    """Other customers' orders: dresses go with belts, then scarves; hats sell on their own."""
    baskets = [[DRESS, BELT], [DRESS, BELT], [DRESS, SCARF], [HAT], [HAT], [HAT], [HAT]]
    for n, basket in enumerate(baskets):
        store_order(url, f"old-{n}-{uuid.uuid4().hex[:6]}", f"other-{n}", basket)


@contextlib.asynccontextmanager
async def worker_for(
    env: WorkflowEnvironment, settings: Settings, **replacements: Callable[..., Any]
) -> AsyncIterator[None]:
    """The real worker's workflows and activities, those named in ``replacements`` swapped."""
    async with httpx.AsyncClient() as http:
        real = {fn.__name__: fn for fn in activities_for(settings, http)}
        assert set(replacements) <= set(real)
        async with Worker(
            env.client,
            task_queue=settings.task_queue,
            workflows=list(workflows()),
            activities=list({**real, **replacements}.values()),
            workflow_runner=SandboxedWorkflowRunner(
                restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
            ),
        ):
            yield


@contextlib.asynccontextmanager
async def buyer_on(
    env: WorkflowEnvironment,
    url: str,
    smtp: SMTPTestServer,
    *,
    email: bool = True,
    **replacements: Callable[..., Any],
) -> AsyncIterator[Buyer]:
    registry.cache_clear()  # the journey's settings as the test's environment says
    settings = make_settings(url, smtp_port=smtp.port, shop_url="https://shop.test")
    buyer = Buyer(env, smtp, settings)
    with session(url) as s:
        s.add(Customer(customer_id=buyer.customer_id, email=buyer.email if email else None))
    async with worker_for(env, settings, **replacements):
        try:
            yield buyer
        finally:
            with contextlib.suppress(RPCError):
                await buyer.handle.terminate("test over")
            await record_histories(env.client, buyer.journey_id)


@activity.defn(name="recommend_products")
async def recommendations_down(request: RecommendInput) -> RecommendResult:
    raise ApplicationError("the recommendations are down", non_retryable=True)


@pytest.fixture
async def buyer(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> AsyncIterator[Buyer]:
    async with buyer_on(time_skipping_env, sqlite_url, smtp) as one:
        yield one


async def test_a_review_request_after_the_delivery_window_then_what_goes_with_it(
    time_skipping_env: WorkflowEnvironment, database_url: str, smtp: SMTPTestServer
) -> None:
    shop_history(database_url)
    async with buyer_on(time_skipping_env, database_url, smtp) as buyer:
        assert await buyer.order("o-1", DRESS) == 1
        await buyer.waiting("the delivery window")
        await buyer.skip(6 * DAY)
        assert buyer.emails() == []  # still within the seven days
        await buyer.skip(DAY + 60)
        [review] = await buyer.received(1)
        assert review["Subject"] == "How do you like your Linen Dress?"
        assert "Linen Dress" in text_of(review) and "order o-1" in text_of(review)
        assert "Review what you bought" in html_of(review)

        await buyer.waiting("the cross-sell delay")
        await buyer.skip(2 * DAY)
        assert len(buyer.emails()) == 1  # the cross-sell waits three days
        await buyer.skip(DAY + 60)
        _, cross_sell = await buyer.received(2)
        assert cross_sell["Subject"] == (
            "Goes well with your Linen Dress, and 10.00 USD off your next order"
        )
        text = text_of(cross_sell)
        # Bought with dresses in the shop's own orders, the belt first; never the dress itself.
        assert text.index("Leather Belt") < text.index("Silk Scarf")
        assert "Linen Dress" not in text
        code = re.search(r"KAERU-[A-Z0-9]{6,}", text)
        assert code is not None, text
        with session(database_url) as s:
            coupon = s.exec(select(Coupon).where(Coupon.code == code.group(0))).one()
        assert (coupon.customer_id, coupon.amount_minor) == (buyer.customer_id, 1000)
        assert coupon.expires_at.replace(tzinfo=UTC) - coupon.created_at.replace(
            tzinfo=UTC
        ) == timedelta(days=14)

        await buyer.waiting("the next order")
        await buyer.skip(14 * DAY + 60)
        result = await buyer.outcome()
        assert (result.outcome, result.last_step) == ("completed", "cross_sell_email")
        assert len(buyer.emails()) == 2
        story = "\n".join((await buyer.status()).story)
        assert "order o-1 (1 product): a review request after the delivery window" in story


async def test_a_new_order_before_the_review_starts_the_follow_up_over(buyer: Buyer) -> None:
    shop_history(buyer.db)
    await buyer.order("o-1", DRESS)
    await buyer.waiting("the delivery window")
    first_run = await buyer.run_id()
    await buyer.skip(5 * DAY)
    assert await buyer.order("o-2", HAT) == 1
    await buyer.waiting("the delivery window", not_run=first_run)
    await buyer.skip(2 * DAY + 60)
    assert buyer.emails() == []  # seven days after o-1: its review never comes
    await buyer.skip(5 * DAY)
    [review] = await buyer.received(1)  # seven days after o-2
    assert review["Subject"] == "How do you like your Felt Hat?"
    assert "order o-2" in text_of(review) and "Linen Dress" not in text_of(review)
    status = await buyer.status()
    assert status.details["order"] == "o-2"
    assert any("a new order o-2: the follow-up starts over from it" in x for x in status.story)


async def test_a_new_order_after_the_review_stops_the_old_cross_sell_and_converts(
    buyer: Buyer,
) -> None:
    shop_history(buyer.db)
    await buyer.order("o-1", DRESS)
    await buyer.waiting("the delivery window")
    first_run = await buyer.run_id()
    await buyer.skip(7 * DAY + 60)
    await buyer.received(1)
    await buyer.waiting("the cross-sell delay")
    await buyer.order("o-2", BELT)
    await buyer.waiting("the delivery window", not_run=first_run)
    await buyer.skip(3 * DAY + 60)
    assert len(buyer.emails()) == 1  # no cross-sell for o-1 after o-2
    await buyer.skip(4 * DAY)
    _, review = await buyer.received(2)
    assert review["Subject"] == "How do you like your Leather Belt?"
    with session(buyer.db) as s:
        [conversion] = s.exec(
            select(Touchpoint).where(
                Touchpoint.customer_id == buyer.customer_id, Touchpoint.kind == "conversion"
            )
        ).all()
    # The order after the review request is that follow-up's conversion.
    assert (conversion.order_id, conversion.step) == ("o-2", "review_email")
    await buyer.waiting("the cross-sell delay")
    await buyer.skip(3 * DAY + 60)
    _, _, cross_sell = await buyer.received(3)
    assert "Linen Dress" in text_of(cross_sell)  # bought with belts; the belt left out
    assert "Leather Belt" not in text_of(cross_sell)


async def test_a_newer_order_not_routed_yet_stops_the_old_review(buyer: Buyer) -> None:
    await buyer.order("o-1", DRESS)
    await buyer.waiting("the delivery window")
    await buyer.skip(6 * DAY)
    store_order(buyer.db, "o-2", buyer.customer_id, [HAT])  # stored; its event still queued
    await buyer.skip(DAY + 60)
    result = await buyer.outcome()
    assert (result.outcome, result.order_id) == ("purchased", "o-2")
    assert buyer.emails() == []  # never o-1's review after o-2
    assert await buyer.route("Order Completed", order_id="o-2", total=40, products=[HAT]) == 1
    await buyer.waiting("the delivery window")
    await buyer.skip(7 * DAY + 60)
    [review] = await buyer.received(1)
    assert review["Subject"] == "How do you like your Felt Hat?"


async def test_the_same_order_again_changes_nothing(buyer: Buyer) -> None:
    await buyer.order("o-1", DRESS)
    await buyer.waiting("the delivery window")
    first_run = await buyer.run_id()
    await buyer.skip(DAY)
    await buyer.route("Order Completed", seq=1, order_id="o-1", total=89.0)  # redelivered
    await buyer.route("Order Completed", order_id="o-1", total=89.0, products=[DRESS])
    await buyer.skip(6 * DAY + 60)
    [review] = await buyer.received(1)
    assert "order o-1" in text_of(review)
    assert await buyer.run_id() == first_run
    assert any("order o-1 came again: nothing changes" in x for x in (await buyer.status()).story)


async def test_a_customer_without_an_email_address_ends_no_email_address(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    async with buyer_on(time_skipping_env, sqlite_url, smtp, email=False) as buyer:
        await buyer.order("o-1", DRESS)
        await buyer.waiting("the delivery window")
        await buyer.skip(7 * DAY + 60)
        result = await buyer.outcome()
        assert (result.outcome, result.last_step) == ("no_email_address", "started")
        assert smtp.messages == []


async def test_an_identity_merge_ends_it_merged(buyer: Buyer) -> None:
    await buyer.order("o-1", DRESS)
    await buyer.waiting("the delivery window")
    await buyer.route("Identity Merged", into="u-known")
    assert (await buyer.outcome()).outcome == "merged"
    await buyer.skip(8 * DAY)
    assert buyer.emails() == []


async def test_waits_come_from_the_settings_and_an_empty_shop_still_gets_the_discount(
    buyer: Buyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAERU_POST_PURCHASE_REVIEW_DELAY", "P2D")
    monkeypatch.setenv("KAERU_POST_PURCHASE_CROSS_SELL_DELAY", "3600")
    monkeypatch.setenv("KAERU_POST_PURCHASE_COUPON_AMOUNT_MINOR", "500")
    monkeypatch.setenv("KAERU_POST_PURCHASE_COUPON_CURRENCY", "EUR")
    registry.cache_clear()
    await buyer.order("o-1", DRESS, {**HAT, "quantity": 2})  # the shop's first order ever
    await buyer.waiting("the delivery window")
    await buyer.skip(2 * DAY + 60)
    [review] = await buyer.received(1)
    assert review["Subject"] == "How was your order o-1 from Kaeru Shop?"
    assert "Linen Dress" in text_of(review) and "Felt Hat" in text_of(review)
    await buyer.waiting("the cross-sell delay")
    await buyer.skip(3600 + 60)
    _, cross_sell = await buyer.received(2)
    assert cross_sell["Subject"] == (
        "Picked for you after your order, and 5.00 EUR off your next order"
    )
    assert "Thank you for your order o-1" in text_of(cross_sell)
    assert re.search(r"KAERU-[A-Z0-9]{6,}", text_of(cross_sell))


async def test_without_suggestions_the_discount_still_goes_out(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    shop_history(sqlite_url)
    env = time_skipping_env
    async with buyer_on(env, sqlite_url, smtp, recommend_products=recommendations_down) as buyer:
        await buyer.order("o-1", DRESS)
        await buyer.waiting("the delivery window")
        await buyer.skip(7 * DAY + 60)
        await buyer.received(1)
        await buyer.waiting("the cross-sell delay")
        await buyer.skip(3 * DAY + 60)
        _, cross_sell = await buyer.received(2)
        assert "Leather Belt" not in text_of(cross_sell)
        assert re.search(r"KAERU-[A-Z0-9]{6,}", text_of(cross_sell))


async def test_started_by_hand_without_an_order_it_ends_at_once(buyer: Buyer) -> None:
    handle = await buyer.env.client.start_workflow(
        PostPurchase.run,
        PostPurchase.start_input(buyer.customer_id, None),
        id=buyer.journey_id,
        task_queue=buyer.settings.task_queue,
        search_attributes=TypedSearchAttributes(Journey.start_search_attributes(buyer.customer_id)),
    )
    assert (await handle.result()).outcome == "no_order"
    assert buyer.emails() == []


def test_switched_off_no_order_starts_one(monkeypatch: pytest.MonkeyPatch) -> None:
    order = {"order_id": "o-1", "total": 10}
    kinds = [d.route.kind for d in deliveries("Order Completed", "c-1", order) if d.start]
    assert PostPurchase.kind in kinds
    monkeypatch.setenv("KAERU_POST_PURCHASE_ENABLED", "false")
    registry.cache_clear()
    kinds = [d.route.kind for d in deliveries("Order Completed", "c-1", order) if d.start]
    assert PostPurchase.kind not in kinds


def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAERU_POST_PURCHASE_RECOMMENDATIONS", "0")
    with pytest.raises(JourneyError, match="KAERU_POST_PURCHASE_RECOMMENDATIONS=0 is not valid"):
        read_settings(PostPurchase)
    monkeypatch.setenv("KAERU_POST_PURCHASE_RECOMMENDATIONS", "3")
    monkeypatch.setenv("KAERU_POST_PURCHASE_REVIEW_DELAY", "soon")
    with pytest.raises(JourneyError, match="KAERU_POST_PURCHASE_REVIEW_DELAY='soon'"):
        read_settings(PostPurchase)
