"""The kaeru worker: registers every journey and activity. ``kaeru worker`` runs it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import httpx
from temporalio import activity, workflow
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
)
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Interceptor, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.ads import AudienceActivities
from activities.audience_sync import AudienceSyncActivities
from activities.conversions import ConversionActivities
from activities.coupons import CouponActivities
from activities.email import EmailActivities
from activities.entries import EntryActivities
from activities.experiments import ExperimentActivities
from activities.recommendations import RecommendationActivities
from activities.reports import ReportActivities, ReportScheduleInput
from activities.send_gate import SendGateActivities
from activities.types import FlushInput, PromoteInput, RefreshInput, SweepInput
from kaeru.db import migrate
from kaeru.journeys import registry
from kaeru.kill_switch import JourneyKind, KillSwitchGate, SwitchReader
from kaeru.settings import Settings
from kaeru.telemetry import NO_TELEMETRY, Telemetry
from workflows.audience_flusher import FLUSHER_ID, AudienceFlusher
from workflows.audience_sweeper import SWEEPER_ID, AudienceSweeper
from workflows.experiment_promoter import PROMOTER_ID, ExperimentPromoter
from workflows.recommendations_refresh import REFRESH_ID, RecommendationsRefresh
from workflows.report import REPORT_SCHEDULE_ID, OperatorReport

log = logging.getLogger("kaeru.worker")

#: Pure modules the sandbox may share instead of re-importing per workflow run.
PASSTHROUGH = (
    "activities.types",
    "kaeru.commerce",
    "kaeru.holds",
    "kaeru.identity",
    "kaeru.metric_names",
    "kaeru.money",
    "kaeru.search_attributes",
    "workflows.kit",
)


def workflows() -> Sequence[type]:
    """Every journey the registry found (kaeru/journeys.py), the audience sweeper and the
    experiment promoter, the operators' report, the recommendations refresh and the audience
    flusher."""
    return [
        *registry().workflows,
        AudienceSweeper,
        AudienceFlusher,
        ExperimentPromoter,
        OperatorReport,
        RecommendationsRefresh,
    ]


def activities_for(
    settings: Settings, http: httpx.AsyncClient, telemetry: Telemetry = NO_TELEMETRY
) -> list[Callable[..., Any]]:
    """Every activity, with its clients injected once (``telemetry``: the SMTP send's span and
    the ad audience batch's)."""
    email = EmailActivities(settings, tracer=telemetry.tracer)
    ads = AudienceActivities(settings, http)
    sync = AudienceSyncActivities(settings, http, tracer=telemetry.tracer)
    recommendations = RecommendationActivities(settings)
    entries = EntryActivities(settings)
    return [
        email.send_email,
        ads.add_to_audience,
        ads.remove_from_audience,
        ads.park_audience_removal,
        ads.retry_audience_removals,
        sync.queue_audience_join,
        sync.queue_audience_leave,
        sync.confirm_audience_change,
        sync.flush_audience_changes,
        CouponActivities(settings).issue_coupon,
        recommendations.recommend_products,
        recommendations.look_up_products,
        recommendations.refresh_recommendations,
        ConversionActivities(settings).record_conversion,
        entries.claim_journey_entry,
        entries.enter_journey,
        ExperimentActivities(settings).promote_experiment_winners,
        SendGateActivities(settings).reserve_send,
        ReportActivities(settings).send_report,
    ]


def keep_workflow_ids_out_of_logs() -> None:
    """Stop Temporal's workflow and activity loggers adding the run's details to log lines.

    By default they append the workflow id to every message and put it in the record's
    ``extra`` (which a structured formatter prints), and a journey's id is
    ``<kind>-<customer id>``, often an email address: personal data stays out of logs. The
    SDK's own messages that name a workflow id ("Failed activation on workflow ... with ID
    ...") are rewritten by the logging setup's filter
    (:class:`kaeru.telemetry.WorkflowIdFilter`).
    """
    workflow.logger.workflow_info_on_message = False
    workflow.logger.workflow_info_on_extra = False
    workflow.logger.full_workflow_info_on_extra = False
    activity.logger.activity_info_on_message = False
    activity.logger.activity_info_on_extra = False
    activity.logger.full_activity_info_on_extra = False


def kill_switch_gate(settings: Settings) -> KillSwitchGate:
    """The worker's kill switch (kaeru/kill_switch.py), for every journey the registry knows."""
    journeys = {
        route.workflow_name: JourneyKind(route.kind, route.journey.transactional)
        for route in registry().routes
    }
    cache = settings.kill_switch_cache.total_seconds()
    reader = SwitchReader(settings.resolved_database_url, cache)
    return KillSwitchGate(reader, journeys)


def workflow_runner() -> SandboxedWorkflowRunner:
    """The sandbox every workflow runs in (``kaeru deploy-check`` replays in the same one)."""
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
    )


