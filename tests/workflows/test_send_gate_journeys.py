"""Real journeys through the send gate on the time-skipping server: the frequency cap across
journeys (also with two workers on one task queue), priority, quiet hours in the customer's
time zone, stale messages, a purchase during the wait, a customer who said no. Transactional
messages never ask."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlmodel import select
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.common import TypedSearchAttributes
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from kaeru.consent import set_consent
from kaeru.db import session
from kaeru.journeys import deliveries, registry
from kaeru.models import Customer, SendSlot
from kaeru.settings import Settings
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import record_histories
from worker import build_worker
from workflows.kit import EVENT_SIGNAL, Journey, JourneyEvent, JourneyResult, JourneyStatus

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
KINDS = ("welcome", "cart-abandonment", "win-back", "order-confirmation")
SHOE = {"product_id": "shoe", "name": "Trail Shoe", "price": 89.5, "quantity": 1}
ORDER = {"order_id": "o-1", "total": 10, "currency": "USD", "products": [SHOE]}


def near(at: datetime | None, expected: datetime) -> bool:
    """``at`` is ``expected`` give or take the seconds workflow tasks take on the server."""
    return at is not None and abs(at - expected) < timedelta(minutes=1)


@dataclass
class Shop:
    """Customers whose events are routed as the router routes them (the registry's
    deliveries), on workers with the gate's settings."""

    env: WorkflowEnvironment
    smtp: SMTPTestServer
    settings: Settings
    customers: list[str] = field(default_factory=list)
    seq: int = 0

    def customer(self, timezone: str | None = None, consent: bool = True) -> str:
        customer_id = f"c-{uuid.uuid4().hex[:8]}"
        with session(self.settings.resolved_database_url) as s:
            s.add(
                Customer(customer_id=customer_id, email=f"{customer_id}@x.test", timezone=timezone)
            )
            set_consent(s, customer_id, "email", consent, "api")
        self.customers.append(customer_id)
        return customer_id

    async def route(self, customer_id: str, name: str, /, **props: Any) -> None:
        self.seq += 1
        event = JourneyEvent(self.seq, name, f"m-{uuid.uuid4()}", datetime.now(UTC), props)
        for target in deliveries(name, customer_id, props):
            if target.start:
                await self.env.client.start_workflow(
                    target.route.workflow_name,
                    target.route.make_input(customer_id, self.settings),
                    id=target.workflow_id,
                    task_queue=self.settings.task_queue,
                    start_signal=EVENT_SIGNAL,
                    start_signal_args=[event],
                    search_attributes=TypedSearchAttributes(
                        Journey.start_search_attributes(customer_id)
                    ),
                )
            else:
                with contextlib.suppress(RPCError):
                    await self.env.client.get_workflow_handle(target.workflow_id).signal(
                        EVENT_SIGNAL, event
                    )

    async def signed_up(self, customer_id: str) -> None:
        await self.route(customer_id, "identify", changed_traits=["email"])

    def handle(self, kind: str, customer_id: str) -> WorkflowHandle[Any, JourneyResult]:
        return self.env.client.get_workflow_handle(
            f"{kind}-{customer_id}", result_type=JourneyResult
        )

    async def status(self, kind: str, customer_id: str) -> JourneyStatus:
        status: JourneyStatus = await self.handle(kind, customer_id).query(
            "status", result_type=JourneyStatus
        )
        return status

    async def sleep(self, delta: timedelta) -> None:
        await self.env.sleep(delta)

    def emails(self, customer_id: str) -> list[Any]:
        return [m.message for m in self.smtp.messages if f"{customer_id}@x.test" in m.rcpt_tos]

    async def wait_for_emails(self, customer_id: str, count: int) -> list[Any]:
        for _ in range(300):
            if len(self.emails(customer_id)) >= count:
                return self.emails(customer_id)
            await asyncio.sleep(0.05)
        raise AssertionError(f"{len(self.emails(customer_id))} email(s), expected {count}")

    async def waiting_for_a_slot(self, kind: str, customer_id: str) -> JourneyStatus:
        """Wait (in real time) until the journey sleeps for a send slot."""
        for _ in range(300):
            with contextlib.suppress(RPCError):
                status = await self.status(kind, customer_id)
                if status.waiting_for == "a send slot":
                    return status
            await asyncio.sleep(0.05)
        raise AssertionError(f"the {kind} journey never waited for a send slot")

    async def timer_started(self, kind: str, customer_id: str) -> None:
        """Wait (in real time) until the journey's first timer started: skipping time before
        its first task ran stalls the test server."""
        for _ in range(300):
            with contextlib.suppress(RPCError):
                history = await self.handle(kind, customer_id).fetch_history()
                if any(e.event_type == EventType.EVENT_TYPE_TIMER_STARTED for e in history.events):
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the {kind} journey never started a timer")

    async def activities(self, kind: str, customer_id: str) -> list[str]:
        history = await self.handle(kind, customer_id).fetch_history()
        return [
            e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        ]

    async def no_activity_in_flight(self) -> None:
        """Wait (in real time, a few seconds at most) until no journey of the shop runs an
        activity: one cut off by the journey's termination at teardown can keep the shared
        time-skipping server from skipping time for every later test."""
        for _ in range(100):
            busy = False
            for customer_id in self.customers:
                for kind in KINDS:
                    with contextlib.suppress(RPCError):
                        described = await self.handle(kind, customer_id).describe()
                        busy = busy or bool(described.raw_description.pending_activities)
            if not busy:
                return
            await asyncio.sleep(0.05)

    def granted(self, customer_id: str) -> list[SendSlot]:
        with session(self.settings.resolved_database_url) as s:
            return list(
                s.exec(
                    select(SendSlot)
                    .where(SendSlot.customer_id == customer_id, SendSlot.state == "granted")
                    .order_by(SendSlot.granted_at)  # type: ignore[arg-type]
                ).all()
            )

    async def took_the_slot_now(self, customer_id: str) -> None:
        """Another journey's message took today's slot (a granted row at the server's now)."""
        now = await self.env.get_current_time()
        with session(self.settings.resolved_database_url) as s:
            s.add(
                SendSlot(
                    key=f"browse-abandonment-{customer_id}/r/browse_email",
                    customer_id=customer_id,
                    kind="browse-abandonment",
                    step="browse_email",
                    priority=20,
                    channel="email",
                    state="granted",
                    wanted_at=now,
                    granted_at=now,
                )
            )


