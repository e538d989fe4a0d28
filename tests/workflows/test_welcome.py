"""The welcome series (workflows/welcome.py), every branch, on the time-skipping server.

Events go through the registry's ``deliveries`` as the router sends them; the real activities
read and write the database (SQLite and PostgreSQL where the journey reads it: the shop's
best-sellers, the customer's orders) and send to a real SMTP server on loopback. Each test
asserts on what the subscriber receives and on how the journey ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.common import TypedSearchAttributes
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from kaeru.db import session
from kaeru.journeys import JourneyError, deliveries, prefix_of, read_settings, registry
from kaeru.models import Coupon, Customer, Order, OrderLine, Product, Touchpoint
from kaeru.settings import Settings
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer
from worker import PASSTHROUGH, build_worker, workflows
from workflows.kit import EVENT_SIGNAL, Journey, JourneyEvent, JourneyResult, JourneyStatus
from workflows.welcome import Welcome, WelcomeSettings

pytestmark = pytest.mark.journeys("welcome")

HOUR = 3600.0
DAY = 24 * HOUR
SHOP = "Pond Tea"
#: The shop's catalogue, and how many orders hold each product (the kettle: none).
CATALOGUE = {
    "teapot": ("Cast Iron Teapot", 4500, 3),
    "mug": ("Stoneware Mug", 1800, 2),
    "sencha": ("Sencha Tea", 950, 1),
    "kettle": ("Copper Kettle", 7900, 0),
}


def only_welcome_journeys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch off every other journey kind, so these tests see the welcome series alone
    (an order here must not start, say, an order confirmation that sends its own email)."""
    registry.cache_clear()
    for route in registry().routes:
        if route.kind != Welcome.kind:
            monkeypatch.setenv(f"KAERU_{prefix_of(route.journey)}_ENABLED", "false")
    registry.cache_clear()


def stock_the_shop(db: str) -> None:
    """The shop's catalogue and other customers' orders: what best-sellers are made of."""
    with session(db) as s:
        for product_id, (name, price_minor, orders) in CATALOGUE.items():
            s.add(
                Product(
                    product_id=product_id,
                    name=name,
                    price_minor=price_minor,
                    currency="USD",
                    url=f"https://shop.test/p/{product_id}",
                )
            )
            for n in range(orders):
                order_id = f"other-{product_id}-{n}"
                s.add(
                    Order(
                        order_id=order_id,
                        customer_id=f"someone-{n}",
                        total_minor=price_minor,
                        currency="USD",
                    )
                )
                s.add(OrderLine(order_id=order_id, product_id=product_id))
        s.commit()


@dataclass
class Subscriber:
    """One new subscriber, whose events are routed as the router routes them."""

    env: WorkflowEnvironment
    db: str
    smtp: SMTPTestServer
    settings: Settings
    customer_id: str
    seq: int = 0

    @property
    def email(self) -> str:
        return f"{self.customer_id}@subscribers.test"

    @property
    def journey_id(self) -> str:
        return f"welcome-{self.customer_id}"

    @property
    def handle(self) -> WorkflowHandle[Any, JourneyResult]:
        return self.env.client.get_workflow_handle(self.journey_id, result_type=JourneyResult)

    async def route(self, name: str, **props: Any) -> int:
        """Deliver an event by the registry's deliveries; how many journeys it started."""
        self.seq += 1
        event = JourneyEvent(self.seq, name, f"m-{uuid.uuid4()}", datetime.now(UTC), props)
        started = 0
        for target in deliveries(name, self.customer_id, props):
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
                with contextlib.suppress(RPCError):  # no live journey: nothing to do
                    handle = self.env.client.get_workflow_handle(target.workflow_id)
                    await handle.signal(EVENT_SIGNAL, event)
        return started

    async def signs_up(self) -> int:
        return await self.route("identify", changed_traits=["email", "first_name"])

    async def orders(self, order_id: str = "o-1", **props: Any) -> None:
        await self.route("Order Completed", order_id=order_id, total=45, currency="USD", **props)

    async def waits(self, timers: int = 1) -> None:
        """Wait (in real time) until the journey has started ``timers`` timers: skipping time
        before a journey's task has run stalls the test server."""
        for _ in range(200):
            history = await self.handle.fetch_history()
            started = [
                e for e in history.events if e.event_type == EventType.EVENT_TYPE_TIMER_STARTED
            ]
            if len(started) >= timers:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the journey did not start {timers} timer(s)")

    async def skip(self, seconds: float) -> None:
        await self.env.sleep(timedelta(seconds=seconds))

    async def outcome(self) -> JourneyResult:
        return await self.handle.result()

    async def status(self) -> JourneyStatus:
        return await self.handle.query(Welcome.status)

    def emails(self) -> list[EmailMessage]:
        return [m.message for m in self.smtp.messages if self.email in m.rcpt_tos]

    def subjects(self) -> list[str]:
        return [str(m["subject"]) for m in self.emails()]

    async def receives(self, count: int) -> list[EmailMessage]:
        """Wait (in real time) until the subscriber has ``count`` emails."""
        for _ in range(200):
            if len(self.emails()) >= count:
                return self.emails()
            await asyncio.sleep(0.05)
        raise AssertionError(f"the subscriber got {self.subjects()}, expected {count} email(s)")

    def conversions(self) -> list[Touchpoint]:
        with session(self.db) as s:
            return list(
                s.exec(
                    select(Touchpoint).where(
                        Touchpoint.customer_id == self.customer_id,
                        Touchpoint.kind == "conversion",
                    )
                ).all()
            )

    def coupons(self) -> list[Coupon]:
        with session(self.db) as s:
            return list(s.exec(select(Coupon)).all())