def worker_interceptors(
    settings: Settings, telemetry: Telemetry = NO_TELEMETRY
) -> list[Interceptor]:
    """The worker's interceptors (``kaeru deploy-check`` replays with the same ones)."""
    tracing = telemetry.interceptor()
    return [kill_switch_gate(settings), *([tracing] if tracing else [])]


def build_worker(
    client: Client,
    settings: Settings,
    http: httpx.AsyncClient,
    activity_executor: concurrent.futures.Executor | None = None,
    telemetry: Telemetry = NO_TELEMETRY,
) -> Worker:
    """A worker on ``settings.task_queue`` with capped concurrency (scale out by processes).

    With ``telemetry`` on, Temporal's tracing interceptor continues the trace of whatever
    started or signalled a journey into its workflow and activity spans (``http`` is
    instrumented by whoever made it: :func:`run_worker`).
    """
    keep_workflow_ids_out_of_logs()
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=list(workflows()),
        activities=activities_for(settings, http, telemetry),
        activity_executor=activity_executor,
        interceptors=worker_interceptors(settings, telemetry),
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        max_concurrent_activities=settings.max_concurrent_activities,
        # On SIGTERM (a deploy), let an email already handed to SMTP finish rather than
        # cancelling it mid-DATA, which would leave it unconfirmed.
        graceful_shutdown_timeout=timedelta(seconds=settings.smtp_timeout + 10),
        workflow_runner=workflow_runner(),
    )


async def put_schedule(
    client: Client, schedule_id: str, schedule: Schedule, *, run_when_created: bool = False
) -> None:
    """Create ``schedule_id``, or bring it in line with ``schedule`` keeping its state: every
    worker calls this at start, and one that restarts or scales out must not un-pause a
    schedule an operator paused. ``run_when_created``: its action also runs at once when the
    schedule is new (never on an update).

    Raises:
        RPCError: the server refused to create or update the schedule (schedules disabled,
            a permission missing).
    """
    try:
        await client.create_schedule(schedule_id, schedule, trigger_immediately=run_when_created)
    except ScheduleAlreadyRunningError:
        await client.get_schedule_handle(schedule_id).update(
            lambda current: ScheduleUpdate(
                schedule=dataclasses.replace(schedule, state=current.description.schedule.state)
            )
        )


async def ensure_audience_sweeper(client: Client, settings: Settings) -> None:
    """Create the audience sweeper's schedule, or bring it in line with today's settings.

    Idempotent: every worker calls it at start; the schedule id is fixed, so there is one.
    An update keeps the schedule's state (paused, its note): a worker that restarts or
    scales out must not un-pause a sweeper an operator paused.

    Raises:
        RPCError: the server refused to create or update the schedule (schedules disabled,
            a permission missing).
    """
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            AudienceSweeper.run, SweepInput(), id=SWEEPER_ID, task_queue=settings.task_queue
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=settings.audience_sweep_interval)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    await put_schedule(client, SWEEPER_ID, schedule)


async def ensure_audience_flusher(client: Client, settings: Settings) -> None:
    """Create the audience flusher's schedule, or bring it in line with today's settings.

    Idempotent and state-keeping, as :func:`ensure_audience_sweeper`.

    Raises:
        RPCError: the server refused to create or update the schedule.
    """
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            AudienceFlusher.run, FlushInput(), id=FLUSHER_ID, task_queue=settings.task_queue
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=settings.audience_flush_interval)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    await put_schedule(client, FLUSHER_ID, schedule)


async def ensure_experiment_promoter(client: Client, settings: Settings) -> None:
    """Create (or update, keeping its state: an operator's pause stays) the experiment
    promoter's schedule while ``KAERU_EXPERIMENT_AUTO_PROMOTE`` is on. Off, nothing is asked
    of the server; a schedule left from before runs but promotes nothing (the activity reads
    the setting).

    Raises:
        RPCError: the server refused to create or update the schedule.
    """
    if not settings.experiment_auto_promote:
        return
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            ExperimentPromoter.run, PromoteInput(), id=PROMOTER_ID, task_queue=settings.task_queue
        ),
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=settings.experiment_promote_every)]
        ),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    await put_schedule(client, PROMOTER_ID, schedule)


