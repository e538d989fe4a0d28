"""The recommendations refresh: recomputes the precomputed recommendations on a schedule.

A Temporal Schedule (``ensure_recommendations_refresh`` in worker.py, created or updated at
every worker start) runs this workflow every ``KAERU_RECOMMENDATIONS_REFRESH``; its one
activity replaces the tables of :mod:`kaeru.recommendations` in one transaction.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.types import RefreshInput, RefreshResult

#: The schedule's id and the id of the workflow it starts (one refresh at a time).
REFRESH_ID = "kaeru-recommendations-refresh"


@workflow.defn(name="RecommendationsRefresh")
class RecommendationsRefresh:
    @workflow.run
    async def run(self, wanted: RefreshInput) -> RefreshResult:
        result: RefreshResult = await workflow.execute_activity(
            "refresh_recommendations",
            wanted,
            result_type=RefreshResult,
            start_to_close_timeout=timedelta(minutes=30),
            # The next scheduled run tries again: no need to retry for long here.
            retry_policy=RetryPolicy(maximum_attempts=3),
        )
        return result
