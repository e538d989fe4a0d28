"""The kit, proven on a journey that lives outside the ``workflows`` package
(tests/journeys/hello.py), reached only through KAERU_JOURNEY_MODULES: the worker runs it, the
registry starts it from an identify with a changed trait, its settings come from
``KAERU_TEST_HELLO_*``, its re-entry rule holds, and ``kaeru settings-table`` lists it."""

from __future__ import annotations

import contextlib
import json
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


@pytest.fixture
async def subscriber(
    time_skipping_env: WorkflowEnvironment,
    sqlite_url: str,
    smtp: SMTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Subscriber]:
    monkeypatch.setenv("KAERU_JOURNEY_MODULES", "tests.journeys.hello")
    monkeypatch.setenv("KAERU_TEST_HELLO_ENABLED", "1")
    monkeypatch.setenv("KAERU_TEST_HELLO_DELAY", "PT2H")
    registry.cache_clear()
    settings = make_settings(sqlite_url, smtp_port=smtp.port)
    customer_id = f"c-{uuid.uuid4().hex[:8]}"
    with session(sqlite_url) as s:
        s.add(Customer(customer_id=customer_id, email=f"{customer_id}@x.test"))
    async with httpx.AsyncClient() as http, build_worker(time_skipping_env.client, settings, http):
        one = Subscriber(time_skipping_env, smtp, settings, customer_id)
        yield one
        with contextlib.suppress(RPCError):
            await one.handle.terminate("test over")
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
    assert "| `KAERU_TEST_HELLO_DELAY` | `3600` (3600 s) | wait after the sign-up" in table
    assert "| `KAERU_CART_EMAIL_DELAY` | `86400` (1 day) |" in table
