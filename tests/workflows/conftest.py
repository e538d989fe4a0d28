"""The journey-test toolkit: a ``Shopper`` that drives one journey the way the router does.

Journeys run on Temporal's time-skipping test server with the real activities (real SMTP
server on loopback, real SQLite, local audience store and coupon provider): only time is
fast-forwarded. A test may swap one activity by its name (:func:`worker_with`), as Temporal
workflow tests do, when the point is what the journey does with that activity's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as SMTPSession
from sqlmodel import select
from temporalio.client import Client, WorkflowHandle
from temporalio.common import TypedSearchAttributes
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.audience_sync import AudienceSyncActivities
from activities.types import EntryPlan, FlushInput
from kaeru.db import session
from kaeru.models import AudienceMember, Customer, Touchpoint
from kaeru.settings import Settings
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer, _Handler
from worker import PASSTHROUGH, activities_for, build_worker, workflows
from workflows.cart_abandonment import CartAbandonment, CartJourneyInput, CartJourneySettings
from workflows.kit import EVENT_SIGNAL, Journey, JourneyEvent, JourneyResult

HOUR = 3600.0
DAY = 24 * HOUR
SETTINGS = CartJourneySettings(
    email_delay=DAY,
    open_wait=DAY,
    ad_delay=DAY,
    ad_click_wait=3 * DAY,
    offer_delay=DAY,
    offer_wait=3 * DAY,
    coupon_ttl=7 * DAY,
    cart_url="https://shop.test/cart",
)
SHOE = {"product_id": "shoe", "name": "Trail Shoe", "price": 89.5, "quantity": 1}
SOCK = {"product_id": "sock", "name": "Wool Socks", "price": 12, "quantity": 2}


@dataclass
class Shopper:
    """One customer's journey under test, driven the way the router drives it."""

    env: WorkflowEnvironment
    db: str
    smtp: SMTPTestServer
    task_queue: str
    customer_id: str = field(default_factory=lambda: f"c-{uuid.uuid4().hex[:8]}")
    seq: int = 0
    settings: CartJourneySettings = field(default_factory=lambda: SETTINGS)
    #: How the journey enters (holdout, experiments), as the router's input says; None: as
    #: journeys started before entries were recorded (no entry).
    entry: EntryPlan | None = None

    @property
    def journey_id(self) -> str:
        return f"{CartAbandonment.kind}-{self.customer_id}"

    @property
    def handle(self) -> WorkflowHandle[Any, Any]:
        return self.env.client.get_workflow_handle(self.journey_id, result_type=JourneyResult)

    def event(self, name: str, /, seq: int | None = None, **props: Any) -> JourneyEvent:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return JourneyEvent(seq, name, f"m-{uuid.uuid4()}", datetime.now(UTC), props)

    async def cart(self, name: str, /, **props: Any) -> JourneyEvent:
        """A cart event: signal-with-start, as the router sends it."""
        event = self.event(name, **props)
        await self.deliver(event)
        return event

    async def deliver(self, event: JourneyEvent) -> None:
        """Signal-with-start ``event`` as it is (a router delivering it again)."""
        await self.env.client.start_workflow(
            CartAbandonment.run,
            CartJourneyInput(self.customer_id, self.settings, entry=self.entry),
            id=self.journey_id,
            task_queue=self.task_queue,
            start_signal=EVENT_SIGNAL,
            start_signal_args=[event],
            search_attributes=TypedSearchAttributes(
                Journey.start_search_attributes(self.customer_id)
            ),
        )

    async def signal(self, name: str, /, **props: Any) -> None:
        await self.handle.signal(EVENT_SIGNAL, self.event(name, **props))

    async def purchase(self, order_id: str = "o-1", coupon: str | None = None) -> None:
        props: dict[str, Any] = {"order_id": order_id, "total": 101.5, "currency": "USD"}
        if coupon:
            props["coupon"] = coupon
        await self.signal("Order Completed", **props)

    async def message_key(self, step: str) -> str:
        """The outbox key of this journey's ``step`` email, as tracking links carry it."""
        first_run = (await self.handle.describe()).raw_description.workflow_execution_info
        return f"{self.journey_id}/{first_run.first_run_id}/{step}"

    async def opened(self, step: str = "cart_email", event: str = "Email Opened") -> None:
        key = await self.message_key(step)
        await self.signal(event, step=step, journey_id=self.journey_id, message_key=key)

    async def status(self) -> Any:
        return await self.handle.query(CartAbandonment.status)

    async def wait_for_step(self, step: str) -> None:
        """Wait (in real time, without skipping) until the journey reaches ``step``."""
        for _ in range(200):
            current = (await self.status()).step
            if current == step:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"journey stuck at {current!r}, expected {step!r}")

    async def wait_for_emails(self, count: int) -> list[Any]:
        """Wait (in real time) until the shopper has received ``count`` emails."""
        for _ in range(200):
            if len(self.emails()) >= count:
                return self.emails()
            await asyncio.sleep(0.05)
        raise AssertionError(f"the shopper got {len(self.emails())} email(s), expected {count}")

    async def skip(self, seconds: float) -> None:
        await self.env.sleep(timedelta(seconds=seconds))

    async def outcome(self) -> str:
        result = await self.handle.result()
        return str(result.outcome)

    def emails(self) -> list[Any]:
        return [m.message for m in self.smtp.messages if self.email in m.rcpt_tos]

    @property
    def email(self) -> str:
        return f"{self.customer_id}@shoppers.test"

    def audience(self) -> list[str]:
        with session(self.db) as s:
            rows = s.exec(select(AudienceMember)).all()
            return [r.customer_id for r in rows if r.customer_id == self.customer_id]

    def touchpoints(self, kind: str) -> list[Touchpoint]:
        with session(self.db) as s:
            return list(
                s.exec(
                    select(Touchpoint).where(
                        Touchpoint.customer_id == self.customer_id, Touchpoint.kind == kind
                    )
                ).all()
            )


