"""The experiment promoter: its run records a significant winner once, and its schedule exists
while KAERU_EXPERIMENT_AUTO_PROMOTE is on."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
from temporalio.client import ScheduleIntervalSpec
from temporalio.testing import WorkflowEnvironment

from activities.types import PromoteInput
from tests.conftest import make_settings
from tests.kaeru.test_experiments import significant_history
from tests.support.schedules import exists, pause
from worker import build_worker, ensure_experiment_promoter
from workflows.experiment_promoter import PROMOTER_ID, ExperimentPromoter


async def test_a_run_promotes_the_significant_winner_once(
    time_skipping_env: WorkflowEnvironment, database_url: str
) -> None:
    significant_history(database_url, 10, 30, at=datetime.now(UTC) - timedelta(days=6))
    settings = make_settings(database_url, experiment_min_sample=100, experiment_auto_promote=True)
    client = time_skipping_env.client
    async with httpx.AsyncClient() as http, build_worker(client, settings, http):
        runs = [
            await client.execute_workflow(
                ExperimentPromoter.run,
                PromoteInput(),
                id=f"promote-{uuid.uuid4().hex[:6]}",
                task_queue=settings.task_queue,
            )
            for _ in range(2)
        ]
    assert [r.promoted for r in runs] == [["cart-abandonment cart_subject: asks_a_question"], []]


async def test_with_the_rule_off_a_run_promotes_nothing(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str
) -> None:
    significant_history(sqlite_url, 10, 30, at=datetime.now(UTC) - timedelta(days=6))
    settings = make_settings(sqlite_url, experiment_min_sample=100)
    client = time_skipping_env.client
    async with httpx.AsyncClient() as http, build_worker(client, settings, http):
        result = await client.execute_workflow(
            ExperimentPromoter.run,
            PromoteInput(),
            id=f"promote-{uuid.uuid4().hex[:6]}",
            task_queue=settings.task_queue,
        )
    assert result.promoted == []


async def test_the_schedule_exists_while_the_rule_is_on(
    dev_server_env: WorkflowEnvironment, sqlite_url: str
) -> None:
    client = dev_server_env.client
    handle = client.get_schedule_handle(PROMOTER_ID)
    await ensure_experiment_promoter(client, make_settings(sqlite_url))  # off: no schedule
    assert not await exists(handle)
    on = make_settings(
        sqlite_url, experiment_auto_promote=True, experiment_promote_every=timedelta(hours=6)
    )
    await ensure_experiment_promoter(client, on)
    await ensure_experiment_promoter(client, on)  # a second worker starts
    try:
        await pause(handle, "paused by ops")
        later = make_settings(
            sqlite_url, experiment_auto_promote=True, experiment_promote_every=timedelta(hours=1)
        )
        await ensure_experiment_promoter(client, later)
        described = await handle.describe()
    finally:
        await handle.delete()
    assert described.schedule.spec.intervals == [ScheduleIntervalSpec(every=timedelta(hours=1))]
    assert described.schedule.action.workflow == "ExperimentPromoter"  # type: ignore[attr-defined]
    assert described.schedule.state.paused and described.schedule.state.note == "paused by ops"
