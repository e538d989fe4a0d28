"""A journey whose workflow id and search attributes show a pseudonym (kaeru/pseudonyms.py), as
the router starts one for a customer id that is personal data: the kit and the activities
treat it like any other, and a hand-over to the next generation keeps showing the pseudonym.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlmodel import select
from temporalio import activity
from temporalio.client import WorkflowHandle
from temporalio.common import TypedSearchAttributes
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.audience_sync import AudienceSyncActivities
from activities.types import AudienceChange, AudienceTargets
from kaeru.db import session
from kaeru.models import Customer, EmailMessage
from kaeru.pseudonyms import ALWAYS, visible_customer_id
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import (
    DAY,
    SOCK,
    Shopper,
    reach_ad_audience,
    worker_with,
)
from worker import build_worker
from workflows.cart_abandonment import CartAbandonment, CartJourneyInput
from workflows.kit import CUSTOMER_ID, EVENT_SIGNAL, Journey, JourneyEvent, JourneyResult

KEY = b"test-pseudonym-key-0123456789abcdefghijkl"


@dataclass
class PseudonymousShopper(Shopper):
    """A shopper whose journey the router started under the pseudonym of their id."""

    @property
    def shown(self) -> str:
        return visible_customer_id(self.customer_id, KEY, ALWAYS)

    @property
    def journey_id(self) -> str:
        return f"{CartAbandonment.kind}-{self.shown}"

    @property
    def handle(self) -> WorkflowHandle[Any, Any]:
        return self.env.client.get_workflow_handle(self.journey_id, result_type=JourneyResult)

    async def deliver(self, event: JourneyEvent) -> None:
        await self.env.client.start_workflow(
            CartAbandonment.run,
            CartJourneyInput(self.customer_id, self.settings),
            id=self.journey_id,
            task_queue=self.task_queue,
            start_signal=EVENT_SIGNAL,
            start_signal_args=[event],
            search_attributes=TypedSearchAttributes(Journey.start_search_attributes(self.shown)),
        )


@pytest.fixture
async def pseudonymous(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> AsyncIterator[PseudonymousShopper]:
    settings = make_settings(sqlite_url, smtp_port=smtp.port)
    async with httpx.AsyncClient() as http, build_worker(time_skipping_env.client, settings, http):
        shopper = PseudonymousShopper(time_skipping_env, sqlite_url, smtp, settings.task_queue)
        with session(sqlite_url) as s:
            s.add(Customer(customer_id=shopper.customer_id, email=shopper.email))
        yield shopper
        with contextlib.suppress(RPCError):
            await shopper.handle.terminate("test over")


async def test_a_pseudonymous_journey_hands_over_under_its_own_id_and_pseudonym(
    pseudonymous: PseudonymousShopper,
) -> None:
    """The next generation (a cart while the journey ends) keeps the workflow id and shows the
    pseudonym, not the clear id its input carries; the steps know their journey's kind."""
    shopper = pseudonymous
    held, release = asyncio.Event(), asyncio.Event()
    real = AudienceSyncActivities(make_settings(shopper.db), http=None)  # type: ignore[arg-type]

    @activity.defn(name="queue_audience_leave")
    async def slow_removal(change: AudienceChange) -> AudienceTargets:
        held.set()
        await release.wait()
        return await real.queue_audience_leave(change)

    async with worker_with(shopper, queue_audience_leave=slow_removal):
        await reach_ad_audience(shopper)
        first_run = (await shopper.handle.describe()).run_id
        await shopper.purchase("o-1")
        await asyncio.wait_for(held.wait(), timeout=30)
        await shopper.cart("Product Added", **SOCK)  # a new cart, while the first journey ends
        release.set()
        await asyncio.sleep(0.5)
        await shopper.skip(DAY + 60)
        await shopper.wait_for_emails(2)
        described = await shopper.handle.describe()
        assert described.run_id != first_run  # the next generation, same workflow id
        assert described.typed_search_attributes.get(CUSTOMER_ID) == shopper.shown
        status = await shopper.status()
        assert status.customer_id == shopper.customer_id  # the input keeps the clear id
    [conversion] = shopper.touchpoints("conversion")
    # Counted once per journey kind, as for a journey under the clear id.
    assert conversion.order_key == f"cart-abandonment/{shopper.customer_id}/o-1"
    with session(shopper.db) as s:
        messages = list(s.exec(select(EmailMessage)))
    assert {m.journey_id for m in messages} == {shopper.journey_id}
    assert shopper.customer_id not in shopper.journey_id
