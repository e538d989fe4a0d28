"""Order confirmation on the time-skipping server, with the real activities (SQLite and
PostgreSQL where the database is read) and a real SMTP server: events are routed as the router
routes them (kaeru.journeys.deliveries), and the tests read what the customer receives."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage as Mail
from email.message import Message
from typing import Any

import httpx
import pytest
from sqlmodel import select
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.common import TypedSearchAttributes
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from kaeru.db import session
from kaeru.journeys import JourneyError, deliveries, read_settings, registry
from kaeru.models import Customer, EmailMessage, Order, Product
from kaeru.settings import Settings
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import record_histories
from worker import build_worker
from workflows.kit import EVENT_SIGNAL, Journey, JourneyEvent, JourneyInput, JourneyResult
from workflows.order_confirmation import OrderConfirmation

pytestmark = pytest.mark.journeys("order-confirmation")

ORDER = {
    "order_id": "o-1001",
    "total": 134.6,
    "subtotal": 120.0,
    "revenue": 110.0,
    "shipping": 5.5,
    "tax": 9.1,
    "discount": 10,
    "coupon": "SPRING10",
    "currency": "EUR",
    "products": [
        {"product_id": "dress", "name": "Linen Dress", "price": 80, "quantity": 1},
        {"product_id": "belt", "name": "Leather Belt", "price": 20, "quantity": 2},
    ],
}


def body(mail: Message, subtype: str = "plain") -> str:
    assert isinstance(mail, Mail)
    part = mail.get_body(preferencelist=(subtype,))
    assert part is not None
    return str(part.get_content())


@dataclass
class Buyer:
    env: WorkflowEnvironment
    smtp: SMTPTestServer
    settings: Settings
    customer_id: str
    seq: int = 0
    started: list[str] = field(default_factory=list)

    @property
    def journey_id(self) -> str:
        return f"order-confirmation-{self.customer_id}"

    @property
    def handle(self) -> WorkflowHandle[Any, JourneyResult]:
        return self.env.client.get_workflow_handle(self.journey_id, result_type=JourneyResult)

    @property
    def db(self) -> str:
        return self.settings.resolved_database_url

    def event(self, name: str, seq: int | None = None, **props: Any) -> JourneyEvent:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return JourneyEvent(seq, name, f"m-{uuid.uuid4()}", datetime.now(UTC), props)

    async def route(self, event: JourneyEvent) -> int:
        """Deliver ``event`` as the router does; returns how many journeys it started."""
        started = 0
        for target in deliveries(event.name, self.customer_id, event.properties):
            if target.start:
                started += 1
                self.started.append(target.workflow_id)
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
                with contextlib.suppress(RPCError):
                    await self.env.client.get_workflow_handle(target.workflow_id).signal(
                        EVENT_SIGNAL, event
                    )
        return started

    async def orders(self, **props: Any) -> JourneyEvent:
        """An ``Order Completed``, stored as ingestion stores it, then routed."""
        event = self.event("Order Completed", **props)
        with session(self.db) as s:
            s.add(
                Order(
                    order_id=str(props["order_id"]),
                    customer_id=self.customer_id,
                    total_minor=0,
                    currency=str(props.get("currency", "USD")),
                    completed_at=event.occurred_at,
                )
            )
        await self.route(event)
        return event

    async def outcome(self) -> str:
        return (await self.handle.result()).outcome

    def emails(self) -> list[Message]:
        return [m.message for m in self.smtp.messages if self.address in m.rcpt_tos]

    @property
    def address(self) -> str:
        return f"{self.customer_id}@buyers.test"

    @contextlib.asynccontextmanager
    async def working(self) -> AsyncIterator[None]:
        async with httpx.AsyncClient() as http, build_worker(self.env.client, self.settings, http):
            yield


@pytest.fixture
async def buyer(
    time_skipping_env: WorkflowEnvironment,
    database_url: str,
    smtp: SMTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Buyer]:
    """A customer with an address and no worker yet (``async with buyer.working()``)."""
    monkeypatch.setenv("KAERU_CART_ENABLED", "false")  # only the order confirmation here
    registry.cache_clear()
    settings = make_settings(database_url, smtp_port=smtp.port, shop_name="Lin & Co")
    one = Buyer(time_skipping_env, smtp, settings, f"c-{uuid.uuid4().hex[:8]}")
    with session(database_url) as s:
        s.add(Customer(customer_id=one.customer_id, email=one.address))
    yield one
    # A journey left running without its worker stops time skipping for later tests.
    with contextlib.suppress(RPCError):
        await one.handle.terminate("test over")
    await record_histories(one.env.client, one.journey_id)


@pytest.fixture
async def smtp() -> AsyncIterator[SMTPTestServer]:
    async with SMTPTestServer() as server:
        yield server


async def test_an_order_gets_one_confirmation_with_items_totals_and_order_number(
    buyer: Buyer,
) -> None:
    async with buyer.working():
        await buyer.orders(**ORDER)
        assert await buyer.outcome() == "confirmed"
    [mail] = buyer.emails()
    assert mail["Subject"] == "Your order o-1001 at Lin & Co is confirmed"
    text = body(mail)
    assert "Order number: o-1001" in text
    assert "- Linen Dress: 1 x 80.00 EUR = 80.00 EUR" in text
    assert "- Leather Belt: 2 x 20.00 EUR = 40.00 EUR" in text
    assert "Subtotal: 120.00 EUR" in text
    assert "Discount (coupon SPRING10): -10.00 EUR" in text
    assert "Shipping: 5.50 EUR" in text
    assert "Tax: 9.10 EUR" in text
    assert "Total: 134.60 EUR" in text
    assert "All amounts in EUR." in text
    html = body(mail, "html")
    assert "<strong>o-1001</strong>" in html and "Leather Belt" in html
    assert "134.60 EUR" in html and "-10.00 EUR" in html
    with session(buyer.db) as s:
        [row] = s.exec(select(EmailMessage).where(EmailMessage.customer_id == buyer.customer_id))
        # Transactional, although the order (stored before the send, as ingestion stores it)
        # happened at the journey's start: a purchase check would have refused it.
        assert (row.step, row.status, row.marketing) == ("confirmation_email", "sent", False)


async def test_names_come_from_the_event_or_the_catalogue_and_a_missing_total_is_left_out(
    buyer: Buyer,
) -> None:
    with session(buyer.db) as s:
        s.add(Product(product_id="scarf", name="Silk Scarf", price_minor=3000, currency="USD"))
    async with buyer.working():
        await buyer.orders(
            order_id="o-2",
            products=[
                {"sku": "scarf", "price": 30, "quantity": 3},
                {"product_id": "pin", "name": "Enamel Pin", "price": "4.5"},
            ],
        )
        assert await buyer.outcome() == "confirmed"
    text = body(buyer.emails()[0])
    assert "- Silk Scarf: 3 x 30.00 USD = 90.00 USD" in text
    assert "- Enamel Pin: 1 x 4.50 USD = 4.50 USD" in text
    assert "Subtotal: 94.50 USD" in text  # not stated: the sum of the items
    assert "Total:" not in text and "Shipping" not in text and "Discount" not in text


async def test_two_orders_close_together_each_get_exactly_one_confirmation(
    buyer: Buyer,
) -> None:
    first = await buyer.orders(order_id="o-A", total=10, currency="USD")
    await buyer.orders(order_id="o-B", total=20, currency="USD")
    await buyer.route(first)  # the router delivering the first order again: ignored
    first_run = (await buyer.handle.describe()).run_id
    async with buyer.working():  # both orders reach the journey before its first task
        assert await buyer.outcome() == "confirmed"
        status = await buyer.handle.query(OrderConfirmation.status)
    subjects = sorted(str(m["Subject"]) for m in buyer.emails())
    assert subjects == [
        "Your order o-A at Lin & Co is confirmed",
        "Your order o-B at Lin & Co is confirmed",
    ]
    assert "Total: 20.00 USD" in body(next(m for m in buyer.emails() if "o-B" in str(m["Subject"])))
    # The second order was handed to the journey's next generation (continue-as-new).
    history = await buyer.env.client.get_workflow_handle(
        buyer.journey_id, run_id=first_run
    ).fetch_history()
    assert history.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    story = "\n".join(status.story)
    assert "another order (o-B) came: it gets its own confirmation next" in story
    assert "sent the confirmation of order o-A (sent)" in story
    assert "sent the confirmation of order o-B (sent)" in story
    assert buyer.address not in story


async def test_the_same_order_again_gets_no_second_confirmation(buyer: Buyer) -> None:
    first = await buyer.orders(order_id="o-9", total=10, currency="USD")
    await buyer.route(first)  # redelivered (same seq)
    resent = buyer.event("Order Completed", order_id="o-9", total=10, currency="USD")
    await buyer.route(resent)  # the shop sending the same order again (a new event)
    await buyer.orders(order_id="o-10", total=5, currency="USD")
    await buyer.route(buyer.event("Order Completed", order_id="o-10", total=5, currency="USD"))
    async with buyer.working():
        assert await buyer.outcome() == "confirmed"
        status = await buyer.handle.query(OrderConfirmation.status)
    assert sorted(str(m["Subject"]) for m in buyer.emails()) == [
        "Your order o-10 at Lin & Co is confirmed",
        "Your order o-9 at Lin & Co is confirmed",
    ]
    assert "order o-9 came again: it gets no second confirmation" in "\n".join(status.story)


async def test_a_next_generation_given_an_order_already_confirmed_sends_nothing(
    buyer: Buyer,
) -> None:
    """What a generation gets when the same order came again as the last one ended (held by
    the kit then, unfiltered): the remembered order ids stop a second confirmation."""
    again = buyer.event("Order Completed", order_id="o-7", total=10, currency="USD")
    async with buyer.working():
        handle = await buyer.env.client.start_workflow(
            OrderConfirmation.run,
            JourneyInput(
                customer_id=buyer.customer_id,
                generation=1,
                pending=[again],
                last_seq=again.seq - 1,
                carried={"confirmed": ["o-6", "o-7"]},
            ),
            id=buyer.journey_id,
            task_queue=buyer.settings.task_queue,
        )
        assert (await handle.result()).outcome == "already_confirmed"
        status = await handle.query(OrderConfirmation.status)
    assert buyer.emails() == []
    assert "order o-7 was already confirmed: not sent again" in "\n".join(status.story)


async def test_a_journey_started_without_an_order_sends_nothing(buyer: Buyer) -> None:
    async with buyer.working():
        handle = await buyer.env.client.start_workflow(
            OrderConfirmation.run,
            JourneyInput(customer_id=buyer.customer_id),
            id=buyer.journey_id,
            task_queue=buyer.settings.task_queue,
        )
        assert (await handle.result()).outcome == "no_order"
    assert buyer.emails() == []


async def test_a_customer_without_an_email_address_ends_no_email_address(buyer: Buyer) -> None:
    buyer.customer_id = f"c-{uuid.uuid4().hex[:8]}"
    with session(buyer.db) as s:
        s.add(Customer(customer_id=buyer.customer_id, email=None))
    async with buyer.working():
        await buyer.orders(order_id="o-3", total=10, currency="USD")
        assert await buyer.outcome() == "no_email_address"
        status = await buyer.handle.query(OrderConfirmation.status)
    assert buyer.smtp.messages == []
    assert "the shopper has no known email address" in "\n".join(status.story)


async def test_max_lines_lists_the_first_items_and_counts_the_rest(
    buyer: Buyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAERU_ORDER_CONFIRMATION_MAX_LINES", "2")
    registry.cache_clear()
    products: list[dict[str, Any]] = [
        {"product_id": f"p{i}", "name": f"Thing {i}", "price": 1} for i in range(4)
    ]
    products.append({"name": "Gift wrap", "price": 0})  # no product id: counted, not listed
    async with buyer.working():
        await buyer.orders(order_id="o-4", total=4, currency="USD", products=products)
        assert await buyer.outcome() == "confirmed"
    text = body(buyer.emails()[0])
    assert "Thing 1" in text and "Thing 2" not in text
    assert "and 3 more items" in text and "Total: 4.00 USD" in text
    assert "Subtotal" not in text  # not stated, and the listed items are not the whole order


async def test_the_journey_can_be_switched_off(
    buyer: Buyer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAERU_ORDER_CONFIRMATION_ENABLED", "false")
    registry.cache_clear()
    assert await buyer.route(buyer.event("Order Completed", order_id="o-8", total=1)) == 0
    assert buyer.started == []


def test_settings_are_read_from_the_environment_and_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    enabled, settings = read_settings(OrderConfirmation)
    assert enabled and settings.max_lines == 50
    monkeypatch.setenv("KAERU_ORDER_CONFIRMATION_MAX_LINES", "0")
    with pytest.raises(JourneyError, match="KAERU_ORDER_CONFIRMATION_MAX_LINES"):
        read_settings(OrderConfirmation)
