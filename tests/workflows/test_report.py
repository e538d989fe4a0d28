"""The operators' report: its schedule follows the settings, each run builds the report of the
period just ended, stores it and emails it once (real SMTP server, real Temporal dev server)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlmodel import select
from temporalio.client import Client, ScheduleIntervalSpec, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities.reports import (
    ReportActivities,
    ReportScheduleInput,
    SendReportInput,
    message_id,
    render_email,
)
from kaeru.db import session
from kaeru.models import StoredReport
from kaeru.settings import Settings
from tests.conftest import make_settings
from tests.support.history import KNOWN, seed_known_history
from tests.support.reports import known_report
from tests.support.schedules import exists, pause
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import record_histories
from worker import build_worker, ensure_report_schedule
from workflows.report import REPORT_SCHEDULE_ID, SCHEDULED_AT, OperatorReport

OPERATORS = "ops@shop.example, owner@shop.example"


def test_the_email_has_the_kpis_with_change_the_routes_and_the_verdicts() -> None:
    settings = make_settings("sqlite://", shop_name="Frog Shop", public_url="https://k.example")
    subject, text, html = render_email(settings, known_report())
    assert subject == (
        "Frog Shop report 2026-11-23 to 2026-11-29: 8 conversions, 459.90 EUR, 12000 JPY recovered"
    )
    lines = [line.split() for line in text.splitlines()]
    assert ["Conversions", "8", "(before", "4,", "+4", "(+100.0", "%))"] in lines
    assert (
        "Revenue recovered (EUR)" in text and "459.90 EUR  (before 200.00 EUR, +259.90 EUR)" in text
    )
    assert "email_sent → email_opened → purchase: 6 of 10 bought (60.0 %), 300.00 EUR" in text
    assert "ad_click → purchase: 0 of 4 bought (0.0 %)" in text  # the worst
    assert "cart-abandonment: subject: b wins" in text
    assert "b: 64 of 640 converted (10.0 %), lift +5.0 pp [+2.1 pp, +7.9 pp]" in text
    assert "holdout (control): 30 of 600 converted (5.0 %)\n" in text
    assert "https://k.example/dashboard?start=2026-11-23&end=2026-11-29" in text
    assert '<td>Conversion rate</td><td align="right">20.0 %</td>' in html
    assert "b wins" in html


async def test_ensure_report_schedule_follows_the_settings_and_keeps_a_pause(
    dev_server_env: WorkflowEnvironment, sqlite_url: str
) -> None:
    client = dev_server_env.client
    handle = client.get_schedule_handle(REPORT_SCHEDULE_ID)
    await ensure_report_schedule(client, make_settings(sqlite_url))  # no recipients: none
    assert not await exists(handle)

    weekly = make_settings(sqlite_url, report_to=OPERATORS)
    await ensure_report_schedule(client, weekly)
    await ensure_report_schedule(client, weekly)  # a second worker starts
    try:
        first = await handle.describe()
        await pause(handle, "paused by ops")
        daily = make_settings(sqlite_url, report_to="ops@shop.example", report_every="86400")
        await ensure_report_schedule(client, daily)
        second = await handle.describe()
    finally:
        await ensure_report_schedule(client, make_settings(sqlite_url))  # unset: deleted
    assert first.schedule.spec.intervals == [
        # The epoch was a Thursday: offset 4 days, the weekly report runs on Mondays 00:00 UTC.
        ScheduleIntervalSpec(every=timedelta(days=7), offset=timedelta(days=4))
    ]
    assert first.schedule.action.workflow == "OperatorReport"  # type: ignore[attr-defined]
    [given] = first.schedule.action.args  # type: ignore[attr-defined]
    assert given.data and b"owner@shop.example" in given.data
    assert second.schedule.state.paused and second.schedule.state.note == "paused by ops"
    assert second.schedule.spec.intervals == [ScheduleIntervalSpec(every=timedelta(days=1))]
    assert not await exists(handle)


@asynccontextmanager
async def report_worker(client: Client, settings: Settings) -> AsyncIterator[Worker]:
    async with httpx.AsyncClient() as http:
        worker = build_worker(client, settings, http)
        async with worker:
            yield worker


async def stored(settings: Settings) -> list[StoredReport]:
    with session(settings.resolved_database_url) as s:
        return list(s.exec(select(StoredReport).order_by(StoredReport.id)).all())  # type: ignore[arg-type]


async def test_the_schedule_runs_the_report_emails_operators_and_stores_it(
    dev_server_env: WorkflowEnvironment, database_url: str
) -> None:
    """The schedule is triggered on the dev server; the worker's real activity builds the
    report of the week before the action time from a history with known answers."""
    async with SMTPTestServer() as smtp:
        settings = make_settings(
            database_url,
            smtp_port=smtp.port,
            report_to=OPERATORS,
            task_queue=f"kaeru-report-{uuid.uuid4().hex[:6]}",
        )
        client = dev_server_env.client
        handle = client.get_schedule_handle(REPORT_SCHEDULE_ID)
        await ensure_report_schedule(client, settings)
        try:
            async with report_worker(client, settings):
                # The known history is stamped relative to now: it falls in the week the
                # triggered run (action time: now) covers.
                seed_known_history(settings, datetime.now(UTC) - timedelta(days=3))
                await handle.trigger()
                for _ in range(300):
                    rows = await stored(settings)
                    if rows and rows[0].emailed_at is not None and smtp.messages:
                        break
                    await asyncio.sleep(0.1)
                description = await handle.describe()
        finally:
            await ensure_report_schedule(client, make_settings(database_url))
    [row] = await stored(settings)
    [message] = smtp.messages
    assert sorted(message.rcpt_tos) == ["ops@shop.example", "owner@shop.example"]
    assert message.message["Message-ID"] == message_id(settings, row.key)
    assert message.message["Subject"] == row.subject
    [run] = description.info.recent_actions
    run_id = run.action.workflow_id  # type: ignore[attr-defined]
    await record_histories(client, run_id)
    started = await client.get_workflow_handle(run_id).describe()
    due = started.typed_search_attributes.get(SCHEDULED_AT)
    # The action time as the run carries it (whole seconds), whoever retries the run.
    assert due is not None and abs(due - run.scheduled_at) < timedelta(seconds=1)
    assert row.key == f"report/{due.isoformat()}"
    assert row.period_end == due
    assert row.period_end - row.period_start == timedelta(days=7)
    overall = row.report["kpis"]["*"]["current"]
    assert overall["entered"] == KNOWN["entered"]
    assert overall["conversions"] == KNOWN["conversions"]
    assert overall["revenue"] == KNOWN["revenue"]
    text = message.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert f"Conversions                  {KNOWN['conversions']:>16}" in text


async def test_a_report_is_stored_once_and_emailed_once_across_retries(sqlite_url: str) -> None:
    """The relay is down on the first attempt: the report is stored, the attempt fails; the
    retry sends what was stored; a repeat of the same run sends nothing."""
    async with SMTPTestServer() as smtp:
        down = make_settings(sqlite_url, smtp_port=1, report_to=OPERATORS)  # nobody listens
        up = make_settings(sqlite_url, smtp_port=smtp.port, report_to=OPERATORS)
        request = SendReportInput(
            key="report/2026-11-30T00:00:00+00:00",
            period_start="2026-11-23T00:00:00+00:00",
            period_end="2026-11-30T00:00:00+00:00",
            to=["ops@shop.example"],
        )
        env = ActivityEnvironment()
        with pytest.raises(ApplicationError, match="did not take the report"):
            await env.run(ReportActivities(down).send_report, request)
        [row] = await stored(up)
        assert row.emailed_at is None
        first = await env.run(ReportActivities(up).send_report, request)
        again = await env.run(ReportActivities(up).send_report, request)
    assert (first.emailed, again.emailed) == (True, False)
    assert first.report_id == again.report_id == row.id
    [message] = smtp.messages
    assert message.message["Subject"] == row.subject
    [row] = await stored(up)
    assert row.emailed_at is not None


async def test_a_run_with_no_recipients_fails_for_good_with_the_fix(sqlite_url: str) -> None:
    request = SendReportInput("report/x", "2026-11-23T00:00:00+00:00", "2026-11-30T00:00:00+00:00")
    with pytest.raises(ApplicationError, match="set KAERU_REPORT_TO") as caught:
        await ActivityEnvironment().run(
            ReportActivities(make_settings(sqlite_url)).send_report, request
        )
    assert caught.value.non_retryable
    assert await stored(make_settings(sqlite_url)) == []


async def test_a_run_without_recipients_or_period_fails_at_once_with_the_fix(
    dev_server_env: WorkflowEnvironment, sqlite_url: str
) -> None:
    settings = make_settings(sqlite_url, task_queue=f"kaeru-report-{uuid.uuid4().hex[:6]}")
    client = dev_server_env.client
    async with report_worker(client, settings):
        for bad in (
            ReportScheduleInput(every_seconds=604800.0),
            ReportScheduleInput(0, ["a@b.example"]),
        ):
            with pytest.raises(WorkflowFailureError) as failed:
                await client.execute_workflow(
                    OperatorReport.run,
                    bad,
                    id=f"report-{uuid.uuid4().hex[:6]}",
                    task_queue=settings.task_queue,
                    execution_timeout=timedelta(seconds=30),
                )
            assert "set KAERU_REPORT_EVERY and KAERU_REPORT_TO" in str(failed.value.cause)
    assert await stored(settings) == []