@pytest.fixture
async def shopper(
    time_skipping_env: WorkflowEnvironment,
    sqlite_url: str,
    smtp: SMTPTestServer,
) -> AsyncIterator[Shopper]:
    settings = make_settings(sqlite_url, smtp_port=smtp.port)
    async with httpx.AsyncClient() as http:
        worker = build_worker(time_skipping_env.client, settings, http)
        async with worker:
            shopper = Shopper(time_skipping_env, sqlite_url, smtp, settings.task_queue)
            with session(sqlite_url) as s:
                s.add(Customer(customer_id=shopper.customer_id, email=shopper.email))
            yield shopper
            # A journey left running without its worker would stop the shared test server
            # from skipping time for every later test.
            with contextlib.suppress(RPCError):
                await shopper.handle.terminate("test over")
            await record_histories(shopper.env.client, shopper.journey_id)


async def record_histories(client: Client, workflow_id: str) -> None:
    """With ``KAERU_RECORD_HISTORIES=<dir>``, store the current test's journey history there
    for tests/replay (docs/writing-a-journey.md): ``<test>@<workflow id>.json`` for its latest
    run and, when it continued as new, ``<test>-first-run@<workflow id>.json`` too.

    A fixture calls it as the test ends; a test that started no such journey stores nothing.
    """
    record_to = os.environ.get("KAERU_RECORD_HISTORIES")
    if not record_to:
        return
    # pytest's documented "<node id> (<stage>)": the test's name, parameters included.
    test = os.environ["PYTEST_CURRENT_TEST"].rpartition("::")[2].rpartition(" ")[0]
    name = re.sub(r"\W+", "-", test.removeprefix("test_")).strip("-")
    try:
        description = await client.get_workflow_handle(workflow_id).describe()
    except RPCError:
        return
    first_run = description.raw_description.workflow_execution_info.first_run_id
    runs = {name: description.run_id}
    if first_run and first_run != description.run_id:
        runs[f"{name}-first-run"] = first_run
    for label, run_id in runs.items():
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        (Path(record_to) / f"{label}@{workflow_id}.json").write_text(history.to_json())


@contextlib.asynccontextmanager
async def flushing(settings: Settings) -> AsyncIterator[None]:
    """What the audience flusher's schedule does, every 0.1 s (the time-skipping server runs
    no schedules): the real flush activity."""
    async with httpx.AsyncClient() as http:
        sync = AudienceSyncActivities(settings, http)

        async def flush_now_and_then() -> None:
            while True:
                await ActivityEnvironment().run(sync.flush_audience_changes, FlushInput())
                await asyncio.sleep(0.1)

        task = asyncio.create_task(flush_now_and_then())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def reach_ad_audience(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    await shopper.opened()
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("ad_audience")
    # A join to Meta or Google waits for the flush: wait (in real time) until it is told, or
    # the journey ended (a refused join), so the test then sees the shopper in the audience.
    for _ in range(200):
        status = await shopper.status()
        if status.outcome is not None or any("added the shopper to" in x for x in status.story):
            return
        await asyncio.sleep(0.05)


async def reach_offer(shopper: Shopper) -> str:
    await reach_ad_audience(shopper)
    await shopper.signal("Ad Clicked")
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("offer_email")
    status = await shopper.status()
    return str(status.details["coupon"])


class _HoldThenRefuse(_Handler):
    """Holds the reply to DATA (while the server is stalled) before any scripted refusal."""

    async def handle_DATA(self, server: SMTP, session: SMTPSession, envelope: Envelope) -> str:
        await self.server.hold("DATA")
        return await super().handle_DATA(server, session, envelope)


class RefusingSMTPServer(SMTPTestServer):
    """The loopback SMTP server, but a stalled DATA reply may end in a refusal (554 after
    the shopper's client has sent the whole message), the window item 6 of issue 13 is about."""

    def _protocol(self) -> SMTP:
        self.connections += 1
        return SMTP(
            _HoldThenRefuse(self),
            hostname="smtp.kaeru.test",
            ident="kaeru test SMTP",
            loop=asyncio.get_running_loop(),
            auth_require_tls=self.credentials is None,
            auth_callback=self._login,
        )


@pytest.fixture
async def smtp() -> AsyncIterator[SMTPTestServer]:
    async with RefusingSMTPServer() as server:
        yield server


@contextlib.asynccontextmanager
async def worker_with(
    shopper: Shopper, task_queue: str | None = None, **replacements: Callable[..., Any]
) -> AsyncIterator[Settings]:
    """Run the journey on a worker of its own whose activities named in ``replacements`` are
    test ones (``send_email=...``): the way Temporal tests swap an activity by name.

    ``task_queue``: the queue the shopper's journey already waits on (events sent before the
    worker runs reach the journey in one workflow task).
    """
    settings = make_settings(
        shopper.db,
        smtp_port=shopper.smtp.port,
        task_queue=task_queue or f"swap-{uuid.uuid4().hex[:8]}",
    )
    shopper.task_queue = settings.task_queue
    async with httpx.AsyncClient() as http:
        real = {fn.__name__: fn for fn in activities_for(settings, http)}
        unknown = set(replacements) - set(real)
        assert not unknown, f"no activity named {unknown}"
        worker = Worker(
            shopper.env.client,
            task_queue=settings.task_queue,
            workflows=list(workflows()),
            activities=list({**real, **replacements}.values()),
            workflow_runner=SandboxedWorkflowRunner(
                restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
            ),
        )
        async with worker:
            yield settings
