"""The experiment promoter: applies ``KAERU_EXPERIMENT_AUTO_PROMOTE`` on a schedule.

A Temporal Schedule (``ensure_experiment_promoter`` in worker.py, created when the rule is on)
runs this workflow every ``KAERU_EXPERIMENT_PROMOTE_EVERY``; its one activity records each
experiment's significant winner (kaeru/experiments.py), once, and journeys that enter after
it give that variant to everyone.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.types import PromoteInput, PromoteResult

#: The schedule's id and the id of the workflow it starts (one run at a time).
PROMOTER_ID = "kaeru-experiment-promoter"


@workflow.defn(name="ExperimentPromoter")
class ExperimentPromoter:
    @workflow.run
    async def run(self, wanted: PromoteInput) -> PromoteResult:
        result: PromoteResult = await workflow.execute_activity(
            "promote_experiment_winners",
            wanted,
            result_type=PromoteResult,
            start_to_close_timeout=timedelta(minutes=10),
            # The next scheduled run tries again: no need to retry for long here.
            retry_policy=RetryPolicy(maximum_attempts=3),
        )
        return result