async def ensure_recommendations_refresh(client: Client, settings: Settings) -> None:
    """Create the recommendations refresh's schedule (every ``KAERU_RECOMMENDATIONS_REFRESH``),
    or bring it in line with today's settings keeping its state (an operator's pause). A new
    schedule refreshes at once, so a new install's site has answers before the first interval.

    Raises:
        RPCError: the server refused to create or update the schedule.
    """
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            RecommendationsRefresh.run,
            RefreshInput(),
            id=REFRESH_ID,
            task_queue=settings.task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=settings.recommendations_refresh)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    await put_schedule(client, REFRESH_ID, schedule, run_when_created=True)


#: Where interval schedules start counting: the Unix epoch was a Thursday, so a weekly
#: report offset by 4 days runs on Mondays at 00:00 UTC and covers Monday to Sunday.
_MONDAY = timedelta(days=4)


async def ensure_report_schedule(client: Client, settings: Settings) -> None:
    """Create the report's schedule, bring it in line with today's settings, or, with no
    ``KAERU_REPORT_TO``, delete it (no recipients: no report; a failed delete is a warning).

    Idempotent, like :func:`ensure_audience_sweeper`: the schedule id is fixed, and an update
    keeps the schedule's state (an operator's pause).

    Raises:
        RPCError: the server refused to create, update or delete the schedule.
    """
    handle = client.get_schedule_handle(REPORT_SCHEDULE_ID)
    if not settings.report_recipients:
        try:
            await handle.delete()
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                # Nothing is wanted, so nothing is lost: a namespace without schedules has no
                # old report schedule to remove either.
                log.warning(
                    "KAERU_REPORT_TO is empty, and a report schedule %r left by an earlier "
                    "setting could not be removed (%s); delete it with `temporal schedule "
                    "delete --schedule-id %s` if it exists",
                    REPORT_SCHEDULE_ID,
                    err.message,
                    REPORT_SCHEDULE_ID,
                )
        return
    every = settings.report_every
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            OperatorReport.run,
            ReportScheduleInput(every_seconds=every.total_seconds(), to=settings.report_recipients),
            id=REPORT_SCHEDULE_ID,
            task_queue=settings.task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every, offset=_MONDAY % every)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    await put_schedule(client, REPORT_SCHEDULE_ID, schedule)


#: The schedules every worker puts at start: how, their id, whose, and what goes missing
#: when the server refuses (journeys run regardless, except where it says they wait).
AUXILIARY_SCHEDULES: tuple[
    tuple[Callable[[Client, Settings], Awaitable[None]], str, str, str], ...
] = (
    (
        ensure_audience_sweeper,
        SWEEPER_ID,
        "audience sweeper's",
        "parked audience removals are not retried; journeys run regardless",
    ),
    (
        ensure_audience_flusher,
        FLUSHER_ID,
        "audience flusher's",
        "queued audience joins and leaves are not sent and journeys that add a shopper to "
        "Meta or Google wait",
    ),
    (
        ensure_experiment_promoter,
        PROMOTER_ID,
        "experiment promoter's",
        "KAERU_EXPERIMENT_AUTO_PROMOTE promotes no winner (`kaeru experiments --promote` "
        "still does); journeys run regardless",
    ),
    (
        ensure_report_schedule,
        REPORT_SCHEDULE_ID,
        "operators' report's",
        "no report is emailed to KAERU_REPORT_TO; journeys run regardless",
    ),
    (
        ensure_recommendations_refresh,
        REFRESH_ID,
        "recommendations refresh's",
        "recommendations stay as the last refresh left them (`kaeru recommendations "
        "refresh` recomputes them); journeys run regardless",
    ),
)


async def run_worker(
    client: Client, settings: Settings, telemetry: Telemetry = NO_TELEMETRY
) -> None:
    """Run the worker until cancelled (SIGINT/SIGTERM in ``kaeru worker``)."""
    await asyncio.to_thread(migrate, settings.resolved_database_url)
    for ensure, schedule_id, what, without in AUXILIARY_SCHEDULES:
        try:
            await ensure(client, settings)
        except RPCError as err:
            # Auxiliary jobs: the worker runs journeys without them, and says what is missing.
            log.error(
                "could not create, update or delete the %s schedule %r (%s: %s), so %s. "
                "Enable schedules on namespace %r (frontend.enableSchedules) and let this "
                "worker's credentials manage schedules, then restart a worker",
                what,
                schedule_id,
                err.status.name if err.status is not None else "unknown status",
                err.message,
                without,
                client.namespace,
            )
    async with httpx.AsyncClient(timeout=30.0) as http:
        telemetry.instrument_http(http)
        worker = build_worker(client, settings, http, telemetry=telemetry)
        log.info("worker polling task queue %r", settings.task_queue)
        await worker.run()
