"""Win-back (workflows/win_back.py) on the time-skipping server, with the real activities
(recommendations and coupons from the database, a real SMTP server): what the customer
receives after they stop ordering, how orders set the clock back, and a simulated year."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.common import TypedSearchAttributes
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from kaeru.db import session
from kaeru.journeys import JourneyError, deliveries, registry
from kaeru.models import Customer, Order, OrderLine, Product
from kaeru.settings import Settings
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import record_histories
from worker import PASSTHROUGH, build_worker, workflows
from workflows.kit import EVENT_SIGNAL, Journey, JourneyEvent, JourneyResult
from workflows.win_back import WinBack

pytestmark = pytest.mark.journeys("win-back")

DAY = 86400.0
DRESS = {"product_id": "dress", "name": "Linen Dress", "price": 120, "quantity": 1}


@dataclass
class Buyer:
    """One customer, their events routed as the router routes them."""

    env: WorkflowEnvironment
    smtp: SMTPTestServer
    settings: Settings
    db: str
    customer_id: str
    seq: int = 0
    orders: int = 0

    @property
    def journey_id(self) -> str:
        return f"win-back-{self.customer_id}"

    @property
    def handle(self) -> WorkflowHandle[Any, JourneyResult]:
        return self.env.client.get_workflow_handle(self.journey_id, result_type=JourneyResult)

    async def route(self, name: str, **props: Any) -> int:
        """Deliver an event by the registry's deliveries; returns how many started a journey."""
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
                with contextlib.suppress(RPCError):  # none live: nothing to do
                    await self.env.client.get_workflow_handle(target.workflow_id).signal(
                        EVENT_SIGNAL, event
                    )
        return started

    async def order(self, *products: dict[str, Any]) -> None:
        self.orders += 1
        await self.route(
            "Order Completed",
            order_id=f"{self.customer_id}-o{self.orders}",
            total=120,
            currency="USD",
            products=list(products) or [DRESS],
        )
        await self.settled()

    async def settled(self) -> None:
        """Wait (in real time) until the journey has no activity or workflow task pending:
        it waits on a timer (or has closed)."""
        for _ in range(400):
            raw = (await self.handle.describe()).raw_description
            if raw.workflow_execution_info.HasField("close_time"):
                return
            if not raw.pending_activities and not raw.HasField("pending_workflow_task"):
                history = await self.handle.fetch_history()
                if history.events[-1].event_type != EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError("the journey never settled on a timer")

    async def skip(self, days: float) -> None:
        """Let ``days`` pass (skipped), in steps, so each email's sending runs in its turn."""
        left = days * DAY
        while left > 0:
            step = min(left, DAY)
            await self.env.sleep(timedelta(seconds=step))
            left -= step
            await self.settled()

    def emails(self) -> list[EmailMessage]:
        return [m.message for m in self.smtp.messages if self.email in m.rcpt_tos]

    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for m in self.emails()]

    @property
    def email(self) -> str:
        return f"{self.customer_id}@shoppers.test"

    async def status(self) -> Any:
        return await self.handle.query(WinBack.status)


def body(message: EmailMessage, kind: str = "text/plain") -> str:
    """The plain-text (or ``kind``) part of ``message``."""
    for part in message.walk():
        if part.get_content_type() == kind:
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode()
    raise AssertionError(f"no {kind} part")


def seed_shop(db: str) -> None:
    """A catalogue and other shoppers' orders that pair the dress with its belt and scarf."""
    with session(db) as s:
        for product_id, name, price in (
            ("dress", "Linen Dress", 12000),
            ("belt", "Leather Belt", 3500),
            ("scarf", "Silk Scarf", 4500),
            ("mug", "Pond Mug", 1500),
        ):
            s.add(Product(product_id=product_id, name=name, price_minor=price, currency="USD"))
        for n, lines in enumerate((["dress", "belt"], ["dress", "scarf"], ["dress", "belt"])):
            order_id = f"other-{uuid.uuid4().hex[:6]}-{n}"
            s.add(Order(order_id=order_id, customer_id="someone", total_minor=1, currency="USD"))
            for product_id in lines:
                s.add(OrderLine(order_id=order_id, product_id=product_id))


