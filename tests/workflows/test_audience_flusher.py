"""The audience flusher: its schedule, and its workflow running the real flush activity."""

from __future__ import annotations

import uuid
from datetime import timedelta

import httpx
from temporalio.client import ScheduleIntervalSpec
from temporalio.testing import WorkflowEnvironment

from activities.audience_sync import AudienceSyncActivities
from activities.types import AudienceChange, FlushInput
from kaeru.db import session
from kaeru.models import Customer
from tests.conftest import make_settings
from tests.support.graph_api import GraphAPIServer
from tests.workflows.conftest import Shopper, worker_with
from worker import ensure_audience_flusher
from workflows.audience_flusher import FLUSHER_ID, AudienceFlusher


async def test_the_flusher_schedule_is_created_once_and_follows_the_setting(
    dev_server_env: WorkflowEnvironment, sqlite_url: str
) -> None:
    client = dev_server_env.client
    settings = make_settings(sqlite_url, audience_flush_interval=timedelta(seconds=30))
    await ensure_audience_flusher(client, settings)
    await ensure_audience_flusher(client, settings)  # a second worker starts
    later = make_settings(sqlite_url, audience_flush_interval=timedelta(seconds=10))
    await ensure_audience_flusher(client, later)

    described = await client.get_schedule_handle(FLUSHER_ID).describe()
    await client.get_schedule_handle(FLUSHER_ID).delete()
    assert described.schedule.spec.intervals == [ScheduleIntervalSpec(every=timedelta(seconds=10))]
    assert described.schedule.action.workflow == "AudienceFlusher"  # type: ignore[attr-defined]


async def test_a_flusher_run_sends_the_queued_joins_in_one_request(shopper: Shopper) -> None:
    with GraphAPIServer() as graph:
        meta = {
            "meta_graph_url": graph.url,
            "meta_access_token": graph.token,
            "meta_audience_id": graph.audience_id,
        }
        settings = make_settings(shopper.db, **meta)
        with session(shopper.db) as s:
            for i in range(3):
                s.add(Customer(customer_id=f"f{i}", email=f"f{i}@example.com"))
        async with httpx.AsyncClient() as http:
            sync = AudienceSyncActivities(settings, http)
            for i in range(3):
                journey = f"cart-abandonment-f{i}"
                await sync.queue_audience_join(
                    AudienceChange(f"{journey}/r/ad", journey, "ad", f"f{i}", "cart-retargeting")
                )
            # The worker's flush is the real activity, pointed at the loopback Graph API.
            flush = sync.flush_audience_changes
            async with worker_with(shopper, flush_audience_changes=flush) as worker_settings:
                result = await shopper.env.client.execute_workflow(
                    AudienceFlusher.run,
                    FlushInput(),
                    id=f"flush-{uuid.uuid4().hex[:6]}",
                    task_queue=worker_settings.task_queue,
                )
    assert (result.batches, result.applied) == (1, 3)
    assert len(graph.requests) == 1 and len(graph.member_hashes()) == 3
