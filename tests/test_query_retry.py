"""The test clients' retry of a query the SDK's deadlock detector cut short (tests/conftest.py)."""

from __future__ import annotations

import time
import uuid

import pytest
from temporalio import workflow
from temporalio.client import WorkflowQueryFailedError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

SLOW_ANSWERS: list[float] = []  # how long each of the next answers takes, in seconds


@workflow.defn(sandboxed=False)
class SlowToAnswer:
    @workflow.run
    async def run(self) -> None:
        await workflow.sleep(1)  # a journey that has ended: its query is a replay

    @workflow.query
    def answer(self) -> str:
        if SLOW_ANSWERS:
            time.sleep(SLOW_ANSWERS.pop(0))  # what a starved CI machine does to a replay
        return "here"


async def ask(env: WorkflowEnvironment) -> str:
    queue = f"slow-{uuid.uuid4().hex[:8]}"
    async with Worker(
        env.client,
        task_queue=queue,
        workflows=[SlowToAnswer],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        handle = await env.client.start_workflow(
            SlowToAnswer.run, id=f"slow-{uuid.uuid4()}", task_queue=queue
        )
        await handle.result()
        return await handle.query(SlowToAnswer.answer)


async def test_a_query_cut_by_the_deadlock_detector_is_asked_again(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    SLOW_ANSWERS[:] = [2.5]
    assert await ask(time_skipping_env) == "here"
    assert SLOW_ANSWERS == []


async def test_three_cut_answers_in_a_row_fail_the_test(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    SLOW_ANSWERS[:] = [2.5, 2.5, 2.5]
    with pytest.raises(WorkflowQueryFailedError, match="deadlock"):
        await ask(time_skipping_env)
    assert SLOW_ANSWERS == []  # asked three times