def text_of(message: EmailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


def html_of(message: EmailMessage) -> str:
    body = message.get_body(("html",))
    assert body is not None
    return str(body.get_content())


@contextlib.asynccontextmanager
async def open_subscriber(
    env: WorkflowEnvironment,
    db: str,
    smtp: SMTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Subscriber]:
    """A new customer with an address, and a worker on its own queue, for one test.

    With ``KAERU_RECORD_HISTORIES=<dir>``, the journey's history is stored there for
    tests/replay (docs/writing-a-journey.md), named ``<test>@<workflow id>.json``.
    """
    only_welcome_journeys(monkeypatch)
    settings = make_settings(db, smtp_port=smtp.port, shop_name=SHOP, shop_url="https://shop.test")
    customer_id = f"c-{uuid.uuid4().hex[:8]}"
    one = Subscriber(env, db, smtp, settings, customer_id)
    with session(db) as s:
        s.add(Customer(customer_id=customer_id, email=one.email))
        s.commit()
    async with httpx.AsyncClient() as http, build_worker(env.client, settings, http):
        yield one
        # A journey left running without its worker stops time skipping for later tests.
        with contextlib.suppress(RPCError):
            await one.handle.terminate("test over")
        record_to = os.environ.get("KAERU_RECORD_HISTORIES")
        if record_to:
            with contextlib.suppress(RPCError):  # a test that started no journey
                history = await one.handle.fetch_history()
                name = re.sub(r"\W+", "-", request.node.name.removeprefix("test_")).strip("-")
                path = Path(record_to) / f"welcome-{name}@{one.journey_id}.json"
                path.write_text(history.to_json())


@pytest.fixture
async def subscriber(
    time_skipping_env: WorkflowEnvironment,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Subscriber]:
    """A subscriber of a stocked shop, on SQLite and on PostgreSQL."""
    stock_the_shop(database_url)
    async with SMTPTestServer() as smtp:
        opened = open_subscriber(time_skipping_env, database_url, smtp, monkeypatch, request)
        async with opened as one:
            yield one


@pytest.fixture
async def sqlite_subscriber(
    time_skipping_env: WorkflowEnvironment,
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Subscriber]:
    """A subscriber of a stocked shop on SQLite, for branches the database does not decide."""
    stock_the_shop(sqlite_url)
    async with SMTPTestServer() as smtp:
        opened = open_subscriber(time_skipping_env, sqlite_url, smtp, monkeypatch, request)
        async with opened as one:
            yield one


async def test_a_new_subscriber_gets_the_welcome_the_best_sellers_on_day_3_and_a_coupon_on_day_7(
    subscriber: Subscriber,
) -> None:
    assert await subscriber.signs_up() == 1
    await subscriber.waits()
    [welcome] = await subscriber.receives(1)
    assert welcome["subject"] == f"Welcome to {SHOP}"
    assert "In 3 days we will show you" in text_of(welcome)
    assert "in 7 days we have a little something" in text_of(welcome)

    status = await subscriber.status()
    started = (await subscriber.handle.describe()).start_time
    assert status.waiting_for == "the day of the best-sellers email"
    assert status.waiting_until is not None
    assert abs((status.waiting_until - started).total_seconds() - 3 * DAY) < 60

    await subscriber.skip(3 * DAY - HOUR)
    assert len(subscriber.emails()) == 1  # not a day early
    await subscriber.skip(2 * HOUR)
    _, bestsellers = await subscriber.receives(2)
    assert bestsellers["subject"] == f"Our best-sellers at {SHOP}"
    text = text_of(bestsellers)
    # Most-ordered first; the kettle nobody ordered is not a best-seller.
    assert text.index("Cast Iron Teapot") < text.index("Stoneware Mug") < text.index("Sencha Tea")
    assert "Copper Kettle" not in text
    assert "45.00 USD" in text
    html = html_of(bestsellers)
    assert "Cast Iron Teapot" in html and "Copper Kettle" not in html
    assert "shop.test" not in html, "every link goes through the click tracker"

    await subscriber.waits(2)
    status = await subscriber.status()
    assert status.waiting_for == "the day of the first-purchase offer"
    assert status.waiting_until is not None
    assert abs((status.waiting_until - started).total_seconds() - 7 * DAY) < 60  # from sign-up
    await subscriber.skip(4 * DAY - 2 * HOUR)
    assert len(subscriber.emails()) == 2
    await subscriber.skip(2 * HOUR)
    *_, offer = await subscriber.receives(3)
    code = re.search(r"KAERU-[A-Z0-9]{6,}", text_of(offer))
    assert code, text_of(offer)
    assert offer["subject"] == f"10.00 USD off your first order at {SHOP}: use {code.group(0)}"
    assert code.group(0) in html_of(offer) and "single use" in html_of(offer)
    [coupon] = subscriber.coupons()
    assert (coupon.code, coupon.amount_minor, coupon.customer_id) == (
        code.group(0),
        1000,
        subscriber.customer_id,
    )
    assert (await subscriber.status()).details == {"coupon": code.group(0)}

    await subscriber.waits(3)
    await subscriber.skip(14 * DAY - 2 * HOUR)  # the offer went out an hour ago
    assert (await subscriber.status()).waiting_for == "a first order with the coupon"
    await subscriber.skip(2 * HOUR)
    result = await subscriber.outcome()
    assert (result.outcome, result.last_step) == ("offer_ignored", "offer_email")
    assert len(subscriber.emails()) == 3
    assert subscriber.conversions() == []

    # Deterministic: the whole series replays on this code (tests/replay's check).
    history = await subscriber.handle.fetch_history()
    replayer = Replayer(
        workflows=list(workflows()),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
        ),
    )
    await replayer.replay_workflow(history)