@contextlib.asynccontextmanager
async def customer_on(
    env: WorkflowEnvironment, db: str, smtp: SMTPTestServer, *, email: bool = True
) -> AsyncIterator[Buyer]:
    settings = make_settings(db, smtp_port=smtp.port)
    customer_id = f"c-{uuid.uuid4().hex[:8]}"
    with session(db) as s:
        s.add(
            Customer(
                customer_id=customer_id, email=f"{customer_id}@shoppers.test" if email else None
            )
        )
    async with httpx.AsyncClient() as http, build_worker(env.client, settings, http):
        one = Buyer(env, smtp, settings, db, customer_id)
        yield one
        # A journey left running without its worker stops time skipping for later tests.
        with contextlib.suppress(RPCError):
            await one.handle.terminate("test over")
        await record_histories(env.client, one.journey_id)


@pytest.fixture(autouse=True)
def only_win_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAERU_CART_ENABLED", "false")  # these tests route no cart journey
    registry.cache_clear()


@pytest.fixture
async def shopper(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> AsyncIterator[Buyer]:
    seed_shop(sqlite_url)
    async with customer_on(time_skipping_env, sqlite_url, smtp) as one:
        yield one


async def test_no_order_for_sixty_days_brings_we_miss_you_then_an_offer_then_silence(
    time_skipping_env: WorkflowEnvironment, database_url: str, smtp: SMTPTestServer
) -> None:
    seed_shop(database_url)
    async with customer_on(time_skipping_env, database_url, smtp) as shopper:
        await shopper.order(DRESS)
        await shopper.skip(59)
        assert shopper.emails() == []  # 59 days without an order: not yet
        await shopper.skip(1.01)
        [miss_you] = shopper.emails()
        assert miss_you["Subject"].startswith("We miss you at ")
        text = body(miss_you)
        assert "Leather Belt" in text and "Silk Scarf" in text  # bought with the dress
        assert "Linen Dress" not in text  # not what they bought
        assert "Leather Belt" in body(miss_you, "text/html")
        await shopper.skip(13.9)
        assert len(shopper.emails()) == 1  # the offer waits OFFER_DELAY (14 days)
        await shopper.skip(0.2)
        [_, offer] = shopper.emails()
        status = await shopper.status()
        code = status.details["coupon"]
        assert offer["Subject"].startswith("10.00 USD off your next order at ")
        assert code in body(offer) and "Leather Belt" in body(offer)
        assert code in body(offer, "text/html")
        await shopper.skip(200)
        assert len(shopper.emails()) == 2  # then nothing until they order again
        status = await shopper.status()
        assert status.outcome is None and status.waiting_for == "their next order"
        assert any("we miss them" in line for line in status.story)
        assert all(shopper.email not in line for line in status.story)


async def test_an_order_sets_the_clock_back(shopper: Buyer) -> None:
    await shopper.order()
    await shopper.skip(50)
    await shopper.order()
    await shopper.skip(50)
    assert shopper.emails() == []  # 100 days since the first order, 50 since the last
    await shopper.skip(10.5)
    assert shopper.subjects()[0].startswith("We miss you")


async def test_an_order_after_the_we_miss_you_email_cancels_the_offer(
    shopper: Buyer,
) -> None:
    await shopper.order()
    await shopper.skip(60.5)
    assert len(shopper.emails()) == 1
    await shopper.skip(5)
    await shopper.order()
    await shopper.skip(30)
    assert len(shopper.emails()) == 1  # no offer: they came back
    # The clock started again: the next lapse sends its own email (a key of its own, so the
    # outbox does not take it for the first one again).
    await shopper.skip(31)
    subjects = shopper.subjects()
    assert len(subjects) == 2 and all(s.startswith("We miss you") for s in subjects)
    assert (await shopper.status()).details["lapses"] == 2


async def test_a_simulated_year_of_orders_and_lapses_with_a_small_history(
    time_skipping_env: WorkflowEnvironment,
    sqlite_url: str,
    smtp: SMTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAERU_WINBACK_HISTORY_LIMIT", "100")
    registry.cache_clear()
    seed_shop(sqlite_url)
    async with customer_on(time_skipping_env, sqlite_url, smtp) as shopper:
        await shopper.order()  # day 0
        await shopper.skip(30)
        await shopper.order()  # day 30: the clock starts again
        await shopper.skip(60.5)  # day 90.5: we miss you (lapse 1)
        await shopper.skip(10)
        await shopper.order()  # day 100.5: back before the offer
        await shopper.skip(74)  # day 174.5: we miss you and the offer (lapse 2)
        await shopper.skip(26)
        await shopper.order()  # day 200.5, after the offer
        await shopper.skip(165)  # day 365.5: lapse 3 (miss you at 260.5, offer at 274.5)
        subjects = shopper.subjects()
        assert [s.split(" ")[0] for s in subjects] == ["We", "We", "10.00", "We", "10.00"]
        codes = {body(m).split("checkout:")[1].split()[0] for m in shopper.emails()[2::2]}
        assert len(codes) == 2  # each lapse's offer has a coupon of its own
        status = await shopper.status()
        assert status.details["orders"] == 4 and status.details["lapses"] == 3
        assert status.outcome is None and status.waiting_for == "their next order"
        # It continued as new to keep its history small: each run within the limit (100) and
        # one turn of its loop, though the year's events together are more than the limit.
        # Each run replays as it ran (the carried state rebuilds the same decisions).
        replayer = Replayer(
            workflows=list(workflows()),
            workflow_runner=SandboxedWorkflowRunner(
                restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
            ),
        )
        runs, run_id = [], (await shopper.handle.describe()).run_id
        while run_id:
            handle = shopper.env.client.get_workflow_handle(shopper.journey_id, run_id=run_id)
            history = await handle.fetch_history()
            await replayer.replay_workflow(history)
            runs.append(len(history.events))
            started = history.events[0].workflow_execution_started_event_attributes
            run_id = started.continued_execution_run_id
        assert len(runs) >= 2 and sum(runs) > 100 and max(runs) <= 140, runs


async def test_an_order_found_before_sending_counts_as_their_order(shopper: Buyer) -> None:
    await shopper.order()
    await shopper.skip(30)
    # An order stored by ingestion but not (yet) routed to the journey.
    with session(shopper.db) as s:
        s.add(
            Order(
                order_id="not-routed",
                customer_id=shopper.customer_id,
                total_minor=500,
                currency="USD",
                completed_at=datetime.now(UTC),
            )
        )
    await shopper.skip(30.5)
    assert shopper.emails() == []  # the email activity found the order: nothing went
    status = await shopper.status()
    assert status.outcome is None  # an order never ends win-back
    assert any("order not-routed came in" in line for line in status.story)
    await shopper.route("Order Completed", order_id="not-routed", total=5, currency="USD")
    await shopper.settled()
    await shopper.skip(59)
    assert shopper.emails() == []  # the clock started again when it was found
    await shopper.skip(1.5)
    assert shopper.subjects()[0].startswith("We miss you")
    assert (await shopper.status()).details["orders"] == 2  # the late event counted once


async def test_a_customer_without_an_email_address_ends_no_email_address(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    async with customer_on(time_skipping_env, sqlite_url, smtp, email=False) as shopper:
        await shopper.order()
        await shopper.skip(61)
        result = await shopper.handle.result()
        assert result.outcome == "no_email_address"
        assert shopper.emails() == []


async def test_an_identity_merge_ends_it_merged(shopper: Buyer) -> None:
    await shopper.order()
    await shopper.route("Identity Merged", into="u-known")
    assert (await shopper.handle.result()).outcome == "merged"
    await shopper.env.sleep(timedelta(days=61))
    assert shopper.emails() == []


def test_settings_come_from_kaeru_winback_and_it_can_be_switched_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order = {"order_id": "o-1", "total": 10, "currency": "USD"}
    monkeypatch.setenv("KAERU_WINBACK_AFTER", "P30D")
    monkeypatch.setenv("KAERU_WINBACK_OFFER_DELAY", "3600")
    registry.cache_clear()
    [target] = [
        d for d in deliveries("Order Completed", "c-1", order) if d.route.kind == "win-back"
    ]
    assert target.start and target.workflow_id == "win-back-c-1"
    assert target.route.journey_settings.after == 30 * DAY
    assert target.route.journey_settings.offer_delay == 3600.0
    monkeypatch.setenv("KAERU_WINBACK_ENABLED", "false")
    registry.cache_clear()
    found = [d for d in deliveries("Order Completed", "c-1", order) if d.route.kind == "win-back"]
    assert all(not d.start for d in found)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KAERU_WINBACK_HISTORY_LIMIT", "10"),
        ("KAERU_WINBACK_COUPON_CURRENCY", "dollars"),
        ("KAERU_WINBACK_RECOMMENDATIONS", "50"),
        ("KAERU_WINBACK_AFTER", "soon"),
    ],
)
def test_a_setting_it_cannot_use_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    registry.cache_clear()
    with pytest.raises(JourneyError, match=variable):
        deliveries("Order Completed", "c-1", {"order_id": "o-1"})
