"""The audience flusher: sends queued audience joins and leaves to the ad platforms in batches.

Journeys queue their changes (``queue_audience_join``, ``queue_audience_leave``); a Temporal
Schedule (:func:`worker.ensure_audience_flusher`, which the worker calls at start) runs this
workflow every ``KAERU_AUDIENCE_FLUSH_INTERVAL``, one at a time. Temporal retries the flush
activity, after the ``Retry-After`` a busy platform asked for; batches already sent stay sent.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.types import FlushInput, FlushResult

#: The schedule's id and the id of the workflow it starts (one flush at a time).
FLUSHER_ID = "kaeru-audience-flusher"


@workflow.defn(name="AudienceFlusher")
class AudienceFlusher:
    @workflow.run
    async def run(self, flush: FlushInput) -> FlushResult:
        result: FlushResult = await workflow.execute_activity(
            "flush_audience_changes",
            flush,
            result_type=FlushResult,
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(minutes=2),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1),
                maximum_interval=timedelta(minutes=5),
            ),
        )
        return result