async def test_the_first_order_after_the_welcome_ends_it_as_a_conversion(
    sqlite_subscriber: Subscriber,
) -> None:
    one = sqlite_subscriber
    await one.signs_up()
    await one.waits()
    await one.skip(DAY)
    await one.orders("o-first")
    result = await one.outcome()
    assert (result.outcome, result.last_step, result.order_id) == (
        "purchased",
        "welcome_email",
        "o-first",
    )
    await one.skip(7 * DAY)
    assert one.subjects() == [f"Welcome to {SHOP}"]  # no best-sellers, no coupon
    [conversion] = one.conversions()
    assert (conversion.order_id, conversion.value_minor) == ("o-first", 4500)
    assert conversion.journey_id == one.journey_id
    assert one.coupons() == []


async def test_an_order_between_the_best_sellers_and_the_offer_ends_it_without_a_coupon(
    sqlite_subscriber: Subscriber,
) -> None:
    one = sqlite_subscriber
    await one.signs_up()
    await one.waits()
    await one.skip(3 * DAY + 60)
    await one.receives(2)
    await one.waits(2)
    await one.skip(2 * DAY)
    await one.orders("o-day-5")
    result = await one.outcome()
    assert (result.outcome, result.last_step) == ("purchased", "bestsellers_email")
    await one.skip(5 * DAY)
    assert len(one.emails()) == 2
    assert one.coupons() == []
    assert [c.order_id for c in one.conversions()] == ["o-day-5"]


