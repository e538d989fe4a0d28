"""Stored histories of real journeys must replay on today's code.

A journey asleep for days resumes on whatever code is deployed then. If a change to a
workflow would make these histories diverge, guard it with ``workflow.patched()``; never
delete a history to make this pass. Record new ones with ``KAERU_RECORD_HISTORIES``
(docs/writing-a-journey.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from worker import PASSTHROUGH, workflows

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_there_are_histories_to_replay() -> None:
    assert len(HISTORIES) >= 3


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    # Files are named <what>@<workflow id>.json: a journey's decisions may depend on its id.
    workflow_id = path.stem.partition("@")[2] or path.stem
    history = WorkflowHistory.from_json(workflow_id, path.read_text())
    replayer = Replayer(
        workflows=list(workflows()),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
        ),
    )
    await replayer.replay_workflow(history)


async def test_a_changed_workflow_is_caught(tmp_path: Path) -> None:
    """The replay check itself can fail: a history whose recorded step differs must not pass."""
    path = next(p for p in HISTORIES if "offer_redeemed" in p.stem)
    text = path.read_text().replace('"send_email"', '"send_sms"', 1)
    history = WorkflowHistory.from_json("tampered", text)
    replayer = Replayer(
        workflows=list(workflows()),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
        ),
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is not None