@contextlib.asynccontextmanager
async def open_shop(
    env: WorkflowEnvironment,
    database_url: str,
    smtp: SMTPTestServer,
    *,
    workers: int = 1,
    record: tuple[str, ...] = (),
    **overrides: Any,
) -> AsyncIterator[Shop]:
    """The product's gate defaults (caps 1 a day and 3 a week, consent required), quiet
    hours off unless ``overrides`` set them. ``record``: journey kinds whose history to keep
    (``KAERU_RECORD_HISTORIES``)."""
    values: dict[str, Any] = {
        "smtp_port": smtp.port,
        "unknown_consent_is_yes": False,
        "cap_per_day": 1,
        "cap_per_week": 3,
        "quiet_start": "00:00",
        "quiet_end": "00:00",
    }
    values.update(overrides)
    settings = make_settings(database_url, **values)
    registry.cache_clear()
    async with httpx.AsyncClient() as http, contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(build_worker(env.client, settings, http))
        for _ in range(workers - 1):
            # One client per worker, as two worker processes have (the SDK refuses two
            # workers of one task queue on one client).
            other = await Client.connect(
                env.client.service_client.config.target_host, namespace=env.client.namespace
            )
            await stack.enter_async_context(build_worker(other, settings, http))
        shop = Shop(env, smtp, settings)
        try:
            yield shop
        finally:
            await shop.no_activity_in_flight()
            for customer_id in shop.customers:
                for kind in record:
                    await record_histories(env.client, f"{kind}-{customer_id}")
                for kind in KINDS:
                    with contextlib.suppress(RPCError):
                        await shop.handle(kind, customer_id).terminate("test over")