async def test_a_first_order_with_the_coupon_converts_with_it(
    sqlite_subscriber: Subscriber,
) -> None:
    one = sqlite_subscriber
    await one.signs_up()
    await one.waits()
    await one.skip(7 * DAY + 60)
    *_, offer = await one.receives(3)
    found = re.search(r"KAERU-[A-Z0-9]{6,}", text_of(offer))
    assert found
    await one.waits(3)
    await one.skip(2 * DAY)
    await one.orders("o-coupon", coupon=found.group(0))
    result = await one.outcome()
    assert (result.outcome, result.last_step, result.coupon_code) == (
        "purchased",
        "offer_email",
        found.group(0),
    )
    [conversion] = one.conversions()
    assert conversion.coupon_code == found.group(0)


async def test_a_customer_who_ordered_before_signing_up_gets_no_first_purchase_offer(
    subscriber: Subscriber,
) -> None:
    with session(subscriber.db) as s:
        yesterday = datetime.now(UTC) - timedelta(days=1)
        s.add(
            Order(
                order_id="o-as-guest",
                customer_id=subscriber.customer_id,
                total_minor=1800,
                currency="USD",
                completed_at=yesterday,
            )
        )
        s.commit()
    await subscriber.signs_up()
    await subscriber.waits()
    await subscriber.skip(7 * DAY + 60)
    result = await subscriber.outcome()
    assert result.outcome == "already_customer"
    # The welcome and the best-sellers still go out; the first-purchase offer does not.
    assert subscriber.subjects() == [f"Welcome to {SHOP}", f"Our best-sellers at {SHOP}"]
    assert subscriber.conversions() == []  # the guest order was not the welcome's doing
    story = (await subscriber.status()).story
    assert any("had already ordered before signing up" in line for line in story)


async def test_an_order_stored_but_not_yet_routed_stops_the_offer_and_converts(
    sqlite_subscriber: Subscriber,
) -> None:
    one = sqlite_subscriber
    await one.signs_up()
    await one.waits()
    await one.skip(3 * DAY + 60)
    await one.receives(2)
    with session(one.db) as s:
        s.add(
            Order(
                order_id="o-unrouted",
                customer_id=one.customer_id,
                total_minor=950,
                currency="USD",
                completed_at=datetime.now(UTC),
            )
        )
        s.commit()
    await one.waits(2)
    await one.skip(4 * DAY)
    result = await one.outcome()
    assert (result.outcome, result.order_id) == ("purchased", "o-unrouted")
    assert len(one.emails()) == 2
    assert [c.order_id for c in one.conversions()] == ["o-unrouted"]


async def test_a_customer_enters_the_welcome_series_once_ever(
    sqlite_subscriber: Subscriber,
) -> None:
    one = sqlite_subscriber
    await one.signs_up()
    await one.waits()
    assert await one.signs_up() == 1  # a second address while it runs: no second welcome
    await one.skip(DAY)
    assert len(one.emails()) == 1
    await one.orders()
    assert (await one.outcome()).outcome == "purchased"

    await one.skip(365 * DAY)
    assert await one.route("identify", changed_traits=["email"]) == 1  # a year later
    result = await one.outcome()
    assert (result.outcome, result.last_step) == ("not_reentered", "started")
    assert one.subjects() == [f"Welcome to {SHOP}"]


