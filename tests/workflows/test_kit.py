"""The kit, proven on a journey that lives outside the ``workflows`` package
(tests/journeys/hello.py), reached only through KAERU_JOURNEY_MODULES: the worker runs it, the
registry starts it from an identify with a changed trait, its settings come from
``KAERU_TEST_HELLO_*``, its re-entry rule holds, and ``kaeru settings-table`` lists it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.common import TypedSearchAttributes
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from kaeru.cli import settings_markdown
from kaeru.db import session
from kaeru.journeys import deliveries, registry
from kaeru.models import Customer
from kaeru.settings import Settings
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer
from worker import build_worker
from workflows.kit import EVENT_SIGNAL, Journey, JourneyEvent, JourneyResult

DAY = 86400.0


@dataclass
class Subscriber:
    env: WorkflowEnvironment
    smtp: SMTPTestServer
    settings: Settings
    customer_id: str
    seq: int = 0

    @property
    def journey_id(self) -> str:
        return f"test-hello-{self.customer_id}"

    @property
    def handle(self) -> WorkflowHandle[Any, JourneyResult]:
        return self.env.client.get_workflow_handle(self.journey_id, result_type=JourneyResult)

    def event(self, name: str, **props: Any) -> JourneyEvent:
        self.seq += 1
        return JourneyEvent(self.seq, name, f"m-{uuid.uuid4()}", datetime.now(UTC), props)

    async def route(self, name: str, **props: Any) -> int:
        """Deliver an event as the router does: by the registry's deliveries and routes.
        Returns how many deliveries started a journey."""
        event = self.event(name, **props)
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

    async def signed_up(self) -> int:
        return await self.route("identify", changed_traits=["email", "name"])

    async def outcome(self, after: timedelta = timedelta(0)) -> str:
        """The journey's outcome, ``after`` this much more (skipped) time."""
        if after:
            await self.env.sleep(after)
        return (await self.handle.result()).outcome

    def emails(self) -> list[Any]:
        return [m for m in self.smtp.messages if f"{self.customer_id}@x.test" in m.rcpt_tos]

    async def sent_contexts(self) -> list[dict[str, Any]]:
        """The ``context`` of every send_email this journey's current run scheduled."""
        history = await self.handle.fetch_history()
        found = []
        for e in history.events:
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                attrs = e.activity_task_scheduled_event_attributes
                if attrs.activity_type.name == "send_email":
                    found.append(json.loads(attrs.input.payloads[0].data)["context"])
        return found


async def waiting(handle: WorkflowHandle[Any, Any]) -> None:
    """Wait (in real time) until the journey's first timer started."""
    for _ in range(200):
        history = await handle.fetch_history()
        if any(e.event_type == EventType.EVENT_TYPE_TIMER_STARTED for e in history.events):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the journey never started a timer")


@pytest.fixture
async def subscriber(
    time_skipping_env: WorkflowEnvironment,
    sqlite_url: str,
    smtp: SMTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Subscriber]:
    monkeypatch.setenv("KAERU_JOURNEY_MODULES", "tests.journeys.hello")
    monkeypatch.setenv("KAERU_TEST_HELLO_ENABLED", "1")
    monkeypatch.setenv("KAERU_CART_ENABLED", "false")  # these tests route no cart journey
    monkeypatch.setenv("KAERU_TEST_HELLO_DELAY", "PT2H")
    registry.cache_clear()
    settings = make_settings(sqlite_url, smtp_port=smtp.port)
    customer_id = f"c-{uuid.uuid4().hex[:8]}"
    with session(sqlite_url) as s:
        s.add(Customer(customer_id=customer_id, email=f"{customer_id}@x.test"))
    async with httpx.AsyncClient() as http, build_worker(time_skipping_env.client, settings, http):
        one = Subscriber(time_skipping_env, smtp, settings, customer_id)
        yield one
        # A journey left running without its worker stops time skipping for later tests.
        for kind in ("test-hello", "test-receipt", "test-browse", "test-lifecycle"):
            with contextlib.suppress(RPCError):
                handle = one.env.client.get_workflow_handle(f"{kind}-{customer_id}")
                await handle.terminate("test over")
    registry.cache_clear()


async def test_a_journey_from_journey_modules_starts_on_a_new_email_with_its_own_settings(
    subscriber: Subscriber,
) -> None:
    assert await subscriber.route("identify", changed_traits=["name"]) == 0
    assert await subscriber.signed_up() == 1
    await subscriber.env.sleep(timedelta(hours=1))
    assert subscriber.emails() == []  # KAERU_TEST_HELLO_DELAY=PT2H, not the default hour
    assert await subscriber.outcome(timedelta(hours=1, minutes=1)) == "greeted"  # the welcome
    assert len(subscriber.emails()) == 1
    assert await subscriber.sent_contexts() == [{"greeting": "welcome"}]