@pytest.fixture
def journey_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAERU_CART_EMAIL_DELAY", "3600")
    monkeypatch.setenv("KAERU_WINBACK_AFTER", "7200")
    monkeypatch.setenv("KAERU_CART_RECOMMENDATIONS", "0")
    monkeypatch.setenv("KAERU_WINBACK_RECOMMENDATIONS", "0")


pytestmark = pytest.mark.usefixtures("journey_env")


@pytest.mark.journeys("welcome", "cart-abandonment")
async def test_a_second_marketing_email_the_same_day_waits_to_the_next_day_and_is_sent(
    time_skipping_env: WorkflowEnvironment, database_url: str, smtp: SMTPTestServer
) -> None:
    async with open_shop(
        time_skipping_env, database_url, smtp, record=("cart-abandonment",)
    ) as shop:
        c = shop.customer()
        await shop.signed_up(c)
        await shop.wait_for_emails(c, 1)  # the welcome, at once
        await shop.route(c, "Product Added", **SHOE)
        await shop.timer_started("cart-abandonment", c)
        await shop.sleep(HOUR + timedelta(minutes=5))
        status = await shop.waiting_for_a_slot("cart-abandonment", c)
        assert any("waiting for a send slot" in line for line in status.story)
        welcomed = shop.granted(c)[0].granted_at
        assert welcomed is not None and status.waiting_until == welcomed + DAY
        assert len(shop.emails(c)) == 1
        await shop.sleep(DAY)
        [_, cart] = await shop.wait_for_emails(c, 2)
        assert cart["X-Kaeru-Step"] == "cart_email"
        [_, slot] = shop.granted(c)
        assert near(slot.granted_at, welcomed + DAY)  # at the slot (the timer), not later
        # One wait is one timer and one more ask, not a loop of activities.
        names = await shop.activities("cart-abandonment", c)
        assert names.count("reserve_send") == 2 and names.count("send_email") == 1


