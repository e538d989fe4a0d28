"""The audience sweeper: retries removals from ad audiences that failed for good.

A journey that cannot take the shopper out of an audience (the platform refused for hours)
parks the removal in the database. A Temporal Schedule (:func:`ensure_audience_sweeper`, which
the worker calls at start) runs this workflow every ``KAERU_AUDIENCE_SWEEP_INTERVAL``; each
run tries the parked removals that are due, and a failing one waits longer each time.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.types import SweepInput, SweepResult

#: The schedule's id and the id of the workflow it starts (one sweep at a time).
SWEEPER_ID = "kaeru-audience-sweeper"


@workflow.defn(name="AudienceSweeper")
class AudienceSweeper:
    @workflow.run
    async def run(self, sweep: SweepInput) -> SweepResult:
        result: SweepResult = await workflow.execute_activity(
            "retry_audience_removals",
            sweep,
            result_type=SweepResult,
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(minutes=2),
            # The next scheduled sweep tries again: no need to retry for long here.
            retry_policy=RetryPolicy(maximum_attempts=3),
        )
        return result