async def test_wait_for_returns_the_event_that_came(subscriber: Subscriber) -> None:
    await subscriber.signed_up()
    await subscriber.env.sleep(timedelta(minutes=30))
    await subscriber.route("Product Viewed", product_id="p1")
    assert await subscriber.outcome() == "greeted"
    assert await subscriber.sent_contexts() == [{"greeting": "you looked around"}]


async def test_the_re_entry_rule_refuses_a_second_journey_within_a_week(
    subscriber: Subscriber,
) -> None:
    await subscriber.signed_up()
    assert await subscriber.outcome(timedelta(hours=2, minutes=1)) == "greeted"
    await subscriber.env.sleep(timedelta(days=3))
    await subscriber.signed_up()  # a changed address three days later
    assert await subscriber.outcome() == "not_reentered"
    assert len(subscriber.emails()) == 1
    await subscriber.env.sleep(timedelta(days=5))
    await subscriber.signed_up()  # more than a week after the first entry
    assert await subscriber.outcome(timedelta(hours=2, minutes=1)) == "greeted"
    assert len(subscriber.emails()) == 2


async def test_an_identity_merge_ends_any_journey_merged(subscriber: Subscriber) -> None:
    await subscriber.signed_up()
    await subscriber.env.sleep(timedelta(minutes=10))
    await subscriber.route("Identity Merged", into="u-known")
    assert await subscriber.outcome() == "merged"
    assert subscriber.emails() == []


def test_kaeru_settings_table_lists_a_journey_from_journey_modules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAERU_JOURNEY_MODULES", "tests.journeys.hello")
    table = settings_markdown()
    assert "| `KAERU_TEST_HELLO_ENABLED` | false |" in table
    assert "| `KAERU_TEST_HELLO_DELAY` | `3600` (1 hour) | wait after the sign-up" in table
    assert "| `KAERU_CART_EMAIL_DELAY` | `86400` (1 day) |" in table


async def test_a_journey_a_purchase_starts_is_not_ended_by_it(subscriber: Subscriber) -> None:
    started = await subscriber.route("Order Completed", order_id="o-7", total=10, currency="USD")
    assert started == 1  # the receipt; the hello (live or not) only hears it
    receipt = subscriber.env.client.get_workflow_handle(
        f"test-receipt-{subscriber.customer_id}", result_type=JourneyResult
    )
    assert (await receipt.result()).outcome == "sent"
    history = await receipt.fetch_history()
    scheduled = [
        e.activity_task_scheduled_event_attributes
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    # Its entry is recorded first (journey_entered), then the one message.
    assert [a.activity_type.name for a in scheduled] == ["enter_journey", "send_email"]
    send = json.loads(scheduled[1].input.payloads[0].data)
    assert send["context"] == {"order_id": "o-7"} and send["marketing"] is False


async def test_a_purchase_ends_a_journey_and_another_kinds_start_event_can_too(
    subscriber: Subscriber,
) -> None:
    browse = subscriber.env.client.get_workflow_handle(
        f"test-browse-{subscriber.customer_id}", result_type=JourneyResult
    )
    await subscriber.route("Product Viewed", product_id="p1")
    await subscriber.route("Product Added", product_id="p1")
    assert (await browse.result()).outcome == "carted"
    await subscriber.route("Product Viewed", product_id="p2")
    await subscriber.route("Order Completed", order_id="o-8", total=10, currency="USD")
    assert (await browse.result()).outcome == "purchased"
    receipt = subscriber.env.client.get_workflow_handle(
        f"test-receipt-{subscriber.customer_id}", result_type=JourneyResult
    )
    assert (await receipt.result()).outcome == "sent"  # the order also started the receipt


async def test_a_lifecycle_journey_continues_as_new_and_keeps_its_state(
    subscriber: Subscriber,
) -> None:
    life = subscriber.env.client.get_workflow_handle(
        f"test-lifecycle-{subscriber.customer_id}", result_type=JourneyResult
    )
    await subscriber.route("Signed Up")
    first_run = (await life.describe()).run_id
    await waiting(life)  # skipping time before the first task ran stalls the test server
    await subscriber.env.sleep(timedelta(days=13))
    assert (await life.result()).outcome == "turns:12"  # a dozen simulated days
    assert (await life.describe()).run_id != first_run
    history = await life.fetch_history()
    assert len(history.events) <= 30  # the last run's history only: kept small


def test_the_temporal_client_module_does_not_import_the_workflow_kit() -> None:
    code = "import sys, kaeru.temporal; print('workflows.kit' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