async def test_only_a_new_email_address_starts_it_and_the_setting_switches_it_off(
    sqlite_subscriber: Subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = sqlite_subscriber
    assert await one.route("identify", changed_traits=["first_name", "phone"]) == 0
    assert await one.route("identify") == 0
    assert await one.route("Product Viewed", product_id="teapot") == 0
    monkeypatch.setenv("KAERU_WELCOME_ENABLED", "false")
    registry.cache_clear()
    assert await one.signs_up() == 0
    with pytest.raises(RPCError):
        await one.handle.describe()  # no journey was ever started
    assert one.emails() == []


async def test_a_subscriber_without_an_address_ends_no_email_address(
    sqlite_subscriber: Subscriber,
) -> None:
    one = sqlite_subscriber
    with session(one.db) as s:
        customer = s.get(Customer, one.customer_id)
        assert customer is not None
        customer.email = None
        s.add(customer)
        s.commit()
    await one.signs_up()
    result = await one.outcome()
    assert (result.outcome, result.last_step) == ("no_email_address", "started")
    assert one.smtp.messages == []


async def test_a_bounced_welcome_ends_it_undeliverable(sqlite_subscriber: Subscriber) -> None:
    one = sqlite_subscriber
    one.smtp.reject_recipient(one.email, 550)
    await one.signs_up()
    result = await one.outcome()
    assert (result.outcome, result.last_step) == ("undeliverable", "started")
    assert one.emails() == []
    assert one.coupons() == []


async def test_a_shop_without_best_sellers_skips_that_email_and_env_delays_apply(
    time_skipping_env: WorkflowEnvironment,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    monkeypatch.setenv("KAERU_WELCOME_BESTSELLERS_DELAY", "3600")  # seconds
    monkeypatch.setenv("KAERU_WELCOME_OFFER_DELAY", "PT2H")  # ISO 8601
    monkeypatch.setenv("KAERU_WELCOME_OFFER_WAIT", "PT30M")
    monkeypatch.setenv("KAERU_WELCOME_COUPON_AMOUNT_MINOR", "500")
    monkeypatch.setenv("KAERU_WELCOME_COUPON_CURRENCY", "eur")
    async with SMTPTestServer() as smtp:
        opened = open_subscriber(time_skipping_env, database_url, smtp, monkeypatch, request)
        async with opened as one:
            await one.signs_up()
            await one.waits()
            [welcome] = await one.receives(1)
            assert "In 1 day we will show you" in text_of(welcome)
            await one.skip(HOUR + 60)
            await one.waits(2)
            story = (await one.status()).story
            assert any("the shop has no best-sellers yet" in line for line in story)
            assert len(one.emails()) == 1
            await one.skip(HOUR)
            _, offer = await one.receives(2)
            assert str(offer["subject"]).startswith(f"5.00 EUR off your first order at {SHOP}")
            await one.waits(3)
            await one.skip(31 * 60)
            assert (await one.outcome()).outcome == "offer_ignored"


async def test_an_identity_merge_ends_it_merged(sqlite_subscriber: Subscriber) -> None:
    one = sqlite_subscriber
    await one.signs_up()
    await one.waits()
    await one.route("Identity Merged", into="u-known")
    assert (await one.outcome()).outcome == "merged"
    assert len(one.emails()) == 1


async def test_no_personal_data_in_the_story_or_the_search_attributes(
    sqlite_subscriber: Subscriber,
) -> None:
    one = sqlite_subscriber
    await one.signs_up()
    await one.waits()
    status = await one.status()
    described = await one.handle.describe()
    shown = " ".join(status.story) + str(status.details) + str(described.typed_search_attributes)
    assert status.story and one.customer_id in described.id
    assert "subscribers.test" not in shown  # not even a masked address


def test_the_settings_read_seconds_and_iso_8601_and_refuse_what_the_journey_cannot_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    enabled, defaults = read_settings(Welcome)
    assert enabled is True
    assert defaults == WelcomeSettings()
    assert (defaults.bestsellers_delay, defaults.offer_delay) == (3 * DAY, 7 * DAY)

    monkeypatch.setenv("KAERU_WELCOME_BESTSELLERS_DELAY", "86400")
    monkeypatch.setenv("KAERU_WELCOME_OFFER_DELAY", "P2D")
    _, read = read_settings(Welcome)
    assert (read.bestsellers_delay, read.offer_delay) == (DAY, 2 * DAY)

    monkeypatch.setenv("KAERU_WELCOME_OFFER_DELAY", "PT1H")  # before the best-sellers
    with pytest.raises(JourneyError, match="KAERU_WELCOME_OFFER_DELAY=3600.0 is not valid"):
        read_settings(Welcome)
    monkeypatch.setenv("KAERU_WELCOME_OFFER_DELAY", "soon")
    with pytest.raises(JourneyError, match="KAERU_WELCOME_OFFER_DELAY='soon'"):
        read_settings(Welcome)
    monkeypatch.delenv("KAERU_WELCOME_OFFER_DELAY")
    monkeypatch.setenv("KAERU_WELCOME_BESTSELLER_COUNT", "40")
    with pytest.raises(JourneyError, match="KAERU_WELCOME_BESTSELLER_COUNT=40"):
        read_settings(Welcome)