@pytest.mark.journeys("welcome", "cart-abandonment")
async def test_a_message_that_would_wait_past_its_stale_limit_is_dropped(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    async with open_shop(time_skipping_env, sqlite_url, smtp, cap_per_week=1) as shop:
        c = shop.customer()
        await shop.signed_up(c)
        await shop.wait_for_emails(c, 1)
        await shop.route(c, "Product Added", **SHOE)
        await shop.timer_started("cart-abandonment", c)
        await shop.sleep(HOUR + timedelta(minutes=5))
        # The week's one slot is taken: the next is 7 days away, past the kit's 2 days.
        result = await shop.handle("cart-abandonment", c).result()
        assert result.outcome == "already_reminded"  # the step was skipped; the journey went on
        story = (await shop.status("cart-abandonment", c)).story
        assert any("did not send the cart email (stale)" in line for line in story)
        assert len(shop.emails(c)) == 1
        assert "send_email" not in await shop.activities("cart-abandonment", c)


@pytest.mark.journeys("welcome", "order-confirmation")
async def test_a_transactional_message_ignores_the_cap_and_quiet_hours(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    now = (await time_skipping_env.get_current_time()).astimezone(UTC)
    async with open_shop(
        time_skipping_env,
        sqlite_url,
        smtp,
        quiet_start=f"{now - HOUR:%H:%M}",
        quiet_end=f"{now + 2 * HOUR:%H:%M}",
    ) as shop:
        c = shop.customer()
        await shop.took_the_slot_now(c)  # and it is quiet hours
        await shop.signed_up(c)
        await shop.waiting_for_a_slot("welcome", c)  # a marketing message waits
        await shop.route(c, "Order Completed", **ORDER)
        result = await shop.handle("order-confirmation", c).result()
        assert result.outcome == "confirmed"
        [confirmation] = await shop.wait_for_emails(c, 1)
        assert confirmation["X-Kaeru-Step"] == "confirmation_email"
        assert "reserve_send" not in await shop.activities("order-confirmation", c)
        assert len(shop.granted(c)) == 1  # the other journey's only


@pytest.mark.journeys("cart-abandonment", "win-back")
async def test_cart_goes_before_win_back_and_win_back_gets_the_next_free_slot(
    time_skipping_env: WorkflowEnvironment,
    database_url: str,
    smtp: SMTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAERU_WINBACK_AFTER", "1800")  # it asks before the cart does
    async with open_shop(time_skipping_env, database_url, smtp) as shop:
        c = shop.customer()
        await shop.took_the_slot_now(c)
        taken = shop.granted(c)[0].granted_at
        assert taken is not None
        await shop.route(c, "Order Completed", **ORDER)  # win-back: 30 minutes without one
        await shop.route(c, "Product Added", **SHOE)  # cart: an hour untouched
        await shop.timer_started("cart-abandonment", c)
        await shop.timer_started("win-back", c)
        await shop.sleep(3 * HOUR)
        cart = await shop.waiting_for_a_slot("cart-abandonment", c)
        win_back = await shop.waiting_for_a_slot("win-back", c)
        assert near(cart.waiting_until, taken + DAY)
        assert near(win_back.waiting_until, taken + DAY)  # it asked before the cart was waiting
        # Both wake for the one slot: the cart takes it, whichever asks first.
        await shop.sleep(DAY)
        [first] = await shop.wait_for_emails(c, 1)
        assert first["X-Kaeru-Step"] == "cart_email"
        win_back = await shop.waiting_for_a_slot("win-back", c)
        assert near(win_back.waiting_until, taken + 2 * DAY)
        await shop.sleep(DAY)
        [_, second] = await shop.wait_for_emails(c, 2)
        assert second["X-Kaeru-Step"] == "winback_email"
        [_, cart_slot, win_back_slot] = shop.granted(c)
        assert cart_slot.kind == "cart-abandonment" and near(cart_slot.granted_at, taken + DAY)
        assert win_back_slot.kind == "win-back" and near(win_back_slot.granted_at, taken + 2 * DAY)


@pytest.mark.journeys("cart-abandonment", "win-back")
async def test_two_journeys_asking_at_once_on_two_workers_get_one_slot(
    dev_server_env: WorkflowEnvironment,
    database_url: str,
    smtp: SMTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the dev server (real time; two clients, as two worker processes have), so the
    shared time-skipping server keeps one client."""
    monkeypatch.setenv("KAERU_CART_EMAIL_DELAY", "1")  # both want to send a second from now
    monkeypatch.setenv("KAERU_WINBACK_AFTER", "1")
    async with open_shop(dev_server_env, database_url, smtp, workers=2) as shop:
        c = shop.customer()
        await shop.route(c, "Order Completed", **ORDER)
        await shop.route(c, "Product Added", **SHOE)
        await shop.wait_for_emails(c, 1)
        for _ in range(300):  # the other one asked too, and waits for tomorrow's slot
            kinds = ("cart-abandonment", "win-back")
            waiting = [(await shop.status(k, c)).waiting_for == "a send slot" for k in kinds]
            if any(waiting):
                break
            await asyncio.sleep(0.05)
        assert sorted(waiting) == [False, True]
        await asyncio.sleep(1.0)  # a second email, had the cap let one through, is here by now
        assert len(shop.emails(c)) == 1
        assert len(shop.granted(c)) == 1


@pytest.mark.journeys("welcome")
async def test_the_same_utc_moment_is_quiet_in_tokyo_and_not_in_new_york(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    async with open_shop(
        time_skipping_env, sqlite_url, smtp, quiet_start="21:00", quiet_end="08:00"
    ) as shop:
        now = await time_skipping_env.get_current_time()
        at_13 = now.astimezone(UTC).replace(hour=13, minute=0, second=0, microsecond=0)
        if at_13 <= now:
            at_13 += DAY
        await shop.sleep(at_13 - now)  # 22:00 in Tokyo; 08:00 (or 09:00 in summer) in New York
        tokyo = shop.customer("Asia/Tokyo")
        new_york = shop.customer("America/New_York")
        await shop.signed_up(tokyo)
        await shop.signed_up(new_york)
        await shop.wait_for_emails(new_york, 1)
        status = await shop.waiting_for_a_slot("welcome", tokyo)
        assert status.waiting_until is not None
        opens = status.waiting_until.astimezone(ZoneInfo("Asia/Tokyo"))
        assert (opens.hour, opens.minute) == (8, 0)
        assert opens - at_13 < DAY  # the next morning
        assert shop.emails(tokyo) == []
        await shop.sleep(status.waiting_until - await time_skipping_env.get_current_time())
        await shop.wait_for_emails(tokyo, 1)
        granted = shop.granted(tokyo)[0].granted_at
        assert granted is not None
        assert granted.astimezone(ZoneInfo("Asia/Tokyo")).hour == 8


@pytest.mark.journeys("cart-abandonment")
async def test_a_purchase_during_the_wait_ends_the_journey_and_nothing_is_sent(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    async with open_shop(time_skipping_env, sqlite_url, smtp) as shop:
        c = shop.customer()
        await shop.took_the_slot_now(c)
        await shop.route(c, "Product Added", **SHOE)
        await shop.timer_started("cart-abandonment", c)
        await shop.sleep(HOUR + timedelta(minutes=5))
        await shop.waiting_for_a_slot("cart-abandonment", c)
        await shop.route(c, "Order Completed", **ORDER)
        result = await shop.handle("cart-abandonment", c).result()
        assert result.outcome == "purchased"
        await shop.sleep(2 * DAY)
        assert shop.emails(c) == []
        assert "send_email" not in await shop.activities("cart-abandonment", c)


@pytest.mark.journeys("welcome")
async def test_a_customer_who_unsubscribed_ends_the_journey_unsubscribed(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    async with open_shop(time_skipping_env, sqlite_url, smtp) as shop:
        c = shop.customer(consent=False)
        await shop.signed_up(c)
        result = await shop.handle("welcome", c).result()
        assert result.outcome == "unsubscribed"
        story = (await shop.status("welcome", c)).story
        assert any("unsubscribed from email marketing" in line for line in story)
        assert shop.emails(c) == []
        assert "send_email" not in await shop.activities("welcome", c)


@pytest.mark.journeys("cart-abandonment", "win-back")
async def test_kaeru_winback_priority_puts_win_back_first(
    time_skipping_env: WorkflowEnvironment,
    sqlite_url: str,
    smtp: SMTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAERU_WINBACK_AFTER", "1800")
    monkeypatch.setenv("KAERU_WINBACK_PRIORITY", "5")
    assert registry().route("win-back").priority == 5
    async with open_shop(time_skipping_env, sqlite_url, smtp) as shop:
        c = shop.customer()
        await shop.took_the_slot_now(c)
        await shop.route(c, "Order Completed", **ORDER)
        await shop.route(c, "Product Added", **SHOE)
        await shop.timer_started("cart-abandonment", c)
        await shop.timer_started("win-back", c)
        await shop.sleep(3 * HOUR)
        await shop.waiting_for_a_slot("cart-abandonment", c)
        await shop.sleep(DAY)
        [first] = await shop.wait_for_emails(c, 1)
        assert first["X-Kaeru-Step"] == "winback_email"
        await shop.sleep(DAY)
        [_, second] = await shop.wait_for_emails(c, 2)
        assert second["X-Kaeru-Step"] == "cart_email"
        assert [(s.kind, s.priority) for s in shop.granted(c)[1:]] == [
            ("win-back", 5),
            ("cart-abandonment", 10),
        ]


def test_a_journey_kind_priority_is_a_setting_that_names_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kaeru.cli import settings_markdown
    from kaeru.journeys import JourneyError, load_registry

    assert "| `KAERU_CART_PRIORITY` | `10` |" in settings_markdown()
    assert registry().route("cart-abandonment").make_input("c-1", Settings()).priority == 10
    monkeypatch.setenv("KAERU_CART_PRIORITY", "first")
    with pytest.raises(JourneyError, match="KAERU_CART_PRIORITY='first' is not valid"):
        load_registry(Settings(_env_file=None))
