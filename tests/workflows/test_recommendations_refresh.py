"""The recommendations refresh: its schedule exists once per namespace (every worker start
puts it, keeping an operator's pause) and, new on the dev server with a worker, refreshes the
seeded tea shop's recommendations at once."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import timedelta

import httpx
from temporalio.client import ScheduleIntervalSpec
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.types import RefreshInput
from kaeru import recommendations
from kaeru.db import session
from tests.conftest import make_settings
from tests.support import tea_shop
from tests.support.schedules import pause
from worker import build_worker, ensure_recommendations_refresh
from workflows.recommendations_refresh import REFRESH_ID, RecommendationsRefresh


async def test_a_run_refreshes_the_recommendations(
    time_skipping_env: WorkflowEnvironment, database_url: str
) -> None:
    tea_shop.store(database_url)
    settings = make_settings(database_url)
    client = time_skipping_env.client
    async with httpx.AsyncClient() as http, build_worker(client, settings, http):
        result = await client.execute_workflow(
            RecommendationsRefresh.run,
            RefreshInput(),
            id=f"refresh-{uuid.uuid4().hex[:6]}",
            task_queue=settings.task_queue,
        )
    assert (result.orders, result.best_sellers) == (285, 10)
    with session(database_url) as s:
        answer = recommendations.for_products(s, ["sencha"], 3)
    assert [p.product_id for p in answer.products] == ["mug", "teapot", "kettle"]


async def test_the_schedule_is_put_once_keeps_a_pause_and_runs_the_refresh(
    dev_server_env: WorkflowEnvironment, sqlite_url: str
) -> None:
    tea_shop.store(sqlite_url)
    client = dev_server_env.client
    settings = make_settings(sqlite_url, task_queue=f"refresh-{uuid.uuid4().hex[:6]}")
    handle = client.get_schedule_handle(REFRESH_ID)
    with contextlib.suppress(RPCError):  # left by another test's worker on this server
        await handle.delete()
    await ensure_recommendations_refresh(client, settings)  # new: it refreshes at once
    await ensure_recommendations_refresh(client, settings)  # a second worker starts
    try:
        async with httpx.AsyncClient() as http, build_worker(client, settings, http):
            for _ in range(100):
                with session(sqlite_url) as s:
                    done = recommendations.last_refresh(s)
                if done is not None:
                    break
                await asyncio.sleep(0.1)
        assert done is not None and done.orders == 285
        assert (await handle.describe()).info.num_actions == 1  # the update did not run it
        await pause(handle, "paused by ops")
        later = make_settings(
            sqlite_url,
            task_queue=settings.task_queue,
            recommendations_refresh=timedelta(minutes=10),
        )
        await ensure_recommendations_refresh(client, later)
        described = await handle.describe()
    finally:
        await handle.delete()
    assert described.schedule.spec.intervals == [ScheduleIntervalSpec(every=timedelta(minutes=10))]
    assert described.schedule.action.workflow == "RecommendationsRefresh"  # type: ignore[attr-defined]
    assert described.schedule.state.paused and described.schedule.state.note == "paused by ops"
