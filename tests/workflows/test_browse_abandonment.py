"""Browse abandonment on the time-skipping server, every branch, with the real activities
(recommendations and entry claims on SQLite and PostgreSQL, a real SMTP server): events are
routed by the registry as the router does, and the tests read what the shopper receives."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage as MailMessage
from typing import Any

import httpx
import pytest
from sqlmodel import select
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.common import TypedSearchAttributes
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.types import RecommendInput, RecommendResult
from kaeru.db import session
from kaeru.journeys import JourneyError, deliveries, load_registry, registry
from kaeru.models import Customer, EmailMessage, Order, OrderLine, Product
from kaeru.settings import Settings
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import record_histories
from worker import PASSTHROUGH, activities_for, build_worker, workflows
from workflows.browse_abandonment import BrowseAbandonment, products_topic
from workflows.kit import EVENT_SIGNAL, Journey, JourneyEvent, JourneyInput, JourneyResult

# A cart event ends it and starts the cart journey: both are on.
pytestmark = pytest.mark.journeys("browse-abandonment", "cart-abandonment")

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
DRESS = {"product_id": "dress", "name": "Summer Dress", "price": 49, "currency": "USD"}
SHOE = {"product_id": "shoe", "name": "Trail Shoe", "price": 89.5, "currency": "USD"}
CATALOGUE = {
    "dress": ("Summer Dress", 4900),
    "belt": ("Leather Belt", 1900),
    "scarf": ("Silk Scarf", 2500),
    "shoe": ("Trail Shoe", 8950),
    "sock": ("Wool Socks", 1200),
}
#: The shop's orders: a dress is bought with its belt and scarf, shoes with socks.
ORDERS = {"o-a": ["dress", "belt"], "o-b": ["dress", "belt", "scarf"], "o-c": ["shoe", "sock"]}


@dataclass
class Browser:
    """One shopper, whose events go where the registry sends them (as the router does)."""

    env: WorkflowEnvironment
    smtp: SMTPTestServer
    settings: Settings
    db: str
    customer_id: str
    seq: int = 0

    @property
    def journey_id(self) -> str:
        return f"browse-abandonment-{self.customer_id}"

    @property
    def email(self) -> str:
        return f"{self.customer_id}@shoppers.test"

    def handle(self, kind: str = "browse-abandonment") -> WorkflowHandle[Any, JourneyResult]:
        return self.env.client.get_workflow_handle(
            f"{kind}-{self.customer_id}", result_type=JourneyResult
        )

    async def route(self, name: str, /, **props: Any) -> list[str]:
        """Deliver an event by the registry; returns the kinds of the journeys it started."""
        self.seq += 1
        event = JourneyEvent(self.seq, name, f"m-{uuid.uuid4()}", datetime.now(UTC), props)
        started = []
        for target in deliveries(name, self.customer_id, props):
            if target.start:
                started.append(target.route.kind)
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

    async def view(self, product: dict[str, Any]) -> None:
        await self.route("Product Viewed", **product)
        await waiting(self.handle())  # skip time only once the journey's timer exists

    async def skip(self, span: timedelta) -> None:
        await self.env.sleep(span)

    async def outcome(self) -> str:
        return (await self.handle().result()).outcome

    def emails(self) -> list[MailMessage]:
        return [m.message for m in self.smtp.messages if self.email in m.rcpt_tos]

    async def story(self) -> list[str]:
        status = await self.handle().query(BrowseAbandonment.status)
        return [line.split(" ", 2)[2] for line in status.story]


def text_of(message: MailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


def html_of(message: MailMessage) -> str:
    body = message.get_body(("html",))
    assert body is not None
    return str(body.get_content())


async def waiting(handle: WorkflowHandle[Any, Any]) -> None:
    """Wait (in real time) until the journey's newest workflow task has run: its last event
    is a timer started or the end (time skipped before that stalls the test server)."""
    done = (
        EventType.EVENT_TYPE_TIMER_STARTED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
    )
    for _ in range(200):
        history = await handle.fetch_history()
        if history.events and history.events[-1].event_type in done:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the journey never started its wait")


def seed_shop(db: str) -> None:
    with session(db) as s:
        for product_id, (name, price) in CATALOGUE.items():
            s.add(
                Product(
                    product_id=product_id,
                    name=name,
                    price_minor=price,
                    url=f"https://shop.test/p/{product_id}",
                )
            )
        for order_id, products in ORDERS.items():
            s.add(Order(order_id=order_id, customer_id="someone", total_minor=1, currency="USD"))
            for product_id in products:
                s.add(OrderLine(order_id=order_id, product_id=product_id))
        s.commit()


@pytest.fixture
async def browser(
    time_skipping_env: WorkflowEnvironment,
    database_url: str,
    smtp: SMTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Browser]:
    monkeypatch.delenv("KAERU_BROWSE_ENABLED", raising=False)
    registry.cache_clear()
    settings = make_settings(database_url, smtp_port=smtp.port, shop_url="https://shop.test")
    seed_shop(database_url)
    customer_id = f"c-{uuid.uuid4().hex[:8]}"
    with session(database_url) as s:
        s.add(Customer(customer_id=customer_id, email=f"{customer_id}@shoppers.test"))
        s.commit()
    async with httpx.AsyncClient() as http, build_worker(time_skipping_env.client, settings, http):
        one = Browser(time_skipping_env, smtp, settings, database_url, customer_id)
        yield one
        # A journey left running without its worker stops time skipping for later tests.
        for kind in ("browse-abandonment", "cart-abandonment"):
            with contextlib.suppress(RPCError):
                await one.handle(kind).terminate("test over")
        await record_histories(one.env.client, one.journey_id)


async def test_after_four_quiet_hours_one_email_shows_the_views_and_similar_products(
    browser: Browser,
) -> None:
    assert await browser.route("Product Viewed", **SHOE) == ["browse-abandonment"]
    await waiting(browser.handle())
    await browser.skip(HOUR)
    await browser.view(DRESS)  # the newest view restarts the four hours
    await browser.skip(3 * HOUR + timedelta(minutes=30))
    assert browser.emails() == []  # 4.5 hours after the first view, 3.5 after the last
    await browser.skip(timedelta(minutes=31))
    assert await browser.outcome() == "emailed"
    [email] = browser.emails()
    assert email["Subject"] == "Summer Dress and more are still at Kaeru Shop"
    text = text_of(email)
    looked, similar = text.split("Similar products:")
    assert looked.index("Summer Dress") < looked.index("Trail Shoe")  # the newest first
    # Bought with a dress (both its pairings) and with shoes; never what they viewed.
    assert "Leather Belt" in similar and "Silk Scarf" in similar and "Wool Socks" in similar
    assert "Summer Dress" not in similar and "Trail Shoe" not in similar
    assert "Leather Belt" in html_of(email)
    with session(browser.db) as s:
        row = s.exec(select(EmailMessage).where(EmailMessage.customer_id == browser.customer_id))
        [message] = row.all()
    assert message.step == "browse_email" and message.marketing
    assert message.topic == products_topic(["shoe", "dress"])
    story = await browser.story()
    assert "the shopper viewed Trail Shoe" in story
    assert "the shopper viewed Summer Dress" in story
    assert "journey ended: emailed" in story
    assert not any(browser.email in line for line in story)


@pytest.mark.parametrize("cart_event", ["Product Added", "Cart Viewed", "Checkout Started"])
async def test_a_cart_event_ends_it_with_no_email_and_the_cart_journey_takes_over(
    browser: Browser, cart_event: str
) -> None:
    await browser.view(DRESS)
    await browser.skip(HOUR)
    started = await browser.route(cart_event, products=[{**DRESS, "quantity": 1}], **DRESS)
    assert started == ["cart-abandonment"]
    assert await browser.outcome() == "carted"
    await waiting(browser.handle("cart-abandonment"))
    await browser.skip(5 * HOUR)
    assert browser.emails() == []  # no browse email, and the cart email waits its day
    cart = await browser.handle("cart-abandonment").describe()
    assert cart.status is not None and cart.status.name == "RUNNING"


async def test_an_order_ends_it_with_no_email(browser: Browser) -> None:
    await browser.view(DRESS)
    await browser.skip(2 * HOUR)
    await browser.route("Order Completed", order_id="o-new", total=49, currency="USD")
    assert await browser.outcome() == "purchased"
    await browser.skip(5 * HOUR)
    assert browser.emails() == []


async def test_at_most_one_browse_email_a_week(browser: Browser) -> None:
    await browser.view(DRESS)
    await browser.skip(4 * HOUR + timedelta(minutes=1))
    assert await browser.outcome() == "emailed"
    await browser.skip(3 * DAY)
    await browser.view(SHOE)  # three days later: browsed again, and left again
    await browser.skip(4 * HOUR + timedelta(minutes=1))
    assert await browser.outcome() == "not_reentered"
    assert len(browser.emails()) == 1
    story = await browser.story()
    assert any(line.startswith("no browse email: the shopper got one on") for line in story), story
    assert any(line.endswith(", and gets one at most every 7 days") for line in story)
    await browser.skip(4 * DAY)
    await browser.view(SHOE)  # more than a week after the first email
    await browser.skip(4 * HOUR + timedelta(minutes=1))
    assert await browser.outcome() == "emailed"
    assert [m["Subject"] for m in browser.emails()][1] == "Still thinking about Trail Shoe?"


async def test_a_browse_that_ended_in_a_cart_does_not_use_up_the_week(browser: Browser) -> None:
    await browser.view(DRESS)
    await browser.route("Product Added", **DRESS)
    assert await browser.outcome() == "carted"
    await waiting(browser.handle("cart-abandonment"))  # its cart email waits a day
    await browser.view(SHOE)
    await browser.skip(4 * HOUR + timedelta(minutes=1))
    assert await browser.outcome() == "emailed"
    [email] = browser.emails()
    assert email["Subject"] == "Still thinking about Trail Shoe?"


async def test_no_second_email_on_a_topic_already_sent(browser: Browser) -> None:
    with session(browser.db) as s:
        s.add(
            EmailMessage(
                key=f"cart-abandonment-{browser.customer_id}/run/cart_email",
                message_id="<earlier@kaeru.test>",
                customer_id=browser.customer_id,
                journey_id=f"cart-abandonment-{browser.customer_id}",
                step="cart_email",
                to_address=browser.email,
                subject="Still thinking about Summer Dress?",
                status="sent",
                topic=products_topic(["dress"]),
            )
        )
        s.commit()
    await browser.view(DRESS)
    await browser.skip(4 * HOUR + timedelta(minutes=1))
    assert await browser.outcome() == "skipped"
    assert browser.emails() == []


async def test_a_shopper_without_an_email_address_gets_nothing(browser: Browser) -> None:
    with session(browser.db) as s:
        customer = s.get(Customer, browser.customer_id)
        assert customer is not None
        customer.email = None
        s.add(customer)
        s.commit()
    await browser.view(DRESS)
    await browser.skip(4 * HOUR + timedelta(minutes=1))
    assert await browser.outcome() == "no_email_address"
    assert browser.smtp.messages == []


async def test_views_without_a_product_id_send_nothing(browser: Browser) -> None:
    await browser.view({"name": "Something"})
    await browser.skip(4 * HOUR + timedelta(minutes=1))
    assert await browser.outcome() == "nothing_viewed"
    assert browser.emails() == []


async def test_the_email_shows_the_four_newest_views_without_repeats(browser: Browser) -> None:
    for product_id in ("belt", "scarf", "sock", "dress", "shoe", "dress"):
        name, price = CATALOGUE[product_id]
        await browser.view({"product_id": product_id, "name": name, "price": price / 100})
        await browser.skip(timedelta(minutes=10))
    await browser.skip(4 * HOUR)
    assert await browser.outcome() == "emailed"
    [email] = browser.emails()
    looked = text_of(email).split("Similar products:")[0]
    shown = [name for name, _ in CATALOGUE.values() if name in looked]
    assert sorted(shown) == sorted(["Summer Dress", "Trail Shoe", "Wool Socks", "Silk Scarf"])
    assert looked.count("Summer Dress") == 1
    assert looked.index("Summer Dress") < looked.index("Trail Shoe") < looked.index("Wool Socks")


async def test_a_long_browse_continues_as_new_and_keeps_what_was_viewed(browser: Browser) -> None:
    start = JourneyInput(
        customer_id=browser.customer_id,
        settings={
            "delay": 4 * 3600.0,
            "reentry": 7 * 86400.0,
            "recommendations": 0,
            "history_limit": 20,
        },
    )
    first = JourneyEvent(1, "Product Viewed", "m-1", datetime.now(UTC), dict(DRESS))
    handle = await browser.env.client.start_workflow(
        BrowseAbandonment.run,
        start,
        id=browser.journey_id,
        task_queue=browser.settings.task_queue,
        start_signal=EVENT_SIGNAL,
        start_signal_args=[first],
        search_attributes=TypedSearchAttributes(
            Journey.start_search_attributes(browser.customer_id)
        ),
    )
    first_run = handle.result_run_id
    browser.seq = 1
    for _ in range(8):
        await browser.view(SHOE)
        await browser.skip(HOUR)
    await browser.skip(4 * HOUR)
    assert await browser.outcome() == "emailed"
    assert (await browser.handle().describe()).run_id != first_run
    [email] = browser.emails()
    assert "Summer Dress" in text_of(email) and "Trail Shoe" in text_of(email)
    assert "Similar products" not in text_of(email)  # "recommendations": 0


async def test_an_identity_merge_ends_it_merged_with_no_email(browser: Browser) -> None:
    await browser.view(DRESS)
    await browser.skip(HOUR)
    await browser.route("Identity Merged", into="u-known")
    assert await browser.outcome() == "merged"
    await browser.skip(5 * HOUR)
    assert browser.emails() == []


@activity.defn(name="recommend_products")
async def recommendations_down(wanted: RecommendInput) -> RecommendResult:
    raise ApplicationError("the recommendations database is down", non_retryable=True)


async def test_the_email_goes_out_without_similar_products_when_they_cannot_be_found(
    browser: Browser,
) -> None:
    browser.settings = make_settings(
        browser.db, smtp_port=browser.smtp.port, shop_url="https://shop.test"
    )
    async with httpx.AsyncClient() as http:
        real = {fn.__name__: fn for fn in activities_for(browser.settings, http)}
        activities = [fn for name, fn in real.items() if name != "recommend_products"]
        worker = Worker(
            browser.env.client,
            task_queue=browser.settings.task_queue,
            workflows=list(workflows()),
            activities=[*activities, recommendations_down],
            workflow_runner=SandboxedWorkflowRunner(
                restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
            ),
        )
        async with worker:
            await browser.view(DRESS)
            await browser.skip(4 * HOUR + timedelta(minutes=1))
            assert await browser.outcome() == "emailed"
    [email] = browser.emails()
    assert "Summer Dress" in text_of(email)
    assert "Similar products" not in text_of(email) and "Leather Belt" not in text_of(email)


def test_the_journey_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [d.route.kind for d in deliveries("Product Viewed", "c-1", DRESS) if d.start] == [
        "browse-abandonment"
    ]
    monkeypatch.setenv("KAERU_BROWSE_ENABLED", "false")
    registry.cache_clear()
    assert [d for d in deliveries("Product Viewed", "c-1", DRESS) if d.start] == []
    # A live journey still hears what ends it.
    found = {(d.route.kind, d.start) for d in deliveries("Product Added", "c-1", DRESS)}
    assert found == {("browse-abandonment", False), ("cart-abandonment", True)}


def test_its_waits_are_settings_read_as_seconds_or_iso_8601(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    defaults = registry().route("browse-abandonment").journey_settings
    assert (defaults.delay, defaults.reentry, defaults.recommendations) == (14400.0, 604800.0, 3)
    monkeypatch.setenv("KAERU_BROWSE_DELAY", "3600")
    monkeypatch.setenv("KAERU_BROWSE_REENTRY", "P3D")
    monkeypatch.setenv("KAERU_BROWSE_RECOMMENDATIONS", "0")
    read = load_registry(Settings(_env_file=None)).route("browse-abandonment").journey_settings
    assert (read.delay, read.reentry, read.recommendations) == (3600.0, 3 * 86400.0, 0)
    monkeypatch.setenv("KAERU_BROWSE_RECOMMENDATIONS", "13")
    with pytest.raises(JourneyError, match="KAERU_BROWSE_RECOMMENDATIONS"):
        load_registry(Settings(_env_file=None))
