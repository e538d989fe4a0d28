"""The scheduled report: one run per period, built, stored and emailed to the operators.

Not a journey (no customer, no kit): a plain workflow the worker registers. A Temporal Schedule
(:func:`worker.ensure_report_schedule`, called when a worker starts) starts it every
``KAERU_REPORT_EVERY`` while ``KAERU_REPORT_TO`` names operators. Each run covers the period
that ends at the schedule's action time, and that time is the key that makes the run
idempotent (``activities/reports.py``): a retried or repeated run emails nothing twice.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.reports import ReportScheduleInput, SendReportInput, SendReportResult

#: The schedule's id, and the prefix of the id of every run it starts.
REPORT_SCHEDULE_ID = "kaeru-report"
#: What the schedule sets on each run it starts: the time the action was due.
SCHEDULED_AT = SearchAttributeKey.for_datetime("TemporalScheduledStartTime")


@workflow.defn(name="OperatorReport")
class OperatorReport:
    @workflow.run
    async def run(self, start: ReportScheduleInput) -> SendReportResult:
        if start.every_seconds <= 0 or not start.to:
            raise ApplicationError(
                f"a report needs a positive period and recipients, got {start.every_seconds} s "
                f"and {len(start.to)} addresses: set KAERU_REPORT_EVERY and KAERU_REPORT_TO and "
                "restart a worker, which updates the schedule",
                type="InvalidReportInput",
                non_retryable=True,
            )
        # A run started by hand (not by the schedule) covers the period up to its own start.
        end = workflow.info().typed_search_attributes.get(SCHEDULED_AT)
        if end is None:
            end = workflow.info().start_time
        period_start = end - timedelta(seconds=start.every_seconds)
        result: SendReportResult = await workflow.execute_activity(
            "send_report",
            SendReportInput(
                key=f"report/{end.isoformat()}",
                period_start=period_start.isoformat(),
                period_end=end.isoformat(),
                to=list(start.to),
            ),
            result_type=SendReportResult,
            start_to_close_timeout=timedelta(minutes=10),
            # An SMTP relay down for a while: keep trying for about a day, then the next
            # period's run comes.
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=30),
                maximum_interval=timedelta(hours=1),
                maximum_attempts=30,
            ),
        )
        return result
