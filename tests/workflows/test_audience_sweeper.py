"""Audience removals that fail for good are parked, and the sweeper's schedule retries them."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import timedelta

import pytest
from sqlmodel import select
from temporalio import activity
from temporalio.client import ScheduleIntervalSpec
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from activities.types import AUDIENCE_REJECTED, AudienceChange, AudienceTargets, SweepInput
from kaeru.db import session
from kaeru.models import AudienceJoin
from tests.conftest import _binary, make_settings
from tests.support.schedules import exists, pause
from tests.workflows.conftest import DAY, Shopper, reach_ad_audience, worker_with
from worker import ensure_audience_sweeper, run_worker
from workflows.audience_flusher import FLUSHER_ID
from workflows.audience_sweeper import SWEEPER_ID, AudienceSweeper


async def test_a_failed_removal_is_parked_and_the_sweeper_removes_it(shopper: Shopper) -> None:
    """``queue_audience_leave`` is swapped for one that fails for good."""

    @activity.defn(name="queue_audience_leave")
    async def refused(change: AudienceChange) -> AudienceTargets:
        raise ApplicationError(
            "Meta refused (HTTP 400)", type=AUDIENCE_REJECTED, non_retryable=True
        )

    async with worker_with(shopper, queue_audience_leave=refused):
        await reach_ad_audience(shopper)
        await shopper.skip(3 * DAY + 60)
        assert await shopper.outcome() == "ad_not_clicked"
        story = (await shopper.status()).story
    assert any("sweeper will try the removal again" in line for line in story)
    assert shopper.audience() == [shopper.customer_id]  # still in: the removal failed
    with session(shopper.db) as s:
        [parked] = s.exec(select(AudienceJoin)).all()
    assert parked.left_at is None and "Meta refused" in (parked.removal_error or "")

    # The schedule's run, with the real activities: the platform accepts the removal now.
    async with worker_with(shopper) as settings:
        result = await shopper.env.client.execute_workflow(
            AudienceSweeper.run,
            SweepInput(),
            id=f"sweep-{uuid.uuid4().hex[:6]}",
            task_queue=settings.task_queue,
        )
    assert (result.tried, result.removed) == (1, 1)
    assert shopper.audience() == []
    with session(shopper.db) as s:
        [swept] = s.exec(select(AudienceJoin)).all()
    assert swept.left_at is not None and swept.removal_error is None


async def test_the_sweeper_schedule_is_created_once_and_follows_the_setting(
    dev_server_env: WorkflowEnvironment, sqlite_url: str
) -> None:
    client = dev_server_env.client
    settings = make_settings(sqlite_url, audience_sweep_interval=timedelta(minutes=15))
    await ensure_audience_sweeper(client, settings)
    await ensure_audience_sweeper(client, settings)  # a second worker starts
    later = make_settings(sqlite_url, audience_sweep_interval=timedelta(minutes=5))
    await ensure_audience_sweeper(client, later)

    handle = client.get_schedule_handle(SWEEPER_ID)
    described = await handle.describe()
    await handle.delete()
    assert not await exists(handle)
    assert described.schedule.spec.intervals == [ScheduleIntervalSpec(every=timedelta(minutes=5))]
    assert described.schedule.action.workflow == "AudienceSweeper"  # type: ignore[attr-defined]


async def test_a_paused_sweeper_stays_paused_when_a_worker_starts(
    dev_server_env: WorkflowEnvironment, sqlite_url: str
) -> None:
    """An operator paused the sweeper; a worker restart or scale-out must not un-pause it."""
    client = dev_server_env.client
    settings = make_settings(sqlite_url, audience_sweep_interval=timedelta(minutes=15))
    handle = client.get_schedule_handle(SWEEPER_ID)
    await ensure_audience_sweeper(client, settings)
    try:
        await pause(handle, "Meta outage: paused by ops")
        later = make_settings(sqlite_url, audience_sweep_interval=timedelta(minutes=5))
        await ensure_audience_sweeper(client, later)  # a worker starts
        described = await handle.describe()
    finally:
        await handle.delete()
    assert described.schedule.state.paused
    assert described.schedule.state.note == "Meta outage: paused by ops"
    assert described.schedule.spec.intervals == [ScheduleIntervalSpec(every=timedelta(minutes=5))]


async def test_a_worker_polls_even_when_it_cannot_create_the_schedule(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Schedules disabled on the namespace (or a missing permission): the sweeper is an
    auxiliary job, so the worker says so loudly, with the fix, and runs every journey."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=_binary("temporal"),
        dev_server_extra_args=["--dynamic-config-value", "frontend.enableSchedules=false"],
    )
    try:
        settings = make_settings(sqlite_url)
        worker = asyncio.create_task(run_worker(env.client, settings))
        try:
            result = await env.client.execute_workflow(
                AudienceSweeper.run,
                SweepInput(),
                id=f"sweep-{uuid.uuid4().hex[:6]}",
                task_queue=settings.task_queue,
                execution_timeout=timedelta(seconds=30),
            )
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
    finally:
        await env.shutdown()
    assert (result.tried, result.removed) == (0, 0)
    failed = [
        r.getMessage()
        for r in caplog.records
        if r.name == "kaeru.worker" and r.levelname == "ERROR"
    ]
    [sweeper] = [m for m in failed if SWEEPER_ID in m]
    assert "Schedules are disabled" in sweeper
    assert "restart a worker" in sweeper
    # The recommendations refresh is auxiliary too: said, with the command that does it now.
    [refresh] = [m for m in failed if "recommendations refresh" in m]
    assert "`kaeru recommendations refresh` recomputes them" in refresh
    [flusher] = [m for m in failed if FLUSHER_ID in m]
    assert "journeys that add a shopper to Meta or Google wait" in flusher
    assert len(failed) == 3
